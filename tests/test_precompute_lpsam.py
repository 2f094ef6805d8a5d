"""precompute-masks with model maskers: LP-SAM end to end (--checkpoint + --sam-checkpoint), and
fingerprints that never load a model (the driver only plans)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from lpsam_helpers import write_phantom_dataset  # noqa: E402

from anaus_core.sam import save_random_sam_checkpoint  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def lpsam_files(tmp_path_factory):
    """A random tiny base SAM saved as a file (so the LP-SAM checkpoint records its sha256), a
    stage-2 LP-SAM checkpoint trained on it for one epoch, and 4 phantoms at 64 px."""
    from anaus_core.lpsam.build import tiny_model_config
    from anaus_core.lpsam.train import AdaptConfig, PrompterConfig, run_adapt, run_train_prompter

    root = tmp_path_factory.mktemp("precompute_lpsam")
    sam = save_random_sam_checkpoint(root / "sam_tiny.pth", "tiny", seed=0)
    dataset = write_phantom_dataset(root / "data", count=4, size=64, multiclass=True)
    common = dict(datasets=[str(dataset)], sam_checkpoint=str(sam), model=tiny_model_config(), epochs=2, batch_size=4, lr=1e-2, val_fraction=0.0, progress=False)
    stage1 = run_adapt(AdaptConfig(out_dir=str(root / "adapt"), **common))
    stage2 = run_train_prompter(PrompterConfig(out_dir=str(root / "prompter"), adapter_checkpoint=str(stage1.last_checkpoint), **common))
    return {"sam": Path(sam), "lpsam": Path(stage2.last_checkpoint), "images": dataset / "img", "root": root}


def _precompute_args(images: Path, out: Path) -> list[str]:
    # A threshold low enough that this briefly trained tiny model yields class components.
    return ["precompute-masks", str(images), "--out", str(out), "--masker", "lpsam", "--stored-size", "64", "--samples-per-shard", "2",
            "--masker-option", "threshold=0.3", "--masker-option", "min_area=4", "--min-area", "4", "--no-progress"]


@pytest.mark.slow
def test_lpsam_precompute_end_to_end_through_the_cli(lpsam_files, tmp_path):
    from anaus_core.sam import file_sha256
    from shards.reader import ShardReader
    from shards.validate import validate

    out = tmp_path / "out"
    args = _precompute_args(lpsam_files["images"], out)
    result = runner.invoke(app(), args + ["--checkpoint", str(lpsam_files["lpsam"]), "--sam-checkpoint", str(lpsam_files["sam"])])
    assert result.exit_code == 0, result.output
    assert "no input skipped" in result.output
    assert validate(out).ok
    reader = ShardReader(out)
    assert len(reader) == 4
    sources = []
    for key in reader.keys():
        sample = reader[key]
        mask_set = sample.mask_set
        assert mask_set.shape == sample.image.shape == (64, 64)
        assert len(mask_set) >= 1 and (mask_set.ids >= 1).all() and len(set(mask_set.ids.tolist())) == len(mask_set)
        assert (mask_set.areas >= 4).all()
        assert all(s == "residual" or s.startswith("lpsam:") for s in mask_set.sources), mask_set.sources
        sources += mask_set.sources
    assert any(s.startswith("lpsam:") for s in sources)

    # The mask fingerprint holds both checkpoints' sha256 (recorded in report/manifest digests
    # via the masker fingerprint); a re-run is a no-op.
    from pipeline.config import PrecomputeConfig
    from pipeline.job import masker_fingerprint_of

    fp = masker_fingerprint_of(PrecomputeConfig(corpus="x", out="y", masker="lpsam", checkpoint=str(lpsam_files["lpsam"]), sam_checkpoint=str(lpsam_files["sam"])))
    assert fp["checkpoint_sha256"] == file_sha256(lpsam_files["lpsam"])
    assert fp["sam_checkpoint_sha256"] == file_sha256(lpsam_files["sam"])
    again = runner.invoke(app(), args + ["--checkpoint", str(lpsam_files["lpsam"]), "--sam-checkpoint", str(lpsam_files["sam"])])
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output

    # Without --sam-checkpoint: one line naming the option, exit 2, nothing run.
    missing = runner.invoke(app(), _precompute_args(lpsam_files["images"], tmp_path / "out2") + ["--checkpoint", str(lpsam_files["lpsam"])])
    assert missing.exit_code == 2, missing.output
    message = missing.output.strip()
    assert "--sam-checkpoint" in message and len(message.splitlines()) == 1, message
    assert not (tmp_path / "out2" / "manifest.json").exists()
    # A different SAM file is refused the same way (the checkpoint records the base SAM's sha256).
    other = save_random_sam_checkpoint(tmp_path / "other_sam.pth", "tiny", seed=1)
    wrong = runner.invoke(app(), _precompute_args(lpsam_files["images"], tmp_path / "out3") + ["--checkpoint", str(lpsam_files["lpsam"]), "--sam-checkpoint", str(other)])
    assert wrong.exit_code == 2 and "was trained on base SAM" in wrong.output, wrong.output


def app():
    from cli import app as typer_app

    return typer_app


def _count_calls(monkeypatch, module, name: str, calls: dict) -> None:
    original = getattr(module, name)

    def counting(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)


def test_sam_and_lpsam_fingerprints_do_not_load_the_model(lpsam_files, monkeypatch):
    import anaus_core.lpsam.checkpoint as lpsam_checkpoint
    import anaus_core.sam as sam_package
    from anaus_core.maskers import build_masker
    from anaus_core.maskers.base import ImageMeta
    from anaus_core.sam import file_sha256

    calls: dict[str, int] = {}
    _count_calls(monkeypatch, sam_package, "build_sam", calls)
    _count_calls(monkeypatch, sam_package, "read_sam_state_dict", calls)
    _count_calls(monkeypatch, lpsam_checkpoint, "load_lpsam", calls)
    image = np.full((64, 64), 90, np.uint8)
    image[16:40, 20:44] = 200
    meta = ImageMeta(key="a", relpath="a.png", frame=None, extra={})

    sam = build_masker("sam", checkpoint=str(lpsam_files["sam"]), image_size=64, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    fp = sam.fingerprint()
    assert fp["checkpoint_sha256"] == file_sha256(lpsam_files["sam"]) and fp["options"]["model_type"] == "tiny"
    assert calls == {} and not sam.model_loaded
    assert len(sam([image], [meta])) == 1
    assert calls == {"build_sam": 1, "read_sam_state_dict": 1} and sam.model_loaded
    sam([image], [meta])
    assert calls["build_sam"] == 1  # loaded once

    calls.clear()
    lpsam = build_masker("lpsam", checkpoint=str(lpsam_files["lpsam"]), sam_checkpoint=str(lpsam_files["sam"]))
    fp = lpsam.fingerprint()
    assert fp["checkpoint_sha256"] == file_sha256(lpsam_files["lpsam"]) and fp["sam_checkpoint_sha256"] == file_sha256(lpsam_files["sam"])
    assert calls == {} and not lpsam.model_loaded
    assert len(lpsam([image], [meta])) == 1
    assert calls == {"load_lpsam": 1}


def test_planning_driver_never_loads_the_sam(lpsam_files, tmp_path, monkeypatch):
    """A no-op run and a dry run with --masker sam plan everything without building SAM."""
    import anaus_core.sam as sam_package
    from pipeline.config import PrecomputeConfig
    from pipeline.job import run_precompute

    options = {"image_size": 64, "points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    images = tmp_path / "img"
    images.mkdir()
    for path in sorted(lpsam_files["images"].glob("*.png"))[:2]:
        (images / path.name).write_bytes(path.read_bytes())

    def config(**extra):
        return PrecomputeConfig(corpus=str(images), out=str(tmp_path / "out"), masker="sam", sam_checkpoint=str(lpsam_files["sam"]), stored_size=64, masker_options=options, progress=False, **extra)

    calls: dict[str, int] = {}
    _count_calls(monkeypatch, sam_package, "build_sam", calls)
    first = run_precompute(config(), show_report=False)
    assert first.exit_code == 0 and first.samples == 2 and calls == {"build_sam": 1}
    calls.clear()
    assert run_precompute(config(), show_report=False).did_no_work
    assert run_precompute(config(min_area=8, dry_run=True), show_report=False).dry_run_plan["stages"]["mask"]["compute"] == 2
    assert calls == {}
