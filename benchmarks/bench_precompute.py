"""Benchmarks of `anaus precompute-masks` (see docs/benchmarks.md (precompute)).

    python3 benchmarks/bench_precompute.py            # full CPU run (a few minutes on 2 cores)
    python3 benchmarks/bench_precompute.py --quick    # small sizes, for CI / a smoke check
    python3 benchmarks/bench_precompute.py --device cuda --sam-spec vit_b   # GPU: SAM ViT-B at 1024

Sections (each prints medians over ``--repeats`` fresh runs):

1. throughput per masker (labels, kmeans, felzenszwalb, a random-initialised SAM): samples/s
   of the whole job, seconds per stage, time inside the masker, and the pipeline's overhead
   as a fraction of the masker's own time, ``(wall - masker) / masker``;
2. a no-op re-run over ``--noop-samples`` samples (default 10,000 tiny 64 px images with the
   labels masker): wall time of the run that finds everything up to date;
3. peak RSS of the whole job (a child process per run, its ``VmHWM``) against corpus
   size, to show memory stays flat as the corpus grows.

``--device cuda`` runs only the GPU section: SAM (``--sam-spec``, random weights, native size)
with batching and bf16 autocast on ``--gpu-samples`` phantoms; samples/s, masker share of
wall time and GPU utilisation sampled every 0.2 s (``torch.cuda.utilization`` / nvidia-smi).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


# ---------------------------------------------------------------------------------------------
# corpora
# ---------------------------------------------------------------------------------------------


def make_tiny_corpus(root: Path, count: int, size: int = 64, seed: int = 0) -> Path:
    """``count`` small synthetic images with {0..3} label maps (fast to make in bulk):
    root/img/s_XXXXXXX.png and root/label/s_XXXXXXX.png."""
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "label").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for index in range(count):
        name = f"s_{index:07d}.png"
        if (root / "img" / name).exists():
            continue
        label = np.zeros((size, size), np.uint8)
        for value in (1, 2, 3):
            cy, cx, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(4, size // 4))]
            label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = value
        image = (60 + 50 * label + rng.normal(0, 12, (size, size))).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "img" / name, compress_level=1)
        Image.fromarray(label).save(root / "label" / name, compress_level=1)
    return root


def list_file(root: Path, count: int) -> Path:
    """A corpus list file naming the first ``count`` images of a tiny corpus."""
    names = sorted(p.name for p in (root / "img").glob("*.png"))[:count]
    # Inside img/ so relative paths (and so label paths under label/) are just the file names.
    path = root / "img" / f"list_{count}.txt"
    path.write_text("".join(f"{n}\n" for n in names))
    return path


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------


def precompute(corpus: Path, out: Path, **options):
    from pipeline.config import PrecomputeConfig
    from pipeline.job import run_precompute

    config = PrecomputeConfig(corpus=str(corpus), out=str(out), progress=False, **options)
    report = run_precompute(config, show_report=False)
    if report.exit_code:
        raise SystemExit(f"benchmark run skipped inputs: {report.errors[:3]}")
    return report


def median(values):
    return statistics.median(values) if values else float("nan")


def bench_maskers(work: Path, *, count: int, size: int, repeats: int, sam_size: int, sam_points: int) -> list[dict]:
    from anaus_core.phantoms import make_phantom_corpus
    from anaus_core.sam import save_random_sam_checkpoint

    corpus = work / "phantoms"
    make_phantom_corpus(corpus, count=count, size=size, seed=0)
    checkpoint = save_random_sam_checkpoint(work / "tiny_sam.pth", "tiny", seed=0)
    setups = {
        "labels": dict(masker="labels", labels=str(corpus / "label")),
        "kmeans": dict(masker="kmeans"),
        "felzenszwalb": dict(masker="felzenszwalb"),
        f"sam (tiny, random, {sam_size} px)": dict(
            masker="sam", checkpoint=str(checkpoint), batch_size=8,
            masker_options={"image_size": sam_size, "points_per_side": sam_points, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
        ),
    }
    rows = []
    for name, options in setups.items():
        runs = []
        for repeat in range(repeats):
            out = work / f"out_{options['masker']}_{repeat}"
            shutil.rmtree(out, ignore_errors=True)
            runs.append(precompute(corpus / "img", out, stored_size=size, samples_per_shard=64, **options))
            shutil.rmtree(out, ignore_errors=True)
        wall = median([r.wall_seconds for r in runs])
        masker = median([r.masker_seconds for r in runs])
        row = {
            "masker": name,
            "samples": runs[0].samples,
            "wall_s": wall,
            "samples_per_s": runs[0].samples / wall,
            "ingest_s": median([r.stages["ingest"].seconds for r in runs]),
            "mask_s": median([r.stages["mask"].seconds for r in runs]),
            "masker_s": masker,
            "pyramid_s": median([r.stages["pyramid"].seconds for r in runs]),
            "pack_s": median([r.pack_seconds for r in runs]),
            "plan_s": median([r.plan_seconds for r in runs]),
            "overhead": median([(r.wall_seconds - r.masker_seconds) / r.masker_seconds for r in runs]),
        }
        rows.append(row)
        print(
            f"{name:32s} {row['samples_per_s']:8.1f} samples/s  wall {wall:6.2f} s  ingest {row['ingest_s']:.2f}  "
            f"mask {row['mask_s']:.2f} (masker {masker:.2f})  pyramid {row['pyramid_s']:.2f}  pack {row['pack_s']:.2f}  "
            f"overhead {100 * row['overhead']:.0f}% of masker time",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------
# child-process runs: peak RSS and no-op time
# ---------------------------------------------------------------------------------------------

_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.config import PrecomputeConfig
from pipeline.job import run_precompute
start = time.perf_counter()
report = run_precompute(PrecomputeConfig(corpus=sys.argv[2], out=sys.argv[3], masker="labels", labels=sys.argv[4],
                        stored_size=64, samples_per_shard=1000, batch_size=64, progress=False), show_report=False)
if report.exit_code != 0:
    raise SystemExit(f"benchmark run skipped inputs: {report.errors[:2]}")
# VmHWM, not getrusage: VmHWM survives fork+exec on Linux and would report the parent's peak.
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"wall_s": report.wall_seconds, "in_process_s": time.perf_counter() - start, "samples": report.samples,
                  "did_no_work": report.did_no_work, "computed": {k: v.computed for k, v in report.stages.items()},
                  "sources_hashed": report.sources_hashed, "plan_s": report.plan_seconds,
                  "peak_rss_mib": peak_kib / 1024}))
"""


