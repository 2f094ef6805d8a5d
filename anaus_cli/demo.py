"""``anaus demo``: the README demo end to end (phantoms -> precompute-masks -> inspect-shard ->
pretrain -> evaluate), each step a library call."""

from __future__ import annotations

import enum
from pathlib import Path

import typer

from anaus_cli.common import app, choice_value, user_errors
from anaus_cli.shard_data import shard_data_source
from anaus_core.errors import UserInputError


class DemoMasker(str, enum.Enum):
    """Weight-free maskers the demo can run."""

    felzenszwalb = "felzenszwalb"
    kmeans = "kmeans"
    labels = "labels"


def run_demo(out: Path, *, count: int = 24, size: int = 128, masker: str = "felzenszwalb", seed: int = 0, progress: bool = True, pretrain_steps: int = 200,
             annotations: bool = True, eval_count: int = 0) -> dict:
    """The README demo, end to end on a machine without weights. Steps (each a library call):

    1. phantoms: ``count`` phantom images + labels under ``OUT/corpus`` (``make_phantom_corpus``);
    2. precompute: ``precompute-masks OUT/corpus/img --out OUT/shards`` with a weight-free
       masker (``labels`` reads ``OUT/corpus/label``);
    3. inspect: validate the shard directory, print its summary, write ``OUT/contact_sheet.png``.

    Later steps (pre-training on ``OUT/shards``; with ``eval_count``, evaluating its encoder
    against ``random`` on that many held-apart phantoms under ``OUT/evaluate``) append to the
    returned dict. Running the demo
    again re-uses everything already computed (step 2 reports "nothing to do").
    """
    from rich.console import Console

    from anaus_core.phantoms import make_phantom_corpus
    from pipeline.config import PrecomputeConfig
    from pipeline.job import run_precompute
    from shards.inspect import inspect_path, render_text, write_contact_sheet

    out = Path(out)
    console = Console()
    result: dict = {"out": out}

    from anaus_core.outputs import claim_output

    console.rule("1. phantom corpus")
    corpus = out / "corpus"
    with claim_output(corpus, command="demo"):
        make_phantom_corpus(corpus, count=count, size=size, seed=seed, progress=progress, annotations=annotations)
    result["corpus"] = corpus

    console.rule(f"2. precompute-masks (--masker {masker})")
    shards_dir = out / "shards"
    config = PrecomputeConfig(
        corpus=str(corpus / "img"),
        out=str(shards_dir),
        masker=masker,
        labels=str(corpus / "label") if masker == "labels" else None,
        stored_size=size,
        samples_per_shard=max(4, count // 4),
        progress=progress,
    )
    report = run_precompute(config, console=console, show_report=True)
    if report.exit_code:
        raise UserInputError(f"{shards_dir}: precompute-masks skipped {report.skipped} input(s) in the demo corpus (see errors.jsonl)")
    result["shards"] = shards_dir
    result["precompute_report"] = report

    console.rule("3. inspect-shard")
    summary, kept = inspect_path(shards_dir, keep_samples=4)
    render_text(summary, console)
    sheet = write_contact_sheet(kept, out / "contact_sheet.png", title=f"{shards_dir} ({masker})")
    console.print(f"contact sheet: {sheet}")
    if not summary["validation"]["ok"]:
        raise UserInputError(f"{shards_dir}: demo shards failed validation")
    result["inspect_summary"] = summary
    result["contact_sheet"] = Path(sheet)

    if pretrain_steps > 0:
        console.rule(f"4. pretrain ({pretrain_steps} steps on the CPU)")
        result.update(_demo_pretrain(shards_dir, out / "pretrain", steps=pretrain_steps, seed=seed,
                                     progress=progress, console=console))
        if eval_count > 0:
            from anaus_core.evaluate.demo import evaluate_demo_encoder
            from pipeline.frame_reader import IngestFrameReader

            console.rule(f"5. evaluate the demo encoder vs random ({eval_count} held-apart phantoms)")
            result["evaluation"] = evaluate_demo_encoder(result["encoder"], out / "evaluate", reader=IngestFrameReader(),
                                                         count=eval_count, seed=seed, progress=progress, console=console)
    return result


def demo_pretrain_config(shards_dir: Path, *, steps: int, seed: int = 0, batch_size: int = 8):
    """The demo's CPU-sized pre-training: 64 px views, K = 8, a 64-channel FPN, slimmer heads and
    blur than the paper's (which are for 224 px on GPUs), a short-schedule peak lr of 0.5 (the
    setting of the phantom learning-signal experiment, docs/benchmarks.md (pretrain)); everything
    else is the default AnaUS objective (multi-scale L_ana + L_ctx)."""
    from anaus_core.config import load_config
    from anaus_core.train import PretrainConfig

    return load_config(PretrainConfig, None, {
        "data.shards": str(shards_dir), "data.batch_size": batch_size, "data.num_workers": 0,
        "views.size": 64, "views.num_mask_samples": 8,
        "augment.view1.blur_kernel": 9, "augment.view2.blur_kernel": 9,
        "model.fpn_channels": 64, "model.projector_hidden_dim": 512, "model.predictor_hidden_dim": 1024,
        "optim.base_lr": 16.0, "optim.warmup_steps": max(1, steps // 20),
        "run.steps": steps, "run.device": "cpu", "run.seed": seed, "run.log_every": max(1, min(10, steps // 20)),
        "run.checkpoint_every": max(50, steps // 4), "run.keep_step_checkpoints": False, "run.tensorboard": False,
    })


def _demo_pretrain(shards_dir: Path, run_dir: Path, *, steps: int, seed: int, progress: bool, console) -> dict:
    """Demo step 4: pre-train on the demo shards (resuming an interrupted demo run, skipping a
    finished one) and report the loss curve and the exported encoder."""
    import dataclasses
    import json as _json

    from anaus_core.train import pretrain
    from shards.index import read_manifest

    samples = sum(int(entry["samples"]) for entry in read_manifest(shards_dir)["shards"])
    config = demo_pretrain_config(shards_dir, steps=steps, seed=seed, batch_size=max(2, min(8, samples)))
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, progress=progress))
    summary_path, last = run_dir / "summary.json", run_dir / "checkpoints" / "last.pt"
    done = summary_path.exists() and _json.loads(summary_path.read_text()).get("steps_done") == steps
    if done and (run_dir / "encoder.pt").exists():
        console.print(f"pretrain: {run_dir} already holds the finished {steps}-step run (nothing to do)")
    else:
        from anaus_core.outputs import claim_output

        with claim_output(run_dir, command="demo"):
            pretrain(config, run_dir, data=shard_data_source(config), resume=True if last.exists() else None,
                     console=console)
    console.print(f"loss curve: {run_dir / 'loss_curve.png'}; encoder: {run_dir / 'encoder.pt'}")
    return {"pretrain_run": run_dir, "loss_curve": run_dir / "loss_curve.png", "encoder": run_dir / "encoder.pt"}


@app.command("demo", epilog="Example: anaus demo demo-out --count 24 --size 128 --pretrain-steps 200")
@user_errors
def demo_command(
    out: Path = typer.Argument(..., help="Output folder (corpus/, shards/, contact_sheet.png)."),
    count: int = typer.Option(24, min=1, help="Phantom images to generate."),
    size: int = typer.Option(128, min=32, max=4096, help="Phantom size in pixels (also the stored size)."),
    masker: DemoMasker = typer.Option(DemoMasker.felzenszwalb, help="Weight-free mask source."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    pretrain_steps: int = typer.Option(200, "--pretrain-steps", min=0, help="CPU pre-training steps on the demo shards (0 skips the step)."),
    annotations: bool = typer.Option(True, "--annotations/--no-annotations", help="Phantoms with burned-in text, rulers, calipers and a colour bar, as on real scans (the scan region removes them)."),
    eval_count: int = typer.Option(60, "--eval-count", min=0, help="Held-apart phantoms on which the demo encoder is evaluated against random (0 skips the step)."),
) -> None:
    """Run the README demo: phantoms -> precompute-masks -> inspect-shard -> pretrain + loss curve (no weights needed)."""
    from anaus_core.outputs import ensure_writable_dir

    ensure_writable_dir(out, option="OUT")  # each step then holds its own sub-folder (corpus/, shards/, pretrain/)
    run_demo(out, count=count, size=size, masker=choice_value(masker), progress=not no_progress, pretrain_steps=pretrain_steps,
             annotations=annotations, eval_count=eval_count)
