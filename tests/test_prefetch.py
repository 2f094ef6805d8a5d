"""pipeline.prefetch: the bounded ordered prefetch iterator, and precompute output unchanged by it."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from lpsam_helpers import write_phantom_dataset  # noqa: E402

from pipeline.prefetch import prefetch_map, resolve_prefetch


def test_prefetch_keeps_order_with_uneven_work():
    delays = [0.03, 0.0, 0.02, 0.0, 0.01, 0.0, 0.0, 0.025]

    def work(i):
        time.sleep(delays[i])
        return i * 10

    assert list(prefetch_map(work, range(len(delays)), workers=4, depth=4)) == [i * 10 for i in range(len(delays))]


def test_prefetch_is_bounded():
    lock = threading.Lock()
    state = {"started": 0, "consumed": 0, "max_ahead": 0}

    def work(i):
        with lock:
            state["started"] += 1
            state["max_ahead"] = max(state["max_ahead"], state["started"] - state["consumed"])
        return i

    pulled = []

    def source():
        for i in range(40):
            pulled.append(i)
            yield i

    for value in prefetch_map(work, source(), workers=3, depth=3):
        with lock:
            state["consumed"] += 1
        # never more than `depth` items taken from the source beyond those consumed
        assert len(pulled) - state["consumed"] <= 3
        time.sleep(0.001)
    assert state["max_ahead"] <= 3
    assert state["consumed"] == 40


def test_prefetch_propagates_exceptions_in_order():
    def work(i):
        if i == 3:
            raise KeyError("bad item 3")
        time.sleep(0.01 if i < 3 else 0.0)
        return i

    seen = []
    with pytest.raises(KeyError, match="bad item 3"):
        for value in prefetch_map(work, range(10), workers=2, depth=4):
            seen.append(value)
    assert seen == [0, 1, 2]


def test_prefetch_rejects_bad_sizes_and_stops_cleanly():
    with pytest.raises(ValueError):
        list(prefetch_map(lambda x: x, [1], workers=0))
    iterator = prefetch_map(lambda x: x, range(100), workers=2, depth=2)
    assert next(iterator) == 0
    iterator.close()  # cancels queued work, joins the threads


def test_resolve_prefetch():
    assert resolve_prefetch(None, "lpsam", "serial") == 2
    assert resolve_prefetch(None, "felzenszwalb", "serial") == 0
    assert resolve_prefetch(3, "kmeans", "serial") == 3
    assert resolve_prefetch(3, "lpsam", "process") == 0


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of the shards and the error list (timings in report files excluded)."""
    digests = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).parts
        stage_entry = len(relative) > 2 and relative[0] == "cache" and relative[1] in ("ingest", "mask", "pyramid", "failed")
        if path.is_file() and (path.suffix == ".tar" or path.name == "errors.jsonl" or stage_entry):
            digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def test_precompute_output_identical_with_and_without_prefetch(tmp_path, monkeypatch):
    import pipeline.prefetch as prefetch_module
    from pipeline.config import PrecomputeConfig
    from pipeline.job import run_precompute

    images = write_phantom_dataset(tmp_path / "data", count=7, size=48, multiclass=True) / "img"
    (images / "broken.png").write_bytes(b"not a png")  # an ingest error among the batches
    calls = []
    original = prefetch_module.ingest_source_batch
    monkeypatch.setattr(prefetch_module, "ingest_source_batch", lambda *a: calls.append(threading.current_thread().name) or original(*a))
    outputs = {}
    for prefetch in (0, 2):
        out = tmp_path / f"out{prefetch}"
        config = PrecomputeConfig(corpus=str(images), out=str(out), masker="kmeans", stored_size=48, samples_per_shard=2, batch_size=2, prefetch=prefetch, progress=False)
        report = run_precompute(config, show_report=False)
        assert report.errors and len(report.errors) == 1
        outputs[prefetch] = _tree_digest(out)
    assert outputs[0] and any("errors" in name for name in outputs[0])
    assert sum(1 for name in outputs[0] if "shard" in name) >= 3
    assert len(calls) == 4 and all(name.startswith("prefetch") for name in calls)  # 8 sources / batch 2, in threads
    assert sum(1 for name in outputs[0] if name.startswith("cache")) > 10
    assert outputs[0] == outputs[2]
