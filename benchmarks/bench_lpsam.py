"""LP-SAM prediction throughput, new path beside old, with FLOP accounting and MFU.

A random-initialised LP-SAM (no checkpoint needed) is built in memory. Two code paths:

* ``old``: segment_anything's attention and its per-image mask decoder (``LPSAM.set_fast_path
  (False)``); bf16 = fp32 weights under ``torch.autocast`` (the predictor before issue 13).
* ``new``: SDPA attention (relative positions as an additive bias) and the batched decoder
  (``set_fast_path(True)``, the default build); bf16 = bf16 weights (``LPSAMPredictor``'s
  ``precision="bf16"``), optionally ``--compile``.

Modes (``--mode``, several allowed):

* ``forward``: images/s of the model call (encoder + prompt engine + decoder), median of
  ``--repeats`` timed repeats of ``--iters`` calls after a warm-up, old and new alternating
  within each repeat (fair on a shared machine); peak GPU memory; FLOPs per
  image counted with ``torch.utils.flop_counter.FlopCounterMode`` on the old path (its explicit
  matmuls are the model's arithmetic; CPU SDPA kernels are not counted by the counter), achieved
  TFLOP/s, and on CUDA the MFU against the device's dense bf16 peak (``PEAK_BF16_TFLOPS``; an
  unknown device prints no MFU); new/old ratio at the same size, batch and dtype.
* ``predict``: ``LPSAMPredictor.predict`` (uint8 images -> finished mask sets) beside the bare
  forward, new predictor (device post-processing, worker threads) vs old path (reference model,
  post-processing inline).
* ``precompute``: ``precompute-masks --masker lpsam`` end to end (synthetic PNG corpus, random
  LP-SAM checkpoint; wall time including model loading and packing) for ``--runs WORKERS:PREFETCH``
  settings (in-process without / with the ingest prefetch; N worker processes, each with its own
  model on the device), against the bare model rate at the same batch size and precision: the
  ratio the issue asks to be >= 0.8.

GPU (one command, < ~8 minutes on an H100/H200): benchmarks/gpu_check.sh
CPU:
    python benchmarks/bench_lpsam.py --mode forward predict                       # tiny, 64/256 px
    python benchmarks/bench_lpsam.py --spec vit_b --sizes 256 --batch-sizes 1 --repeats 1 --iters 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from anaus_core.lpsam.build import LPSAMModelConfig, build_lpsam, tiny_model_config  # noqa: E402
from anaus_core.lpsam.predictor import LPSAMPredictor, PredictorOptions  # noqa: E402

CLASSES = ["nodule", "gland", "vessel"]

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets. Matched
# in order against torch.cuda.get_device_name(); first hit wins.
PEAK_BF16_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 989.0),  # H200 SXM (and GH200)
    (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),  # H100 SXM
    (("B200",), 2250.0),
    (("A100",), 312.0),
    (("L40S",), 362.0),
    (("A10G",), 70.0),
    (("L4",), 121.0),
]


def peak_bf16_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for needles, peak in PEAK_BF16_TFLOPS:
        if all(n in name for n in needles):
            return peak
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, *, device, repeats: int, iters: int, deadline: float) -> list[float]:
    """Seconds per call, one entry per repeat (median of the caller's choosing)."""
    fn()  # warm-up (cuDNN autotuning, allocator, compilation)
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


def count_flops_per_image(model, size: int, device: torch.device) -> int:
    """FLOPs of one image through the old (reference) path: every matmul explicit, so the counter
    sees all of them; batch 2 so that per-image costs are not confused with per-batch ones."""
    fast = model.batched_decoder
    model.set_fast_path(False)
    grads = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # the counter's module tracker trips over expanded leaf views
    try:
        pixels = torch.rand(2, model.in_chans, size, size, device=device) * 255
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(pixels)
        return counter.get_total_flops() // 2
    finally:
        for parameter, flag in zip(model.parameters(), grads):
            parameter.requires_grad_(flag)
        model.set_fast_path(fast)


def variant(model, path: str, dtype: str, *, compile: bool):
    """(callable model, autocast?) for a path/dtype: a copy of ``model`` on that path (the old
    bf16 path autocasts fp32 weights; the new one is a bf16 copy)."""
    model = copy.deepcopy(model).set_fast_path(path == "new")
    if path == "old":
        return model, dtype == "bf16"
    if dtype == "bf16":
        model.to(torch.bfloat16)
        model.image_encoder.normalizer.float()
        model.prompt_encoder.float()
    return (torch.compile(model) if compile else model), False


def time_paths(calls: dict, *, device, repeats: int, iters: int, deadline: float) -> tuple[dict, dict]:
    """Median seconds per call and peak MiB for each path; the paths alternate within every
    repeat so that a shared machine's load affects old and new alike."""
    peaks = {path: 0.0 for path in calls}
    for call in calls.values():
        call()  # warm-up (cuDNN autotuning, allocator, compilation)
    synchronize(device)
    seconds: dict[str, list[float]] = {path: [] for path in calls}
    for _ in range(repeats):
        for path, call in calls.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(iters):
                call()
            synchronize(device)
            seconds[path].append((time.perf_counter() - start) / iters)
            if device.type == "cuda":
                peaks[path] = max(peaks[path], torch.cuda.max_memory_allocated(device) / 2**20)
        if time.perf_counter() > deadline:
            break
    return {path: statistics.median(values) for path, values in seconds.items()}, peaks


def bench_forward(args, device) -> None:
    deadline = time.perf_counter() + args.time_budget
    peak = peak_bf16_tflops(device)
    print(f"# LP-SAM forward, spec={args.spec}, device={device}, repeats={args.repeats}, iters={args.iters}, compile(new)={args.compile}")
    if device.type == "cuda":
        print(f"# {torch.cuda.get_device_name(device)}; dense bf16 peak {peak if peak else 'unknown (MFU not printed)'} TFLOP/s")
    print(f"{'size':>5} {'batch':>5} {'dtype':>5} {'path':>4} {'img/s':>9} {'peak MiB':>9} {'GFLOP/img':>9} {'TFLOP/s':>8} {'MFU':>6} {'new/old':>7}")
    for size in args.sizes:
        torch.manual_seed(0)
        model = build_lpsam(model_config(args.spec, size), class_names=CLASSES).to(device).eval()
        flops = count_flops_per_image(model, size, device)
        failed_from: dict[str, int] = {}
        for dtype in args.dtypes:
            runners = {path: variant(model, path, dtype, compile=args.compile and path == "new") for path in args.paths}
            for batch_size in args.batch_sizes:
                label = f"{size:>5} {batch_size:>5} {dtype:>5}"
                if time.perf_counter() > deadline:
                    print(f"{label} skipped (time budget)")
                    continue
                if dtype in failed_from and batch_size >= failed_from[dtype]:
                    print(f"{label} OOM (smaller batch already failed)")
                    continue
                pixels = torch.rand(batch_size, 1, size, size, device=device) * 255

                def make_call(runner, autocast):
                    def call():
                        with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                            return runner(pixels)

                    return call

                calls = {path: make_call(*runners[path]) for path in args.paths}
                try:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    seconds, peaks = time_paths(calls, device=device, repeats=args.repeats, iters=args.iters, deadline=deadline)
                except torch.cuda.OutOfMemoryError:
                    failed_from[dtype] = batch_size
                    del pixels, calls
                    torch.cuda.empty_cache()
                    print(f"{label} OOM (one of the paths)")
                    continue
                for path in args.paths:
                    rate = batch_size / seconds[path]
                    memory = peaks[path] if device.type == "cuda" else float("nan")
                    tflops = rate * flops / 1e12
                    mfu = f"{100 * tflops / peak:5.1f}%" if (peak and dtype == "bf16") else "-"
                    ratio = f"{seconds['old'] / seconds['new']:.2f}x" if path == "new" and "old" in seconds else ""
                    print(f"{label} {path:>4} {rate:>9.2f} {memory:>9.0f} {flops / 1e9:>9.2f} {tflops:>8.3f} {mfu:>6} {ratio:>7}", flush=True)
                del pixels, calls
            del runners
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_predict(args, device) -> None:
    """predict() (uint8 images -> finalized mask sets) vs the bare forward, new vs old."""
    size, batch_size = args.sizes[0], args.batch_sizes[-1]
    deadline = time.perf_counter() + args.time_budget
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size + 13, size - 7), dtype=np.uint8) for _ in range(batch_size * 2)]
    dtype = args.dtypes[-1]
    print(f"# predict() vs bare forward, size {size}, batch {batch_size}, {len(images)} images of {images[0].shape}, dtype {dtype}")
    rates = {}
    for path in args.paths:
        torch.manual_seed(0)
        model = build_lpsam(model_config(args.spec, size), class_names=CLASSES, fast=path == "new")
        precision = ("bf16" if path == "new" else "bf16-autocast") if dtype == "bf16" else "fp32"
        predictor = LPSAMPredictor(
            model, device=device, batch_size=batch_size, precision=precision, compile=args.compile and path == "new",
            postprocess_workers=2 if path == "new" else 0, options=PredictorOptions(threshold=0.5),
        )
        pixels = predictor._pixels(images[:batch_size])

        def bare():
            with torch.inference_mode():
                return predictor._model_outputs(pixels)

        forward = statistics.median(time_call(bare, device=device, repeats=args.repeats, iters=args.iters, deadline=deadline))
        full = statistics.median(time_call(lambda: predictor.predict(images, finalize=True), device=device, repeats=args.repeats, iters=1, deadline=deadline))
        rates[path] = len(images) / full
        print(f"{path}: forward only {batch_size / forward:.1f} img/s, predict() with mask sets {rates[path]:.1f} img/s, predict/forward {rates[path] * forward / batch_size:.2f}")
        predictor.close()
    if "new" in rates and "old" in rates:
        print(f"predict() new/old: {rates['new'] / rates['old']:.2f}x")


