"""Every command against a table of bad inputs, as a new user (or an attacker) would try them.

For each row: the exit code is non-zero, there is no traceback, exactly one error line that names
the file or option, and nothing previously written changed (every file under the test's folder
is hashed before and after). Also: --help shows every default the config dataclasses hold.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Things a user already has: a corpus, a shard store made by precompute-masks, a run folder,
    a phantom corpus, broken stores, a plain file and a garbage checkpoint."""
    return make_world(tmp_path_factory.mktemp("world"))


def make_world(root: Path) -> Path:
    """The fixture's folder (also used by the matrix in docs/reliability.md)."""
    from anaus_core.phantoms import make_phantom_corpus

    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(corpus / f"im{index}.png")
    (root / "empty").mkdir()
    (root / "tiny").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "tiny" / "dot.png")  # below the 8 px minimum
    result = CliRunner().invoke(app, ["precompute-masks", str(corpus), "--out", str(root / "store"), "--masker", "kmeans",
                                      "--stored-size", "32", "--samples-per-shard", "2", "--no-progress", "--no-scan-region"])
    assert result.exit_code == 0, result.output
    missing = shutil.copytree(root / "store", root / "store_missing")
    sorted(missing.glob("*.tar"))[0].unlink()
    truncated = shutil.copytree(root / "store", root / "store_truncated")
    victim = sorted(truncated.glob("*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:700])
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    make_phantom_corpus(root / "phantoms", count=2, size=32, seed=0)
    (root / "file.txt").write_text("not a folder\n")
    (root / "garbage.pt").write_bytes(pickle.dumps({"x": object()}))
    (root / "truncated.pt").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    (root / "lpdata").mkdir()
    return root


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


# (id, argv with {w} = the world folder, what the one error line must contain)
BAD_INPUTS = [
    # make-phantoms
    ("phantoms-size", ["make-phantoms", "{w}/new", "--size", "10"], "--size"),
    ("phantoms-out-is-file", ["make-phantoms", "{w}/file.txt"], "file.txt: OUT exists"),
    ("phantoms-out-under-file", ["make-phantoms", "{w}/file.txt/sub"], "file.txt/sub"),
    ("phantoms-other-size", ["make-phantoms", "{w}/phantoms", "--size", "48", "--count", "2"], "32x32"),
    ("phantoms-count-0", ["make-phantoms", "{w}/new", "--count", "0"], "--count"),
    # inspect-shard
    ("inspect-missing", ["inspect-shard", "{w}/nope"], "nope"),
    ("inspect-garbage", ["inspect-shard", "{w}/file.txt"], "file.txt"),
    # precompute-masks
    ("precompute-empty-corpus", ["precompute-masks", "{w}/empty", "--out", "{w}/store", "--masker", "kmeans", "--no-progress"], "empty corpus"),
    ("precompute-empty-corpus-gc", ["precompute-masks", "{w}/empty", "--out", "{w}/store", "--masker", "kmeans", "--gc", "--no-progress"], "empty corpus"),
    ("precompute-nothing-usable", ["precompute-masks", "{w}/tiny", "--out", "{w}/store", "--masker", "kmeans", "--no-progress", "--no-scan-region"], "all 1 input(s) were skipped", "store/cache/"),
    ("precompute-missing-corpus", ["precompute-masks", "{w}/nope", "--out", "{w}/store", "--no-progress"], "nope"),
    ("precompute-masker-change", ["precompute-masks", "{w}/corpus", "--out", "{w}/store", "--stored-size", "32", "--samples-per-shard", "2", "--no-progress"], "--masker kmeans"),
    ("precompute-stored-size", ["precompute-masks", "{w}/corpus", "--out", "{w}/store", "--stored-size", "100000", "--no-progress"], "--stored-size"),
    ("precompute-out-is-file", ["precompute-masks", "{w}/corpus", "--out", "{w}/file.txt", "--no-progress"], "file.txt"),
    ("precompute-out-under-file", ["precompute-masks", "{w}/corpus", "--out", "{w}/file.txt/o", "--no-progress"], "file.txt/o"),
    ("precompute-device", ["precompute-masks", "{w}/corpus", "--out", "{w}/store", "--masker", "kmeans", "--device", "tpu", "--no-progress"], "--device"),
    ("precompute-masker-name", ["precompute-masks", "{w}/corpus", "--out", "{w}/store", "--masker", "nope"], "--masker"),
    ("precompute-max-shrink", ["precompute-masks", "{w}/corpus", "--out", "{w}/store", "--masker", "kmeans", "--max-shrink", "2", "--no-progress"], "--max-shrink"),
    ("precompute-sam-no-checkpoint", ["precompute-masks", "{w}/corpus", "--out", "{w}/sam_out", "--masker", "sam", "--no-progress"], "checkpoint"),
    # pretrain
    ("pretrain-lr", ["pretrain", "--shards", "{w}/store", "--out", "{w}/run", "--lr", "-1"], "--lr"),
    ("pretrain-device-name", ["pretrain", "--shards", "{w}/store", "--out", "{w}/run", "--device", "tpu"], "--device"),
    ("pretrain-crop-size", ["pretrain", "--shards", "{w}/store", "--out", "{w}/run", "--crop-size", "50"], "--crop-size 50: must be a positive multiple of 32"),
    ("pretrain-shards-is-file", ["pretrain", "--shards", "{w}/file.txt", "--out", "{w}/run", "--device", "cpu"], "file.txt"),
    ("pretrain-shards-missing", ["pretrain", "--shards", "{w}/nope", "--out", "{w}/run", "--device", "cpu"], "nope"),
    ("pretrain-out-is-file", ["pretrain", "--shards", "{w}/store", "--out", "{w}/file.txt", "--device", "cpu"], "file.txt"),
    ("pretrain-out-under-file", ["pretrain", "--shards", "{w}/store", "--out", "{w}/file.txt/r", "--device", "cpu"], "file.txt/r"),
    ("pretrain-missing-shard", ["pretrain", "--shards", "{w}/store_missing", "--out", "{w}/run", "--device", "cpu"], "missing"),
    ("pretrain-truncated-shard", ["pretrain", "--shards", "{w}/store_truncated", "--out", "{w}/run", "--device", "cpu"], "store_truncated"),
    ("pretrain-pipe", ["pretrain", "--shards", "pipe:touch {w}/pwned", "--out", "{w}/run", "--device", "cpu"], "pipe:"),
    ("pretrain-remote", ["pretrain", "--shards", "s3://bucket/shards", "--out", "{w}/run", "--device", "cpu"], "remote"),
    ("pretrain-garbage-resume", ["pretrain", "--out", "{w}/run", "--resume-from", "{w}/garbage.pt"], "garbage.pt"),
    ("pretrain-truncated-resume", ["pretrain", "--out", "{w}/run", "--resume-from", "{w}/truncated.pt"], "truncated.pt"),
    ("pretrain-resume-nothing", ["pretrain", "--out", "{w}/run", "--resume"], "last.pt"),
    ("pretrain-steps", ["pretrain", "--shards", "{w}/store", "--out", "{w}/run", "--steps", "0"], "--steps"),
    ("pretrain-unknown-set", ["pretrain", "--shards", "{w}/store", "--out", "{w}/run", "--set", "run.nope=1"], "nope"),
    # export-encoder
    ("export-missing", ["export-encoder", "{w}/nope.pt", "{w}/run"], "nope.pt"),
    ("export-garbage", ["export-encoder", "{w}/garbage.pt", "{w}/exp"], "garbage.pt"),
    ("export-out-is-file", ["export-encoder", "{w}/garbage.pt", "{w}/file.txt"], "file.txt"),
    # lpsam
    ("adapt-no-sam", ["lpsam", "adapt", "--data", "{w}/lpdata", "--out", "{w}/run"], "--sam-checkpoint"),
    ("adapt-sam-missing", ["lpsam", "adapt", "--data", "{w}/lpdata", "--sam-checkpoint", "{w}/missing.pth", "--out", "{w}/run"], "missing.pth"),
    ("adapt-spec", ["lpsam", "adapt", "--data", "{w}/lpdata", "--spec", "vit_q", "--out", "{w}/run"], "--spec"),
    ("adapt-lr", ["lpsam", "adapt", "--data", "{w}/lpdata", "--random-sam", "--lr", "-1", "--out", "{w}/run"], "--lr"),
    ("adapt-device", ["lpsam", "adapt", "--data", "{w}/lpdata", "--random-sam", "--device", "tpu", "--out", "{w}/run"], "--device"),
    ("prompter-no-sam", ["lpsam", "train-prompter", "--data", "{w}/lpdata", "--adapter-checkpoint", "{w}/garbage.pt", "--out", "{w}/run"], "--sam-checkpoint"),
    ("predict-batch-0", ["lpsam", "predict", "{w}/corpus", "--checkpoint", "{w}/garbage.pt", "--out", "{w}/run", "--batch-size", "0"], "--batch-size"),
    ("predict-threshold", ["lpsam", "predict", "{w}/corpus", "--checkpoint", "{w}/garbage.pt", "--out", "{w}/run", "--threshold", "5"], "--threshold"),
    ("predict-no-sam", ["lpsam", "predict", "{w}/corpus", "--checkpoint", "{w}/garbage.pt", "--out", "{w}/run"], "--sam-checkpoint"),
    ("predict-garbage", ["lpsam", "predict", "{w}/corpus", "--checkpoint", "{w}/garbage.pt", "--random-sam", "--out", "{w}/run"], "garbage.pt"),
    ("predict-out-is-file", ["lpsam", "predict", "{w}/corpus", "--checkpoint", "{w}/garbage.pt", "--random-sam", "--out", "{w}/file.txt"], "file.txt"),
    ("precompute-lpsam-no-sam", ["precompute-masks", "{w}/corpus", "--out", "{w}/lp_out", "--masker", "lpsam", "--checkpoint", "{w}/garbage.pt", "--no-progress"], "--sam-checkpoint"),
    # evaluate
    ("evaluate-missing-data", ["evaluate", "{w}/nope", "--out", "{w}/run", "--encoder", "random"], "nope"),
    ("evaluate-out-is-file", ["evaluate", "{w}/corpus", "--out", "{w}/file.txt", "--encoder", "random"], "file.txt"),
    ("evaluate-device", ["evaluate", "{w}/corpus", "--out", "{w}/run", "--encoder", "random", "--device", "tpu"], "--device"),
    ("evaluate-garbage-encoder", ["evaluate", "{w}/corpus", "--out", "{w}/run", "--encoder", "x={w}/garbage.pt"], "garbage.pt"),
    # demo
    ("demo-steps", ["demo", "{w}/demo", "--pretrain-steps", "-1"], "--pretrain-steps"),
    ("demo-out-is-file", ["demo", "{w}/file.txt"], "file.txt"),
    ("demo-masker", ["demo", "{w}/demo", "--masker", "sam"], "--masker"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_line_and_changes_nothing(world, case):
    # a 4th field names a folder exempt from the comparison: only precompute's cache/, which
    # memoises work (here: that an input failed ingest) and never holds published output
    name, argv, needle, *exempt = case
    argv = [part.replace("{w}", str(world)) for part in argv]

    def tree_hash(root):
        return {key: value for key, value in _tree_hash(root).items() if not any(key.startswith(e) for e in exempt)}

    before = tree_hash(world)
    result = CliRunner().invoke(app, argv)
    output = result.output
    assert result.exit_code != 0, f"{name}: exit 0\n{output}"
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), f"{name}: {result.exception!r}"
    assert "Traceback" not in output, output
    assert "weights_only" not in output and "Weights only" not in output, output  # torch's unsafe advice never reaches a user
    errors = [line for line in output.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, f"{name}: expected one error line\n{output}"
    if not errors[0].startswith("Error: "):  # our own messages (not click's usage errors) are the whole output
        assert output.strip().splitlines() == errors, f"{name}: extra output\n{output}"
    assert needle.replace("{w}", str(world)) in errors[0], f"{name}: {needle!r} not in {errors[0]!r}"
    assert tree_hash(world) == before, f"{name}: changed files under the output"
    assert not (world / "pwned").exists()
    for made in ("new", "demo", "exp", "sam_out"):
        assert not (world / made).exists() or not any((world / made).rglob("*.png")), made


def test_cuda_without_a_gpu_is_one_line(world, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, also on a GPU box
    result = CliRunner().invoke(app, ["pretrain", "--shards", str(world / "store"), "--out", str(world / "run"), "--device", "cuda"])
    assert result.exit_code == 2 and result.output.strip() == "error: --device cuda: CUDA is not available on this machine (use --device cpu or auto)"


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    return re.sub(r"\s+", " ", result.output)


def test_help_shows_defaults_choices_and_an_example():
    from anaus_core.lpsam.train import AdaptConfig, PrompterConfig
    from anaus_core.train import PretrainConfig
    from pipeline.config import PrecomputeConfig

    config = PretrainConfig()
    text = _help("pretrain")
    for option, value in (("--num-workers", config.data.num_workers), ("--seed", config.run.seed),
                          ("--checkpoint-every", config.run.checkpoint_every), ("--batch-size", config.data.batch_size),
                          ("--crop-size", config.views.size), ("--log-every", config.run.log_every), ("--lr", config.optim.base_lr)):
        assert re.search(rf"{option} .*?\(default {value}\b", text) or re.search(rf"{option} .*?default {value}\b", text), option
    assert "Example: anaus pretrain" in text and "auto|cpu|cuda" in text
    text = _help("precompute-masks")
    assert "felzenszwalb|kmeans|labels|sam|lpsam" in text and "Example: anaus precompute-masks" in text
    assert f"(default {PrecomputeConfig().stored_size})" in text and f"(default {PrecomputeConfig().max_shrink})" in text
    for stage, cls in (("adapt", AdaptConfig), ("train-prompter", PrompterConfig)):
        text = _help("lpsam", stage)
        defaults = cls()
        for option, value in (("--epochs", defaults.epochs), ("--batch-size", defaults.batch_size), ("--lr", defaults.lr)):
            shown = re.search(rf"{option} .*?\(default ([0-9.e+-]+)\)", text)
            assert shown and float(shown.group(1)) == value, (stage, option)
        assert f"Example: anaus lpsam {stage}" in text and "--random-sam" in text
        assert f"(default {defaults.alpha})" in text and f"(default {defaults.device})" in text
    assert f"(default {AdaptConfig().model.image_size} " in _help("lpsam", "adapt")
    text = _help("pretrain")
    assert ("default on" if config.run.amp else "default off") in text.split("--no-amp", 1)[1].split(" --", 1)[0]
    assert ("default on" if config.model.sync_batchnorm else "default off") in text.split("--no-sync-batchnorm", 1)[1].split(" --", 1)[0]
    for command in (["make-phantoms"], ["inspect-shard"], ["export-encoder"], ["demo"], ["lpsam", "predict"], ["evaluate"]):
        assert "Example: anaus " in _help(*command), command
