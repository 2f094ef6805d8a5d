"""Bad input: each fault gets a one-line error naming the file, validation names the culprit
(shard and key) and every other shard is still read and checked ("loses nothing else")."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from anaus_core.errors import UserInputError
from shards.index import INDEX_NAME, MANIFEST_NAME, read_index
from shards.reader import ShardReadError, ShardReader, iter_shard
from shards.synthetic import synthetic_sample
from shards.validate import validate
from shards.writer import ShardWriter, write_shard


@pytest.fixture()
def store(tmp_path):
    samples = [synthetic_sample(f"img{i:02d}", height=48, width=64, partition=4, overlapping=1, seed=i) for i in range(9)]
    out = tmp_path / "store"
    with ShardWriter(out, samples_per_shard=3, fingerprints={"mask": "f00d"}) as writer:
        for sample in samples:
            writer.write(sample)
    return out, samples


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and message
    return message


def good_shards_still_read(out, samples, bad: str) -> None:
    reader = ShardReader(out, verify_shards=True)
    index = read_index(out)
    bad_number = [s.name for s in index.shards].index(bad)
    for row, sample in enumerate(samples):
        if int(index.shard[row]) != bad_number:
            assert reader[sample.key] == sample
    problems: list[str] = []
    delivered = list(reader.iter_samples(skip_bad_shards=True, problems=problems))
    good = [s for row, s in enumerate(samples) if int(index.shard[row]) != bad_number]
    assert [s for s in delivered if s in good] == good
    assert len(problems) == 1 and bad in problems[0]


def test_valid_store_validates(store):
    out, samples = store
    report = validate(out)
    assert report.ok, [str(p) for p in report.problems]
    assert report.samples_checked == len(samples) and [s.ok for s in report.shards] == [True] * 3


def test_truncated_shard(store):
    out, samples = store
    shard = out / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])

    report = validate(out)
    assert not report.ok
    kinds = {(p.kind, p.shard) for p in report.errors}
    assert ("checksum", "shard-000001.tar") in kinds and ("structure", "shard-000001.tar") in kinds
    assert all(p.shard == "shard-000001.tar" for p in report.errors)
    assert "truncated" in " ".join(p.message for p in report.errors)
    assert [s.ok for s in report.shards] == [True, False, True]

    with pytest.raises(ShardReadError, match=r"shard-000001\.tar: .*truncated") as caught:
        list(iter_shard(shard))
    one_line(caught.value)
    with pytest.raises(ShardReadError, match="truncated") as caught:
        ShardReader(out)[samples[5].key]
    one_line(caught.value)
    with pytest.raises(ShardReadError, match=r"sha256 mismatch \(truncated") as caught:
        ShardReader(out, verify_shards=True)[samples[3].key]
    good_shards_still_read(out, samples, "shard-000001.tar")


def test_shard_truncated_between_members_is_detected(store):
    out, samples = store
    shard = out / "shard-000002.tar"
    index = read_index(out)
    row = index.position(samples[7].key)
    end_of_sample = int(index.offset[row] + index.size[row])
    shard.write_bytes(shard.read_bytes()[:end_of_sample])  # a clean cut: tar structure alone looks fine
    with pytest.raises(ShardReadError, match="no end-of-archive marker") as caught:
        list(iter_shard(shard))
    one_line(caught.value)
    report = validate(shard)  # single shard: the manifest beside it is used for the checksum
    assert {p.kind for p in report.errors} == {"checksum", "structure"}


@pytest.mark.parametrize("where", ["payload", "header", "json"])
def test_one_byte_altered_shard(store, where):
    out, samples = store
    shard = out / "shard-000002.tar"
    index = read_index(out)
    row = index.position(samples[7].key)
    offset = int(index.offset[row])
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        members = {m.name: m for m in tar}
    if where == "payload":
        position = members[f"{samples[7].key}.png"].offset_data + 100
    elif where == "header":
        position = offset + 130  # inside the first member's tar header (mode/uid fields)
    else:
        member = members[f"{samples[7].key}.json"]
        text = data[member.offset_data : member.offset_data + member.size].decode()
        position = member.offset_data + text.index('"area":') + len('"area":')  # first digit of an area
    data[position] = (data[position] + 1) % 256 if where != "json" else (ord("1") if data[position] != ord("1") else ord("2"))
    shard.write_bytes(bytes(data))

    report = validate(out)
    assert not report.ok
    assert any(p.kind == "checksum" and p.shard == "shard-000002.tar" and "altered" in p.message for p in report.errors)
    assert all(p.shard == "shard-000002.tar" for p in report.errors)
    if where == "payload":
        assert any(p.key == samples[7].key and "png: crc32 mismatch" in p.message for p in report.errors)
    elif where == "json":
        assert any(p.key == samples[7].key and "record area" in p.message for p in report.errors)
    else:
        assert any(p.kind == "structure" for p in report.errors)
    # The other samples of the altered shard and the other shards are all still checked.
    assert report.samples_checked >= 6 + (2 if where != "header" else 0)

    with pytest.raises(ShardReadError, match=r"shard-000002\.tar: sha256 mismatch \(altered") as caught:
        ShardReader(out, verify_shards=True)[samples[7].key]
    one_line(caught.value)
    if where == "payload":  # member crc32s catch it even without the shard sha256
        with pytest.raises(ShardReadError) as caught:
            ShardReader(out)[samples[7].key]
        assert samples[7].key in one_line(caught.value)
    good_shards_still_read(out, samples, "shard-000002.tar")


def test_index_names_missing_shard(store):
    out, samples = store
    (out / "shard-000000.tar").unlink()
    report = validate(out)
    assert not report.ok
    assert [(p.kind, p.shard) for p in report.errors] == [("missing", "shard-000000.tar")]
    assert report.samples_checked == 6
    with pytest.raises(ShardReadError, match=r"shard-000000\.tar: missing \(named by .*index\.zarr\)") as caught:
        ShardReader(out)[samples[0].key]
    one_line(caught.value)
    good_shards_still_read(out, samples, "shard-000000.tar")


def test_unreadable_paths(tmp_path, store):
    out, _ = store
    for bad in (tmp_path / "nope", tmp_path / "nope.tar"):
        with pytest.raises(UserInputError, match="no such file") as caught:
            validate(bad)
        one_line(caught.value)
        with pytest.raises(UserInputError) as caught:
            ShardReader(bad)
        one_line(caught.value)
    with pytest.raises(ShardReadError, match="cannot open") as caught:
        list(iter_shard(tmp_path / "nope.tar"))
    one_line(caught.value)
    with pytest.raises(ShardReadError, match="cannot open") as caught:
        list(iter_shard(out))  # a directory
    not_tar = tmp_path / "notes.tar"
    not_tar.write_text("hello, this is not a tar file\n" * 40)
    with pytest.raises(ShardReadError, match="not a tar") as caught:
        list(iter_shard(not_tar))
    one_line(caught.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError, match="no manifest") as caught:
        ShardReader(empty)
    one_line(caught.value)


def test_damaged_manifest_or_index(store):
    out, samples = store
    original = (out / MANIFEST_NAME).read_text()
    manifest = json.loads(original)
    manifest["index_id"] = "0" * 64
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(UserInputError, match="index does not match") as caught:
        ShardReader(out)
    one_line(caught.value)
    report = validate(out)
    # The manifest is still usable for checksums, so every shard is still checked.
    assert not report.ok and report.samples_checked == len(samples)
    assert [p.kind for p in report.errors] == ["index"]

    (out / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(UserInputError, match="unreadable manifest") as caught:
        ShardReader(out)
    one_line(caught.value)
    report = validate(out)
    assert not report.ok and report.samples_checked == len(samples)  # falls back to the tars on disk

    (out / MANIFEST_NAME).write_text(original)
    shutil.rmtree(out / INDEX_NAME)
    with pytest.raises(UserInputError, match="missing index"):
        ShardReader(out)


def test_index_pointing_at_wrong_bytes(store):
    out, samples = store
    # Replace a shard by one with the same keys in another order: sha256, offsets and order differ.
    index = read_index(out)
    rows = index.rows_of_shard(1)
    reordered = [samples[int(r)] for r in rows][::-1]
    write_shard(out / "shard-000001.tar", reordered)
    report = validate(out)
    assert any(p.kind == "index" and p.shard == "shard-000001.tar" for p in report.errors)
    assert any(p.kind == "checksum" for p in report.errors)
    with pytest.raises(ShardReadError, match="index says"):
        ShardReader(out)[samples[3].key]


def test_orphans_and_leftover_temp_files_are_warnings(store):
    out, samples = store
    write_shard(out / "extra.tar", [synthetic_sample("orphan", seed=99)])
    (out / ".shard-000009.tar.tmp-1-abcd").write_bytes(b"partial")
    report = validate(out)
    assert report.ok
    assert sorted((p.kind, p.severity) for p in report.problems) == [("orphan", "warning"), ("temp", "warning")]
