"""Unit tests of the trainer's independent parts: config, checkpoint I/O + RNG, metrics, plot,
schedule bookkeeping and the per-micro-batch seeds."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from anaus_core.config import ConfigError, load_config
from anaus_core.errors import UserInputError
from anaus_core.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    resolve_resume_path,
    restore_rng_state,
    save_checkpoint,
)
from anaus_core.train.config import PretrainConfig, effective_base_lr, micro_batch_size, validate_config
from anaus_core.train.metrics import MetricsWriter, WindowTimer, read_metrics
from anaus_core.train.plots import plot_loss_curve
from anaus_core.train.trainer import make_schedule, micro_step_seed


def test_config_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  batch_size: 64\n  shards: /data/s\noptim:\n  base_lr: 0.1\nrun:\n  steps: 5\n")
    config = load_config(PretrainConfig, path, {"data.batch_size": 32, "run.device": "cpu"})
    assert config.data.batch_size == 32 and config.data.shards == "/data/s"
    assert config.optim.base_lr == 0.1 and config.run.steps == 5 and config.run.device == "cpu"
    assert effective_base_lr(config) == pytest.approx(0.1 * 32 / 256)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  base_lrr: 0.1\n")
    with pytest.raises(ConfigError, match="base_lrr"):
        load_config(PretrainConfig, bad)


def test_validate_config_batch_divisibility():
    config = load_config(PretrainConfig, None, {"data.batch_size": 12, "optim.accumulation_steps": 2})
    validate_config(config, world_size=2)
    assert micro_batch_size(config, 2) == 3
    with pytest.raises(ConfigError, match="divisible"):
        validate_config(config, world_size=5)


def test_schedule_steps_epochs_and_warmup():
    config = load_config(PretrainConfig, None, {"data.batch_size": 8, "run.epochs": 2, "optim.warmup_epochs": 0.5})
    schedule = make_schedule(config, num_samples=70, world_size=1)
    assert schedule.batches_per_epoch == 8 and schedule.steps_per_epoch == 8
    assert schedule.total_steps == 16 and schedule.warmup_steps == 4
    config = load_config(PretrainConfig, None, {"data.batch_size": 8, "run.steps": 3, "optim.accumulation_steps": 2})
    schedule = make_schedule(config, num_samples=70, world_size=2)
    assert schedule.micro_batch == 2 and schedule.batches_per_epoch == 17 and schedule.steps_per_epoch == 8
    assert schedule.total_steps == 3
    with pytest.raises(UserInputError, match="fewer than one global batch"):
        make_schedule(config, num_samples=7, world_size=1)


def test_micro_step_seed_is_keyed():
    seeds = {micro_step_seed(0, s, m, r) for s in range(5) for m in range(2) for r in range(2)}
    assert len(seeds) == 20
    assert micro_step_seed(3, 7, 0, 1) == micro_step_seed(3, 7, 0, 1)


def test_rng_state_roundtrip_through_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    payload = {"format": "anaus-pretrain-checkpoint", "version": 1, "step": 4, "rng": state,
               "model": {"w": torch.ones(2)}}
    last = save_checkpoint(payload, tmp_path / "checkpoints", step=4)
    assert last.name == "last.pt" and (tmp_path / "checkpoints" / "step-000004.pt").is_file()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    loaded = load_checkpoint(last)  # weights_only=True: nothing but plain data inside
    restore_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    assert resolve_resume_path(True, tmp_path) == last
    assert resolve_resume_path(None, tmp_path) is None


@pytest.mark.gpu
def test_rng_state_restores_from_a_checkpoint_loaded_onto_cuda(tmp_path):
    # the trainer loads checkpoints with map_location=<training device>; the generator states
    # then arrive as CUDA tensors (a resumed CUDA run failed on exactly this)
    random.seed(1), np.random.seed(2), torch.manual_seed(3), torch.cuda.manual_seed_all(4)
    state = capture_rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())),
                float(torch.rand((), device="cuda")))
    last = save_checkpoint({"format": "anaus-pretrain-checkpoint", "version": 1, "step": 1,
                            "rng": state, "model": {}}, tmp_path / "checkpoints", step=1)
    random.seed(9), np.random.seed(9), torch.manual_seed(9), torch.cuda.manual_seed_all(9)
    loaded = load_checkpoint(last, map_location="cuda")
    assert loaded["rng"]["numpy"]["keys"].device.type == "cuda"
    restore_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(())),
            float(torch.rand((), device="cuda"))) == expected


def test_load_checkpoint_rejects_foreign_and_truncated(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(UserInputError, match="not an AnaUS pre-training checkpoint"):
        load_checkpoint(foreign)
    good = save_checkpoint({"format": "anaus-pretrain-checkpoint", "version": 1, "x": torch.zeros(100)},
                           tmp_path / "c", step=1)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserInputError, match="trunc.pt: not a readable checkpoint"):
        load_checkpoint(truncated)
    with pytest.raises(UserInputError, match="no last checkpoint"):
        resolve_resume_path(True, tmp_path / "empty-run")


def test_metrics_writer_resume_truncates_and_plot(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=True) as writer:
        for step in range(1, 6):
            writer.log({"step": step, "loss": 5.0 - step, "loss_ana": 3.0 - step / 2, "loss_ana_s7": 1.0,
                        "loss_ctx": 1.0, "lr": 0.1, "data_wait_fraction": 0.1})
        assert writer.tensorboard_enabled
    assert any((tmp_path / "tensorboard").iterdir())
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=3) as writer:
        writer.log({"step": 4, "loss": 0.5})
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == 0.5
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss_curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_window_timer_fraction():
    timer = WindowTimer()
    timer.add_wait(0.0)
    timer.add_step(8)
    summary = timer.summary()
    assert 0.0 <= summary["data_wait_fraction"] <= 1.0 and summary["images_per_s"] > 0
