"""The scan-region stage and sample groups in the precompute job: bad input is named and
nothing else is lost, region settings re-run only what depends on them, the record and shard
carry the region, the origin and the group."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import PrecomputeConfig
from pipeline.job import run_precompute
from shards.reader import ShardReader


def speckle(rng: np.random.Generator, shape) -> np.ndarray:
    """Correlated gray texture (white noise blurred over ~2 px, as speckle is), 40..220."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal(shape), 1.2)
    return np.clip(130 + 90 * field / field.std() / 2, 40, 220).astype(np.uint8)


def fan_image(size: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    fan = (np.abs(np.arctan2(xx - size / 2, yy + 2.0)) <= 0.7) & (np.hypot(xx - size / 2, yy + 2.0) <= 0.8 * size)
    image = np.zeros((size, size), np.uint8)
    image[fan] = speckle(rng, (size, size))[fan]
    return image


def write_clip(path: Path, frames: list[np.ndarray]) -> None:
    import av

    height, width = frames[0].shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1", rate=10)  # lossless: the test is about geometry
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            rgb = np.repeat(frame[..., None], 3, axis=2)
            for packet in stream.encode(__import__("av").VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def shifted_fan(size: int, seed: int) -> np.ndarray:
    """The same probe after a depth change: a narrow, deep fan."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    fan = (np.abs(np.arctan2(xx - size / 2, yy + 2.0)) <= 0.3) & (np.hypot(xx - size / 2, yy + 2.0) <= 0.98 * size)
    image = np.zeros((size, size), np.uint8)
    image[fan] = speckle(rng, (size, size))[fan]
    return image


def make_corpus(root: Path) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    for index in range(3):
        Image.fromarray(fan_image(seed=index)).save(corpus / f"good_{index}.png")
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(corpus / "black.png")
    dot = np.zeros((96, 96), np.uint8)
    dot[40:43, 40:43] = 150
    Image.fromarray(dot).save(corpus / "no_region.png")
    write_clip(corpus / "depth_change.avi", [fan_image(seed=10 + i) for i in range(4)] + [shifted_fan(96, 20 + i) for i in range(4)])
    write_clip(corpus / "steady.avi", [fan_image(seed=30 + i) for i in range(3)])
    return corpus


def config(corpus: Path, out: Path, **overrides) -> PrecomputeConfig:
    settings = dict(corpus=str(corpus), out=str(out), masker="kmeans", stored_size=96, samples_per_shard=4, progress=False)
    settings.update(overrides)
    return PrecomputeConfig(**settings)


def test_bad_input_named_region_stage_and_records(tmp_path):
    corpus = make_corpus(tmp_path)
    with open(corpus / "groups.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "group"])
        writer.writerow(["good_0.png", "patient-A"])
        writer.writerow(["good_1.png", "patient-A"])
    out = tmp_path / "out"
    report = run_precompute(config(corpus, out), show_report=False)
    reasons = {error["path"]: (error["stage"], error["reason"]) for error in report.errors}
    assert set(reasons) == {"black.png", "no_region.png", "depth_change.avi"}, reasons
    assert reasons["black.png"][0] == "region" and "black" in reasons["black.png"][1]
    assert "no scan region" in reasons["no_region.png"][1]
    assert "geometry changes mid-clip" in reasons["depth_change.avi"][1]
    reader = ShardReader(out)
    keys = sorted(reader.keys())
    assert keys == ["good_0_png", "good_1_png", "good_2_png", "steady_avi_f00000", "steady_avi_f00001", "steady_avi_f00002"]
    for key in keys:
        sample = reader[key]
        region = sample.scan_region
        assert region is not None and region.shape == sample.image.shape
        assert not (sample.mask_set.masks & ~region).any()
        assert sample.record["scan_region"]["area"] == int(region.sum())
        assert "region" in sample.record["fingerprints"]
    assert reader["good_0_png"].record["group"] == {"id": "patient-A", "source": "groups.csv"}
    assert reader["good_2_png"].record["group"] == {"id": "good_2.png", "source": "file"}
    clip = reader["steady_avi_f00001"].record
    assert clip["origin"] == {"kind": "video", "file": "steady.avi", "frame": 1} and clip["group"]["id"] == "steady.avi"


def test_region_settings_rerun_region_and_masks_only(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(2):
        Image.fromarray(fan_image(seed=index)).save(corpus / f"good_{index}.png")
    out = tmp_path / "out"
    first = run_precompute(config(corpus, out), show_report=False)
    assert {s: first.stages[s].computed for s in first.stages} == {"ingest": 2, "region": 2, "mask": 2, "pyramid": 2}
    changed = run_precompute(config(corpus, out, region_options={"close_fraction": 0.05}), show_report=False)
    assert {s: changed.stages[s].computed for s in changed.stages} == {"ingest": 0, "region": 2, "mask": 2, "pyramid": 2}
    whole = run_precompute(config(corpus, out, scan_region=False), show_report=False)
    assert whole.stages["ingest"].computed == 0 and whole.stages["region"].computed == 2
    assert ShardReader(out)["good_0_png"].scan_region.all()
    again = run_precompute(config(corpus, out, scan_region=False), show_report=False)
    assert again.did_no_work


def test_dicom_uids_become_the_group(tmp_path):
    from tests.test_ingest import write_dicom

    from pipeline.ingest import decode_source

    frames = np.stack([fan_image(seed=i) for i in range(3)])
    write_dicom(tmp_path / "cine.dcm", frames, PatientID="P-7", StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.4")
    decoded = decode_source(tmp_path / "cine.dcm")
    assert len(decoded.frames) == 3 and decoded.info["kind"] == "dicom"
    assert decoded.info["dicom"] == {"PatientID": "P-7", "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4"}
    assert (decoded.group, decoded.group_source) == ("PatientID:P-7", "dicom:PatientID")
    # a groups.csv entry wins over the DICOM tags
    assert decode_source(tmp_path / "cine.dcm", groups={"cine.dcm": "site-3"}).group == "site-3"


def test_multi_frame_file_whose_frames_change_size_is_refused(tmp_path):
    import pytest

    from pipeline.ingest import IngestError, decode_source

    pages = [Image.fromarray(fan_image(96, 0)), Image.fromarray(fan_image(80, 1))]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(IngestError, match="geometry changes mid-clip") as error:
        decode_source(tmp_path / "stack.tif")
    assert error.value.path.endswith("stack.tif")


def test_groups_are_in_the_index(tmp_path):
    from shards.index import read_index

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(3):
        Image.fromarray(fan_image(seed=index)).save(corpus / f"good_{index}.png")
    (corpus / "groups.csv").write_text("path,group\ngood_0.png,P1\ngood_1.png,P1\ngood_2.png,P2\n")
    out = tmp_path / "out"
    run_precompute(config(corpus, out), show_report=False)
    index = read_index(out)
    assert dict(zip(index.keys, index.group)) == {"good_0_png": "P1", "good_1_png": "P1", "good_2_png": "P2"}
    # an edited groups.csv rewrites the shards (the records hold the groups), nothing else runs
    (corpus / "groups.csv").write_text("path,group\ngood_0.png,P1\ngood_1.png,P3\ngood_2.png,P2\n")
    changed = run_precompute(config(corpus, out), show_report=False)
    assert {s: changed.stages[s].computed for s in changed.stages} == {"ingest": 0, "region": 0, "mask": 0, "pyramid": 0}
    assert changed.shards_written >= 1 and read_index(out).group[1] == "P3"


def test_gc_drops_regions_of_old_settings(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    Image.fromarray(fan_image(seed=0)).save(corpus / "good_0.png")
    out = tmp_path / "out"
    run_precompute(config(corpus, out), show_report=False)
    run_precompute(config(corpus, out, region_options={"close_fraction": 0.05}), show_report=False)
    assert len(list((out / "cache" / "region").rglob("*.bin"))) == 2
    run_precompute(config(corpus, out, region_options={"close_fraction": 0.05}, gc=True), show_report=False)
    assert len(list((out / "cache" / "region").rglob("*.bin"))) == 1


def test_region_member_round_trip_crc_and_contact_sheet(tmp_path):
    import pytest

    from anaus_core.maskset import MaskSet
    from shards.inspect import write_contact_sheet
    from shards.sample import REGION_FIELD, SampleFormatError, ShardSample, decode_sample, encode_sample
    from shards.writer import ShardWriter

    image = fan_image(64, 0)
    region = image > 0
    masks = np.stack([region & (np.arange(64)[None, :] < 32), region & (np.arange(64)[None, :] >= 32)])
    sample = ShardSample.build(key="a", image=image, mask_set=MaskSet(masks=masks, ids=[1, 2], sources=["x", "x"], scores=[1, 1]),
                               record={"source_path": "a.png"}, scan_region=region)
    encoded = encode_sample(sample)
    assert REGION_FIELD in encoded and list(encoded)[-1] == "json"
    decoded = decode_sample(encoded)
    assert decoded == sample and np.array_equal(decoded.scan_region, region)
    with pytest.raises(SampleFormatError, match="crc32"):
        decode_sample({**encoded, REGION_FIELD: encode_sample(ShardSample.build(key="a", image=image, mask_set=sample.mask_set,
                                                                               scan_region=~region))[REGION_FIELD]})
    with pytest.raises(SampleFormatError, match="missing member"):
        decode_sample({k: v for k, v in encoded.items() if k != REGION_FIELD})
    with ShardWriter(tmp_path / "store", samples_per_shard=4) as writer:
        writer.write(sample)
    stored = ShardReader(tmp_path / "store")["a"]
    assert np.array_equal(stored.scan_region, region)
    assert write_contact_sheet([stored], tmp_path / "sheet.png").stat().st_size > 0
