"""`anaus lpsam adapt | train-prompter | predict` end to end with a tiny model; --help; one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from lpsam_helpers import write_phantom_dataset  # noqa: E402

from cli import app
from anaus_core.sam import save_random_sam_checkpoint

TINY = ["--set", "model.engine_heads=2", "--set", "model.engine_mlp_dim=64", "--set", "model.engine_cnn_channels=[8, 16, 16, 32]"]


@pytest.mark.parametrize("command", ["adapt", "train-prompter", "predict"])
def test_help(command):
    result = CliRunner().invoke(app, ["lpsam", command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_cli_end_to_end(tmp_path):
    runner = CliRunner()
    sam = save_random_sam_checkpoint(tmp_path / "sam.pth", "tiny", seed=0)
    data = write_phantom_dataset(tmp_path / "data", count=3, size=64)
    common = ["--data", str(data), "--sam-checkpoint", str(sam), "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    result = runner.invoke(app, ["lpsam", "adapt", *common, "--spec", "tiny", "--image-size", "64", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["lpsam", "train-prompter", *common, *TINY, "--adapter-checkpoint", str(tmp_path / "a" / "best.pt"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "pred"
    result = runner.invoke(app, ["lpsam", "predict", str(data / "img"), "--checkpoint", str(tmp_path / "p" / "last.pt"), "--sam-checkpoint", str(sam), "--out", str(out), "--png", "--threshold", "0.3", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "predictions.json").read_text())
    assert len(summary) == 3
    for record in summary:
        stored = np.load(out / f"{record['name']}.npz")
        assert stored["masks"].shape[0] == len(record["masks"]) == len(stored["ids"])
        assert [m["area"] for m in record["masks"]] == stored["masks"].reshape(len(stored["ids"]), -1).sum(1).tolist()
        assert (out / f"{record['name']}_overlay.png").is_file()
    # A stage-1 checkpoint given to predict, and a wrong base SAM: one line each, exit code 2.
    result = runner.invoke(app, ["lpsam", "predict", str(data / "img"), "--checkpoint", str(tmp_path / "a" / "last.pt"), "--sam-checkpoint", str(sam), "--out", str(out)])
    assert result.exit_code == 2 and "train-prompter" in result.output
    other = save_random_sam_checkpoint(tmp_path / "other.pth", "tiny", seed=9)
    result = runner.invoke(app, ["lpsam", "predict", str(data / "img"), "--checkpoint", str(tmp_path / "p" / "last.pt"), "--sam-checkpoint", str(other), "--out", str(out)])
    assert result.exit_code == 2 and "sha256" in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
