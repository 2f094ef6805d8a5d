"""precompute-masks: fingerprints, cache, shard assignment, incremental re-runs, bad input, DDTI."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anaus_core.errors import UserInputError
from pipeline.cache import StageCache, atomic_write_bytes, clean_stale_temps, decode_entry, encode_entry
from pipeline.config import PrecomputeConfig
from pipeline.fingerprint import StatCache, canonical_json, fingerprint
from pipeline.job import assign_shards, run_precompute
from pipeline.lock import OutputLock
from pipeline.report import EXIT_OK, EXIT_SKIPPED, EXIT_STRICT_FAILURE


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def copy_corpus(phantom_corpus: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private, mutable copy of the phantom corpus: (images, labels)."""
    root = tmp_path / "corpus"
    shutil.copytree(phantom_corpus, root)
    return root / "img", root / "label"


def make_config(images: Path, out: Path, **overrides) -> PrecomputeConfig:
    settings = dict(corpus=str(images), out=str(out), masker="labels", labels=str(images.parent / "label"), stored_size=128, samples_per_shard=3, progress=False)
    settings.update(overrides)
    return PrecomputeConfig(**settings)


def run(config: PrecomputeConfig):
    return run_precompute(config, show_report=False)


def computed(report) -> dict[str, int]:
    return {stage: summary.computed for stage, summary in report.stages.items()}


def index_keys(out: Path) -> list[str]:
    from shards.index import read_index

    return list(read_index(out).keys)


def shard_files(out: Path) -> set[str]:
    return {p.name for p in out.glob("*.tar")}


def indexed_shards(out: Path) -> set[str]:
    from shards.index import read_manifest

    return {s["name"] for s in read_manifest(out)["shards"]}


def assert_consistent(out: Path, expected_keys) -> None:
    """Every expected key in the index exactly once, no shard outside the index, valid store."""
    from shards.validate import validate

    keys = index_keys(out)
    assert sorted(keys) == sorted(expected_keys)
    assert len(keys) == len(set(keys))
    assert shard_files(out) == indexed_shards(out)
    report = validate(out)
    assert report.ok, report.problems


def phantom_keys(images: Path) -> list[str]:
    from pipeline.ingest import make_key

    return [make_key(p.name) for p in sorted(images.glob("*.png"))]


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------


def test_fingerprint_is_canonical_and_refuses_unhashable_values():
    assert fingerprint({"b": 1, "a": [1, 2.5]}) == fingerprint({"a": (1, 2.5), "b": 1.0})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert canonical_json({"b": 1, "a": None}) == '{"a":null,"b":1}'
    with pytest.raises(TypeError):
        fingerprint({"model": object()})
    with pytest.raises(TypeError):
        fingerprint({"x": float("nan")})


def test_assign_shards_is_deterministic_bounded_and_local():
    rng = np.random.default_rng(0)
    keys = sorted(f"k{v:08d}" for v in rng.choice(10**8, 2000, replace=False))
    groups = assign_shards(keys, 50)
    assert [i for g in groups for i in g] == list(range(len(keys)))
    assert all(len(g) <= 100 for g in groups)
    assert all(len(g) >= 25 for g in groups[:-1])
    assert 30 <= len(keys) / len(groups) <= 80
    assert assign_shards(keys, 50) == groups

    def memberships(ks):
        return {tuple(ks[i] for i in g) for g in assign_shards(ks, 50)}

    before = memberships(keys)
    # Insert 5 keys and remove 5: only the shards around them may change.
    edited = sorted(set(keys[::400]) ^ set(keys) | {"k5000000a", "k1234567a", "k9999999a", "k0000001a", "k7777777a"})
    after = memberships(edited)
    changed = len(after - before)
    assert changed <= 2 * 10, f"{changed} of {len(after)} shards changed after editing 10 keys"
    assert len(after & before) >= len(before) - 20


def test_stat_cache_rehashes_only_changed_files(tmp_path):
    source = tmp_path / "a.bin"
    source.write_bytes(b"one")
    old = 1_600_000_000_000_000_000
    os.utime(source, ns=(old, old))
    # racy_window_ns=0: the change stamp includes ctime, which utime cannot move back (just now)
    cache = StatCache(tmp_path / "stat.sqlite", racy_window_ns=0)
    first = cache.sha256(source)
    cache.save()
    again = StatCache(tmp_path / "stat.sqlite", racy_window_ns=0)
    assert again.sha256(source) == first and again.hashed == 0 and again.reused == 1
    source.write_bytes(b"two")  # new content, new mtime
    assert again.sha256(source) != first and again.hashed == 1
    # A file modified within the racy window of its hashing is never trusted from the cache.
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"x")
    racy = StatCache(None)
    racy.sha256(fresh)
    racy.sha256(fresh)
    assert racy.hashed == 2