def child_run(corpus: Path, out: Path, labels: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, str(REPO_ROOT), str(corpus), str(out), str(labels)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def bench_memory_and_noop(work: Path, *, sizes: list[int], noop_samples: int, repeats: int, phase_split: bool = False) -> dict:
    corpus = make_tiny_corpus(work / "tiny", max(sizes + [noop_samples]))
    labels = corpus / "label"
    memory = []
    noop_out = None
    for count in sizes:
        out = work / f"tiny_out_{count}"
        shutil.rmtree(out, ignore_errors=True)
        result = child_run(list_file(corpus, count), out, labels)
        memory.append({"samples": count, "peak_rss_mib": result["peak_rss_mib"], "first_run_s": result["wall_s"], "samples_per_s": count / result["wall_s"]})
        print(f"first run, {count:6d} samples: {result['wall_s']:7.1f} s ({count / result['wall_s']:.0f} samples/s), peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
        if count == noop_samples:
            noop_out = out
    if noop_out is None:
        noop_out = work / f"tiny_out_{noop_samples}"
        shutil.rmtree(noop_out, ignore_errors=True)
        child_run(list_file(corpus, noop_samples), noop_out, labels)
    noops = [child_run(list_file(corpus, noop_samples), noop_out, labels) for _ in range(repeats)]
    assert all(n["did_no_work"] for n in noops), noops
    noop = {
        "samples": noop_samples,
        "wall_s": median([n["wall_s"] for n in noops]),
        "process_s": median([n["process_s"] for n in noops]),
        "plan_s": median([n["plan_s"] for n in noops]),
        "peak_rss_mib": median([n["peak_rss_mib"] for n in noops]),
    }
    print(
        f"no-op re-run over {noop_samples} samples: {noop['wall_s']:.2f} s inside the job "
        f"({noop['process_s']:.2f} s including interpreter start and imports), peak RSS {noop['peak_rss_mib']:.0f} MiB",
        flush=True,
    )
    if phase_split:
        for row in memory:
            out = work / f"tiny_out_{row['samples']}"
            corpus_list = list_file(corpus, row["samples"])
            again = child_run(corpus_list, out, labels)
            shutil.rmtree(out / "index.zarr", ignore_errors=True)
            (out / "manifest.json").unlink(missing_ok=True)
            index_only = child_run(corpus_list, out, labels)
            row["noop_peak_rss_mib"], row["noop_s"] = again["peak_rss_mib"], again["wall_s"]
            row["index_only_peak_rss_mib"], row["index_only_s"] = index_only["peak_rss_mib"], index_only["wall_s"]
            print(
                f"phase split, {row['samples']:6d} samples: no-op run peak RSS {again['peak_rss_mib']:.1f} MiB ({again['wall_s']:.2f} s); "
                f"index-only run (index + manifest deleted) peak RSS {index_only['peak_rss_mib']:.1f} MiB ({index_only['wall_s']:.2f} s)",
                flush=True,
            )
    if len(memory) >= 2:
        ratio = memory[-1]["peak_rss_mib"] / memory[0]["peak_rss_mib"]
        print(f"peak RSS {memory[-1]['samples']} vs {memory[0]['samples']} samples: ratio {ratio:.2f} (corpus ratio {memory[-1]['samples'] / memory[0]['samples']:.0f}x)")
    return {"memory": memory, "noop": noop}


# ---------------------------------------------------------------------------------------------
# GPU: SAM at native size
# ---------------------------------------------------------------------------------------------


class GpuSampler:
    """Samples GPU utilisation (%) every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float | None:
        import torch

        try:
            return float(torch.cuda.utilization())
        except Exception:
            pass
        try:
            text = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
            return float(text.split()[0])
        except Exception:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.values.append(value)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def bench_gpu(work: Path, *, spec: str, count: int, batch_size: int, points: int, device: str) -> dict:
    import torch

    from anaus_core.phantoms import make_phantom_corpus
    from anaus_core.sam import save_random_sam_checkpoint

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    corpus = work / "gpu_phantoms"
    make_phantom_corpus(corpus, count=count, size=256, seed=0)
    checkpoint = save_random_sam_checkpoint(work / f"{spec}_random.pth", spec, seed=0)
    options = dict(
        masker="sam", checkpoint=str(checkpoint), device=device, batch_size=batch_size, stored_size=256, samples_per_shard=256,
        masker_options={"points_per_side": points, "autocast": True},
    )
    # Warm-up (CUDA context, cuDNN autotune, allocator) on a few images, not timed.
    warm = work / "gpu_warm"
    precompute(Path(list_file_phantoms(corpus, 4)), warm, **options)
    out = work / "gpu_out"
    shutil.rmtree(out, ignore_errors=True)
    with GpuSampler() as sampler:
        report = precompute(corpus / "img", out, **options)
    steady = sampler.values[len(sampler.values) // 10 :] or sampler.values
    result = {
        "spec": spec,
        "device": torch.cuda.get_device_name(),
        "samples": report.samples,
        "wall_s": report.wall_seconds,
        "samples_per_s": report.samples / report.wall_seconds,
        "masker_s": report.masker_seconds,
        "masker_share": report.masker_seconds / report.wall_seconds,
        "overhead": (report.wall_seconds - report.masker_seconds) / report.masker_seconds,
        "gpu_util_mean": float(np.mean(steady)) if steady else None,
        "gpu_util_median": float(np.median(steady)) if steady else None,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "batch_size": batch_size,
        "points_per_side": points,
    }
    print(json.dumps(result, indent=1))
    return result


def list_file_phantoms(corpus: Path, count: int) -> Path:
    names = sorted(p.name for p in (corpus / "img").glob("*.png"))[:count]
    path = corpus / f"list_{count}.txt"
    path.write_text("".join(f"img/{n}\n" for n in names))
    return path


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke check)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    parser.add_argument("--noop-samples", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write all figures here")
    parser.add_argument("--skip-maskers", action="store_true", help="only the no-op and memory sections")
    parser.add_argument("--phase-split", action="store_true", help="after the memory runs: peak RSS of a no-op run and of an index-only run per size")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=None, help="corpus sizes of the memory section (default 1000 4000 10000)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sam-spec", default="vit_b")
    parser.add_argument("--gpu-samples", type=int, default=96)
    parser.add_argument("--gpu-batch-size", type=int, default=8)
    parser.add_argument("--gpu-points", type=int, default=32, help="SAM automatic-mask points per side")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    if args.device == "cpu":
        torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_precompute_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"quick": args.quick, "cpu_count": os.cpu_count()}
    try:
        if args.device != "cpu":
            results["gpu"] = bench_gpu(work, spec=args.sam_spec, count=args.gpu_samples, batch_size=args.gpu_batch_size, points=args.gpu_points, device=args.device)
        else:
            repeats = args.repeats or (1 if args.quick else 3)
            if not args.skip_maskers:
                print("== 1. throughput per masker (in-process, 1 thread)")
                results["maskers"] = bench_maskers(
                    work, count=16 if args.quick else 64, size=128 if args.quick else 256, repeats=repeats,
                    sam_size=128 if args.quick else 256, sam_points=8,
                )
            noop = args.noop_samples or (1000 if args.quick else 10_000)
            sizes = args.memory_sizes or ([250, 1000] if args.quick else [1000, 4000, 10_000])
            print(f"== 2./3. no-op re-run over {noop} samples; peak RSS vs corpus size")
            results.update(bench_memory_and_noop(work, sizes=sizes, noop_samples=noop, repeats=repeats, phase_split=args.phase_split))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
