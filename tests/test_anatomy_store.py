"""precompute-masks --anatomy: one category per sample in the record, the index and the manifest;
adding it to an existing store re-runs only the pack stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anaus_core.errors import UserInputError
from pipeline.anatomy import AnatomyResolver, largest_lpsam_class, parse_anatomy_source
from pipeline.config import PrecomputeConfig
from pipeline.job import run_precompute


def _config(images: Path, out: Path, **overrides) -> PrecomputeConfig:
    settings = dict(corpus=str(images), out=str(out), masker="labels", labels=str(images.parent / "label"),
                    stored_size=64, samples_per_shard=3, progress=False)
    settings.update(overrides)
    return PrecomputeConfig(**settings)


def _records(out: Path) -> dict[str, dict]:
    from shards.reader import iter_raw_samples

    return {raw.key: json.loads(raw.fields["json"]) for shard in sorted(out.glob("*.tar")) for raw in iter_raw_samples(shard)}


def _probe_csv(corpus: Path, path: Path) -> dict[str, str]:
    """Phantom category = probe geometry (linear / sector) from the generator's json."""
    truth = {}
    lines = ["file,category"]
    for meta_path in sorted((corpus / "label").glob("*.json")):
        meta = json.loads(meta_path.read_text())
        truth[meta["id"]] = meta["geometry"]
        lines.append(f"{meta['id']}.png,{meta['geometry']}")
    lines.append("not_in_corpus.png,kidney")
    path.write_text("\n".join(lines) + "\n")
    return truth


def test_anatomy_from_csv_is_a_pack_only_change(phantom_corpus, tmp_path):
    images = phantom_corpus / "img"
    out = tmp_path / "store"
    first = run_precompute(_config(images, out), show_report=False)
    assert all("anatomy" not in r for r in _records(out).values())
    from shards.index import read_index

    assert read_index(out).anatomy is None

    truth = _probe_csv(phantom_corpus, tmp_path / "anatomy.csv")
    plan = run_precompute(_config(images, out, anatomy=f"csv:{tmp_path / 'anatomy.csv'}", dry_run=True), show_report=False).dry_run_plan
    assert plan["stages"]["mask"]["compute"] == 0 and plan["stages"]["pack (shards)"]["reuse"] == 0
    second = run_precompute(_config(images, out, anatomy=f"csv:{tmp_path / 'anatomy.csv'}"), show_report=False)
    # nothing before the pack stage ran again
    assert {s: v.computed for s, v in second.stages.items()} == {s: 0 for s in second.stages}
    assert second.shards_written >= 1 and second.index_written
    records = _records(out)
    assert {key: r["anatomy"] for key, r in records.items()} == {f"{k}_png": v for k, v in truth.items()}
    index = read_index(out)
    assert index.anatomy_categories == ["unknown", "linear", "sector"]
    decoded = [index.anatomy_categories[c] for c in index.anatomy]
    assert decoded == [records[key]["anatomy"] for key in index.keys]
    manifest = json.loads((out / "manifest.json").read_text())
    linear = sum(v == "linear" for v in truth.values())
    assert manifest["anatomy"] == {"categories": ["unknown", "linear", "sector"],
                                   "counts": {"unknown": 0, "linear": linear, "sector": len(truth) - linear}}
    # inspect-shard shows the counts
    from shards.inspect import inspect_path

    summary, _ = inspect_path(out)
    assert summary["anatomy"] == {"linear": linear, "sector": len(truth) - linear}
    # the same settings again: nothing rewritten
    third = run_precompute(_config(images, out, anatomy=f"csv:{tmp_path / 'anatomy.csv'}"), show_report=False)
    assert third.shards_written == 0 and not third.index_written
    # the CSV's bytes enter the pack fingerprint: an edited CSV re-packs
    (tmp_path / "anatomy.csv").write_text("file,category\nphantom_00000.png,liver\n")
    run_precompute(_config(images, out, anatomy=f"csv:{tmp_path / 'anatomy.csv'}"), show_report=False)
    counts = json.loads((out / "manifest.json").read_text())["anatomy"]["counts"]
    assert counts == {"unknown": len(truth) - 1, "liver": 1}
    assert first.samples == len(truth)