def test_cache_entries_round_trip_and_temps_are_cleaned(tmp_path):
    data = encode_entry({"a": 1}, {"x": b"abc", "y": b""})
    assert decode_entry(data) == ({"a": 1}, {"x": b"abc", "y": b""})
    cache = StageCache(tmp_path / "cache")
    cache.put("mask", "ab" * 32, {"m": [1, 2]}, {"bits": b"\x01\x02"})
    assert cache.has("mask", "ab" * 32)
    assert cache.get_meta("mask", "ab" * 32) == {"m": [1, 2]}
    # A temp left behind by a killed writer is removed, final entries are kept.
    leftover = Path(cache.path("mask", "ab" * 32)).parent / "x.bin.tmp-123.part"
    leftover.write_bytes(b"partial")
    (tmp_path / ".index.zarr.tmp-1-ab").mkdir()
    (tmp_path / ".index.zarr.tmp-1-ab" / "zarr.json").write_text("{}")
    assert clean_stale_temps(tmp_path) == 2
    assert not leftover.exists() and cache.has("mask", "ab" * 32)
    atomic_write_bytes(tmp_path / "f.json", b"{}")
    assert (tmp_path / "f.json").read_bytes() == b"{}"


def test_lock_refuses_a_second_holder_with_a_clear_message(tmp_path):
    with OutputLock(tmp_path / "out"):
        with pytest.raises(UserInputError, match=rf"being written by another precompute-masks run \(pid {os.getpid()}"):
            OutputLock(tmp_path / "out").acquire()
    with OutputLock(tmp_path / "out"):  # released on exit
        pass


# ---------------------------------------------------------------------------------------------
# incremental re-runs (issue point 4)
# ---------------------------------------------------------------------------------------------


def test_first_run_then_noop_run_does_no_work(phantom_corpus, tmp_path):
    images, _ = copy_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    first = run(make_config(images, out))
    assert first.exit_code == EXIT_OK
    assert computed(first) == {"ingest": 12, "region": 12, "mask": 12, "pyramid": 12}
    assert first.shards_written == len(indexed_shards(out)) and first.index_written
    assert_consistent(out, phantom_keys(images))
    shas = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    manifest_mtime = (out / "manifest.json").stat().st_mtime_ns

    second = run(make_config(images, out))
    assert second.did_no_work
    assert computed(second) == {"ingest": 0, "region": 0, "mask": 0, "pyramid": 0}
    assert {s: second.stages[s].reused for s in second.stages} == {"ingest": 12, "region": 12, "mask": 12, "pyramid": 12}
    assert second.shards_written == 0 and second.shards_reused == len(shas) and not second.index_written
    assert "nothing to do" in second.summary_line()
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == shas
    assert (out / "manifest.json").stat().st_mtime_ns == manifest_mtime
    assert json.loads((out / "report.json").read_text())["did_no_work"] is True


def test_added_edited_and_removed_images(phantom_corpus, tmp_path):
    images, labels = copy_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    run(make_config(images, out))
    before_shards = indexed_shards(out)

    # add one image (with its label), edit one image's pixels
    flipped = np.array(Image.open(images / "phantom_00003.png"))[:, ::-1]
    Image.fromarray(flipped).save(images / "phantom_00100.png")
    shutil.copy(labels / "phantom_00003.png", labels / "phantom_00100.png")
    edited = np.array(Image.open(images / "phantom_00005.png"))
    edited[:10, :10] = 255 - edited[:10, :10]
    Image.fromarray(edited).save(images / "phantom_00005.png")

    report = run(make_config(images, out))
    assert computed(report) == {"ingest": 2, "region": 2, "mask": 2, "pyramid": 2}
    assert {s: report.stages[s].reused for s in report.stages} == {"ingest": 11, "region": 11, "mask": 11, "pyramid": 11}
    assert report.shards_written in (1, 2, 3) and report.shards_reused >= len(before_shards) - 3
    assert_consistent(out, phantom_keys(images))
    from shards.reader import ShardReader

    reader = ShardReader(out)
    assert np.array_equal(reader["phantom_00005_png"].image, edited)

    # remove two images: they drop out of the index, nothing is recomputed
    (images / "phantom_00000.png").unlink()
    (images / "phantom_00007.png").unlink()
    report = run(make_config(images, out))
    assert computed(report) == {"ingest": 0, "region": 0, "mask": 0, "pyramid": 0}
    assert report.shards_removed >= 1
    keys = index_keys(out)
    assert "phantom_00000_png" not in keys and "phantom_00007_png" not in keys
    assert_consistent(out, phantom_keys(images))


