"""The pre-training loop on tiny synthetic shards (CPU): EMA timing, exact resume, outputs, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from typer.testing import CliRunner

from anaus_core.config import load_config
from anaus_core.errors import UserInputError
from anaus_core.optim import cosine_momentum
from anaus_core.train import PretrainConfig, load_checkpoint, pretrain, read_metrics
from anaus_core.train.trainer import make_schedule

# Small everything: 48 px synthetic images, 32 px views, K = 4, narrow heads. ResNet-18 itself
# stays the real torchvision model (the export test needs it).
TINY = {
    "data.batch_size": 4, "data.num_workers": 0, "data.shuffle_buffer": 8,
    "views.size": 32, "views.num_mask_samples": 4, "views.core_min_side": 4,
    "augment.view1.blur_kernel": 5, "augment.view2.blur_kernel": 5,
    "model.fpn_channels": 16, "model.projector_hidden_dim": 32, "model.projector_dim": 16,
    "model.predictor_hidden_dim": 32,
    "run.device": "cpu", "run.log_every": 1, "run.progress": False, "run.tensorboard": False,
    "optim.warmup_steps": 1,
}


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    from shards.synthetic import write_synthetic_store

    return write_synthetic_store(tmp_path_factory.mktemp("tiny-shards"), count=16, samples_per_shard=6, height=48, width=48)


def tiny_config(shards: Path, **overrides) -> PretrainConfig:
    return load_config(PretrainConfig, None, {**TINY, "data.shards": str(shards), **overrides})


def data_source(config: PretrainConfig):
    from cli import shard_data_source

    return shard_data_source(config)


def test_ema_updated_exactly_once_per_optimizer_step(tiny_shards, tmp_path, monkeypatch):
    from anaus_core.models import AnaUSModel
    from anaus_core.optim import LARS

    events: list[str] = []
    momenta: list[float] = []
    original_update, original_step, original_forward = AnaUSModel.update_target, LARS.step, AnaUSModel.forward

    def counting_step(self, *args, **kwargs):
        events.append("optimizer.step")
        return original_step(self, *args, **kwargs)

    def checked_update(self, momentum):
        # the EMA formula, checked on one tensor: target <- m * target + (1 - m) * online
        before = self.target_encoder.backbone.conv1.weight.detach().clone()
        online = self.online_encoder.backbone.conv1.weight.detach().clone()
        original_update(self, momentum)
        expected = momentum * before + (1 - momentum) * online
        torch.testing.assert_close(self.target_encoder.backbone.conv1.weight, expected)
        events.append("update_target")
        momenta.append(momentum)

    def counting_forward(self, *args, **kwargs):
        events.append("forward")
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(LARS, "step", counting_step)
    monkeypatch.setattr(AnaUSModel, "update_target", checked_update)
    monkeypatch.setattr(AnaUSModel, "forward", counting_forward)
    config = tiny_config(tiny_shards, **{"run.steps": 3, "optim.accumulation_steps": 2})
    result = pretrain(config, tmp_path / "run", data=data_source(config))
    assert result.steps_done == 3 and result.batches_seen == 6
    assert events == ["forward", "forward", "optimizer.step", "update_target"] * 3
    assert momenta == pytest.approx([cosine_momentum(step, 3, base=0.99) for step in range(3)])
    logged = [record["momentum"] for record in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert logged == pytest.approx(momenta)


def _losses(records):
    return [{k: v for k, v in r.items() if k.startswith("loss")} | {"step": r["step"], "lr": r["lr"]} for r in records]


@pytest.mark.parametrize("num_workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_resume_continues_with_identical_losses(tiny_shards, tmp_path, num_workers):
    # 16 samples / batch 4 = 4 steps per epoch: the 5-step run crosses an epoch boundary, and the
    # split at step 3 lands mid-epoch, so the data-stream position is exercised too.
    config = tiny_config(tiny_shards, **{"run.steps": 5, "data.num_workers": num_workers, "run.checkpoint_every": 0})
    whole = pretrain(config, tmp_path / "whole", data=data_source(config))
    first = pretrain(config, tmp_path / "split", data=data_source(config), stop_after_steps=3)
    assert first.steps_done == 3 and first.encoder_path is None
    state = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert state["step"] == 3 and state["data_state"] == {"epoch": 0, "batches_done": 3}
    assert set(state["rng"]) >= {"python", "numpy", "torch"} and state["optimizer"]["state"]
    with pytest.raises(UserInputError, match="already holds a run"):
        pretrain(config, tmp_path / "split", data=data_source(config))
    second = pretrain(config, tmp_path / "split", data=data_source(config), resume=True)
    assert second.steps_done == 5

    uninterrupted = _losses(read_metrics(tmp_path / "whole" / "metrics.jsonl"))
    resumed = _losses(read_metrics(tmp_path / "split" / "metrics.jsonl"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")] == [0, 0, 0, 0, 1]
    assert resumed == uninterrupted  # exact: same batches, same draws, same optimiser state
    whole_encoder = torch.load(whole.encoder_path, weights_only=True)
    split_encoder = torch.load(second.encoder_path, weights_only=True)
    for key in whole_encoder:
        assert torch.equal(whole_encoder[key], split_encoder[key]), key


def test_run_outputs_and_torchvision_export(tiny_shards, tmp_path):
    config = tiny_config(tiny_shards, **{"run.steps": 2, "run.tensorboard": True})
    run = tmp_path / "run"
    result = pretrain(config, run, data=data_source(config))
    assert load_config(PretrainConfig, run / "config.yaml") == config
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "loss_ana", "loss_ctx", "loss_ana_s7", "loss_ana_s56", "loss_ctx_s28", "lr", "momentum",
                "images_per_s", "data_wait_fraction", "peak_rss_mb"):
        assert key in records[0], key
    assert 0.0 <= records[0]["data_wait_fraction"] <= 1.0
    schedule = make_schedule(config, 16, 1)
    assert records[0]["lr"] == pytest.approx(0.3 * 4 / 256)  # warm-up of one step, then cosine
    assert schedule.total_steps == 2
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert any((run / "tensorboard").iterdir())
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.pt", "step-000002.pt"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_done"] == 2 and summary["world_size"] == 1

    resnet = torchvision.models.resnet18()
    missing, unexpected = resnet.load_state_dict(torch.load(result.encoder_path, weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    resnet.fc = torch.nn.Identity()
    resnet.load_state_dict(torch.load(result.encoder_path, weights_only=True), strict=True)
    fpn_state = torch.load(result.fpn_path, weights_only=True)
    assert any(key.startswith("inner_blocks") for key in fpn_state)
    # the exported weights are the online encoder of the final checkpoint
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert torch.equal(checkpoint["model"]["online_encoder.backbone.conv1.weight"], resnet.conv1.weight)


def test_cli_pretrain_resume_and_export(tiny_shards, tmp_path):
    from cli import app

    runner = CliRunner()
    config_file = tmp_path / "tiny.yaml"
    nested: dict = {}
    for dotted, value in TINY.items():
        section, key = dotted.split(".", 1)
        node = nested.setdefault(section, {})
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = value
    config_file.write_text(yaml.safe_dump(nested))
    run = tmp_path / "run"
    args = ["pretrain", "--shards", str(tiny_shards), "--out", str(run), "--config", str(config_file),
            "--steps", "2", "--batch-size", "8", "--device", "cpu", "--no-progress", "--set", "model.objective=byol"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    snapshot = load_config(PretrainConfig, run / "config.yaml")
    assert snapshot.data.batch_size == 8 and snapshot.model.objective == "byol" and snapshot.views.size == 32
    assert "loss_byol" in read_metrics(run / "metrics.jsonl")[0]
    # continue the finished run for two more steps: its own config, --steps on top
    result = runner.invoke(app, ["pretrain", "--out", str(run), "--resume", "--steps", "4"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    result = runner.invoke(app, ["export-encoder", str(run / "checkpoints" / "step-000002.pt"), str(tmp_path / "exp")])
    assert result.exit_code == 0, result.output
    exported = torch.load(tmp_path / "exp" / "encoder.pt", weights_only=True)
    step2 = load_checkpoint(run / "checkpoints" / "step-000002.pt")["model"]
    assert torch.equal(exported["layer4.1.bn2.weight"], step2["online_encoder.backbone.layer4.1.bn2.weight"])
    # user errors: one line, exit code 2
    result = runner.invoke(app, ["pretrain", "--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "r2"),
                                 "--steps", "1", "--device", "cpu"])
    assert result.exit_code == 2 and "nope" in result.output
    result = runner.invoke(app, ["export-encoder", str(tmp_path / "missing.pt"), str(tmp_path / "e")])
    assert result.exit_code == 2 and "missing.pt: checkpoint not found" in result.output


def test_pretrain_help_documents_every_option():
    from cli import app

    result = CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--shards", "--out", "--steps", "--epochs", "--batch-size", "--device", "--config", "--resume",
                   "--resume-from", "--num-workers", "--crop-size", "--masks-per-image", "--lr", "--warmup-epochs",
                   "--accumulation-steps", "--amp", "--channels-last", "--sync-batchnorm", "--seed", "--log-every",
                   "--checkpoint-every", "--progress", "--set", "--method", "--init", "--weights", "--compile"):
        assert option in result.output, option


@pytest.mark.gpu
def test_cuda_bf16_channels_last_steps(tiny_shards, tmp_path):
    config = tiny_config(tiny_shards, **{"run.steps": 3, "run.device": "cuda", "run.amp": True,
                                         "run.channels_last": True, "data.pin_memory": True})
    result = pretrain(config, tmp_path / "run", data=data_source(config))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert result.steps_done == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["cuda_peak_memory_mb"] > 0
    assert next(result.model.parameters()).device.type == "cuda"
