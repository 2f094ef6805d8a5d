"""``anaus make-phantoms`` (a synthetic corpus) and ``anaus inspect-shard`` (summary, validation,
contact sheet)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from anaus_cli.common import app, user_errors


@app.command("make-phantoms", epilog="Example: anaus make-phantoms corpus --count 24 --size 128  (then: anaus precompute-masks corpus --out shards)")
@user_errors
def make_phantoms_command(
    out: Path = typer.Argument(..., help="Output folder; gets img/<id>.png, label/<id>.png and label/<id>.json."),
    count: int = typer.Option(24, "--count", "-n", help="Number of phantoms (>= 1)."),
    size: int = typer.Option(256, "--size", "-s", help="Image side in pixels, 32..4096."),
    seed: int = typer.Option(0, "--seed", help="Corpus seed (>= 0); phantom i depends only on (seed, i, size)."),
    annotations: bool = typer.Option(False, "--annotations", help="Burn in text, a depth ruler, calipers, a colour bar and a logo (RGB images; true field of view and overlay masks in truth/)."),
    geometry: Optional[str] = typer.Option(None, "--geometry", help="linear or sector for all phantoms (default: alternate)."),
) -> None:
    """Write a synthetic B-mode ultrasound corpus with labelled structures (linear and sector probes).

    Speckle from random scatterers, a depth-dependent point-spread function, envelope detection, attenuation with TGC and log compression.

    Labels: 0 = background tissue (and outside the fan), 1..n = the structures named in label/<id>.json (cyst, hypo, hyper, layer).
    """
    from anaus_core.outputs import claim_output
    from anaus_core.phantoms import make_phantom_corpus

    with claim_output(out, command="make-phantoms", option="OUT"):
        ids = make_phantom_corpus(out, count=count, size=size, seed=seed, progress=True, annotations=annotations, geometry=geometry)
    typer.echo(f"wrote {len(ids)} phantoms ({size}x{size}) to {out}")


@app.command("inspect-shard", epilog="Example: anaus inspect-shard shards --png sheet.png")
@user_errors
def inspect_shard_command(
    path: Path = typer.Argument(..., help="A shard (.tar) or a shard directory (shards + index.zarr + manifest.json)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary and validation result as JSON."),
    png: Optional[Path] = typer.Option(None, "--png", help="Write a contact sheet: N samples with masks overlaid and their pyramid levels."),
    samples: int = typer.Option(4, "--samples", "-n", min=1, help="Samples on the contact sheet."),
) -> None:
    """Summarise and validate shards (exit 1 when validation fails, 2 for unreadable input)."""
    import json

    from shards.inspect import inspect_path, render_text, write_contact_sheet

    summary, kept = inspect_path(path, keep_samples=samples if png is not None else 0)
    if png is not None:
        write_contact_sheet(kept, png, title=str(path))
        summary["contact_sheet"] = str(png)
    if json_output:
        typer.echo(json.dumps(summary, indent=2))
    else:
        from rich.console import Console

        render_text(summary, Console())
        if png is not None:
            typer.echo(f"contact sheet: {png}")
    if not summary["validation"]["ok"]:
        errors = summary["validation"]["errors"]
        first = next(p["text"] for p in summary["validation"]["problems"] if p["severity"] == "error")
        typer.echo(f"error: validation failed ({errors} problem{'s' if errors != 1 else ''}; first: {first})", err=True)
        raise typer.Exit(1)
