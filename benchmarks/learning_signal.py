"""Learning-signal benchmark (issue 14 part 4): does pre-training help on ultrasound phantoms,
which view policy wins, and is AnaUS better than random init and whole-image BYOL?

Stages (``--stage all`` runs them in order; each re-uses what an earlier call wrote, so arms can
be trained by several processes side by side and reported together):

1. ``prepare``: a pre-training corpus (``anaus_core.phantoms``, both probe geometries, optional
   burned-in annotations) -> shards with each requested mask source (``labels``, ``kmeans``,
   ``felzenszwalb``; the precompute job's library entry point); held-apart phantoms of each probe
   geometry (another seed, never pre-trained on) -> the ``anaus evaluate`` classification layout
   (``anaus_core.evaluate.phantom_tasks``: class = dominant structure kind).
2. ``train``: for every arm x seed, ``anaus_core.train.pretrain`` with the online evaluation
   (``anaus_core.evaluate.online``: frozen-feature weighted kNN + linear probe, grouped k folds,
   never trained or selected on the scored fold) on each geometry's held-apart set every
   ``--eval-every`` steps, with each probe (``--probes``): ``regions`` (features pooled inside
   every structure and the tissue around them, classes = structure kind + tissue; the issue's
   protocol) and ``image`` (global pooled features, class = dominant structure kind) -> curves of
   probe accuracy over training steps; step 0 is the arm's random initialisation (same seed). The
   final encoder's per-fold accuracies are kept for the paired tests. Arms:

   * ``random``: the initialisation, not trained (its fold accuracies = every curve's step 0);
   * ``byol``: whole-image BYOL (``model.objective=byol``, ``model.context=false``: one
     whole-image mask per image and scale), the paper's view policy;
   * ``anaus-<policy>-<masks>``: AnaUS (L_ana + L_ctx) with ``augment.policy`` ``paper`` or
     ``ultrasound`` on ``labels`` / ``kmeans`` / ``felzenszwalb`` shards.
3. ``report``: mean curves (PNG), a table of final accuracies per probe, and paired two-sided
   Wilcoxon signed-rank tests (``anaus_core.evaluate.metrics.paired_test``, scipy) over folds x
   seeds x geometries between arms; written as ``report.md`` + ``results.json`` into ``--work``.

Run (the grid of docs/benchmarks.md; one ``train`` process per seed, side by side):

    OMP_NUM_THREADS=1 python3 benchmarks/learning_signal.py --work /tmp/ls --stage prepare --size 64 \
        --pretrain-count 160 --eval-count 80
    OMP_NUM_THREADS=1 python3 benchmarks/learning_signal.py --work /tmp/ls --stage train --size 64 --view-size 64 \
        --steps 1000 --eval-every 100 --eval-count 80 --seeds 0 --arms random byol anaus-paper-labels anaus-ultrasound-labels
    python3 benchmarks/learning_signal.py --work /tmp/ls --stage report --steps 1000 --eval-count 80 --seeds 0 1 2 \
        --arms random byol anaus-paper-labels anaus-ultrasound-labels --figure docs/img/learning_signal.png

Scale it with ``--steps``, ``--size``/``--view-size``, ``--batch-size``, ``--seeds``, ``--arms``,
``--pretrain-count``/``--eval-count``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GEOMETRIES = ("linear", "sector")
POLICIES = ("paper", "ultrasound")
MASKERS = ("labels", "kmeans", "felzenszwalb")
ALL_ARMS = ("random", "byol", *(f"anaus-{p}-{m}" for p in POLICIES for m in MASKERS))
KEY_ARMS = ("random", "byol", "anaus-paper-labels", "anaus-ultrasound-labels")
PROBES = ("regions", "image")
PROBE_TITLES = {"regions": "region probe (features pooled in each structure)",
                "image": "image probe (global pooled, dominant kind)"}


def arm_settings(arm: str) -> tuple[str, dict]:
    """(mask source of its shards, config overrides) of an arm."""
    if arm == "random":
        return "labels", {}
    if arm == "byol":
        return "labels", {"model.objective": "byol", "model.context": False, "augment.policy": "paper"}
    parts = arm.split("-")
    if len(parts) != 3 or parts[0] != "anaus" or parts[1] not in POLICIES or parts[2] not in MASKERS:
        raise SystemExit(f"unknown arm {arm!r}; choose from {', '.join(ALL_ARMS)}")
    return parts[2], {"model.objective": "anaus", "augment.policy": parts[1]}


# ------------------------------------------------------------------------------------------------
# 1. prepare
# ------------------------------------------------------------------------------------------------

def prepare(args) -> None:
    from anaus_core.evaluate.phantom_tasks import write_phantom_tasks
    from anaus_core.phantoms import make_phantom_corpus
    from pipeline.config import PrecomputeConfig
    from pipeline.job import run_precompute

    work = Path(args.work)
    corpus = work / "pretrain_corpus"
    if not (corpus / "img").exists() or len(list((corpus / "img").glob("*.png"))) < args.pretrain_count:
        make_phantom_corpus(corpus, count=args.pretrain_count, size=args.size, seed=0, progress=False,
                            annotations=args.annotations)
    maskers = sorted({arm_settings(arm)[0] for arm in args.arms})
    for masker in maskers:
        shards = work / f"shards_{masker}"
        if (shards / "manifest.json").exists():
            continue
        config = PrecomputeConfig(corpus=str(corpus / "img"), out=str(shards), masker=masker,
                                  labels=str(corpus / "label") if masker == "labels" else None,
                                  stored_size=args.size, samples_per_shard=max(8, args.pretrain_count // 4),
                                  progress=False)
        report = run_precompute(config, show_report=False)
        if report.exit_code:
            raise SystemExit(f"{shards}: precompute skipped {report.skipped} input(s)")
    for offset, geometry in enumerate(GEOMETRIES):
        held = work / "heldapart" / geometry
        if not (held / "img").exists():
            make_phantom_corpus(held, count=args.eval_count, size=args.size, seed=7919 + offset, progress=False,
                                annotations=args.annotations, geometry=geometry)
        tasks = write_phantom_tasks(held, work / "tasks" / geometry, min_per_class=args.folds + 1)
        print(f"held-apart {geometry}: classes {tasks['classes']} (left out: {tasks['left_out']})", flush=True)


# ------------------------------------------------------------------------------------------------
# 2. train
# ------------------------------------------------------------------------------------------------

class GeometryEvaluator:
    """The online evaluation on each geometry's held-apart set with each probe (``PROBES``):
    ``regions`` (features pooled inside every structure and the tissue around them, the issue's
    protocol) and ``image`` (global pooled features, class = dominant structure kind). Keys:
    ``eval_<probe>_<geometry>_knn_top1`` / ``_linear_acc``, their means over geometries as
    ``eval_<probe>_knn_top1`` / ``_linear_acc``, and the primary (first) probe's means as
    ``eval_knn_top1`` / ``eval_linear_acc`` (what the trainer draws)."""

    def __init__(self, work: Path, args) -> None:
        from anaus_core.evaluate.online import OnlineEvalConfig, OnlineEvaluator
        from pipeline.frame_reader import IngestFrameReader

        self.probes = list(args.probes)
        self.evaluators = {}
        for probe, geometry in itertools.product(self.probes, GEOMETRIES):
            layout = "regions" if probe == "regions" else "classification"
            config = OnlineEvalConfig(data=str(work / "tasks" / geometry / layout), every=args.eval_every,
                                      task=layout, max_images=args.eval_count, folds=args.folds, seed=0)
            self.evaluators[(probe, geometry)] = OnlineEvaluator(config, reader=IngestFrameReader(), image_size=args.size)

    def evaluate(self, encoder) -> dict[str, float]:
        record: dict[str, float] = {}
        for (probe, geometry), evaluator in self.evaluators.items():
            for key, value in evaluator.evaluate(encoder).items():
                record[key.replace("eval_", f"eval_{probe}_{geometry}_", 1)] = value
        for probe, metric in itertools.product(self.probes, ("knn_top1", "linear_acc")):
            record[f"eval_{probe}_{metric}"] = float(np.mean([record[f"eval_{probe}_{g}_{metric}"] for g in GEOMETRIES]))
        for metric in ("knn_top1", "linear_acc"):
            record[f"eval_{metric}"] = record[f"eval_{self.probes[0]}_{metric}"]
        return record

    def fold_accuracies(self, encoder) -> dict[str, dict[str, dict[str, list[float]]]]:
        """{probe: {geometry: {"knn": [per fold], "linear": [per fold]}}} of ``encoder``."""
        out: dict = {}
        for (probe, geometry), evaluator in self.evaluators.items():
            out.setdefault(probe, {})[geometry] = evaluator.fold_accuracies(encoder)
        return out


def pretrain_config(args, shards: Path, arm: str, seed: int):
    from anaus_core.config import apply_overrides
    from cli import demo_pretrain_config

    _, overrides = arm_settings(arm)
    config = demo_pretrain_config(shards, steps=args.steps, seed=seed, batch_size=args.batch_size)
    return apply_overrides(config, {"views.size": args.view_size, "run.progress": False, "run.log_every": args.log_every,
                                    "run.checkpoint_every": 0, "eval.every": args.eval_every, **overrides})


def train_arm(args, arm: str, seed: int, evaluator: GeometryEvaluator) -> dict:
    import torch

    from anaus_core.train import pretrain
    from anaus_core.train.trainer import build_model
    from cli import shard_data_source

    work = Path(args.work)
    out = work / "runs" / f"{arm}-s{seed}"
    result_path = out / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    masker, _ = arm_settings(arm)
    config = pretrain_config(args, work / f"shards_{masker}", arm, seed)
    started = time.perf_counter()
    initial = build_model(config)  # the arm's step-0 weights (build_model seeds with run.seed)
    curve = [{"step": 0, **evaluator.evaluate(initial.eval_encoder())}]
    if arm == "random":
        final_model = initial
    else:
        if out.exists():  # an interrupted run: start it again from scratch
            import shutil

            shutil.rmtree(out)
        result = pretrain(config, out, data=shard_data_source(config), evaluator=evaluator)
        curve += result.eval_records
        final_model = result.model
    folds = evaluator.fold_accuracies(final_model.eval_encoder())
    record = {"arm": arm, "seed": seed, "steps": 0 if arm == "random" else args.steps, "curve": curve,
              "folds": folds, "seconds": time.perf_counter() - started, "torch_threads": torch.get_num_threads()}
    out.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(record, indent=1))
    print(f"{arm} seed {seed}: " + ", ".join(f"{probe} linear {curve[-1][f'eval_{probe}_linear_acc']:.3f} knn "
                                             f"{curve[-1][f'eval_{probe}_knn_top1']:.3f}" for probe in evaluator.probes)
          + f" ({record['seconds']:.0f} s)", flush=True)
    return record


def train(args) -> None:
    evaluator = GeometryEvaluator(Path(args.work), args)
    for seed, arm in itertools.product(args.seeds, args.arms):
        train_arm(args, arm, seed, evaluator)


# ------------------------------------------------------------------------------------------------
# 3. report
# ------------------------------------------------------------------------------------------------

def _paired(records: dict, a: str, b: str, probe: str, protocol: str, seeds: list[int]) -> dict | None:
    from anaus_core.evaluate.metrics.paired_test import paired_wilcoxon

    xs, ys = [], []
    for seed in seeds:
        ra, rb = records.get((a, seed)), records.get((b, seed))
        if ra is None or rb is None:
            return None
        for geometry in GEOMETRIES:
            xs += ra["folds"][probe][geometry][protocol]
            ys += rb["folds"][probe][geometry][protocol]
    return {"a": a, "b": b, "probe": probe, "protocol": protocol, "mean_a": float(np.mean(xs)),
            "mean_b": float(np.mean(ys)), **paired_wilcoxon(np.array(xs), np.array(ys))}


def report(args) -> dict:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    work = Path(args.work)
    records = {}
    for path in sorted((work / "runs").glob("*/result.json")):
        record = json.loads(path.read_text())
        if record["arm"] in args.arms and record["seed"] in args.seeds:
            records[(record["arm"], record["seed"])] = record
    arms = [arm for arm in args.arms if any((arm, s) in records for s in args.seeds)]
    seeds = [s for s in args.seeds if all((arm, s) in records for arm in arms)]
    probes = [p for p in args.probes if all(p in records[(arm, s)]["folds"] for arm in arms for s in seeds)]
    table = []
    for probe, arm in itertools.product(probes, arms):
        finals = [records[(arm, s)] for s in seeds]
        row = {"probe": probe, "arm": arm, "seeds": len(finals), "steps": finals[0]["steps"] if finals else 0}
        for protocol in ("linear", "knn"):
            for geometry in GEOMETRIES:
                row[f"{protocol}_{geometry}"] = float(np.mean([np.mean(r["folds"][probe][geometry][protocol])
                                                               for r in finals]))
            row[protocol] = float(np.mean([row[f"{protocol}_{g}"] for g in GEOMETRIES]))
        row["seconds"] = float(np.mean([r["seconds"] for r in finals]))
        table.append(row)
    pairs = [(a, "random") for a in arms if a != "random"] + [(a, "byol") for a in arms if a.startswith("anaus")]
    for masker in MASKERS:
        if f"anaus-ultrasound-{masker}" in arms and f"anaus-paper-{masker}" in arms:
            pairs.append((f"anaus-ultrasound-{masker}", f"anaus-paper-{masker}"))
    tests = [t for probe in probes for a, b in pairs for protocol in ("linear", "knn")
             if (t := _paired(records, a, b, probe, protocol, seeds))]

    panels = [(f"eval_{probe}_{g}_linear_acc", f"{PROBE_TITLES[probe]}\nlinear probe, {g} phantoms")
              for probe in probes for g in GEOMETRIES]
    fig, axes = plt.subplots(len(probes), len(GEOMETRIES), figsize=(6 * len(GEOMETRIES), 4 * len(probes)), squeeze=False)
    for ax, (key, title) in zip(axes.ravel(), panels):
        for arm in arms:
            curves = [records[(arm, s)]["curve"] for s in seeds]
            if arm == "random":
                value = float(np.mean([c[0][key] for c in curves]))
                ax.plot([0, max(args.steps, 1)], [value, value], "k--", label="random init")
                continue
            steps = sorted({p["step"] for c in curves for p in c})
            means = [float(np.mean([p[key] for c in curves for p in c if p["step"] == step])) for step in steps]
            ax.plot(steps, means, marker="o", label=arm)
        ax.set_xlabel("pre-training step")
        ax.set_ylabel("accuracy (held-out folds)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"online evaluation on held-apart phantoms, mean over seeds {seeds}", fontsize=10)
    fig.tight_layout()
    curve_path = work / "learning_signal.png"
    fig.savefig(curve_path, dpi=100)
    plt.close(fig)
    if args.figure:
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        Path(args.figure).write_bytes(curve_path.read_bytes())

    lines = [f"seeds {seeds}, {args.steps} steps, batch {args.batch_size}, {args.size} px phantoms, "
             f"{args.view_size} px views, {args.folds} folds", ""]
    for probe in probes:
        lines += [f"{PROBE_TITLES[probe]}:", "",
                  "| arm | steps | linear (lin. / sector / mean) | kNN (lin. / sector / mean) | s per run |",
                  "|---|---|---|---|---|"]
        for row in (r for r in table if r["probe"] == probe):
            lines.append(f"| {row['arm']} | {row['steps']} | {row['linear_linear']:.3f} / {row['linear_sector']:.3f} / "
                         f"**{row['linear']:.3f}** | {row['knn_linear']:.3f} / {row['knn_sector']:.3f} / "
                         f"**{row['knn']:.3f}** | {row['seconds']:.0f} |")
        lines.append("")
    majority = {}
    for geometry in GEOMETRIES:
        counts = [len(list(d.iterdir())) for d in (work / "tasks" / geometry / "classification").iterdir() if d.is_dir()]
        majority[geometry] = max(counts) / sum(counts) if counts else float("nan")
    lines += [f"image probe, majority class: {majority['linear']:.3f} / {majority['sector']:.3f} / "
              f"{np.mean(list(majority.values())):.3f}", ""]
    lines += ["| probe | a − b | protocol | mean a | mean b | median diff | n | p (Wilcoxon) |",
              "|---|---|---|---|---|---|---|---|"]
    for t in tests:
        lines.append(f"| {t['probe']} | {t['a']} − {t['b']} | {t['protocol']} | {t['mean_a']:.3f} | {t['mean_b']:.3f} | "
                     f"{t['median_difference']:+.3f} | {t['n']} | {t['p_value']:.3g} |")
    (work / "report.md").write_text("\n".join(lines) + "\n")
    results = {"seeds": seeds, "arms": arms, "probes": probes, "table": table, "tests": tests, "majority": majority,
               "figure": str(curve_path), "settings": {k: v for k, v in vars(args).items() if k not in ("stage",)}}
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(lines), flush=True)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--stage", choices=("prepare", "train", "report", "all"), default="all")
    parser.add_argument("--arms", nargs="+", default=list(KEY_ARMS), help=f"from {', '.join(ALL_ARMS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--probes", nargs="+", choices=PROBES, default=list(PROBES),
                        help="region probe (pooled in each structure) and/or image probe; the first is the primary")
    parser.add_argument("--size", type=int, default=64, help="phantom and evaluation image side")
    parser.add_argument("--view-size", type=int, default=64, help="pre-training view side (multiple of 32)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pretrain-count", type=int, default=160)
    parser.add_argument("--eval-count", type=int, default=60, help="held-apart phantoms per probe geometry")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--annotations", action=argparse.BooleanOptionalAction, default=True,
                        help="burned-in text, rulers, calipers in every phantom (the scan region removes them from masks)")
    parser.add_argument("--figure", default=None, help="also copy the curve PNG here (e.g. docs/img/learning_signal.png)")
    args = parser.parse_args(argv)
    for arm in args.arms:
        arm_settings(arm)
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.stage in ("prepare", "all"):
        prepare(args)
    if args.stage in ("train", "all"):
        train(args)
    if args.stage in ("report", "all"):
        return report(args)
    return None


if __name__ == "__main__":
    main()
