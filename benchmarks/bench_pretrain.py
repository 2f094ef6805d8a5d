"""Pre-training benchmarks.

1. ``masks``: one training step with masks read from the precomputed shards vs masks computed
   online by a (tiny, random) SAM automatic mask generator in the loop — the reason the design
   precomputes masks. Same images, same view code, same model step; medians of several steps,
   measured side by side, reported as a ratio.
2. ``memory``: the trainer for several epochs on small shards; RSS per epoch (should be flat).
3. ``throughput``: the trainer at a given device/batch (e.g. ``--device cuda --batch-size 192
   --bf16``): images/s and the data-wait fraction from ``metrics.jsonl``.
4. ``step``: the training step itself, old (eager: data-dependent head shapes, per-parameter
   LARS loop, no compile) against new (static-shape heads, foreach LARS, no host sync, compiled
   per ``--compile``) on the same batch and weights, interleaved, medians; FLOPs per image of
   the step (forward + backward, ``torch.utils.flop_counter.FlopCounterMode``), achieved
   TFLOP/s and, on CUDA, MFU against the dense bf16 peak (``--peak-tflops``, default 989 =
   H100/H200 SXM).
5. ``gpu-check``: the acceptance check of issue 13 in one command (about 5 minutes on one
   H100/H200): ``step`` at batch 192, 224 px, bf16, then the trainer for 60 steps;
   prints PASS/FAIL for >= 2,000 img/s at batch 192 with data wait < 5 %.

Run:  python3 benchmarks/bench_pretrain.py [--quick]                          (CPU: 1 + 2)
      python3 benchmarks/bench_pretrain.py --mode step --batch-size 8 --crop 64  (CPU: 4)
      python3 benchmarks/bench_pretrain.py --mode gpu-check --num-workers 12      (GPU: 5)
      python3 benchmarks/bench_pretrain.py --mode throughput --device cuda --batch-size 192 \
          --bf16 --steps 60 --num-workers 12                                   (GPU: 3)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _synthetic(args):
    key, size, seed = args
    from shards.synthetic import synthetic_sample

    return synthetic_sample(key, height=size, width=size, partition=8, overlapping=4, seed=seed)


def make_shards(out: Path, *, count: int, size: int, workers: int = 1) -> Path:
    """``count`` synthetic speckle images with blob masks at ``size`` px, written as shards."""
    from shards.writer import ShardWriter

    if (out / "manifest.json").exists():
        return out
    jobs = [(f"img{i:06d}", size, i) for i in range(count)]
    with ShardWriter(out, samples_per_shard=256) as writer:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for sample in pool.map(_synthetic, jobs, chunksize=16):
                    writer.write(sample)
        else:
            for job in jobs:
                writer.write(_synthetic(job))
    return out


def base_overrides(args, shards: Path) -> dict:
    small = args.device == "cpu"
    overrides = {
        "data.shards": str(shards), "data.batch_size": args.batch_size, "data.num_workers": args.num_workers,
        "data.shuffle_buffer": 256, "views.size": args.crop, "views.num_mask_samples": args.k,
        "run.device": args.device, "run.amp": args.bf16, "run.seed": 0, "run.progress": args.progress,
        "run.tensorboard": False, "run.checkpoint_every": 0, "run.keep_step_checkpoints": False,
        "optim.warmup_steps": 1, "run.compile": getattr(args, "compile", "auto"),
    }
    if small:  # CPU: reduced heads and blur so a step takes seconds, not minutes
        overrides.update({"augment.view1.blur_kernel": 9, "augment.view2.blur_kernel": 9})
    return overrides


# ----------------------------------------------------------------------------------------------
# 1. precomputed masks vs SAM in the loop
# ----------------------------------------------------------------------------------------------

def bench_masks(args, workdir: Path) -> dict:
    from anaus_core.augment.collate import collate_views
    from anaus_core.augment.views import PairedViews
    from anaus_core.config import load_config
    from anaus_core.maskers import build_masker
    from anaus_core.maskers.base import ImageMeta
    from anaus_core.optim import build_lars, param_groups_excluding_norm_and_bias
    from anaus_core.sam import save_random_sam_checkpoint
    from anaus_core.train import PretrainConfig
    from anaus_core.train.trainer import build_model, forward_losses, make_generator
    from shards.reader import ShardReader

    shards = make_shards(workdir / "shards-masks", count=args.batch_size * 2, size=args.image_size)
    config = load_config(PretrainConfig, None, base_overrides(args, shards))
    device = torch.device(args.device)
    reader = ShardReader(shards)
    samples = [reader[key] for key in list(reader.keys())[: args.batch_size]]
    views = PairedViews(config.views)
    checkpoint = save_random_sam_checkpoint(workdir / "sam-tiny.pth", "tiny", seed=0)
    masker = build_masker("sam", checkpoint=str(checkpoint), model_type="tiny", image_size=args.sam_image_size,
                          points_per_side=args.sam_points, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                          device=args.device, batch_size=args.batch_size)
    model = build_model(config).to(device)
    optimizer = build_lars(param_groups_excluding_norm_and_bias(model), lr=0.01)

    def train_step(batch, step):
        generator = make_generator(device, step)
        prepared = model.prepare_batch(batch, device=device, generator=generator)
        losses = forward_losses(model, prepared, generator=generator, device=device, amp=args.bf16)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        model.update_target(0.99)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def views_of(mask_sets, step):
        rng = np.random.default_rng(step)
        return collate_views([views(s.image, m.masks, m.ids, rng=rng) for s, m in zip(samples, mask_sets)])

    def precomputed(step):
        return train_step(views_of([s.mask_set for s in samples], step), step)

    mask_counts = []

    def online(step):
        metas = [ImageMeta(key=s.key, relpath=s.key) for s in samples]
        proposals = masker([s.image for s in samples], metas)
        mask_sets = [p.finalize(min_area=16, max_masks=32) for p in proposals]
        mask_counts.append(float(np.mean([len(m) for m in mask_sets])))
        return train_step(views_of(mask_sets, step), step)

    times = {"precomputed": [], "online_sam": []}
    precomputed(1000), online(1001)  # warm-up (allocations, SAM build)
    for repeat in range(args.repeats):
        for name, fn in (("precomputed", precomputed), ("online_sam", online)):
            start = time.perf_counter()
            fn(repeat)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"batch": args.batch_size, "image_size": args.image_size, "crop": args.crop,
            "sam": f"tiny random, input {args.sam_image_size}, {args.sam_points}x{args.sam_points} points",
            "mean_sam_masks_per_image": statistics.mean(mask_counts) if mask_counts else None,
            "median_step_s": medians, "ratio_online_over_precomputed": medians["online_sam"] / medians["precomputed"],
            "repeats": args.repeats}


# ----------------------------------------------------------------------------------------------
# 2 + 3. the trainer: memory over epochs, throughput
# ----------------------------------------------------------------------------------------------

def run_trainer(args, workdir: Path, *, samples: int, steps: int, name: str) -> tuple[list[dict], dict]:
    from anaus_core.config import load_config
    from anaus_core.train import PretrainConfig, pretrain, read_metrics
    from cli import shard_data_source

    shards = Path(args.shards) if args.shards else make_shards(workdir / f"shards-{name}", count=samples,
                                                                size=args.image_size, workers=args.gen_workers)
    overrides = base_overrides(args, shards)
    overrides.update({"run.steps": steps, "run.log_every": args.log_every})
    config = load_config(PretrainConfig, None, overrides)
    run = workdir / f"run-{name}"
    start = time.perf_counter()
    result = pretrain(config, run, data=shard_data_source(config))
    summary = json.loads((run / "summary.json").read_text())
    summary["wall_s"] = time.perf_counter() - start
    return read_metrics(run / "metrics.jsonl"), summary


def bench_memory(args, workdir: Path) -> dict:
    samples = args.batch_size * args.memory_steps_per_epoch
    records, summary = run_trainer(args, workdir, samples=samples, steps=args.memory_steps_per_epoch * args.epochs,
                                   name="memory")
    per_epoch: dict[int, list[float]] = {}
    for record in records:
        per_epoch.setdefault(int(record["epoch"]), []).append(record["rss_mb"])
    return {"epochs": args.epochs, "steps_per_epoch": summary["steps_per_epoch"],
            "rss_mb_max_per_epoch": {e: round(max(v), 1) for e, v in sorted(per_epoch.items())},
            "peak_rss_mb_final": round(records[-1]["peak_rss_mb"], 1)}


def bench_throughput(args, workdir: Path) -> dict:
    samples = args.samples or args.batch_size * 8
    records, summary = run_trainer(args, workdir, samples=samples, steps=args.steps, name="throughput")
    steady = [r for r in records if r["step"] > args.warmup_steps] or records
    out = {"device": summary["device"], "batch": args.batch_size, "crop": args.crop, "bf16": args.bf16,
           "num_workers": args.num_workers, "steps": args.steps,
           "images_per_s_median": statistics.median(r["images_per_s"] for r in steady),
           "data_wait_fraction_median": statistics.median(r["data_wait_fraction"] for r in steady),
           "step_time_s_median": statistics.median(r["step_time_s"] for r in steady)}
    if "cuda_peak_memory_mb" in records[-1]:
        out["cuda_peak_memory_mb"] = records[-1]["cuda_peak_memory_mb"]
    return out


# ----------------------------------------------------------------------------------------------
# 4. the step: old vs new, FLOPs, MFU
# ----------------------------------------------------------------------------------------------

STEP_VARIANTS = {
    "old": {"model.static_shapes": "off", "optim.foreach": False, "run.compile": "off"},
    "new": {"model.static_shapes": "auto", "optim.foreach": True},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(args, workdir: Path) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from anaus_core.config import load_config
    from anaus_core.train import PretrainConfig
    from anaus_core.train.trainer import (_autocast, build_model, build_optimizer, make_generator, use_compile)
    from cli import shard_data_source

    shards = Path(args.shards) if args.shards else make_shards(workdir / "shards-step", count=args.batch_size * 2,
                                                                size=args.image_size, workers=args.gen_workers)
    device = torch.device(args.device)
    runs = {}
    for name, extra in STEP_VARIANTS.items():
        overrides = {**base_overrides(args, shards), **extra}
        if name == "new":
            overrides["run.compile"] = args.compile
        config = load_config(PretrainConfig, None, overrides)
        method = build_model(config).to(device)   # same seed: the same weights in both variants
        if device.type == "cuda" and config.run.channels_last:
            method = method.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(method, config, 0.01)
        compiled = use_compile(config, device)
        if compiled:
            method.compile_for_training()
        loader = shard_data_source(config).loader(epoch=0, skip_batches=0, batch_size=args.batch_size, rank=0,
                                                  world_size=1)
        batch = next(iter(loader))
        runs[name] = (config, method, optimizer, batch, compiled)

    def step(name: int, index: int, counter=None):
        config, method, optimizer, batch, _ = runs[name]
        generator = make_generator(device, index)
        prepared = method.prepare_batch(batch, device=device, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        with counter if counter is not None else contextlib.nullcontext():
            with _autocast(device, config.run.amp):
                method.begin_step([prepared], generators=[generator], step=index)
                loss = method(prepared, generator=generator, step=index)["loss"]
            loss.backward()
        optimizer.step()
        method.after_optimizer_step(step=index, total_steps=1000)
        _sync(device)

    counter = FlopCounterMode(display=False)
    step("old", 0, counter)   # eager: the FLOPs of one forward + backward (+ target forwards)
    flops = counter.get_total_flops()
    for name in runs:            # warm-up (allocator, cudnn autotune, compilation)
        for index in range(args.warmup_steps if name == "new" and runs[name][4] else 2):
            step(name, 1 + index)
    times = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name in runs:
            _sync(device)
            start = time.perf_counter()
            step(name, 100 + repeat)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    out = {"device": str(device), "batch": args.batch_size, "crop": args.crop, "bf16": args.bf16,
           "compile_new": runs["new"][4], "repeats": args.repeats,
           "gflop_per_image": flops / args.batch_size / 1e9,
           "median_step_s": medians, "images_per_s": {n: args.batch_size / t for n, t in medians.items()},
           "ratio_old_over_new": medians["old"] / medians["new"],
           "achieved_tflops": {n: flops / t / 1e12 for n, t in medians.items()}}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["mfu"] = {n: flops / t / 1e12 / args.peak_tflops for n, t in medians.items()}
        out["peak_tflops_assumed"] = args.peak_tflops
    return out


def gpu_check(args, workdir: Path) -> dict:
    """Issue 13's pre-training target on one GPU: >= 2,000 img/s at batch 192, data wait < 5 %."""
    if not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA device")
    args.device, args.bf16, args.crop, args.batch_size = "cuda", True, 224, 192
    args.image_size = max(args.image_size, 256)
    args.gen_workers = max(args.gen_workers, 8)
    out = {"step": bench_step(args, workdir)}
    print("step", json.dumps(out["step"]), flush=True)
    args.steps, args.warmup_steps = max(args.steps, 60), max(args.warmup_steps, 20)
    out["throughput"] = bench_throughput(args, workdir)
    rate, wait = out["throughput"]["images_per_s_median"], out["throughput"]["data_wait_fraction_median"]
    out["throughput"]["mfu"] = rate * out["step"]["gflop_per_image"] / 1e3 / args.peak_tflops
    out["pass"] = bool(rate >= 2000 and wait < 0.05)
    print(f"gpu-check: {rate:.0f} img/s (target >= 2000), data wait {100 * wait:.2f} % (target < 5 %), "
          f"MFU {100 * out['throughput']['mfu']:.1f} % -> {'PASS' if out['pass'] else 'FAIL'}", flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["all", "masks", "memory", "throughput", "step", "gpu-check"], default="all")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="step/gpu-check/throughput: run.compile of the new step (auto = on CUDA only)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak of the GPU for MFU (H100/H200 SXM: 989)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40, help="throughput mode: optimiser steps")
    parser.add_argument("--warmup-steps", type=int, default=10, help="throughput mode: steps left out of the medians")
    parser.add_argument("--samples", type=int, default=0, help="throughput mode: synthetic samples (default 8 batches)")
    parser.add_argument("--shards", default="", help="use these shards instead of synthetic ones")
    parser.add_argument("--gen-workers", type=int, default=1, help="processes generating synthetic shards")
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=4, help="memory mode: epochs")
    parser.add_argument("--memory-steps-per-epoch", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="masks mode: timed steps per variant")
    parser.add_argument("--sam-image-size", type=int, default=256)
    parser.add_argument("--sam-points", type=int, default=16)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs, args.memory_steps_per_epoch, args.batch_size = 2, 3, 2, 4
    if args.device == "cpu":
        torch.set_num_threads(1)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"device": args.device, "torch": torch.__version__,
                           "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    if args.mode in ("all", "masks"):
        results["masks"] = bench_masks(args, workdir)
        print("masks", json.dumps(results["masks"]), flush=True)
    if args.mode in ("all", "memory"):
        results["memory"] = bench_memory(args, workdir)
        print("memory", json.dumps(results["memory"]), flush=True)
    if args.mode == "step":
        results["step"] = bench_step(args, workdir)
        print("step", json.dumps(results["step"]), flush=True)
    if args.mode == "gpu-check":
        results["gpu_check"] = gpu_check(args, workdir)
    if args.mode == "throughput":
        results["throughput"] = bench_throughput(args, workdir)
        print("throughput", json.dumps(results["throughput"]), flush=True)
    (workdir / "bench_pretrain.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