def test_anatomy_from_folder_and_dicom(phantom_corpus, tmp_path):
    from PIL import Image

    from tests.test_ingest import write_dicom

    corpus = tmp_path / "corpus"
    # phantom B-mode images (the precompute's scan-region stage wants an ultrasound-like image)
    phantoms = [np.asarray(Image.open(p).convert("L")) for p in sorted((phantom_corpus / "img").glob("*.png"))[:4]]
    for folder, image in zip(("liver", "thyroid"), phantoms):
        (corpus / folder).mkdir(parents=True)
        Image.fromarray(image).save(corpus / folder / "a.png")
    Image.fromarray(phantoms[2]).save(corpus / "root.png")
    write_dicom(corpus / "scan.dcm", phantoms[3], BodyPartExamined="THYROID")
    out = tmp_path / "store"
    run_precompute(PrecomputeConfig(corpus=str(corpus), out=str(out), masker="kmeans", stored_size=32,
                                    samples_per_shard=2, progress=False, anatomy="folder"), show_report=False)
    by_key = {key: record["anatomy"] for key, record in _records(out).items()}
    assert by_key == {"liver/a_png": "liver", "thyroid/a_png": "thyroid", "root_png": "unknown", "scan_dcm": "unknown"}
    run_precompute(PrecomputeConfig(corpus=str(corpus), out=str(out), masker="kmeans", stored_size=32,
                                    samples_per_shard=2, progress=False, anatomy="dicom"), show_report=False)
    by_key = {key: record["anatomy"] for key, record in _records(out).items()}
    assert by_key == {"liver/a_png": "unknown", "thyroid/a_png": "unknown", "root_png": "unknown", "scan_dcm": "thyroid"}


def test_largest_lpsam_class_and_bad_sources(tmp_path):
    from anaus_core.maskset import MaskSet
    from pipeline.stages import encode_mask_entry

    masks = np.zeros((3, 8, 8), bool)
    masks[0, :2] = True        # liver: 16 px
    masks[1, 2:7] = True       # kidney: 40 px
    masks[2, 7:] = True        # felzenszwalb residual: not a class
    mask_set = MaskSet(masks=masks, ids=np.arange(1, 4), sources=["lpsam:liver", "lpsam:kidney", "residual"],
                       scores=np.ones(3, np.float32))
    assert largest_lpsam_class(*encode_mask_entry(mask_set)) == "kidney"
    assert largest_lpsam_class(*encode_mask_entry(MaskSet.empty(8, 8))) == "unknown"
    with pytest.raises(UserInputError, match="anatomy"):
        parse_anatomy_source("bodypart")
    with pytest.raises(UserInputError, match="not found"):
        parse_anatomy_source(f"csv:{tmp_path / 'missing.csv'}")
    (tmp_path / "bad.csv").write_text("only-one-column\n")
    with pytest.raises(UserInputError, match="line 1"):
        parse_anatomy_source(str(tmp_path / "bad.csv"))
    (tmp_path / "ok.csv").write_text("sub/x.png,liver\ny.png,\n")
    resolver = AnatomyResolver(parse_anatomy_source(str(tmp_path / "ok.csv")))

    class Ref:
        def __init__(self, relpath):
            self.relpath, self.source_path, self.mask_fp = relpath, "", ""

    assert [resolver.category(Ref(p)) for p in ("sub/x.png", "other/x.png", "y.png", "z.png")] == ["liver", "liver", "unknown", "unknown"]


