"""``anaus inspect-shard``: text, JSON and contact sheet; exit codes 0 / 1 (invalid) / 2 (unreadable)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from shards.synthetic import synthetic_sample
from shards.writer import ShardWriter


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "store"
    with ShardWriter(out, samples_per_shard=2, fingerprints={"ingest": "aa11", "mask": "bb22"}) as writer:
        for i in range(5):
            writer.write(synthetic_sample(f"scan{i}", height=40, width=56, partition=3 + i % 3, overlapping=1, seed=i))
    return out


def run(*args):
    return CliRunner().invoke(app, ["inspect-shard", *map(str, args)])


def test_text_summary(store):
    result = run(store)
    assert result.exit_code == 0, result.output
    for expected in ("samples", "5", "masks per sample", "mask area histogram", "7, 14, 28, 56", "mask=bb22", "OK", "shard-000002.tar"):
        assert expected in result.output


def test_json_summary_and_single_shard(store):
    result = run(store, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["samples"] == 5 and summary["shards"] == 3
    assert summary["masks_per_sample"]["min"] == 4 and summary["masks_per_sample"]["max"] == 6
    assert sum(summary["mask_area_histogram"]["counts"]) == summary["masks_per_sample"]["total"]
    assert summary["scales"] == [7, 14, 28, 56]
    assert summary["fingerprints"] == {"ingest": "aa11", "mask": "bb22"}
    assert summary["validation"]["ok"] is True
    single = json.loads(run(store / "shard-000001.tar", "--json").output)
    assert single["kind"] == "shard" and single["samples"] == 2 and single["validation"]["ok"]


def test_contact_sheet(store, tmp_path):
    sheet = tmp_path / "sheet.png"
    result = run(store, "--png", sheet, "--samples", 3)
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(sheet).convert("RGB"))
    # Three rows of (overlay + four pyramid levels), in colour.
    assert image.shape[0] > image.shape[1] * 0.35 and image.shape[1] > 600
    assert np.ptp(image[..., 0].astype(int) - image[..., 1].astype(int)) > 50


def test_invalid_store_exits_1_and_names_the_shard(store, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(store, broken)
    data = (broken / "shard-000001.tar").read_bytes()
    (broken / "shard-000001.tar").write_bytes(data[: len(data) - 3000])
    result = run(broken, "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert not summary["validation"]["ok"]
    assert {p["shard"] for p in summary["validation"]["problems"]} == {"shard-000001.tar"}
    assert summary["samples"] >= 3  # the other shards are still summarised
    text = run(broken)
    assert text.exit_code == 1 and "shard-000001.tar" in text.output and "FAILED" in text.output
    assert "validation failed" in text.stderr


def test_unreadable_input_exits_2_with_one_line(tmp_path):
    for path in (tmp_path / "missing", tmp_path / "missing.tar"):
        result = run(path)
        assert result.exit_code == 2
        assert result.stderr.strip().startswith("error: ") and result.stderr.strip().count("\n") == 0
        assert "no such file" in result.stderr
    not_tar = tmp_path / "x.tar"
    not_tar.write_bytes(b"\x89PNG not a tar" * 100)
    result = run(not_tar)
    assert result.exit_code == 2 and "not a tar" in result.stderr
    assert "Traceback" not in result.output
