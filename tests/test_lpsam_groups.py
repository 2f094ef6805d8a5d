"""LP-SAM's validation split keeps every group (patient, clip) on one side and never validates
on the training set; dataset.yaml names the group source; --preset paper."""

from __future__ import annotations

import warnings

import pytest
import yaml
from typer.testing import CliRunner

from anaus_core.lpsam.data import read_description, split_indices
from anaus_core.lpsam.presets import preset_overrides
from tests.lpsam_helpers import write_phantom_dataset


def test_grouped_split_keeps_each_group_on_one_side():
    groups = [f"patient{i // 5}" for i in range(40)]  # 8 patients, 5 frames each
    train, val = split_indices(40, val_fraction=0.25, seed=3, groups=groups)
    assert sorted(train + val) == list(range(40)) and val
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in val})
    assert len({groups[i] for i in val}) == 2  # a quarter of the 8 groups
    assert (train, val) == split_indices(40, val_fraction=0.25, seed=3, groups=groups)
    assert split_indices(40, val_fraction=0.25, seed=4, groups=groups) != (train, val)


def test_no_validation_is_explicit_never_the_training_set():
    assert split_indices(6, val_fraction=0.0, seed=0) == (list(range(6)), [])
    with pytest.warns(UserWarning, match="one group"):
        assert split_indices(4, val_fraction=0.5, seed=0, groups=["p"] * 4) == (list(range(4)), [])
    with pytest.warns(UserWarning, match="one group"):
        assert split_indices(1, val_fraction=0.5, seed=0) == ([0], [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, val = split_indices(2, val_fraction=0.1, seed=0)  # two images: one each side
        assert len(train) == len(val) == 1


def test_dataset_yaml_names_the_group_source(tmp_path):
    root = write_phantom_dataset(tmp_path / "d", count=4, size=32)
    description = yaml.safe_load((root / "dataset.yaml").read_text())
    assert read_description(root).groups == tuple(f"d/case{i:02d}" for i in range(4))  # default: each image
    (root / "dataset.yaml").write_text(yaml.safe_dump({**description, "group_pattern": r"^case0([0-3])"}))
    assert read_description(root).group_source == "group_pattern"
    (root / "groups.csv").write_text("path,group\ncase00.png,A\ncase01.png,A\ncase02.png,B\ncase03.png,B\n")
    (root / "dataset.yaml").write_text(yaml.safe_dump({**description, "groups": "groups.csv"}))
    loaded = read_description(root)
    assert loaded.groups == ("d/A", "d/A", "d/B", "d/B") and loaded.group_source == "groups"
    train, val = split_indices(4, val_fraction=0.5, seed=0, groups=loaded.groups)
    assert {loaded.groups[i] for i in val} in ({"d/A"}, {"d/B"}) and len(val) == 2


def test_preset_paper_sets_the_papers_schedules(monkeypatch, tmp_path):
    import anaus_core.lpsam.train as train_module
    from cli import app

    assert preset_overrides("paper", "adapt") == {"epochs": 200, "batch_size": 16, "lr": 5e-4, "weight_decay": 0.0}
    assert preset_overrides("paper", "train-prompter")["epochs"] == 100
    seen = {}

    def fake_adapt(config):
        seen["adapt"] = config
        raise SystemExit(0)

    monkeypatch.setattr(train_module, "run_adapt", fake_adapt)
    runner = CliRunner()
    result = runner.invoke(app, ["lpsam", "adapt", "--data", str(tmp_path), "--preset", "paper", "--batch-size", "8",
                                 "--random-sam", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    config = seen["adapt"]
    assert (config.epochs, config.batch_size, config.lr, config.weight_decay) == (200, 8, 5e-4, 0.0)  # --batch-size wins
    result = runner.invoke(app, ["lpsam", "adapt", "--data", str(tmp_path), "--preset", "fast", "--random-sam", "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "unknown preset" in result.output
