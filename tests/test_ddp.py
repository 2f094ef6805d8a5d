"""Two CPU ranks with the gloo backend (torch.multiprocessing spawn, torchrun-style environment).

* The trainer under DDP: every rank gets the same number of batches, the online weights stay
  identical on both ranks after the optimiser steps, only rank 0 writes the run folder, and the
  logged loss is the mean over ranks.
* The loss of step 0 with world 2 × batch b equals the single-process loss on the same 2b
  samples. BatchNorm makes a train-mode comparison meaningless (per-rank batch statistics over b
  vs 2b samples; SyncBatchNorm would fix that but PyTorch supports it on CUDA only), so the
  comparison runs the DDP-wrapped model in eval-mode BN. The photometric draws and the L_ctx
  damage are keyed per (step, micro-batch, rank), not per sample, so they are switched off for the
  comparison; crops, flips and mask sampling are keyed per sample and stay on.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from anaus_core.config import load_config
from anaus_core.train import PretrainConfig, read_metrics

WORLD = 2
PER_RANK = 2
TINY = {
    "data.batch_size": WORLD * PER_RANK, "data.num_workers": 0, "data.shuffle_buffer": 8,
    "views.size": 32, "views.num_mask_samples": 4, "views.core_min_side": 4,
    "augment.view1.blur_kernel": 5, "augment.view2.blur_kernel": 5,
    "model.fpn_channels": 16, "model.projector_hidden_dim": 32, "model.projector_dim": 16,
    "model.predictor_hidden_dim": 32,
    "run.device": "cpu", "run.log_every": 1, "run.progress": False, "run.tensorboard": False,
    "run.steps": 2, "optim.warmup_steps": 1,
}
# what the single-process comparison needs to be exact (see module docstring)
COMPARABLE = {"augment.photometric": False, "model.damage_shuffle": False, "model.damage_noise": False,
              "model.damage_occlusion": False}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(shards: str, **extra) -> PretrainConfig:
    return load_config(PretrainConfig, None, {**TINY, "data.shards": shards, **extra})


def _source(config):
    from cli import shard_data_source

    return shard_data_source(config)


def _first_batch(config, rank: int, world_size: int, batch_size: int):
    loader = _source(config).loader(epoch=0, skip_batches=0, batch_size=batch_size, rank=rank, world_size=world_size)
    return next(iter(loader))


def _step0_eval_losses(model, batch, config) -> dict[str, torch.Tensor]:
    from anaus_core.train.trainer import forward_losses, make_generator, unwrap

    device = torch.device("cpu")
    generator = make_generator(device, 0)
    prepared = unwrap(model).prepare_batch(batch, device=device, generator=generator)
    with torch.no_grad():
        losses = forward_losses(model, prepared, generator=generator, device=device, amp=False)
    return {key: value.detach() for key, value in losses.items()}


def _rank_main(rank: int, world_size: int, port: int, shards: str, workdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from anaus_core.train.distributed import all_reduce_mean, init_distributed, teardown_distributed
    from anaus_core.train.trainer import build_model, pretrain

    context = init_distributed("cpu")
    assert context.owns_process_group and context.world_size == world_size and context.rank == rank
    report: dict = {"rank": rank}
    # 1) step-0 losses of the DDP-wrapped model in eval-mode BN, averaged over ranks
    config = _config(shards, **COMPARABLE)
    ddp_model = torch.nn.parallel.DistributedDataParallel(build_model(config).eval())
    batch = _first_batch(config, rank, world_size, PER_RANK)
    report["index"] = batch["index"].tolist()
    losses = _step0_eval_losses(ddp_model, batch, config)
    report["eval_losses"] = {k: float(all_reduce_mean(v, context)) for k, v in losses.items()}
    del ddp_model
    # 2) the trainer (it finds the process group initialised and leaves it to us)
    config = _config(shards)
    result = pretrain(config, Path(workdir) / "run", data=_source(config))
    report.update(batches_seen=result.batches_seen, steps_done=result.steps_done, records=result.records)
    report["online_weights"] = {name: float(p.detach().double().sum())
                                for name, p in result.model.online_encoder.named_parameters()}
    report["online_weights"].update({f"proj.{name}": float(p.detach().double().sum())
                                     for name, p in result.model.projectors.named_parameters()})
    (Path(workdir) / f"rank{rank}.json").write_text(json.dumps(report))
    teardown_distributed(context)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    from shards.synthetic import write_synthetic_store

    # uneven shards: 5, 5, 5, 1
    return write_synthetic_store(tmp_path_factory.mktemp("ddp-shards"), count=16, samples_per_shard=5, height=48, width=48)


@pytest.mark.slow
def test_two_gloo_ranks_match_single_process_and_stay_in_sync(tiny_shards, tmp_path):
    mp.spawn(_rank_main, args=(WORLD, _free_port(), str(tiny_shards), str(tmp_path)), nprocs=WORLD, join=True)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]

    # equal batch counts (16 samples / (2 ranks x 2) = 4 batches per epoch; 2 steps = 2 batches)
    assert [r["batches_seen"] for r in reports] == [2, 2] and [r["steps_done"] for r in reports] == [2, 2]
    # DDP kept the online network identical on both ranks
    assert reports[0]["online_weights"] == reports[1]["online_weights"]
    # rank 0 wrote the run; the logged loss is the same rank mean on both ranks
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert [r["loss"] for r in reports[0]["records"]] == [r["loss"] for r in reports[1]["records"]]
    assert (tmp_path / "run" / "encoder.pt").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["micro_batch_per_rank"] == PER_RANK

    # the ranks' first batches are disjoint halves of one global batch ...
    first, second = reports[0]["index"], reports[1]["index"]
    assert len(first) == len(second) == PER_RANK and not set(first) & set(second)
    # ... whose single-process loss (same model, same samples, batch 2b) is the rank mean
    from anaus_core.train.trainer import build_model

    config = _config(str(tiny_shards), **COMPARABLE)
    halves = [_first_batch(config, rank, WORLD, PER_RANK) for rank in range(WORLD)]
    global_batch = {key: torch.cat([half[key] for half in halves]) for key in halves[0]}
    assert global_batch["index"].tolist() == first + second
    single = _step0_eval_losses(build_model(config).eval(), global_batch, config)
    distributed = reports[0]["eval_losses"]
    assert set(single) == set(distributed)
    for key, value in single.items():
        assert distributed[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
