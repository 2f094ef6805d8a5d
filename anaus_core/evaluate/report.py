"""The report of an evaluation run: ``results.json`` (everything), ``results.md`` (tables and
paired tests), ``folds.csv`` (the outer folds used, re-usable with ``--splits``),
``predictions.png``, ``confusion.png`` (classification) and ``label_fraction.png`` (when several
label fractions ran)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from anaus_core.evaluate.datasets import EvalDataset
from anaus_core.evaluate.folds import Fold, write_splits_file


def _clean(value):
    """NaN/inf -> None (JSON null), numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _fmt(summary: dict, digits: int = 3) -> str:
    mean, std = summary.get("mean"), summary.get("std")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _p(value) -> str:
    """p-values with significant digits (a tiny p must not print as 0.0000)."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def render_markdown(results: dict) -> str:
    task = results["task"]
    lines = [f"# Evaluation: {task} on {results['dataset']['root']}", ""]
    if results["optimistic"]:
        lines += ["**OPTIMISTIC: model selection used the test fold (--select-on-test); do not report these figures as "
                  "held-out results.**", ""]
    lines += [f"Model selection: {results['selection']}.", "",
              f"{results['dataset']['images']} images, {results['dataset']['groups']} groups, classes "
              f"{', '.join(results['dataset']['classes'])}; {len(results['folds'])} folds "
              f"(test sizes {', '.join(str(f['test']) for f in results['folds'])}; folds.csv). Device: {results['device']}.", ""]
    for warning in results["warnings"]:
        lines.append(f"- warning: {warning}")
    if results["warnings"]:
        lines.append("")
    if task == "classification":
        lines += ["## Results (mean ± std over folds; pooled over all test predictions)", "",
                  "| encoder | protocol | labels | accuracy | macro F1 | AUROC | pooled accuracy | pooled macro F1 | pooled AUROC [95% CI] |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for run in results["runs"]:
            s, p = run["summary"], run["pooled"]
            ci = p["auroc_ci95"]
            lines.append(f"| {run['encoder']} | {run['protocol']} | {run['label_fraction']:g} | {_fmt(s['accuracy'])} | "
                         f"{_fmt(s['macro_f1'])} | {_fmt(s['auroc'])} | {_num(p['accuracy'])} | {_num(p['macro_f1'])} | "
                         f"{_num(p['auroc'])} [{_num(ci[0])}, {_num(ci[1])}] |")
        lines += ["", "Pooled per-class sensitivity / specificity:", ""]
        classes = results["dataset"]["classes"]
        lines += ["| encoder | protocol | labels | " + " | ".join(classes) + " |", "|---|---|---|" + "---|" * len(classes)]
        for run in results["runs"]:
            p = run["pooled"]
            cells = [f"{_num(se, 2)} / {_num(sp, 2)}" for se, sp in zip(p["sensitivity"], p["specificity"])]
            lines.append(f"| {run['encoder']} | {run['protocol']} | {run['label_fraction']:g} | " + " | ".join(cells) + " |")
    else:
        lines += ["## Results (per image, then mean ± std over folds; pooled = mean over all images)", "",
                  "Distances in pixels at the labels' original size.", "",
                  "| encoder | protocol | labels | Dice | PPV | sensitivity | HD95 px | HD px | pooled Dice | pooled HD95 px |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for run in results["runs"]:
            s, p = run["summary"], run["pooled"]["mean_over_images"]
            lines.append(f"| {run['encoder']} | {run['protocol']} | {run['label_fraction']:g} | {_fmt(s['dice'])} | "
                         f"{_fmt(s['ppv'])} | {_fmt(s['sensitivity'])} | {_fmt(s['hd95'], 1)} | {_fmt(s['hd'], 1)} | "
                         f"{_fmt(p['dice'])} | {_fmt(p['hd95'], 1)} |")
    if results["paired_tests"]:
        lines += ["", "## Paired tests (two-sided Wilcoxon signed-rank; difference = a - b)", "",
                  "| protocol | labels | a | b | over | metric | n | median difference | p |", "|---|---|---|---|---|---|---|---|---|"]
        for t in results["paired_tests"]:
            lines.append(f"| {t['protocol']} | {t['label_fraction']:g} | {t['a']} | {t['b']} | {t['over']} | {t['metric']} | "
                         f"{t['n']} | {_num(t['median_difference'], 4)} | {_p(t['p_value'])} |")
    lines += ["", "## Selection per fold", ""]
    for run in results["runs"]:
        chosen = []
        for f in run["folds"]:
            sel = f["selected"]
            chosen.append(f"epoch {sel['epoch']}" if "epoch" in sel else f"lr {sel['head']['lr']:g} wd {sel['head']['weight_decay']:g}")
        lines.append(f"- {run['encoder']} / {run['protocol']} / {run['label_fraction']:g}: " + "; ".join(chosen))
    return "\n".join(lines) + "\n"


def _confusion_figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r["label_fraction"] == max(x["label_fraction"] for x in results["runs"])]
    classes = results["dataset"]["classes"]
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.2), squeeze=False)
    for ax, run in zip(axes[0], runs):
        matrix = np.array(run["pooled"]["confusion"])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(classes)), classes, rotation=45, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_title(f"{run['encoder']} ({run['protocol']})", fontsize=8)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    fig.suptitle("pooled confusion" + (" (OPTIMISTIC: selected on test)" if results["optimistic"] else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _predictions_figure(results: dict, dataset: EvalDataset, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(r["label_fraction"] for r in results["runs"])
    protocol = results["runs"][0]["protocol"]
    runs = [r for r in results["runs"] if r["label_fraction"] == top and r["protocol"] == protocol]
    suffix = " (OPTIMISTIC: selected on test)" if results["optimistic"] else ""
    if results["task"] == "classification":
        count = min(12, len(dataset.items))
        positions = np.linspace(0, len(dataset.items) - 1, count).round().astype(int)
        cols = min(6, count)
        rows = int(math.ceil(count / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, position in zip(axes.flat, positions):
            item = dataset.items[position]
            ax.imshow(item.image, cmap="gray")
            names = dataset.class_names
            text = [f"GT {names[int(item.target)]}"] + [f"{r['encoder']}: {names[r['per_image']['prediction'][position]]}" for r in runs]
            ax.set_title("\n".join(text), fontsize=6)
        fig.suptitle(f"{protocol} predictions{suffix}", fontsize=9)
    else:
        positions = sorted(int(p) for p in runs[0]["sheet_predictions"])
        cols = 2 + len(runs)
        fig, axes = plt.subplots(len(positions), cols, figsize=(2.0 * cols, 2.0 * len(positions)), squeeze=False)
        vmax = len(dataset.class_names)
        for row, position in enumerate(positions):
            item = dataset.items[position]
            panels = [("image", None), ("ground truth", item.target)] + [
                (r["encoder"], np.array(r["sheet_predictions"][position])) for r in runs]
            for col, (title, mask) in enumerate(panels):
                ax = axes[row, col]
                ax.axis("off")
                ax.imshow(item.image, cmap="gray", extent=(0, item.target.shape[1], item.target.shape[0], 0))
                if mask is not None:
                    ax.imshow(np.ma.masked_equal(mask, 0), cmap="autumn", alpha=0.5, vmin=0, vmax=vmax, interpolation="nearest")
                if row == 0:
                    ax.set_title(title, fontsize=8)
        fig.suptitle(f"{protocol} segmentation{suffix}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label_fraction_figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "accuracy" if results["task"] == "classification" else "dice"
    protocols = sorted({r["protocol"] for r in results["runs"]})
    fig, axes = plt.subplots(1, len(protocols), figsize=(4 * len(protocols), 3.2), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        for name in dict.fromkeys(r["encoder"] for r in results["runs"]):
            runs = sorted((r for r in results["runs"] if r["encoder"] == name and r["protocol"] == protocol),
                          key=lambda r: r["label_fraction"])
            x = [r["label_fraction"] for r in runs]
            y = [r["summary"][metric]["mean"] for r in runs]
            e = [r["summary"][metric]["std"] for r in runs]
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("fraction of training labels")
        ax.set_ylabel(f"{metric} (mean ± std over folds)")
        ax.set_title(protocol + (" (OPTIMISTIC)" if results["optimistic"] else ""), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, dataset: EvalDataset, folds: list[Fold], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = {"results.json": out / "results.json", "results.md": out / "results.md", "folds.csv": out / "folds.csv"}
    written["results.json"].write_text(json.dumps(_clean(results), indent=1) + "\n")
    written["results.md"].write_text(render_markdown(_clean(results)))
    write_splits_file(written["folds.csv"], [i.id for i in dataset.items], folds)
    written["predictions.png"] = out / "predictions.png"
    _predictions_figure(results, dataset, written["predictions.png"])
    if results["task"] == "classification":
        written["confusion.png"] = out / "confusion.png"
        _confusion_figure(results, written["confusion.png"])
    if len({r["label_fraction"] for r in results["runs"]}) > 1:
        written["label_fraction.png"] = out / "label_fraction.png"
        _label_fraction_figure(results, written["label_fraction.png"])
    return written
