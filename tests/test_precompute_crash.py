"""precompute-masks crash safety (issue point 5): SIGKILL at deterministic points and at a
random moment, then a re-run; and two runs on one directory at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anaus_core.errors import UserInputError
from pipeline.faults import ENV_VAR, PAUSE_VAR
from pipeline.job import run_precompute
from test_precompute import assert_consistent, computed, copy_corpus, index_keys, make_config, phantom_keys, run

REPO_ROOT = Path(__file__).resolve().parents[1]


def cli_args(images: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "cli", "precompute-masks", str(images), "--out", str(out), "--masker", "labels",
        "--labels", str(images.parent / "label"), "--stored-size", "128", "--samples-per-shard", "3", "--no-progress",
    ]


def start(images: Path, out: Path, **env_extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env_extra}
    return subprocess.Popen(cli_args(images, out), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_killed_at(images: Path, out: Path, point: str) -> None:
    process = start(images, out, **{ENV_VAR: point})
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == -signal.SIGKILL, f"expected SIGKILL at {point}, got rc {process.returncode}: {stderr[-2000:]}"


def entries(out: Path, stage: str) -> int:
    return sum(1 for _ in (out / "cache" / stage).glob("*/*.bin")) if (out / "cache" / stage).is_dir() else 0


def test_kill_during_the_stage_chain_then_resume(phantom_corpus, tmp_path):
    images, _ = copy_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    run_killed_at(images, out, "sample:5")
    done = entries(out, "pyramid")
    assert done == 5
    assert not list(out.glob("*.tar")) and not (out / "manifest.json").exists()
    report = run(make_config(images, out))
    assert report.stages["pyramid"].reused == done and report.stages["pyramid"].computed == 12 - done
    assert report.stages["ingest"].computed + report.stages["ingest"].reused == 12
    assert report.stages["ingest"].reused == entries(out, "ingest") - report.stages["ingest"].computed
    assert_consistent(out, phantom_keys(images))


def test_kill_between_shard_writes_then_resume(phantom_corpus, tmp_path):
    images, _ = copy_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    run_killed_at(images, out, "shard:2")
    assert len(list(out.glob("*.tar"))) == 2 and not (out / "manifest.json").exists()
    report = run(make_config(images, out))
    assert computed(report) == {"ingest": 0, "region": 0, "mask": 0, "pyramid": 0}
    # The first shard's info was recorded and is reused; the second was final but unrecorded
    # (killed in between) and is written again with identical bytes.
    assert report.shards_reused == 1
    assert_consistent(out, phantom_keys(images))


def test_kill_before_index_keeps_the_old_index_then_resume(phantom_corpus, tmp_path):
    images, labels = copy_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    run(make_config(images, out))
    old_keys = index_keys(out)
    (images / "phantom_00001.png").unlink()
    (images / "phantom_00004.png").rename(images / "renamed_4.png")
    (labels / "phantom_00004.png").rename(labels / "renamed_4.png")
    run_killed_at(images, out, "index:1")
    # Readers still see the previous, complete state.
    assert sorted(index_keys(out)) == sorted(old_keys)
    report = run(make_config(images, out))
    assert computed(report) == {"ingest": 0, "region": 0, "mask": 0, "pyramid": 0}
    assert report.index_written
    assert_consistent(out, phantom_keys(images))


def test_kill_after_index_before_cleanup_then_resume(phantom_corpus, tmp_path):
    images, _ = copy_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    run(make_config(images, out))
    for name in ("phantom_00000.png", "phantom_00006.png", "phantom_00011.png"):
        (images / name).unlink()
    run_killed_at(images, out, "cleanup:1")
    assert sorted(index_keys(out)) == sorted(phantom_keys(images))  # the new index is committed
    report = run(make_config(images, out))
    assert report.shards_removed >= 1 and report.shards_written == 0
    assert_consistent(out, phantom_keys(images))


def test_kill_at_a_random_moment_then_resume(phantom_corpus, tmp_path):
    images, _ = copy_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    process = start(images, out)
    deadline = time.monotonic() + 120
    while entries(out, "mask") < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    before = {stage: entries(out, stage) for stage in ("ingest", "mask", "pyramid")}
    assert before["mask"] >= 3
    report = run(make_config(images, out))
    assert report.stages["mask"].reused == before["mask"]
    assert report.stages["pyramid"].reused == before["pyramid"]
    assert_consistent(out, phantom_keys(images))


def test_second_concurrent_run_refuses_and_does_not_disturb_the_first(phantom_corpus, tmp_path):
    images, _ = copy_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    first = start(images, out, **{PAUSE_VAR: "sample:2:3"})
    lock = out / ".lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(UserInputError, match=rf"being written by another precompute-masks run \(pid {first.pid}"):
        run_precompute(make_config(images, out), show_report=False)
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, cli_args(images, out)[3:])
    assert result.exit_code == 2
    assert "being written by another precompute-masks run" in result.output
    _, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr[-2000:]
    assert_consistent(out, phantom_keys(images))