def _write_corpus(root: Path, count: int, shape: tuple[int, int]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for index in range(count):
        cy, cx, radius = rng.uniform(0.3, 0.7) * shape[0], rng.uniform(0.3, 0.7) * shape[1], rng.uniform(0.1, 0.25) * min(shape)
        image = rng.gamma(2.0, 30.0, shape) + 90 * (np.hypot(yy - cy, xx - cx) < radius)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / f"img{index:05d}.png")
    return root


def _random_lpsam_checkpoint(root: Path, spec: str, size: int) -> tuple[Path, Path]:
    from anaus_core.lpsam.checkpoint import save_checkpoint
    from anaus_core.sam import file_sha256, resolve_spec, save_random_sam_checkpoint

    sam = save_random_sam_checkpoint(root / f"sam_{spec}.pth", spec, seed=0)
    config = model_config(spec, size)
    model = build_lpsam(config, class_names=CLASSES, sam_checkpoint=sam)
    payload = {
        "stage": "prompter", "epoch": 0, "model_config": config.to_dict(), "spec": resolve_spec(spec).to_dict(), "class_names": CLASSES,
        "base_sam_sha256": file_sha256(sam), "trained": {"prompt_engine": model.engine_state_dict()}, "adapters": model.adapter_state_dict(),
    }
    return save_checkpoint(root / "lpsam.pt", payload), sam


