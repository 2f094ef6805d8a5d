"""The A-ViT arms of benchmarks/bench_evaluate.py phantoms: the probe-geometry anatomy CSV is what
precompute-masks reads, and the untrained-ViT baseline is an encoder `anaus evaluate` recognises."""

import importlib.util
import json
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_evaluate", REPO / "benchmarks" / "bench_evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_geometry_csv_is_read_by_the_anatomy_source(bench, tmp_path):
    from pipeline.anatomy import parse_anatomy_source

    (tmp_path / "label").mkdir()
    for i, geometry in enumerate(["linear", "sector", "sector"]):
        (tmp_path / "label" / f"phantom_{i:05d}.json").write_text(json.dumps({"id": f"phantom_{i:05d}", "geometry": geometry}))
    counts = bench.write_geometry_anatomy_csv(tmp_path, tmp_path / "anatomy.csv")
    assert counts == {"linear": 1, "sector": 2}
    source = parse_anatomy_source(f"csv:{tmp_path / 'anatomy.csv'}")
    assert dict(source.table) == {"phantom_00000.png": "linear", "phantom_00001.png": "sector",
                                  "phantom_00002.png": "sector"}


def test_random_vit_arm_loads_as_a_vit_encoder(bench, tmp_path):
    from anaus_core.evaluate.encoders import EncoderSpec, load_encoder

    args = types.SimpleNamespace(avit_size="micro", avit_patch=8, size=32)
    path = bench.write_random_vit(args, tmp_path / "random_vit")
    weights = load_encoder(EncoderSpec("random_vit", path))
    assert weights.kind == "vit"
    assert weights.state["patch_embed.proj.weight"].shape == (64, 3, 8, 8)
    assert weights.state["pos_embed"].shape[1] == 1 + (32 // 8) ** 2


def test_avit_arms_differ_only_in_the_conditioning(bench):
    args = types.SimpleNamespace(avit_batch_size=16, avit_steps=40, avit_size="micro", avit_patch=8, size=64,
                                 avit_local=2, avit_head_dim=4096,
                                 avit_lr=0.0005, avit_warmup_steps=None)
    acdt, none = bench.avit_pretrain_args(args, "acdt"), bench.avit_pretrain_args(args, "none")
    assert [a for a in acdt if a != "avit.acdt=acdt"] == [a for a in none if a != "avit.acdt=none"]
    assert "optim.name=adamw" in acdt and "optim.weight_decay=0.04" in acdt and acdt[acdt.index("--lr") + 1] == "0.0005"


def test_region_probe_mode_compares_encoders_with_paired_tests(bench, tmp_path):
    """`bench_evaluate.py regions`: the region probe of two encoders on held-apart phantoms, a row
    each and a paired test over images (an encoder against itself: identical predictions)."""
    import torch
    import torchvision

    from anaus_core.phantoms import make_phantom_corpus

    make_phantom_corpus(tmp_path / "heldapart", count=16, size=48, seed=5, progress=False)
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18()
    state = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "encoder.pt")
    args = types.SimpleNamespace(work=str(tmp_path), encoder=["random", f"same={tmp_path / 'encoder.pt'}",
                                                              f"again={tmp_path / 'encoder.pt'}"], size=48, folds=2)
    result = bench.regions(args)
    assert [row["encoder"] for row in result["rows"]] == ["random", "same", "again"]
    assert result["rows"][0]["regions"] > result["rows"][0]["images"] == 16     # tissue + structures per image
    assert "tissue" in result["classes"] and (tmp_path / "regions.md").exists()
    same = [t for t in result["tests"] if {t["a"], t["b"]} == {"same", "again"}]
    assert same and all(t["p_value"] == 1.0 and t["median_difference"] == 0 for t in same)
    assert result["rows"][1]["linear"] == result["rows"][2]["linear"]
    assert all(t["n"] == 16 for t in result["tests"])
