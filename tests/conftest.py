"""Shared fixtures: a small phantom corpus, the real DDTI image, and test-wide determinism."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run on a 2-core machine next to other work: keep torch to one thread per process so
# timings are stable and DataLoader workers do not oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared sits beside the checkout (CI, developers); ANAUS_SHARED_DIR points elsewhere (GPU box).
SHARED_DIR = Path(os.environ.get("ANAUS_SHARED_DIR", REPO_ROOT.parent / "shared"))
DDTI_DIR = SHARED_DIR / "fixtures" / "ddti"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if not has_cuda:
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def ddti_dir() -> Path:
    """The real DDTI image/label pair shipped in ../shared/fixtures/ddti (label values {0, 1})."""
    if not (DDTI_DIR / "20436_img.png").exists():
        pytest.fail(f"missing fixture {DDTI_DIR}/20436_img.png (shared/ must sit beside the repo)")
    return DDTI_DIR


@pytest.fixture(scope="session")
def phantom_corpus(tmp_path_factory) -> Path:
    """12 phantoms at 128 px (linear and sector), written by the project's own generator."""
    from anaus_core.phantoms import make_phantom_corpus

    out = tmp_path_factory.mktemp("phantoms")
    make_phantom_corpus(out, count=12, size=128, seed=0)
    return out
