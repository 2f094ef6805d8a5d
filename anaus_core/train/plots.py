"""Loss-curve figure of a run, drawn from ``metrics.jsonl`` with matplotlib's Agg backend."""

from __future__ import annotations

import os
from pathlib import Path

from anaus_core.train.metrics import eval_keys, loss_keys, read_metrics


def _draw(ax, records, keys, *, title: str, ylabel: str | None = None, marker: str | None = None) -> None:
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=key, linewidth=2.0 if key == "loss" else 1.2, marker=marker)
    ax.set_xlabel("optimiser step")
    ax.set_title(title)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=8)


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Write a PNG of the total loss and its components against the optimiser step.

    Left panel: total, L_ana and L_ctx (the terms of eq. 7). Next: the per-scale terms
    (``loss_ana_s7`` ...), if any. Last: the online evaluation's accuracies
    (``eval_knn_top1``, ``eval_linear_acc``), if the run logged any. Written atomically
    (temporary name, then rename).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    keys = loss_keys(records)
    main_keys = [k for k in keys if "_s" not in k.split("loss", 1)[1]]
    scale_keys = [k for k in keys if k not in main_keys]
    accuracy_keys = eval_keys(records)
    panels = [(main_keys, "loss", None, None)]
    if scale_keys:
        panels.append((scale_keys, "per scale", None, None))
    if accuracy_keys:
        panels.append((accuracy_keys, "online evaluation (held-out folds)", "accuracy", "o"))
    fig, axes = plt.subplots(1, len(panels), figsize=(1 + 5 * len(panels), 4), squeeze=False)
    for ax, (group, title, ylabel, marker) in zip(axes[0], panels):
        _draw(ax, records, group, title=title, ylabel=ylabel, marker=marker)
    if not records:
        axes[0][0].text(0.5, 0.5, "no metrics logged", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path
