"""A-ViT training-step throughput (images/s), data-wait fraction and peak memory.

One step = the loader's multi-crop batch (``MultiCropTransform`` in the real shard loader over a
synthetic store) -> ``AViTMethod.prepare_batch`` (photometric ops, MIM masks) -> forward (student
on 2 global + n local crops, EMA teacher, DINO + MIM + adaptive adversarial + discriminator) ->
backward -> AdamW step -> teacher EMA. Medians over the timed steps after warm-up; ACDT and the
no-ACDT ablation are measured in the same run, their steps interleaved, and compared as a ratio.

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


class VariantRun:
    """One variant's method, optimiser, generator and endless loader, stepped one step at a time."""

    def __init__(self, args, store: Path, variant: str) -> None:
        from anaus_core.avit.method import AViTMethod

        self.args, self.store, self.variant = args, store, variant
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        self.config = _config(args, variant)
        self.method = AViTMethod(config=self.config).to(self.device)
        groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in self.method.optimizer_param_groups()]
        self.optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=self.device.type == "cuda")
        self.generator = torch.Generator(device=self.device).manual_seed(0)
        self.epoch = 0
        self.iterator = iter(_loader(args, store, self.config, self.epoch))
        self.step_seconds: list[float] = []
        self.wait_seconds: list[float] = []
        self.peak_bytes = 0
        self.last_loss = float("nan")

    def _next_batch(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.epoch += 1
            self.iterator = iter(_loader(self.args, self.store, self.config, self.epoch))
            return next(self.iterator)

    def step(self, step: int, total: int, *, timed: bool) -> None:
        device, method = self.device, self.method
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        batch = self._next_batch()
        waited = time.perf_counter() - start
        prepared = method.prepare_batch(batch, device=device, generator=self.generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.args.bf16 and device.type == "cuda"):
            out = method(prepared, step=step, total_steps=total)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.optimizer.step()
        method.after_optimizer_step(step=step, total_steps=total)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(device))
        if timed:
            self.step_seconds.append(time.perf_counter() - start)
            self.wait_seconds.append(waited)
        self.last_loss = float(out["loss"].detach())

    def result(self) -> dict:
        median = statistics.median(self.step_seconds)
        result = {
            "variant": self.variant,
            "params_M": round(sum(p.numel() for p in self.method.student.parameters()) / 1e6, 2),
            "step_s_median": round(median, 4),
            "images_per_s": round(self.args.batch_size / median, 2),
            "data_wait_fraction": round(sum(self.wait_seconds) / sum(self.step_seconds), 3),
            "final_loss": round(self.last_loss, 4),
        }
        if self.device.type == "cuda":
            result["peak_memory_GiB"] = round(self.peak_bytes / 2 ** 30, 2)
        return result


def run_variants(args, store: Path, variants: list[str]) -> list[dict]:
    """Interleaved (CPU default): the variants' steps alternate (order flipped every step), so a
    change in machine load hits every variant alike and their ratio stays meaningful. Sequential
    (CUDA default): one variant at a time, so each peak memory is its own."""
    total = args.warmup + args.steps
    if not args.interleave:
        results = []
        for variant in variants:
            run = VariantRun(args, store, variant)
            for step in range(total):
                run.step(step, total, timed=step >= args.warmup)
            results.append(run.result())
            del run
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return results
    runs = [VariantRun(args, store, variant) for variant in variants]
    for step in range(total):
        for run in (runs if step % 2 == 0 else runs[::-1]):
            run.step(step, total, timed=step >= args.warmup)
    return [run.result() for run in runs]


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
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="alternate the variants step by step (default: on CPU only)")
    parser.add_argument("--images", type=int, default=None, help="synthetic store size")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    defaults = dict(size="small" if gpu else "tiny", patch_size=16 if gpu else 8, global_size=224 if gpu else 64,
                    local_size=96 if gpu else 32, num_local=6 if gpu else 4, head_output_dim=65536 if gpu else 4096,
                    disc_channels=64 if gpu else 16,
                    batch_size=64 if gpu else 16, steps=20 if gpu else 5, num_workers=8 if gpu else 0,
                    images=2048 if gpu else 128, interleave=not gpu)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.set_num_threads(torch.get_num_threads())
    from shards.synthetic import write_synthetic_store

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        side = 256 if gpu else 96
        write_synthetic_store(store, count=args.images, samples_per_shard=256, key_digits=6, height=side, width=side)
        results = run_variants(args, store, args.variants.split(","))
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