def test_identical_bytes_under_a_new_name_share_entries_but_get_their_own_key(phantom_corpus, tmp_path):
    images, labels = copy_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    run(make_config(images, out, masker="felzenszwalb", labels=None))
    shutil.copy(images / "phantom_00003.png", images / "copy_of_3.png")
    report = run(make_config(images, out, masker="felzenszwalb", labels=None))
    # Content-addressed: the copy re-uses ingest and mask entries of the original.
    assert computed(report) == {"ingest": 0, "region": 0, "mask": 0, "pyramid": 0}
    assert_consistent(out, phantom_keys(images))
    from shards.reader import ShardReader

    reader = ShardReader(out)
    assert reader["copy_of_3_png"].record["source_path"] == "copy_of_3.png"
    assert reader["copy_of_3_png"].mask_set == reader["phantom_00003_png"].mask_set


def test_masker_change_reruns_mask_onwards_but_not_ingest(phantom_corpus, tmp_path):
    images, _ = copy_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    base = dict(masker="felzenszwalb", labels=None, masker_options={"scale": 200.0})
    run(make_config(images, out, **base))
    # A new masker fingerprint (here an option; for SAM the checkpoint sha256) re-runs mask -> pack.
    changed = run(make_config(images, out, **{**base, "masker_options": {"scale": 400.0}}))
    assert computed(changed) == {"ingest": 0, "region": 0, "mask": 12, "pyramid": 12}
    assert changed.stages["ingest"].reused == 12
    assert changed.index_written
    assert_consistent(out, phantom_keys(images))
    # Going back re-uses the cached masks of the first configuration: no stage work at all.
    back = run(make_config(images, out, **base))
    assert computed(back) == {"ingest": 0, "region": 0, "mask": 0, "pyramid": 0}


def test_label_edit_reruns_only_that_sample(phantom_corpus, tmp_path):
    images, labels = copy_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    run(make_config(images, out))
    label = np.array(Image.open(labels / "phantom_00002.png"))
    label[:20, :20] = 9
    Image.fromarray(label).save(labels / "phantom_00002.png")
    report = run(make_config(images, out))
    assert computed(report) == {"ingest": 0, "region": 0, "mask": 1, "pyramid": 1}


def test_scale_change_reruns_only_pyramid_and_pack(phantom_corpus, tmp_path):
    images, _ = copy_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    run(make_config(images, out))
    report = run(make_config(images, out, scales=[7, 14]))
    assert computed(report) == {"ingest": 0, "region": 0, "mask": 0, "pyramid": 12}
    assert report.stages["mask"].reused == 12
    from shards.index import read_index

    assert read_index(out).scales == (7, 14)
    assert_consistent(out, phantom_keys(images))


def test_dry_run_prints_per_stage_plan_and_writes_nothing(phantom_corpus, tmp_path):
    images, _ = copy_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    fresh = run(make_config(images, out, dry_run=True))
    assert not out.exists()
    assert fresh.dry_run_plan["stages"]["ingest"]["compute"] == 12
    run(make_config(images, out))
    listing = sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*") if p.name != ".lock")
    plan = run(make_config(images, out, scales=[7, 14, 28], dry_run=True)).dry_run_plan
    assert plan["stages"]["ingest"] == {"compute": 0, "reuse": 12, "failed": 0}
    assert plan["stages"]["mask"] == {"compute": 0, "reuse": 12, "failed": 0}
    assert plan["stages"]["pyramid"] == {"compute": 12, "reuse": 0, "failed": 0}
    assert plan["shards_to_write"] == plan["shards"] > 0
    assert sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*") if p.name != ".lock") == listing
    assert "nothing to recompute" in run(make_config(images, out, dry_run=True)).dry_run_plan["summary"]


# ---------------------------------------------------------------------------------------------
# bad input (issue point 7)
# ---------------------------------------------------------------------------------------------


