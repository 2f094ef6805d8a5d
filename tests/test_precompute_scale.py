"""precompute-masks scale-out (issue point 6): local worker processes and a real
dask.distributed LocalCluster give exactly the single-process output."""

from __future__ import annotations

import hashlib

import pytest

from test_precompute import assert_consistent, computed, copy_corpus, make_config, phantom_keys, run


def shard_digests(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def index_rows(out):
    from shards.index import read_index

    index = read_index(out)
    return list(zip(index.keys, index.shard.tolist(), index.offset.tolist(), index.size.tolist()))


@pytest.fixture(scope="module")
def reference(phantom_corpus, tmp_path_factory):
    """The single-process output for the felzenszwalb masker."""
    tmp = tmp_path_factory.mktemp("reference")
    images, _ = copy_corpus(phantom_corpus, tmp)
    out = tmp / "out"
    report = run(make_config(images, out, masker="felzenszwalb", labels=None, batch_size=2))
    assert report.exit_code == 0
    return images, out


def test_dask_local_cluster_output_equals_single_process(reference, tmp_path):
    from distributed import Client, LocalCluster

    images, reference_out = reference
    out = tmp_path / "out"
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        # Through the scheduler address, exactly as `--scheduler ADDRESS` does.
        report = run(make_config(images, out, masker="felzenszwalb", labels=None, batch_size=2, scheduler=cluster.scheduler_address))
        assert report.executor == "dask" and report.workers == 2
        assert computed(report) == {"ingest": 12, "region": 12, "mask": 12, "pyramid": 12}
        # Both worker processes ran stage tasks (6 batches of 2 over 2 workers).
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
        assert report.task_processes == 2
    assert shard_digests(out) == shard_digests(reference_out)
    assert index_rows(out) == index_rows(reference_out)
    assert report.shards_written == len(shard_digests(out))
    assert_consistent(out, phantom_keys(images))


def test_local_worker_processes_output_equals_single_process(reference, tmp_path):
    images, reference_out = reference
    out = tmp_path / "out"
    report = run(make_config(images, out, masker="felzenszwalb", labels=None, batch_size=2, workers=2))
    assert report.executor == "process" and report.workers == 2
    assert shard_digests(out) == shard_digests(reference_out)
    assert index_rows(out) == index_rows(reference_out)
    # And a no-op re-run through the pool does nothing.
    again = run(make_config(images, out, masker="felzenszwalb", labels=None, batch_size=2, workers=2))
    assert again.did_no_work
