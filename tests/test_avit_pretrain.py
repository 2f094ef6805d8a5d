"""``anaus pretrain --method avit`` through the shared trainer: CLI run + export, resume, 2-rank DDP."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from anaus_core.config import load_config
from anaus_core.train import PretrainConfig, pretrain, read_metrics

TINY_AVIT = {
    "method": "avit", "data.batch_size": 4, "data.num_workers": 0, "data.shuffle_buffer": 8,
    "avit.size": "micro", "avit.patch_size": 8, "avit.crops.global_size": 32, "avit.crops.local_size": 16,
    "avit.crops.num_local": 2, "avit.head_hidden_dim": 64, "avit.head_bottleneck_dim": 32, "avit.head_output_dim": 128,
    "avit.decoder_dim": 32, "avit.decoder_heads": 2, "avit.decoder_depth": 1, "avit.disc_channels": 8, "avit.disc_layers": 2,
    "augment.view1.blur_kernel": 5, "augment.view2.blur_kernel": 5,
    "run.device": "cpu", "run.log_every": 1, "run.progress": False, "run.tensorboard": False,
    "run.steps": 3, "optim.warmup_steps": 1, "optim.name": "adamw", "optim.base_lr": 0.016, "optim.weight_decay": 0.04,
}
# the loss terms the trainer logs for A-ViT
LOGGED = {"loss", "loss_dino", "loss_mim", "loss_adv", "loss_disc", "adv_lambda", "teacher_temp", "momentum"}


@pytest.fixture(scope="module")
def anatomy_store(tmp_path_factory) -> Path:
    """12 phantoms (64 px stored) with their probe geometry as the anatomy category."""
    from anaus_core.phantoms import make_phantom_corpus
    from pipeline.config import PrecomputeConfig
    from pipeline.job import run_precompute

    root = tmp_path_factory.mktemp("avit-store")
    make_phantom_corpus(root / "corpus", count=12, size=64, seed=0)
    rows = ["file,category"] + [f"{p.stem}.png,{json.loads(p.read_text())['geometry']}"
                                for p in sorted((root / "corpus" / "label").glob("*.json"))]
    (root / "anatomy.csv").write_text("\n".join(rows) + "\n")
    run_precompute(PrecomputeConfig(corpus=str(root / "corpus" / "img"), out=str(root / "store"), masker="labels",
                                    labels=str(root / "corpus" / "label"), stored_size=64, samples_per_shard=5,
                                    progress=False, anatomy=f"csv:{root / 'anatomy.csv'}"), show_report=False)
    return root / "store"


def _config(store: Path, **overrides) -> PretrainConfig:
    from cli import store_anatomy_categories

    return store_anatomy_categories(load_config(PretrainConfig, None, {**TINY_AVIT, "data.shards": str(store), **overrides}))


def _source(config):
    from cli import shard_data_source

    return shard_data_source(config)


def test_cli_pretrain_method_avit_trains_and_exports(anatomy_store, tmp_path):
    from typer.testing import CliRunner

    from anaus_core.avit.backbone import build_vit
    from cli import app

    sets = [item for key, value in TINY_AVIT.items() if key.startswith(("avit.", "augment.", "optim.", "data.shuffle"))
            for item in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(app, ["pretrain", "--method", "avit", "--shards", str(anatomy_store), "--out", str(tmp_path / "run"),
                                      "--steps", "2", "--batch-size", "4", "--device", "cpu", "--num-workers", "0",
                                      "--log-every", "1", "--no-progress", *sets])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and LOGGED <= set(records[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    # the vocabulary came from the store's manifest and is saved with the run
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "avit" and saved["avit"]["categories"] == ["linear", "sector"]
    vit = build_vit(size="micro", img_size=32, patch_size=8)
    vit.load_state_dict(torch.load(run / "encoder.pt"), strict=True)
    assert (run / "acdt.pt").is_file() and json.loads((run / "encoder.json").read_text())["family"] == "timm_vit"


def test_resume_continues_with_the_same_losses(anatomy_store, tmp_path):
    config = _config(anatomy_store, **{"run.steps": 4, "run.checkpoint_every": 0})
    whole = pretrain(config, tmp_path / "whole", data=_source(config))
    pretrain(config, tmp_path / "split", data=_source(config), stop_after_steps=2)
    pretrain(config, tmp_path / "split", data=_source(config), resume=True)
    losses = lambda run: [{k: r[k] for k in sorted(LOGGED)} for r in read_metrics(run / "metrics.jsonl")]  # noqa: E731
    assert len(losses(tmp_path / "whole")) == 4
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert whole.steps_done == 4
    # export-encoder from an A-ViT checkpoint: the same files as the run's own export
    from anaus_core.avit.backbone import build_vit
    from anaus_core.train import export_encoder_from_checkpoint

    encoder, _ = export_encoder_from_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt", tmp_path / "exported")
    vit = build_vit(size="micro", img_size=32, patch_size=8)
    vit.load_state_dict(torch.load(encoder), strict=True)
    for key, value in torch.load(tmp_path / "whole" / "encoder.pt").items():
        torch.testing.assert_close(vit.state_dict()[key], value)
    assert (tmp_path / "exported" / "acdt.pt").is_file()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, store: str, workdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from anaus_core.train.distributed import init_distributed, teardown_distributed

    context = init_distributed("cpu")
    config = _config(Path(store), **{"run.steps": 2})
    result = pretrain(config, Path(workdir) / "run", data=_source(config))
    report = {"batches_seen": result.batches_seen, "steps_done": result.steps_done,
              "losses": [r["loss"] for r in result.records],
              "student": {n: float(p.detach().double().sum()) for n, p in result.model.student.named_parameters()},
              "teacher": {n: float(p.detach().double().sum()) for n, p in result.model.teacher.named_parameters()},
              "center": result.model.dino_loss.center.flatten().tolist()}
    (Path(workdir) / f"rank{rank}.json").write_text(json.dumps(report))
    teardown_distributed(context)


@pytest.mark.slow
def test_two_gloo_ranks_see_equal_batches_and_stay_in_sync(anatomy_store, tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(anatomy_store), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    # 12 samples / (2 ranks × 2 per rank): 3 batches per epoch on each rank; 2 steps = 2 batches each
    assert [r["batches_seen"] for r in reports] == [2, 2] and [r["steps_done"] for r in reports] == [2, 2]
    assert reports[0]["student"] == reports[1]["student"]        # DDP kept the student identical
    assert reports[0]["teacher"] == reports[1]["teacher"]        # so the EMA teacher is too
    assert reports[0]["center"] == pytest.approx(reports[1]["center"])   # DINO centre all-reduced
    assert reports[0]["losses"] == reports[1]["losses"]          # the logged loss is the rank mean
    assert (tmp_path / "run" / "encoder.pt").is_file() and (tmp_path / "run" / "acdt.pt").is_file()


@pytest.mark.gpu
def test_tiny_avit_trains_on_cuda_with_bf16(anatomy_store, tmp_path):
    """bf16 autocast + channels_last on CUDA: finite losses, an export that loads into timm."""
    from anaus_core.avit.backbone import build_vit

    config = _config(anatomy_store, **{"run.device": "cuda", "run.amp": True, "run.channels_last": True})
    result = pretrain(config, tmp_path / "run", data=_source(config))
    assert result.steps_done == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.records)
    build_vit(size="micro", img_size=32, patch_size=8).load_state_dict(torch.load(tmp_path / "run" / "encoder.pt"), strict=True)


def test_optimizer_choice(anatomy_store):
    from anaus_core.optim.lars import LARS
    from anaus_core.train.trainer import build_model, build_optimizer

    config = _config(anatomy_store)
    method = build_model(config)
    adamw = build_optimizer(method, config, 1e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.04, 0.0]   # biases / norms: no decay
    assert all("lars_adaptation" not in g for g in adamw.param_groups)
    config.optim.name = "lars"
    assert isinstance(build_optimizer(method, config, 1e-3), LARS)
    assert PretrainConfig().optim.name == "lars"                              # AnaUS default unchanged


def test_weight_decay_schedule_and_frozen_prototype_layer(anatomy_store, tmp_path):
    """DINO's two schedule details: ``optim.final_weight_decay`` (cosine 0.04 -> 0.4 over the run,
    decayed groups only) and ``avit.freeze_last_layer_steps`` (the student head's prototype layer
    gets no update in the first steps, through the trainer's ``before_optimizer_step`` hook)."""
    import math

    from anaus_core.train.trainer import build_model

    config = _config(anatomy_store, **{"run.steps": 4, "optim.final_weight_decay": 0.4, "avit.freeze_last_layer_steps": 4})
    initial = build_model(config)
    result = pretrain(config, tmp_path / "run", data=_source(config))
    logged = [r["weight_decay"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "weight_decay" in r]
    # value in force at optimiser step s (0-based), independent of the trainer's helper
    reference = [0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * s / 3)) for s in range(4)]
    assert logged == pytest.approx(reference) and logged[0] == pytest.approx(0.04) and logged[-1] == pytest.approx(0.4)
    frozen = dict(result.model.student_head.last_layer.named_parameters())
    for name, value in initial.student_head.last_layer.named_parameters():
        torch.testing.assert_close(frozen[name], value, rtol=0, atol=0)
    trained_layer = result.model.student_head.layers[0].weight
    assert not torch.equal(trained_layer, initial.student_head.layers[0].weight)  # the rest of the head trains

    method = build_model(_config(anatomy_store, **{"avit.freeze_last_layer_steps": 1}))
    for parameter in method.parameters():
        parameter.grad = torch.ones_like(parameter)
    method.before_optimizer_step(step=1)                         # past the frozen steps: untouched
    assert all(p.grad is not None for p in method.student_head.last_layer.parameters())
    method.before_optimizer_step(step=0)
    assert all(p.grad is None for p in method.student_head.last_layer.parameters())
    assert all(p.grad is not None for p in method.student.parameters())


def test_schedule_settings_are_checked():
    from anaus_core.config import ConfigError
    from anaus_core.train.config import validate_config

    config = load_config(PretrainConfig, None, {**TINY_AVIT, "data.shards": "x", "optim.final_weight_decay": -1.0})
    with pytest.raises(ConfigError, match="optim.final_weight_decay"):
        validate_config(config)
    config = load_config(PretrainConfig, None, {**TINY_AVIT, "data.shards": "x", "avit.freeze_last_layer_steps": -1})
    with pytest.raises(ConfigError, match="freeze_last_layer_steps"):
        validate_config(config)