def test_multicrop_loader_reads_the_stored_anatomy(phantom_corpus, tmp_path):
    """The A-ViT batch transform in the real shard loader: every batch row carries its sample's category."""
    from anaus_core.avit.config import MultiCropConfig
    from anaus_core.avit.multicrop import MultiCropTransform
    from shards.anatomy_sample import decode_image_and_anatomy
    from shards.loader import PretrainLoader
    from shards.shard_stream import ShardStream
    from shards.source import resolve_shards

    images = phantom_corpus / "img"
    out = tmp_path / "store"
    truth = _probe_csv(phantom_corpus, tmp_path / "anatomy.csv")
    run_precompute(_config(images, out, anatomy=f"csv:{tmp_path / 'anatomy.csv'}"), show_report=False)
    # batch["index"] is the canonical sample number: shards in name order, members in tar order
    keys = list(_records(out))
    vocabulary = ["sector", "linear"]            # the model's order need not be the store's
    transform = MultiCropTransform(MultiCropConfig(global_size=32, local_size=16, num_local=1), categories=vocabulary,
                                   seed=3, decode=decode_image_and_anatomy)
    stream = ShardStream(resolve_shards(out), batch_size=4, seed=3, epoch=0, rank=0, world_size=1, num_workers=0,
                         start_batch=0, shuffle_buffer=0, batch_transform=transform)
    seen = 0
    for batch in PretrainLoader(stream, num_workers=0):
        assert batch["global"].shape == (4, 2, 1, 32, 32) and batch["local"].shape == (4, 1, 1, 16, 16)
        for row, code in zip(batch["index"].tolist(), batch["anatomy"].tolist()):
            key = keys[row]
            assert code == vocabulary.index(truth[key[:-len("_png")]]) + 1
            seen += 1
    assert seen == (len(truth) // 4) * 4


@pytest.mark.slow
def test_anatomy_from_lpsam_is_the_largest_class(tmp_path):
    """--masker lpsam --anatomy lpsam through the CLI: each record's category is the LP-SAM class
    whose masks (as listed in the record) cover the most pixels."""
    import sys
    from collections import Counter

    from typer.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).parent))
    from lpsam_helpers import write_phantom_dataset

    from anaus_core.lpsam.build import tiny_model_config
    from anaus_core.lpsam.train import AdaptConfig, PrompterConfig, run_adapt, run_train_prompter
    from anaus_core.sam import save_random_sam_checkpoint
    from cli import app

    sam = save_random_sam_checkpoint(tmp_path / "sam_tiny.pth", "tiny", seed=0)
    dataset = write_phantom_dataset(tmp_path / "data", count=4, size=64, multiclass=True)
    common = dict(datasets=[str(dataset)], sam_checkpoint=str(sam), model=tiny_model_config(), epochs=2, batch_size=4,
                  lr=1e-2, val_fraction=0.0, progress=False)
    stage1 = run_adapt(AdaptConfig(out_dir=str(tmp_path / "adapt"), **common))
    stage2 = run_train_prompter(PrompterConfig(out_dir=str(tmp_path / "prompter"), adapter_checkpoint=str(stage1.last_checkpoint), **common))
    out = tmp_path / "store"
    result = CliRunner().invoke(app, ["precompute-masks", str(dataset / "img"), "--out", str(out), "--masker", "lpsam",
                                      "--checkpoint", str(stage2.last_checkpoint), "--sam-checkpoint", str(sam),
                                      "--stored-size", "64", "--samples-per-shard", "2", "--masker-option", "threshold=0.3",
                                      "--masker-option", "min_area=4", "--min-area", "4", "--no-progress", "--anatomy", "lpsam"])
    assert result.exit_code == 0, result.output
    records = _records(out)
    assert len(records) == 4
    for record in records.values():
        areas = Counter()
        for mask in record["masks"]:
            if mask["source"].startswith("lpsam:"):
                areas[mask["source"][len("lpsam:"):]] += mask["area"]
        expected = min(n for n, a in areas.items() if a == max(areas.values())) if areas else "unknown"
        assert record["anatomy"] == expected
    assert any(r["anatomy"] != "unknown" for r in records.values())
