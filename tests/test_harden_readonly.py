"""Issue 11, the faults a root test machine cannot produce for real: a read-only ``--out`` and an
unreachable ``--scheduler``. Each gives one error line naming the folder or address, a non-zero
exit, no traceback, and writes nothing.

Root ignores permission bits, so ``chmod 0o555`` does not make a folder read-only here. The
read-only folder is simulated at the two system calls an unprivileged user would hit:
``os.access(path, W_OK)`` reports False (what ``anaus_core.outputs.ensure_writable_dir`` and
precompute's ``--dry-run`` check ask) and ``os.mkdir`` below it fails with EACCES (what creating
a sub-folder of a read-only parent does). Writes themselves still succeed as root, so the
"nothing written" assertions below are real: any write that slipped past the check would show.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app


def _tree_hash(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (a new empty folder or a ``.lock`` counts too)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def _assert_one_line_error(result, needle: str) -> str:
    """Non-zero exit, no traceback, the whole output is one ``error: ...`` line containing ``needle``."""
    output = result.output
    assert result.exit_code != 0, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: from now on ``folder`` (and everything under it) looks read-only."""
    folders: list[str] = []
    real_access, real_mkdir = os.access, os.mkdir

    def under(path) -> bool:
        try:
            path = os.path.abspath(os.fspath(path))
        except TypeError:  # a file descriptor
            return False
        return any(path == f or path.startswith(f + os.sep) for f in folders)

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and under(path):
            return False
        return real_access(path, mode, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if under(os.path.dirname(os.path.abspath(os.fspath(path)))) and not os.path.isdir(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "mkdir", mkdir)

    def make(folder: Path) -> Path:
        folders.append(os.path.abspath(folder))
        return folder

    return make


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A small image corpus and a shard store made from it (the inputs the writers read)."""
    from shards.synthetic import write_synthetic_store

    root = tmp_path_factory.mktemp("readonly-inputs")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(corpus / f"im{index}.png")
    write_synthetic_store(root / "store", count=8, samples_per_shard=4, height=48, width=48)
    return root


def _existing_output(tmp_path: Path) -> Path:
    """A folder a user already has (with a file in it) that they may not write."""
    out = tmp_path / "ro"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    return out


# (id, argv with {in} = the inputs, {out} = the read-only folder)
WRITERS = [
    ("precompute", ["precompute-masks", "{in}/corpus", "--out", "{out}", "--masker", "kmeans", "--no-progress", "--no-scan-region"]),
    ("pretrain", ["pretrain", "--shards", "{in}/store", "--out", "{out}", "--device", "cpu", "--steps", "1", "--batch-size", "2"]),
    ("make-phantoms", ["make-phantoms", "{out}", "--count", "1", "--size", "32"]),
    ("demo", ["demo", "{out}", "--count", "2", "--size", "32", "--no-progress", "--pretrain-steps", "0", "--eval-count", "0"]),
]


@pytest.mark.parametrize("case", WRITERS, ids=[row[0] for row in WRITERS])
def test_read_only_out_is_one_line_and_writes_nothing(tmp_path, inputs, read_only, case):
    _, argv = case
    out = read_only(_existing_output(tmp_path))
    argv = [part.replace("{in}", str(inputs)).replace("{out}", str(out)) for part in argv]
    before = _tree_hash(tmp_path)
    line = _assert_one_line_error(CliRunner().invoke(app, argv), str(out))
    assert "not writable" in line
    assert _tree_hash(tmp_path) == before


@pytest.mark.parametrize("case", WRITERS, ids=[row[0] for row in WRITERS])
def test_out_under_a_read_only_folder_is_one_line_and_writes_nothing(tmp_path, inputs, read_only, case):
    _, argv = case
    parent = read_only(_existing_output(tmp_path))
    out = parent / "new"
    argv = [part.replace("{in}", str(inputs)).replace("{out}", str(out)) for part in argv]
    before = _tree_hash(tmp_path)
    line = _assert_one_line_error(CliRunner().invoke(app, argv), str(out))
    assert "Permission denied" in line
    assert _tree_hash(tmp_path) == before


def test_dry_run_plans_a_read_only_out_without_writing(tmp_path, inputs, read_only):
    """``--dry-run`` writes nothing, so a read-only output can be planned: exit 0, no lock, no
    cache, nothing new (the lock is skipped only because the folder is not writable)."""
    argv = ["precompute-masks", str(inputs / "corpus"), "--masker", "kmeans", "--no-progress", "--no-scan-region"]
    made = tmp_path / "made"
    result = CliRunner().invoke(app, [*argv, "--out", str(made)])
    assert result.exit_code == 0, result.output
    read_only(made)
    before = _tree_hash(tmp_path)
    result = CliRunner().invoke(app, [*argv, "--out", str(made), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert _tree_hash(tmp_path) == before


def _closed_loopback_port() -> int:
    """A loopback port nobody listens on: bound by the OS, read, released."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_scheduler_is_one_line(tmp_path, inputs):
    address = f"tcp://127.0.0.1:{_closed_loopback_port()}"
    out = tmp_path / "out"
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["precompute-masks", str(inputs / "corpus"), "--out", str(out), "--masker", "kmeans",
                                      "--no-progress", "--no-scan-region", "--scheduler", address, "--scheduler-timeout", "2"])
    elapsed = time.perf_counter() - started
    line = _assert_one_line_error(result, f"--scheduler {address}")
    assert "cannot connect" in line
    # the wait is bounded by the option, not the 30 s default (a refused loopback connect is retried until then)
    assert elapsed < 25, f"--scheduler-timeout 2 did not bound the wait ({elapsed:.0f} s)"
    assert not list(out.glob("*.tar")) and not (out / "index.zarr").exists()


