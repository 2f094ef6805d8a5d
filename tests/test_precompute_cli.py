"""`anaus precompute-masks` and `anaus demo` through the CLI: options, exit codes, messages."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli import app
from test_precompute import assert_consistent, copy_corpus, make_bad_corpus, phantom_keys

runner = CliRunner()


def base_args(images, out):
    return ["precompute-masks", str(images), "--out", str(out), "--masker", "labels", "--labels", str(images.parent / "label"),
            "--stored-size", "128", "--samples-per-shard", "4", "--no-progress"]


def test_cli_run_noop_dry_run_and_config_file(phantom_corpus, tmp_path):
    images, _ = copy_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, base_args(images, out))
    assert result.exit_code == 0, result.output
    assert "no input skipped" in result.output
    assert_consistent(out, phantom_keys(images))
    result = runner.invoke(app, base_args(images, out))
    assert result.exit_code == 0 and "nothing to do" in result.output
    result = runner.invoke(app, base_args(images, out) + ["--scales", "7,14", "--dry-run"])
    assert result.exit_code == 0 and "would compute ingest 0 file(s), mask 0, pyramid 12" in result.output
    # A YAML config, overridden by options.
    config = tmp_path / "precompute.yaml"
    config.write_text(f"corpus: {images}\nout: {out}\nmasker: felzenszwalb\nstored_size: 128\nsamples_per_shard: 4\nmasker_options: {{scale: 150}}\n")
    result = runner.invoke(app, ["precompute-masks", "--config", str(config), "--masker-option", "scale=250", "--no-progress", "--dry-run", "--allow-masker-change"])
    assert result.exit_code == 0, result.output
    assert "mask 12" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["did_no_work"] is True  # the dry run did not overwrite the last run's report


def test_cli_exit_codes_for_skips_strict_and_bad_options(phantom_corpus, tmp_path):
    images, _ = make_bad_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, base_args(images, out))
    assert result.exit_code == 1, result.output
    assert "6 input(s) skipped" in result.output and "zero_bytes.png" in result.output
    result = runner.invoke(app, base_args(images, out) + ["--strict"])
    assert result.exit_code == 3
    assert "--strict: 6 input(s) skipped" in result.output
    result = runner.invoke(app, base_args(images, out) + ["--scales", "7,x"])
    assert result.exit_code == 2 and "--scales" in result.output
    result = runner.invoke(app, ["precompute-masks", str(tmp_path / "missing"), "--out", str(out), "--no-progress"])
    assert result.exit_code == 2 and "corpus not found" in result.output
    result = runner.invoke(app, base_args(images, out) + ["--masker", "nope"])
    assert result.exit_code == 2 and "'--masker'" in result.output  # a click choice since the harden branch


@pytest.mark.slow
def test_demo_runs_end_to_end_at_tiny_size(tmp_path):
    from cli import run_demo

    result = run_demo(tmp_path / "demo", count=6, size=64, progress=False, pretrain_steps=0)
    assert result["precompute_report"].samples == 6
    assert result["inspect_summary"]["validation"]["ok"]
    assert result["contact_sheet"].stat().st_size > 0
    again = runner.invoke(app, ["demo", str(tmp_path / "demo"), "--count", "6", "--size", "64", "--no-progress", "--pretrain-steps", "0"])
    assert again.exit_code == 0, again.output
    assert "nothing to do" in again.output
