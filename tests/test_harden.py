"""Issue 11 (security and data safety): one test per item, security first."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from anaus_core.errors import UserInputError, one_line
from cli import app


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    from shards.synthetic import write_synthetic_store

    return write_synthetic_store(tmp_path_factory.mktemp("harden-store"), count=12, samples_per_shard=4, height=48, width=48)


def _copy_store(store: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(store, dest)
    return dest


def _run(args: list[str]):
    return CliRunner().invoke(app, args)


# ------------------------------------------------------------------------------------------
# 1. security: a pipe: shard source from a file or a checkpoint never runs
# ------------------------------------------------------------------------------------------


def _pipe(marker: Path, store: Path) -> str:
    return f"pipe:touch {marker}; cat {next(store.glob('*.tar'))}"


def test_pipe_source_in_yaml_config_does_not_execute(tmp_path, tiny_store):
    marker = tmp_path / "pwned"
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data:\n  shards: '{_pipe(marker, tiny_store)}'\n  num_workers: 0\nrun:\n  device: cpu\n  steps: 1\n")
    for extra in ([], ["--allow-pipe-shards"]):  # the flag covers only a source typed on the command line
        result = _run(["pretrain", "--config", str(config), "--out", str(tmp_path / "run"), *extra])
        assert result.exit_code == 2, result.output
        assert "data.shards" in result.output and "pipe:" in result.output and "Traceback" not in result.output
        assert not marker.exists()


def test_pipe_source_in_a_checkpoint_does_not_execute(tmp_path, tiny_store):
    from anaus_core.train import PretrainConfig
    from anaus_core.train.checkpoint import CHECKPOINT_FORMAT

    marker = tmp_path / "pwned"
    config = dataclasses.asdict(PretrainConfig())
    config["data"]["shards"] = _pipe(marker, tiny_store)
    config["run"]["device"] = "cpu"
    checkpoint = tmp_path / "someone_elses_last.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "step": 1, "config": config}, checkpoint)
    for extra in ([], ["--allow-pipe-shards"]):
        result = _run(["pretrain", "--out", str(tmp_path / "run"), "--resume-from", str(checkpoint), *extra])
        assert result.exit_code == 2, result.output
        assert "checkpoint" in result.output and "pipe:" in result.output
        assert not marker.exists()


def test_shard_source_policy_at_the_library_level(tmp_path, tiny_store):
    from anaus_core.shard_urls import ShardUrlPolicy
    from shards.stream import ShardSource, resolve_shards

    marker = tmp_path / "pwned"
    with pytest.raises(UserInputError, match="pipe:"):
        resolve_shards(_pipe(marker, tiny_store))
    with pytest.raises(UserInputError, match="pipe:"):
        ShardSource(urls=(_pipe(marker, tiny_store),), sizes=(4,))
    with pytest.raises(UserInputError, match="remote"):
        resolve_shards("s3://bucket/shards")
    assert not marker.exists()
    # explicitly allowed (what --shards 'pipe:...' --allow-pipe-shards does): it runs
    source = resolve_shards(_pipe(marker, tiny_store), policy=ShardUrlPolicy(allow_pipe=True))
    assert source.num_samples == 4 and marker.exists()


# ------------------------------------------------------------------------------------------
# 2./3. an output refuses to be emptied, shrunk or re-made with another masker
# ------------------------------------------------------------------------------------------


def _published(out: Path) -> dict[str, str]:
    files = [p for p in sorted(out.rglob("*")) if p.is_file() and "cache" not in p.relative_to(out).parts and p.name != ".lock"
             and p.name not in ("errors.jsonl", "report.json")]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / f"im{index}.png")
    return root


@pytest.fixture(scope="module")
def built_store(tmp_path_factory, small_corpus) -> Path:
    out = tmp_path_factory.mktemp("built") / "out"
    result = _run(["precompute-masks", str(small_corpus), "--out", str(out), "--masker", "kmeans", "--stored-size", "32",
                   "--samples-per-shard", "2", "--no-progress", "--no-scan-region"])  # noise images have no scan region
    assert result.exit_code == 0, result.output
    return out


def test_empty_corpus_is_an_error_and_deletes_nothing(tmp_path, built_store):
    out = _copy_store(built_store, tmp_path / "out")
    before = _published(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    for extra in ([], ["--gc"]):
        result = _run(["precompute-masks", str(empty), "--out", str(out), "--masker", "kmeans", "--no-progress", *extra])
        assert result.exit_code == 2 and "empty corpus" in result.output, result.output
        assert _published(out) == before
    assert any((out / "cache").rglob("*"))  # --gc did not run


def test_shrinking_by_more_than_the_limit_needs_allow_shrink(tmp_path, built_store, small_corpus):
    out = _copy_store(built_store, tmp_path / "out")
    before = _published(out)
    part = tmp_path / "part"
    part.mkdir()
    (part / "im0.png").write_bytes((small_corpus / "im0.png").read_bytes())
    args = ["precompute-masks", str(part), "--out", str(out), "--masker", "kmeans", "--stored-size", "32", "--samples-per-shard", "2",
            "--no-progress", "--no-scan-region"]
    result = _run(args)
    assert result.exit_code == 2 and "shrink the store from 6 to 1" in result.output and "--allow-shrink" in result.output
    assert _published(out) == before
    result = _run(args + ["--allow-shrink"])
    assert result.exit_code == 0, result.output
    assert sum(1 for _ in out.glob("*.tar")) == 1


def test_output_remembers_its_masker_and_refuses_another(tmp_path, built_store, small_corpus):
    import json

    out = _copy_store(built_store, tmp_path / "out")
    assert json.loads((out / "manifest.json").read_text())["fingerprints"]["masker"] == "kmeans"
    before = _published(out)
    result = _run(["precompute-masks", str(small_corpus), "--out", str(out), "--stored-size", "32", "--samples-per-shard", "2", "--no-progress"])
    assert result.exit_code == 2 and "was made with --masker kmeans" in result.output
    assert _published(out) == before


# ------------------------------------------------------------------------------------------
# 4. bounded memory: segmenters at a bounded resolution, declared sizes checked first
# ------------------------------------------------------------------------------------------


def test_segmenters_work_at_a_bounded_resolution():
    from anaus_core.maskers._segments import masks_from_segments, segment_at_bounded_resolution

    seen = []

    def segment(image):
        seen.append(image.shape)
        return (np.arange(image.size).reshape(image.shape) // 7).astype(np.int32)

    image = np.zeros((300, 5000), np.uint8)
    labels = segment_at_bounded_resolution(segment, image, max_pixels=10_000)
    assert labels.shape == image.shape and seen[0][0] * seen[0][1] <= 10_000
    small = np.zeros((20, 30), np.uint8)
    assert np.array_equal(segment_at_bounded_resolution(segment, small, max_pixels=10_000), segment(small))
    many = masks_from_segments(np.arange(64 * 64).reshape(64, 64) // 8, source="t", min_segment_area=1)
    assert len(many.masks) == 256  # at most MAX_PROPOSALS materialised, not 512


def test_extreme_aspect_ratio_and_huge_stored_size_are_refused(tmp_path):
    from pipeline.ingest import IngestError, resize_gray

    with pytest.raises(IngestError, match="stored-image limit"):
        resize_gray(np.zeros((20, 16000), np.uint8), 256)  # would be 256 x 204800
    result = _run(["precompute-masks", str(tmp_path), "--out", str(tmp_path / "o"), "--stored-size", "100000", "--no-progress"])
    assert result.exit_code == 2 and "--stored-size" in result.output


def test_declared_png_size_is_checked_before_decoding():
    from shards.sample import SampleFormatError, decode_image

    import io

    buffer = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buffer, format="PNG")  # ~140 kB on disk, 144 MB decoded
    with pytest.raises(SampleFormatError, match="declares 12000x12000"):
        decode_image(buffer.getvalue())


# ------------------------------------------------------------------------------------------
# 5. one lock per output folder for every writing command
# ------------------------------------------------------------------------------------------


def test_a_second_writer_of_a_run_folder_is_refused(tmp_path, tiny_store):
    from anaus_core.outputs import OutputLock

    run = tmp_path / "run"
    with OutputLock(run, command="pretrain"):
        result = _run(["pretrain", "--shards", str(tiny_store), "--out", str(run), "--steps", "1", "--device", "cpu"])
        assert result.exit_code == 2 and "being written by another pretrain run" in result.output
        result = _run(["make-phantoms", str(run), "--count", "1", "--size", "32"])
        assert result.exit_code == 2 and "being written" in result.output
    assert not (run / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------
# 6. missing or corrupt shards: one line by default, skippable with a count
# ------------------------------------------------------------------------------------------


def test_missing_and_truncated_shards(tmp_path, tiny_store):
    from shards.vet import BadShardsError, open_vetted_shards

    store = _copy_store(tiny_store, tmp_path / "s")
    tars = sorted(store.glob("*.tar"))
    tars[0].unlink()
    with pytest.raises(BadShardsError, match=f"{tars[0].name}: missing"):
        open_vetted_shards(store)
    data = tars[1].read_bytes()
    tars[1].write_bytes(data[: len(data) // 2])
    warnings: list[str] = []
    source = open_vetted_shards(store, skip_bad=True, warn=warnings.append)
    assert len(source.urls) == 1 and source.num_samples == 4
    assert len(warnings) == 1 and "skipped 2 of 3 shards" in warnings[0]
    assert source.indexed and len(source.offsets) == 4
    result = _run(["pretrain", "--shards", str(store), "--out", str(tmp_path / "run"), "--steps", "1", "--device", "cpu"])
    assert result.exit_code == 2 and "--skip-bad-shards" in result.output and len(result.output.strip().splitlines()) == 1


def test_worker_tracebacks_become_one_line():
    text = ("Caught ShardReadError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\nshards.stream.ShardReadError: s/shard-1.tar: shard is unreadable')
    assert one_line(text) == "s/shard-1.tar: shard is unreadable"


# ------------------------------------------------------------------------------------------
# 7. make-phantoms does not overwrite a corpus of another size
# ------------------------------------------------------------------------------------------


def test_make_phantoms_refuses_another_size(tmp_path):
    corpus = tmp_path / "c"
    assert _run(["make-phantoms", str(corpus), "--count", "2", "--size", "32"]).exit_code == 0
    before = (corpus / "img" / "phantom_00000.png").read_bytes()
    result = _run(["make-phantoms", str(corpus), "--count", "2", "--size", "48"])
    assert result.exit_code == 2 and "32x32" in result.output
    assert (corpus / "img" / "phantom_00000.png").read_bytes() == before


# ------------------------------------------------------------------------------------------
# 8. stale temporary files are removed when a writer starts; keep_last_checkpoints
# ------------------------------------------------------------------------------------------


def test_stale_checkpoint_temps_are_cleaned_at_start(tmp_path):
    from anaus_core.outputs import claim_output

    stale = tmp_path / "run" / "checkpoints" / ".step-000010.pt.tmp-12345"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * 100)
    keep = tmp_path / "run" / "checkpoints" / "step-000005.pt"
    keep.write_bytes(b"y")
    with claim_output(tmp_path / "run", command="pretrain"):
        assert not stale.exists() and keep.exists()


def test_keep_last_checkpoints(tmp_path):
    from anaus_core.train.checkpoint import save_checkpoint

    for step in (1, 2, 3, 4):
        save_checkpoint({"step": step}, tmp_path, step=step, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["last.pt", "step-000003.pt", "step-000004.pt"]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 4


# ------------------------------------------------------------------------------------------
# 9. SAM-based commands need a checkpoint unless a random (seeded) one is asked for
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["lpsam", "adapt", "--data", "d", "--out", "o"],
    ["lpsam", "train-prompter", "--data", "d", "--adapter-checkpoint", "a.pt", "--out", "o"],
    ["lpsam", "predict", "img", "--checkpoint", "c.pt", "--out", "o"],
])
def test_sam_commands_require_a_checkpoint(tmp_path, args):
    result = _run([str(tmp_path / a) if a in ("d", "o", "img") else a for a in args])
    assert result.exit_code == 2 and "--sam-checkpoint: required" in result.output and "--random-sam" in result.output
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------
# 10. a phantom corpus's label PNGs are not ingested as images
# ------------------------------------------------------------------------------------------


def test_phantom_labels_are_not_ingested(tmp_path):
    from anaus_core.phantoms import make_phantom_corpus
    from anaus_core.phantoms.corpus import LABELS_MARKER as WRITTEN
    from pipeline.ingest import LABELS_MARKER, iter_source_files

    assert WRITTEN == LABELS_MARKER
    make_phantom_corpus(tmp_path / "c", count=3, size=32, seed=0)
    found = [rel for _, rel in iter_source_files(tmp_path / "c")]
    assert found == [f"img/phantom_0000{i}.png" for i in range(3)]


# ------------------------------------------------------------------------------------------
# 11. accepted without complaint before: now refused (or skipped with a reason)
# ------------------------------------------------------------------------------------------


def test_tiny_images_are_skipped_with_a_reason(tmp_path):
    from pipeline.ingest import IngestError, _check_dimensions

    with pytest.raises(IngestError, match="below the minimum"):
        _check_dimensions(1, 1)


def test_in_place_edit_keeping_size_and_mtime_is_seen(tmp_path):
    from pipeline.fingerprint import StatCache

    path = tmp_path / "a.bin"
    path.write_bytes(b"a" * 64)
    old = os.stat(path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns - 10_000_000_000))  # old enough to be trusted
    cache = StatCache(tmp_path / "stat.sqlite", racy_window_ns=0)
    first = cache.sha256(path)
    stamp = os.stat(path)
    path.write_bytes(b"b" * 64)  # same size ...
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # ... same mtime; ctime moved
    assert cache.sha256(path) != first


def test_garbage_checkpoint_gives_no_weights_only_advice(tmp_path):
    import pickle

    bad = tmp_path / "bad.pt"
    bad.write_bytes(pickle.dumps({"x": object()}))  # a legacy pickle holding a non-tensor object
    result = _run(["export-encoder", str(bad), str(tmp_path / "exp")])
    assert result.exit_code == 2 and "weights_only" not in result.output and "can still be loaded" not in result.output
    torch.save({"x": Evil()}, bad)
    result = _run(["pretrain", "--out", str(tmp_path / "r"), "--resume-from", str(bad)])
    assert result.exit_code == 2 and "weights_only" not in result.output and "bad.pt" in result.output


class Evil:
    """A class a weights-only load must refuse."""


# ------------------------------------------------------------------------------------------
# a user's first hour: progress off a terminal, defaults that fit the machine and the data
# ------------------------------------------------------------------------------------------


def test_progress_is_a_line_per_interval_when_not_a_terminal():
    import io

    from rich.console import Console
    from rich.progress import Progress

    from anaus_core.progress import LineProgress, make_progress

    buffer = io.StringIO()
    progress = make_progress(console=Console(file=buffer, force_terminal=False, width=200), interval=0.0)
    assert isinstance(progress, LineProgress)
    with progress:
        task = progress.add_task("pretrain", total=4, loss="-")
        for step in range(4):
            progress.update(task, completed=step + 1, loss=f"{1.0 / (step + 1):.3f}")
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("pretrain: 1/4 (25%)") and "loss=1.000" in lines[0]
    assert lines[-1].startswith("pretrain: 4/4 (100%)") and len(lines) == 5  # one per update + the final line
    terminal = make_progress(console=Console(file=io.StringIO(), force_terminal=True))
    assert type(terminal) is Progress


def test_defaults_fit_the_machine_and_the_corpus():
    from anaus_core.machine import fit_pretrain_to_machine
    from anaus_core.train import PretrainConfig

    config, notes = fit_pretrain_to_machine(PretrainConfig(), corpus_samples=12, stored_size=48, cpu_count=2)
    assert config.data.num_workers == 2 and config.data.batch_size == 12
    assert len(notes) == 3 and "num_workers 4 > 2" in notes[0] and "--batch-size 192 exceeds the 12" in notes[1]
    assert "--crop-size 224 is larger than the stored images (48 px)" in notes[2]
    same, none = fit_pretrain_to_machine(PretrainConfig(), corpus_samples=10_000, stored_size=256, cpu_count=64)
    assert same == PretrainConfig() and none == []
    # A-ViT's views are its multi-crop global crops, not --crop-size
    avit = PretrainConfig(method="avit")
    avit.avit.crops.global_size = 64
    assert fit_pretrain_to_machine(avit, corpus_samples=10_000, stored_size=64, cpu_count=64)[1] == []
    avit.avit.crops.global_size = 96
    (note,) = fit_pretrain_to_machine(avit, corpus_samples=10_000, stored_size=64, cpu_count=64)[1]
    assert "avit.crops.global_size 96 is larger than the stored images (64 px)" in note
    with pytest.raises(UserInputError, match="fewer than world size"):
        fit_pretrain_to_machine(PretrainConfig(), corpus_samples=1, stored_size=48, cpu_count=2, world_size=2)


def test_lpsam_predict_skips_a_corrupt_image(tmp_path):
    import json
    from types import SimpleNamespace

    from anaus_core.lpsam.export import predict_files
    from anaus_core.maskset import MaskSet

    class Predictor:  # stands in for LPSAMPredictor: an empty mask set per image
        model = SimpleNamespace(in_chans=1)
        batch_size = 4

        def predict(self, images, *, finalize, max_masks):
            return [MaskSet.empty(*image.shape[:2]) for image in images]

    good = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    summary = predict_files(Predictor(), [good, bad], tmp_path / "out", progress=False)
    assert [r["image"] for r in summary] == [str(good)]
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert skipped[0]["image"] == str(bad) and "cannot be decoded" in skipped[0]["error"]
    with pytest.raises(UserInputError, match="no readable image"):
        predict_files(Predictor(), [bad], tmp_path / "out2", progress=False)


def test_only_rank_zero_of_a_torchrun_job_locks_the_run_folder(tmp_path, monkeypatch):
    from anaus_core.outputs import OutputLock, claim_output

    with OutputLock(tmp_path / "run", command="pretrain"):
        monkeypatch.setenv("RANK", "1")
        with claim_output(tmp_path / "run", command="pretrain"):
            pass  # rank 1 shares rank 0's folder
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(UserInputError, match="being written"):
            with claim_output(tmp_path / "run", command="pretrain"):
                pass
