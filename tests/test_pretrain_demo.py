"""The README demo's pre-training step (step 4 of ``run_demo``) at a tiny size."""

from __future__ import annotations

import pytest
import torch
import torchvision

from anaus_core.train import read_metrics


@pytest.mark.slow
def test_demo_pretrains_and_writes_loss_curve(tmp_path):
    from typer.testing import CliRunner

    from cli import app, run_demo

    result = run_demo(tmp_path / "demo", count=8, size=64, progress=False, pretrain_steps=3)
    run = result["pretrain_run"]
    assert result["loss_curve"].read_bytes()[:4] == b"\x89PNG"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    resnet = torchvision.models.resnet18()
    resnet.fc = torch.nn.Identity()
    resnet.load_state_dict(torch.load(result["encoder"], weights_only=True), strict=True)
    again = CliRunner().invoke(app, ["demo", str(tmp_path / "demo"), "--count", "8", "--size", "64", "--no-progress",
                                     "--pretrain-steps", "3", "--eval-count", "0"])
    assert again.exit_code == 0, again.output
    assert "already holds the finished 3-step run" in again.output