def bench_precompute(args, device) -> None:
    """End-to-end precompute-masks --masker lpsam vs the bare model rate (same batch, precision)."""
    from pipeline.config import PrecomputeConfig
    from pipeline.job import run_precompute

    size, batch_size = args.sizes[0], args.batch_sizes[-1]
    precision = "bf16" if (device.type == "cuda" and "bf16" in args.dtypes) else "fp32"
    with tempfile.TemporaryDirectory(prefix="bench_lpsam_") as tmp:
        root = Path(tmp)
        corpus = _write_corpus(root / "corpus", args.images, (size + size // 4, size))
        checkpoint, sam = _random_lpsam_checkpoint(root, args.spec, size)
        # bare model rate: the predictor's own forward on a batch of this corpus' images
        torch.manual_seed(0)
        model = build_lpsam(model_config(args.spec, size), class_names=CLASSES)
        predictor = LPSAMPredictor(model, device=device, batch_size=batch_size, precision=precision, compile=args.compile)
        pixels = torch.rand(batch_size, 1, size, size, device=device) * 255
        seconds = statistics.median(time_call(lambda: predictor._model_outputs(pixels), device=device, repeats=args.repeats, iters=args.iters, deadline=time.perf_counter() + args.time_budget))
        bare = batch_size / seconds
        del predictor, model, pixels
        print(f"# precompute-masks --masker lpsam end to end: {args.images} PNGs {size + size // 4}x{size}, spec {args.spec}, stored/model size {size}, batch {batch_size}, {precision}, device {device}")
        print(f"bare model (forward only): {bare:.1f} img/s")
        for run in args.runs:
            workers, prefetch = (int(part) for part in run.split(":"))
            config = PrecomputeConfig(
                corpus=str(corpus), out=str(root / f"out-{workers}-{prefetch}"), workers=workers, masker="lpsam", checkpoint=str(checkpoint), sam_checkpoint=str(sam),
                masker_options={"threshold": 0.5, "precision": precision, "compile": args.compile}, stored_size=size, batch_size=batch_size,
                device=str(device), prefetch=prefetch, progress=False, samples_per_shard=1000,
            )
            report = run_precompute(config, show_report=False)
            rate = args.images / report.wall_seconds
            stages = ", ".join(f"{name} {summary.seconds:.1f} s" for name, summary in report.stages.items())
            print(f"workers {workers}, prefetch {prefetch}: {rate:.1f} img/s end to end (wall {report.wall_seconds:.1f} s incl. model load; masker calls {report.masker_seconds:.1f} s; "
                  f"stage time {stages}; pack {report.pack_seconds:.1f} s), ratio to bare model {rate / bare:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", nargs="+", default=None, choices=["forward", "predict", "precompute"])
    parser.add_argument("--spec", default=None, help="SAM spec (default: tiny on CPU, vit_b on CUDA)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16"])
    parser.add_argument("--paths", nargs="+", default=["old", "new"], choices=["old", "new"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the new path")
    parser.add_argument("--images", type=int, default=64, help="corpus size of --mode precompute")
    parser.add_argument("--runs", nargs="+", default=["0:0", "0:2"], help="--mode precompute: WORKERS:PREFETCH settings to run (workers 0 = in-process)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--time-budget", type=float, default=180.0, help="seconds per mode; later configurations are skipped once spent")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    args.mode = args.mode or (["forward"] if cuda else ["forward", "predict"])
    args.spec = args.spec or ("vit_b" if cuda else "tiny")
    args.sizes = args.sizes or ([256, 1024] if cuda else [64, 256])
    args.batch_sizes = args.batch_sizes or ([1, 8, 32] if cuda else [1, 8])
    args.dtypes = args.dtypes or (["fp32", "bf16"] if cuda else ["fp32"])
    args.iters = args.iters or 2
    if args.quick:
        args.sizes, args.batch_sizes, args.repeats, args.iters = args.sizes[:1], args.batch_sizes[:2], 1, 1
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}")
    for mode in args.mode:
        {"forward": bench_forward, "predict": bench_predict, "precompute": bench_precompute}[mode](args, device)


if __name__ == "__main__":
    main()
