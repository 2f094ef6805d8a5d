"""kill -9 trials for `anaus pretrain` and `anaus precompute-masks` on the committed code.

Each trial starts the command as a subprocess, sends SIGKILL after a random delay (seeded),
re-runs it (pretrain: ``--resume`` when a last.pt exists) until it finishes, and compares the
result with an uninterrupted reference run:

* pretrain: every tensor of the final ``encoder.pt`` and ``fpn.pt`` bit-identical, the step
  list of ``metrics.jsonl`` without gaps or repeats, no ``.tmp-`` file left;
* precompute: every shard and the index byte-identical, ``manifest.json`` identical but for its
  ``created`` time stamp; no ``.tmp-`` file left.

Usage (tiny sizes; a few minutes on 2 CPU cores)::

    python benchmarks/kill_test.py --what pretrain --trials 5
    python benchmarks/kill_test.py --what precompute --trials 5

Prints one line per trial and a summary line; exits 1 if any trial's result differed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRETRAIN_SET = {
    "data.num_workers": 0, "data.shuffle_buffer": 8, "views.size": 32, "views.num_mask_samples": 4, "views.core_min_side": 4,
    "augment.view1.blur_kernel": 5, "augment.view2.blur_kernel": 5, "model.fpn_channels": 16,
    "model.projector_hidden_dim": 32, "model.projector_dim": 16, "model.predictor_hidden_dim": 32,
    "run.log_every": 1, "run.tensorboard": False, "optim.warmup_steps": 2,
}


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def pretrain_args(shards: Path, out: Path, steps: int, resume: bool) -> list[str]:
    args = [sys.executable, "-m", "cli", "pretrain", "--out", str(out), "--no-progress"]
    if resume:
        return args + ["--resume"]
    args += ["--shards", str(shards), "--steps", str(steps), "--batch-size", "4", "--device", "cpu", "--checkpoint-every", "1", "--seed", "3"]
    for key, value in PRETRAIN_SET.items():
        args += ["--set", f"{key}={value}"]
    return args


def precompute_args(corpus: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cli", "precompute-masks", str(corpus), "--out", str(out), "--masker", "felzenszwalb",
            "--stored-size", "64", "--samples-per-shard", "3", "--no-progress"]


def tensors_digest(path: Path) -> str:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def folder_digest(out: Path, *, skip: tuple[str, ...] = ()) -> str:
    digest = hashlib.sha256()
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if path.is_file() and not any(part in skip for part in rel.parts) and path.name != ".lock":
            digest.update(str(rel).encode())
            data = path.read_bytes()
            if rel == Path("manifest.json"):  # its "created" time stamp differs between any two runs by design
                manifest = json.loads(data)
                manifest.pop("created", None)
                data = json.dumps(manifest, sort_keys=True).encode()
            digest.update(data)
    return digest.hexdigest()


def temps(out: Path) -> int:
    return sum(1 for p in out.rglob("*") if ".tmp-" in p.name)


def run_to_end(args: list[str], *, timeout: float = 600) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"run failed (rc {done.returncode}): {' '.join(args)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def kill_after(args: list[str], delay: float) -> bool:
    """Start, SIGKILL after ``delay`` s; True if it was killed (False: it finished first)."""
    process = subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        return True


def pretrain_result(out: Path) -> dict:
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"encoder": tensors_digest(out / "encoder.pt"), "fpn": tensors_digest(out / "fpn.pt"), "steps": steps}


def trial_pretrain(root: Path, shards: Path, steps: int, reference: dict, duration: float, rng: random.Random, number: int) -> dict:
    out = root / f"trial-{number}"
    delay = rng.uniform(0.3, 0.8 * duration)  # the reference time is measured under the same load; leave room to be killed
    killed = kill_after(pretrain_args(shards, out, steps, resume=False), delay)
    left = temps(out) if out.exists() else 0
    kills = int(killed)
    restarts = 0
    while not (out / "encoder.pt").exists():
        resume = (out / "checkpoints" / "last.pt").exists()
        if restarts == 0 and killed and rng.random() < 0.5:  # a second kill during the resumed run
            again = kill_after(pretrain_args(shards, out, steps, resume=resume), rng.uniform(0.3, duration))
            kills += int(again)
            restarts += 1
            continue
        if not resume and out.exists():
            shutil.rmtree(out)  # killed before the first checkpoint: start again
        run_to_end(pretrain_args(shards, out, steps, resume=resume))
        restarts += 1
    result = pretrain_result(out)
    same = result == reference
    return {"trial": number, "delay_s": round(delay, 2), "kills": kills, "restarts": restarts, "temps_after_kill": left,
            "temps_at_end": temps(out), "identical": same, "steps_logged": result["steps"] == list(range(1, steps + 1))}


def trial_precompute(root: Path, corpus: Path, reference: str, duration: float, rng: random.Random, number: int) -> dict:
    out = root / f"trial-{number}"
    delay = rng.uniform(0.3, 0.8 * duration)  # the reference time is measured under the same load; leave room to be killed
    killed = kill_after(precompute_args(corpus, out), delay)
    left = temps(out) if out.exists() else 0
    run_to_end(precompute_args(corpus, out))
    same = folder_digest(out, skip=("cache", "report.json", "errors.jsonl")) == reference
    return {"trial": number, "delay_s": round(delay, 2), "kills": int(killed), "temps_after_kill": left, "temps_at_end": temps(out),
            "identical": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=["pretrain", "precompute"], required=True)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12, help="pretrain: optimiser steps of the run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix=f"kill-{args.what}-"))
    results = []
    if args.what == "pretrain":
        from shards.synthetic import write_synthetic_store

        shards = write_synthetic_store(root / "shards", count=24, samples_per_shard=6, height=48, width=48)
        duration = run_to_end(pretrain_args(shards, root / "reference", args.steps, resume=False))
        reference = pretrain_result(root / "reference")
        print(f"reference: {args.steps} steps in {duration:.1f} s")
        for number in range(args.trials):
            results.append(trial_pretrain(root, shards, args.steps, reference, duration, rng, number))
            print(json.dumps(results[-1]))
    else:
        from anaus_core.phantoms import make_phantom_corpus

        make_phantom_corpus(root / "corpus", count=12, size=64, seed=0)
        corpus = root / "corpus"
        duration = run_to_end(precompute_args(corpus, root / "reference"))
        reference = folder_digest(root / "reference", skip=("cache", "report.json", "errors.jsonl"))
        print(f"reference: precompute in {duration:.1f} s")
        for number in range(args.trials):
            results.append(trial_precompute(root, corpus, reference, duration, rng, number))
            print(json.dumps(results[-1]))
    kills = sum(r["kills"] for r in results)
    identical = sum(r["identical"] for r in results)
    print(f"summary: {args.what}: {len(results)} trials, {kills} SIGKILLs delivered, {identical}/{len(results)} results identical "
          f"to the uninterrupted run, temp files left at the end: {sum(r['temps_at_end'] for r in results)}")
    shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if identical == len(results) else 1)


if __name__ == "__main__":
    main()