def test_scheduler_timeout_must_be_positive(tmp_path, inputs):
    result = CliRunner().invoke(app, ["precompute-masks", str(inputs / "corpus"), "--out", str(tmp_path / "out"),
                                      "--scheduler", "tcp://127.0.0.1:1", "--scheduler-timeout", "0"])
    _assert_one_line_error(result, "--scheduler-timeout")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # ~16 s on CPU: two tiny LP-SAM trainings and two predictions
def test_random_sam_predictions_are_reproducible(tmp_path):
    """Issue 11 item 9: ``--random-sam`` is seeded, so the same ``lpsam predict`` command gives the
    same masks twice (a tiny LP-SAM trained on a random SAM; prediction rebuilds that SAM from
    ``--seed``), and another seed gives another base SAM."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from lpsam_helpers import write_phantom_dataset

    from anaus_core.lpsam.build import tiny_model_config
    from anaus_core.lpsam.checkpoint import load_lpsam
    from anaus_core.lpsam.train import AdaptConfig, PrompterConfig, run_adapt, run_train_prompter

    dataset = write_phantom_dataset(tmp_path / "data", count=2, size=64)
    common = dict(datasets=[str(dataset)], sam_checkpoint=None, model=tiny_model_config(), epochs=1, batch_size=2,
                  lr=1e-2, val_fraction=0.0, progress=False)
    torch.manual_seed(0)
    stage1 = run_adapt(AdaptConfig(out_dir=str(tmp_path / "adapt"), **common))
    checkpoint = run_train_prompter(PrompterConfig(out_dir=str(tmp_path / "prompter"), adapter_checkpoint=str(stage1.last_checkpoint),
                                                   **common)).last_checkpoint

    def predict(out: str, seed: int) -> dict[str, np.ndarray]:
        result = CliRunner().invoke(app, ["lpsam", "predict", str(dataset / "img"), "--checkpoint", str(checkpoint), "--random-sam",
                                          "--seed", str(seed), "--device", "cpu", "--threshold", "0.3", "--min-area", "1",
                                          "--no-progress", "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        arrays = {}
        for path in sorted((tmp_path / out).glob("*.npz")):
            with np.load(path) as data:
                arrays.update({f"{path.name}:{key}": data[key] for key in data.files})
        return arrays

    first, again = predict("first", 3), predict("again", 3)
    assert first and first.keys() == again.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)

    def encoder_weights(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        model, _ = load_lpsam(checkpoint, sam_checkpoint=None)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(encoder_weights(3), encoder_weights(3))
    assert not torch.equal(encoder_weights(3), encoder_weights(4))
