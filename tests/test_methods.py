"""The method interface: registry, the AnaUS method's hooks, and resuming pre-interface checkpoints."""

from __future__ import annotations

import pytest
import torch

from anaus_core.config import ConfigError
from anaus_core.methods import PretrainMethod, build_method
from anaus_core.train import PretrainConfig, load_checkpoint, pretrain, read_metrics
from tests.test_pretrain import data_source, tiny_config, tiny_shards  # noqa: F401 (fixture)


def test_registry_builds_anaus_and_rejects_unknown(tiny_shards):
    config = tiny_config(tiny_shards)
    method = build_method(config)
    assert isinstance(method, PretrainMethod) and method.name == "anaus"
    groups = method.optimizer_param_groups()
    assert [g["lars_exclude"] for g in groups] == [False, True]
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    config.method = "simclr"
    with pytest.raises(ConfigError, match="simclr"):
        build_method(config)


def test_after_optimizer_step_is_the_cosine_ema(tiny_shards):
    from anaus_core.optim import cosine_momentum

    method = build_method(tiny_config(tiny_shards))
    with torch.no_grad():
        for p in method.online_encoder.parameters():
            p.add_(1.0)
    before = method.target_encoder.backbone.conv1.weight.clone()
    online = method.online_encoder.backbone.conv1.weight.clone()
    logs = method.after_optimizer_step(step=3, total_steps=10)
    m = cosine_momentum(3, 10, base=0.99)
    assert logs == {"momentum": pytest.approx(m)}
    torch.testing.assert_close(method.target_encoder.backbone.conv1.weight, m * before + (1 - m) * online)


def test_checkpoint_from_before_the_method_interface_resumes(tiny_shards, tmp_path):
    config = tiny_config(tiny_shards, **{"run.steps": 3, "run.checkpoint_every": 0})
    whole = pretrain(config, tmp_path / "whole", data=data_source(config))
    pretrain(config, tmp_path / "old", data=data_source(config), stop_after_steps=2)
    last = tmp_path / "old" / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    payload.pop("method")
    payload["config"].pop("method")   # what a checkpoint written before the refactor holds
    last.unlink()
    torch.save(payload, last)
    pretrain(config, tmp_path / "old", data=data_source(config), resume=True)
    losses = lambda run: [r["loss"] for r in read_metrics(run / "metrics.jsonl")]  # noqa: E731
    assert losses(tmp_path / "old") == losses(tmp_path / "whole")
    # health monitors on every log line: projection std and RankMe per scale, empty slots, EMA momentum
    record = read_metrics(tmp_path / "whole" / "metrics.jsonl")[-1]
    for key in ("health_std_s7", "health_rankme_s56", "health_empty_slots", "momentum"):
        assert key in record, key
    assert 0.0 <= record["health_empty_slots"] <= 1.0
    # the logged RankMe / std are those of the last step's projections, recomputed here in numpy
    # (RankMe: exp of the entropy of the normalised singular values, Garrido et al.; rows with no
    # mask left out)
    import numpy as np

    assert sorted(whole.model._health_inputs) == [7, 14, 28, 56]
    for scale, (projection, valid) in whole.model._health_inputs.items():
        rows = projection.detach().reshape(-1, projection.shape[-1]).double().numpy()
        if valid is not None:
            rows = rows[valid.reshape(-1).numpy().astype(bool)]
        singular = np.linalg.svd(rows, compute_uv=False)
        p = singular / singular.sum() + 1e-7
        assert record[f"health_rankme_s{scale}"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-3)
        assert 1.0 < record[f"health_rankme_s{scale}"] < rows.shape[1]


def test_cli_method_option(tiny_shards, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["pretrain", "--shards", str(tiny_shards), "--out", str(tmp_path / "r"),
                                      "--method", "nope", "--steps", "1", "--device", "cpu"])
    assert result.exit_code == 2 and "method" in result.output and "nope" in result.output
