"""LP-SAM prediction throughput: images/s and peak GPU memory for input sizes x batch sizes x dtypes.

A random-initialised LP-SAM (no checkpoint needed) is built in memory. For each configuration:
one warm-up pass, then ``--repeats`` timed repeats of ``--iters`` forward passes (encoder +
prompt engine + decoder, the ``LPSAMPredictor`` model call); the median images/s is printed.
Side-by-side ratios: bf16 / fp32 at the same size and batch (GPU), and on the CPU the cost of
the adapters (LP-SAM encoder vs the vanilla SAM encoder) and of mask-set post-processing
(``LPSAMPredictor.predict`` vs the bare forward).

GPU (the lead runs it; capped to stay < 4 min on an H100; OOM is reported, not fatal):
    python3 benchmarks/bench_lpsam.py --device cuda --spec vit_b --sizes 256 1024 \
        --batch-sizes 1 2 4 8 16 32 --dtypes fp32 bf16
CPU (tiny model):
    python3 benchmarks/bench_lpsam.py            # or --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from anaus_core.lpsam.build import LPSAMModelConfig, build_lpsam, tiny_model_config  # noqa: E402
from anaus_core.lpsam.predictor import LPSAMPredictor, PredictorOptions  # noqa: E402
from anaus_core.sam import build_sam  # noqa: E402

CLASSES = ["nodule", "gland", "vessel"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, *, device, repeats: int, iters: int, deadline: float) -> list[float]:
    """Seconds per call, one entry per repeat (median of the caller's choosing)."""
    fn()  # warm-up (cuDNN autotuning, allocator)
    synchronize(device)
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        synchronize(device)
        per_call.append((time.perf_counter() - start) / iters)
        if time.perf_counter() > deadline:
            break
    return per_call


def model_config(spec: str, size: int) -> LPSAMModelConfig:
    return tiny_model_config(image_size=size) if spec == "tiny" else LPSAMModelConfig(spec=spec, image_size=size)


def bench_forward(args, device) -> None:
    deadline = time.perf_counter() + args.time_budget
    print(f"# LP-SAM forward, spec={args.spec}, device={device}, repeats={args.repeats}, iters={args.iters}")
    if device.type == "cuda":
        print(f"# {torch.cuda.get_device_name(device)}")
    print(f"{'size':>5} {'batch':>5} {'dtype':>5} {'img/s':>9} {'peak MiB':>9} {'bf16/fp32':>9}")
    for size in args.sizes:
        torch.manual_seed(0)
        model = build_lpsam(model_config(args.spec, size), class_names=CLASSES).to(device).eval()
        fp32_rate: dict[int, float] = {}
        failed_from: dict[str, int] = {}
        for batch_size in args.batch_sizes:
            for dtype in args.dtypes:
                if time.perf_counter() > deadline:
                    print(f"{size:>5} {batch_size:>5} {dtype:>5} {'skipped (time budget)':>20}")
                    continue
                if dtype in failed_from and batch_size >= failed_from[dtype]:
                    print(f"{size:>5} {batch_size:>5} {dtype:>5} {'OOM (smaller batch already failed)':>20}")
                    continue
                pixels = torch.rand(batch_size, 1, size, size, device=device) * 255
                use_bf16 = dtype == "bf16"
                if use_bf16 and device.type == "cpu":
                    print(f"{size:>5} {batch_size:>5} {dtype:>5} {'n/a on CPU (predictor uses autocast on CUDA only)':>20}")
                    continue

                def forward():
                    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        return model(pixels)

                try:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    seconds = statistics.median(time_call(forward, device=device, repeats=args.repeats, iters=args.iters, deadline=deadline))
                except torch.cuda.OutOfMemoryError:
                    failed_from[dtype] = batch_size
                    del pixels
                    torch.cuda.empty_cache()
                    print(f"{size:>5} {batch_size:>5} {dtype:>5} {'OOM':>9}")
                    continue
                rate = batch_size / seconds
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
                ratio = ""
                if dtype == "fp32":
                    fp32_rate[batch_size] = rate
                elif batch_size in fp32_rate:
                    ratio = f"{rate / fp32_rate[batch_size]:.2f}x"
                print(f"{size:>5} {batch_size:>5} {dtype:>5} {rate:>9.2f} {peak:>9.0f} {ratio:>9}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_cpu_extras(args, device) -> None:
    """Adapter overhead and post-processing overhead, side by side, at the first size."""
    size, batch_size = args.sizes[0], args.batch_sizes[-1]
    deadline = time.perf_counter() + args.time_budget
    torch.manual_seed(0)
    model = build_lpsam(model_config(args.spec, size), class_names=CLASSES).to(device).eval()
    vanilla = build_sam(args.spec, image_size=size).to(device).eval()
    pixels = torch.rand(batch_size, 1, size, size, device=device) * 255
    normalised = model.image_encoder.normalizer(pixels)
    with torch.inference_mode():
        adapted = statistics.median(time_call(lambda: model.image_encoder(pixels), device=device, repeats=args.repeats, iters=args.iters, deadline=deadline))
        plain = statistics.median(time_call(lambda: vanilla.image_encoder(normalised), device=device, repeats=args.repeats, iters=args.iters, deadline=deadline))
        bare = statistics.median(time_call(lambda: model(pixels), device=device, repeats=args.repeats, iters=args.iters, deadline=deadline))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(batch_size)]
    predictor = LPSAMPredictor(model, device=device, batch_size=batch_size, options=PredictorOptions(threshold=0.5))
    full = statistics.median(time_call(lambda: predictor.predict(images, finalize=True), device=device, repeats=args.repeats, iters=args.iters, deadline=deadline))
    print(f"# side by side at size {size}, batch {batch_size}")
    print(f"encoder img/s: LP-SAM {batch_size / adapted:.1f}, vanilla SAM {batch_size / plain:.1f}, ratio {plain / adapted:.2f}x (adapter cost)")
    print(f"prediction img/s: forward only {batch_size / bare:.1f}, predict() with mask sets {batch_size / full:.1f}, ratio {bare / full:.2f}x (post-processing cost)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--spec", default=None, help="SAM spec (default: tiny on CPU, vit_b on CUDA)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--time-budget", type=float, default=180.0, help="seconds; later configurations are skipped once spent")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    args.spec = args.spec or ("vit_b" if cuda else "tiny")
    args.sizes = args.sizes or ([256, 1024] if cuda else [64, 256])
    args.batch_sizes = args.batch_sizes or ([1, 2, 4, 8, 16, 32] if cuda else [1, 8])
    args.dtypes = args.dtypes or (["fp32", "bf16"] if cuda else ["fp32"])
    args.iters = args.iters or 2
    if args.quick:
        args.sizes, args.batch_sizes, args.repeats, args.iters = args.sizes[:1], args.batch_sizes[:2], 1, 1
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench_forward(args, device)
    if not cuda:
        bench_cpu_extras(args, device)


if __name__ == "__main__":
    main()