def _png_claiming_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (valid CRC) but holds almost no data."""
    raw = bytearray()
    Image.new("L", (1, 1)).save(buffer := __import__("io").BytesIO(), format="PNG")
    raw = bytearray(buffer.getvalue())
    ihdr_data = struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[16:29] = ihdr_data
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr_data))
    return bytes(raw)


def make_bad_corpus(phantom_corpus: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    images, labels = copy_corpus(phantom_corpus, tmp_path)
    good = (images / "phantom_00001.png").read_bytes()
    bad = {
        "zero_bytes.png": b"",
        "not_an_image.png": b"hello, I am a text file\n" * 10,
        "truncated.png": good[: len(good) // 2],
        "corrupt.png": good[:40] + bytes(np.random.default_rng(0).integers(0, 256, len(good) - 40, dtype=np.uint8)),
        "huge.png": _png_claiming_size(100_000, 100_000),
    }
    for name, data in bad.items():
        (images / name).write_bytes(data)
    # A label that does not match its image (wrong size).
    shutil.copy(images / "phantom_00004.png", images / "mismatch.png")
    Image.fromarray(np.ones((40, 60), np.uint8)).save(labels / "mismatch.png")
    expected_reasons = {
        "zero_bytes.png": "empty",
        "not_an_image.png": "not an image",
        "truncated.png": "",
        "corrupt.png": "",
        "huge.png": "limit",
        "mismatch.png": "does not match",
    }
    return images, expected_reasons


def test_bad_inputs_are_skipped_with_reasons_and_good_ones_written(phantom_corpus, tmp_path):
    images, reasons = make_bad_corpus(phantom_corpus, tmp_path)
    out = tmp_path / "out"
    report = run(make_config(images, out))
    assert report.exit_code == EXIT_SKIPPED
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    by_path = {e["path"]: e for e in errors}
    assert set(by_path) == set(reasons)
    for path, fragment in reasons.items():
        assert by_path[path]["reason"] and fragment in by_path[path]["reason"], by_path[path]
    assert by_path["mismatch.png"]["stage"] == "mask"
    assert {by_path[p]["stage"] for p in reasons if p != "mismatch.png"} == {"ingest"}
    good = [k for k in phantom_keys(images) if k.startswith("phantom_")]
    assert_consistent(out, good)
    assert "6 input(s) skipped" in report.summary_line()

    # Known-bad files are not decoded again (cached failures) but are still reported.
    again = run(make_config(images, out))
    assert computed(again) == {"ingest": 0, "region": 0, "mask": 0, "pyramid": 0}
    assert again.exit_code == EXIT_SKIPPED and len(again.errors) == 6

    # --strict: failure, and the published index stays as it was.
    (images / "phantom_00002.png").unlink()
    manifest = (out / "manifest.json").read_bytes()
    strict = run(make_config(images, out, strict=True))
    assert strict.exit_code == EXIT_STRICT_FAILURE
    assert (out / "manifest.json").read_bytes() == manifest
    assert_consistent(out, good)


def test_corpus_that_does_not_exist_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="corpus not found"):
        run(make_config(tmp_path / "nope", tmp_path / "out", masker="felzenszwalb", labels=None))


# ---------------------------------------------------------------------------------------------
# the real DDTI image: its {0, 1} label must come through as a mask
# ---------------------------------------------------------------------------------------------


def test_ddti_label_comes_through_as_a_mask(ddti_dir, tmp_path):
    corpus = tmp_path / "ddti"
    corpus.mkdir()
    shutil.copy(ddti_dir / "20436_img.png", corpus / "20436_img.png")
    label = np.array(Image.open(ddti_dir / "20436_label.png"))
    assert set(np.unique(label).tolist()) == {0, 1}
    out = tmp_path / "out"
    config = make_config(corpus, out, labels=str(ddti_dir), stored_size=512, masker_options={"replace": ["_img", "_label"]})
    report = run(config)
    assert report.exit_code == EXIT_OK, report.errors
    from shards.reader import ShardReader

    sample = ShardReader(out)["20436_img_png"]
    image = np.array(Image.open(ddti_dir / "20436_img.png").convert("L"))
    assert np.array_equal(sample.image, image)
    labelled = [i for i, s in enumerate(sample.mask_set.sources) if s == "labels"]
    assert len(labelled) == 1
    assert np.array_equal(sample.mask_set.masks[labelled[0]], label == 1)
    assert sample.record["masks"][labelled[0]]["area"] == int((label == 1).sum())
    assert sample.mask_pyramid[7].shape == (len(sample.mask_set), 7, 7)
    assert run(config).did_no_work


@pytest.mark.slow
def test_new_sam_checkpoint_reruns_mask_onwards_but_not_ingest(phantom_corpus, tmp_path):
    from anaus_core.sam import save_random_sam_checkpoint

    images, _ = copy_corpus(phantom_corpus, tmp_path)
    for path in sorted(images.glob("*.png"))[4:]:
        path.unlink()
    first, second = tmp_path / "sam_a.pth", tmp_path / "sam_b.pth"
    save_random_sam_checkpoint(first, "tiny", seed=0)
    save_random_sam_checkpoint(second, "tiny", seed=1)
    out = tmp_path / "out"
    options = {"image_size": 64, "points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    sam = dict(masker="sam", labels=None, stored_size=64, masker_options=options)
    report = run(make_config(images, out, checkpoint=str(first), **sam))
    assert computed(report) == {"ingest": 4, "region": 4, "mask": 4, "pyramid": 4} and report.masker_seconds > 0
    assert run(make_config(images, out, checkpoint=str(first), **sam)).did_no_work
    changed = run(make_config(images, out, checkpoint=str(second), **sam))
    assert computed(changed) == {"ingest": 0, "region": 0, "mask": 4, "pyramid": 4}
    assert changed.index_written
    assert_consistent(out, phantom_keys(images))
