"""Loss-curve figure of a run, drawn from ``metrics.jsonl`` with matplotlib's Agg backend."""

from __future__ import annotations

import os
from pathlib import Path

from anaus_core.train.metrics import loss_keys, read_metrics


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Write a PNG of the total loss and its components against the optimiser step.

    Left panel: total, L_ana and L_ctx (the terms of eq. 7). Right panel: the per-scale terms
    (``loss_ana_s7`` ...), if any. Written atomically (temporary name, then rename).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    keys = loss_keys(records)
    main_keys = [k for k in keys if "_s" not in k.split("loss", 1)[1]]
    scale_keys = [k for k in keys if k not in main_keys]
    fig, axes = plt.subplots(1, 2 if scale_keys else 1, figsize=(11 if scale_keys else 6, 4), squeeze=False)
    for ax, group, title in ((axes[0][0], main_keys, "loss"), *(((axes[0][1], scale_keys, "per scale"),) if scale_keys else ())):
        for key in group:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=key, linewidth=2.0 if key == "loss" else 1.2)
        ax.set_xlabel("optimiser step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if group:
            ax.legend(fontsize=8)
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
