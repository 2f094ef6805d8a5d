"""A-ViT training-step throughput (images/s), data-wait fraction and peak memory.

One step = the loader's multi-crop batch (``MultiCropTransform`` in the real shard loader over a
synthetic store) -> ``AViTMethod.prepare_batch`` (photometric ops, MIM masks) -> forward (student
on 2 global + n local crops, EMA teacher, DINO + MIM + adaptive adversarial + discriminator) ->
backward -> AdamW step -> teacher EMA. Medians over the timed steps after warm-up; ACDT and the
no-ACDT ablation are measured in the same run and compared as a ratio.

Run:  python3 benchmarks/bench_avit.py                        (CPU: ViT-Ti, 64 px global / 32 px local, patch 8)
      python3 benchmarks/bench_avit.py --device cuda --size small --bf16      (GPU: ViT-S/16 at 224)
      python3 benchmarks/bench_avit.py --device cuda --size base --bf16       (GPU: ViT-B/16 at 224)
Prints one JSON object (also written to --out when given).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _config(args, variant: str):
    from anaus_core.avit.config import AViTConfig, MultiCropConfig

    return AViTConfig(size=args.size, patch_size=args.patch_size, categories=["a", "b", "c"], acdt=variant,
                      crops=MultiCropConfig(global_size=args.global_size, local_size=args.local_size, num_local=args.num_local),
                      head_output_dim=args.head_output_dim, disc_channels=args.disc_channels)


def _loader(args, store: Path, config, epoch: int):
    from anaus_core.avit.multicrop import MultiCropTransform
    from shards.anatomy_sample import decode_image_and_anatomy
    from shards.loader import PretrainLoader
    from shards.shard_stream import ShardStream
    from shards.source import resolve_shards

    transform = MultiCropTransform(config.crops, categories=config.categories, seed=0, decode=decode_image_and_anatomy)
    stream = ShardStream(resolve_shards(store), batch_size=args.batch_size, seed=0, epoch=epoch, rank=0, world_size=1,
                         num_workers=args.num_workers, start_batch=0, shuffle_buffer=0, batch_transform=transform)
    return PretrainLoader(stream, num_workers=args.num_workers, pin_memory=args.device == "cuda")


def run_variant(args, store: Path, variant: str) -> dict:
    from anaus_core.avit.method import AViTMethod

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = _config(args, variant)
    method = AViTMethod(config=config).to(device)
    groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in method.optimizer_param_groups()]
    optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    total = args.warmup + args.steps
    step_seconds, wait_seconds = [], []
    step = 0
    epoch = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < total:
        iterator = iter(_loader(args, store, config, epoch))
        while step < total:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            waited = time.perf_counter() - start
            prepared = method.prepare_batch(batch, device=device, generator=generator)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda"):
                out = method(prepared, step=step, total_steps=total)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            method.after_optimizer_step(step=step, total_steps=total)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                step_seconds.append(time.perf_counter() - start)
                wait_seconds.append(waited)
            step += 1
        epoch += 1
    median = statistics.median(step_seconds)
    result = {
        "variant": variant,
        "params_M": round(sum(p.numel() for p in method.student.parameters()) / 1e6, 2),
        "step_s_median": round(median, 4),
        "images_per_s": round(args.batch_size / median, 2),
        "data_wait_fraction": round(sum(wait_seconds) / sum(step_seconds), 3),
        "final_loss": round(float(out["loss"].detach()), 4),
    }
    if device.type == "cuda":
        result["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default=None, help="micro, tiny, small, base (default tiny on CPU, small on CUDA)")
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--global-size", type=int, default=None)
    parser.add_argument("--local-size", type=int, default=None)
    parser.add_argument("--num-local", type=int, default=None)
    parser.add_argument("--head-output-dim", type=int, default=None)
    parser.add_argument("--disc-channels", type=int, default=None, help="discriminator width (VQGAN: 64)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--variants", default="acdt,none")
    parser.add_argument("--images", type=int, default=None, help="synthetic store size")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    defaults = dict(size="small" if gpu else "tiny", patch_size=16 if gpu else 8, global_size=224 if gpu else 64,
                    local_size=96 if gpu else 32, num_local=6 if gpu else 4, head_output_dim=65536 if gpu else 4096,
                    disc_channels=64 if gpu else 16,
                    batch_size=64 if gpu else 16, steps=20 if gpu else 5, num_workers=8 if gpu else 0,
                    images=2048 if gpu else 128)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.set_num_threads(torch.get_num_threads())
    from shards.synthetic import write_synthetic_store

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        side = 256 if gpu else 96
        write_synthetic_store(store, count=args.images, samples_per_shard=256, key_digits=6, height=side, width=side)
        results = [run_variant(args, store, variant) for variant in args.variants.split(",")]
    report = {
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if gpu else "cpu"},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    if len(results) >= 2:
        report["ratio_images_per_s_" + results[1]["variant"] + "_over_" + results[0]["variant"]] = round(
            results[1]["images_per_s"] / results[0]["images_per_s"], 3)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
