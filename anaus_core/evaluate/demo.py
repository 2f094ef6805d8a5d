"""The README demo's last step: evaluate the demo's own encoder against ``random`` on phantoms
held apart from pre-training (another seed), with the linear protocol for classification of
the dominant structure kind and for segmentation of cysts."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from anaus_core.config import load_config
from anaus_core.evaluate.config import EvaluateConfig
from anaus_core.evaluate.encoders import EncoderSpec
from anaus_core.evaluate.phantom_tasks import write_phantom_tasks
from anaus_core.evaluate.reader import FrameReader
from anaus_core.evaluate.run import run_evaluation
from anaus_core.phantoms import make_phantom_corpus

#: held-apart phantoms use seed + this offset, so none of them was seen in pre-training
HELD_APART_SEED_OFFSET = 7919


def evaluate_demo_encoder(encoder: Path, out: Path, *, reader: FrameReader, count: int = 60, size: int = 64,
                          folds: int = 3, seed: int = 0, segmentation_epochs: int = 4, progress: bool = True,
                          console: Console | None = None) -> dict:
    """Write ``out/phantoms`` (held apart), ``out/tasks`` and the two reports ``out/classification``
    and ``out/segmentation``; return ``{"classification": results, "segmentation": results}``."""
    console = console or Console()
    out = Path(out)
    corpus = out / "phantoms"
    make_phantom_corpus(corpus, count=count, size=size, seed=seed + HELD_APART_SEED_OFFSET, progress=progress)
    tasks = write_phantom_tasks(corpus, out / "tasks", segment_kind="cyst", min_per_class=folds + 2)
    if tasks["left_out"]:
        console.print(f"classification: dominant kinds with too few phantoms left out: {tasks['left_out']}")
    encoders = [EncoderSpec("demo", Path(encoder)), EncoderSpec("random", None)]
    common = {"folds": folds, "seed": seed, "image_size": size, "progress": progress, "device": "cpu",
              "protocols": ["linear"], "bootstrap_resamples": 200}
    results = {}
    for task, data, extra in (("classification", tasks["classification"], {"linear.epochs": 50}),
                              ("segmentation", tasks["segmentation"], {"finetune.epochs": segmentation_epochs,
                                                                       "finetune.batch_size": 8})):
        config = load_config(EvaluateConfig, None, {**common, **extra, "task": task, "data": str(data),
                                                    "out": str(out / task)})
        results[task] = run_evaluation(config, encoders, reader=reader, console=console)
        console.print(f"{task}: {out / task / 'results.md'}")
    return results
