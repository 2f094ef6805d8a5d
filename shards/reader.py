"""Reading shards: sequential iteration of one tar, and random access by key through the index.

Random access reads exactly the sample's bytes: ``seek(offset); read(size)`` from the index,
then parses that small tar stream. No scan of the shard, no cached member list.

A bad shard (missing, truncated, altered) raises :class:`ShardReadError`, a
``UserInputError`` with a one-line message naming the file; it never affects reading other
shards (each shard is opened independently, nothing is shared between them).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from anaus_core.errors import UserInputError
from shards.sample import SampleFormatError, ShardSample, decode_sample

_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # the same split as webdataset
_END_OF_ARCHIVE = b"\0" * 1024


class ShardReadError(UserInputError):
    """A shard cannot be read (missing, not a tar, truncated, altered); one line naming it."""


@dataclass
class RawSample:
    """A sample's undecoded members as webdataset would yield them, plus where it sits in the tar."""

    key: str
    fields: dict[str, bytes]
    offset: int
    size: int

    def as_webdataset_dict(self, url: str = "") -> dict[str, Any]:
        return {"__key__": self.key, "__url__": url, **self.fields}


def _split_member(name: str) -> tuple[str, str] | None:
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2)) if match else None


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _iter_members(tar: tarfile.TarFile, label: str) -> Iterator[tuple[str, str, bytes, int, int]]:
    """(key, field, data, header offset, end offset incl. padding) of each regular member."""
    for member in tar:
        if not member.isfile():
            continue
        split = _split_member(member.name)
        if split is None:
            raise ShardReadError(f"{label}: member {member.name!r} has no key.field name")
        handle = tar.extractfile(member)
        data = handle.read() if handle is not None else b""
        if len(data) != member.size:
            raise ShardReadError(f"{label}: truncated tar (member {member.name} has {len(data)} of {member.size} bytes)")
        end = member.offset_data + ((member.size + 511) // 512) * 512
        yield split[0], split[1], data, member.offset, end


class _NeedsTarfile(Exception):
    """A header the fast parser leaves to ``tarfile`` (pax/GNU extensions, links, base-256 sizes)."""


_BLOCK = 512
_ZERO_BLOCK = b"\0" * _BLOCK
_REGULAR_TYPES = (b"0", b"\0")


def _header_checksum_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        return False
    # The checksum field counts as eight spaces; like tarfile, accept the unsigned or signed sum.
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    field = header[:148] + b"        " + header[156:]
    return stored == unsigned - 256 * sum(1 for byte in field if byte > 127)


def _parse_header(header: bytes, label: str, offset: int) -> tuple[str, int]:
    """(member name, data size) of a plain ustar regular-file header; _NeedsTarfile otherwise."""
    if header[156:157] not in _REGULAR_TYPES or header[257:262] != b"ustar":
        raise _NeedsTarfile
    size_field = header[124:136]
    if size_field[0] & 0x80:  # base-256 size (over 8 GiB)
        raise _NeedsTarfile
    if not _header_checksum_ok(header):
        raise ShardReadError(f"{label}: damaged tar header at byte {offset} (checksum mismatch)")
    try:
        size = int(size_field.replace(b"\0", b" ").strip() or b"0", 8)
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise ShardReadError(f"{label}: damaged tar header at byte {offset}") from None
    return (f"{prefix}/{name}" if prefix else name), size


def _scan_members(handle, label: str, start: int = 0) -> Iterator[tuple[str, str, bytes, int, int]]:
    """Like :func:`_iter_members`, parsing the 512-byte ustar headers directly instead of
    through ``tarfile`` (whose per-member TarInfo parsing costs more than decoding a sample's
    masks). Stops at the end-of-archive block or at the end of the data; members this parser
    does not handle (pax or GNU long names, links, huge sizes) hand the rest to ``tarfile``."""
    offset = start
    while True:
        header = handle.read(_BLOCK)
        if len(header) == 0:
            return  # no end-of-archive marker: iter_raw_samples' check_end reports it
        if len(header) < _BLOCK:
            raise ShardReadError(f"{label}: truncated tar after byte {offset} (partial header)")
        if header == _ZERO_BLOCK:
            handle.seek(offset)  # leave the marker for the end-of-archive check
            return
        try:
            name, size = _parse_header(header, label, offset)
        except _NeedsTarfile:
            handle.seek(offset)
            try:
                tar = tarfile.open(fileobj=handle, mode="r:")
            except tarfile.TarError as exc:
                raise ShardReadError(f"{label}: damaged tar header at byte {offset} ({exc})") from None
            yield from _iter_members(tar, label)
            return
        split = _split_member(name)
        if split is None:
            raise ShardReadError(f"{label}: member {name!r} has no key.field name")
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        data = handle.read(padded)
        if len(data) < size:
            raise ShardReadError(f"{label}: truncated tar (member {name} has {max(len(data), 0)} of {size} bytes)")
        end = offset + _BLOCK + padded
        yield split[0], split[1], (data[:size] if padded != size else data), offset, end
        offset = end


def iter_raw_samples(path: str | os.PathLike, *, check_end: bool = True) -> Iterator[RawSample]:
    """Undecoded samples of one tar in file order, grouping consecutive members by key.

    Raises ShardReadError (one line naming the file) for an unreadable path, a file that is not
    a tar, a truncated tar (including one cut exactly between members: the end-of-archive
    marker is checked when ``check_end``) and a key that appears in two separate runs.
    Samples before the damage are yielded first.
    """
    path = Path(path)
    label = str(path)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ShardReadError(f"{label}: cannot open ({exc.strerror or exc})") from None
    with handle:
        first = handle.read(_BLOCK)
        handle.seek(0)
        if len(first) < _BLOCK or first == _ZERO_BLOCK or not _header_checksum_ok(first):
            size = os.fstat(handle.fileno()).st_size
            reason = "empty file" if size == 0 else "not a tar or damaged header (first header unreadable)"
            raise ShardReadError(f"{label}: {reason}")
        seen: set[str] = set()
        current: RawSample | None = None
        end = 0
        try:
            for key, field_name, data, start, end in _scan_members(handle, label):
                if current is not None and key == current.key:
                    if field_name in current.fields:
                        raise ShardReadError(f"{label}: member {key}.{field_name} appears twice")
                    current.fields[field_name] = data
                    current.size = end - current.offset
                    continue
                if current is not None:
                    yield current
                if key in seen:
                    raise ShardReadError(f"{label}: key {key!r} appears in two places")
                seen.add(key)
                current = RawSample(key=key, fields={field_name: data}, offset=start, size=end - start)
        except tarfile.TarError as exc:
            raise ShardReadError(f"{label}: truncated or damaged tar after byte {end} ({exc})") from None
        except (EOFError, OSError) as exc:
            raise ShardReadError(f"{label}: truncated tar after byte {end} ({exc})") from None
        if check_end:
            handle.seek(end)
            tail = handle.read(len(_END_OF_ARCHIVE))
            if tail != _END_OF_ARCHIVE:
                # The sample in progress may be incomplete: do not hand it out as if it were whole.
                raise ShardReadError(f"{label}: truncated tar (no end-of-archive marker after byte {end})")
        if current is not None:
            yield current


def iter_shard(path: str | os.PathLike, *, verify: bool | str = True) -> Iterator[ShardSample]:
    """Decoded samples of one shard, in file order, without an index.

    A sample that cannot be decoded raises ShardReadError naming the shard and the key.
    """
    label = str(path)
    for raw in iter_raw_samples(path):
        yield _decode(raw, label, verify=verify)


def _decode(raw: RawSample, label: str, *, verify: bool | str) -> ShardSample:
    try:
        return decode_sample(raw.as_webdataset_dict(label), verify=verify)
    except SampleFormatError as exc:
        raise ShardReadError(f"{label}: {exc}") from None


def parse_sample_bytes(chunk: bytes, label: str) -> RawSample:
    """Parse the bytes of one sample (its tar members, as located by the index)."""
    try:
        members = list(_scan_members(io.BytesIO(chunk), label))
    except tarfile.TarError as exc:
        raise ShardReadError(f"{label}: damaged tar members ({exc})") from None
    if not members:
        raise ShardReadError(f"{label}: no tar member at the indexed offset")
    key = members[0][0]
    if any(m[0] != key for m in members):
        raise ShardReadError(f"{label}: the indexed byte range holds several keys")
    return RawSample(key=key, fields={m[1]: m[2] for m in members}, offset=0, size=len(chunk))


def peek_key(chunk: bytes) -> str | None:
    """The key named by the first tar header of ``chunk`` (None if it is not a plain header);
    lets a reader say "wrong sample here" before it finds the chunk's members cut short."""
    try:
        name, _ = _parse_header(chunk[:_BLOCK], "", 0) if len(chunk) >= _BLOCK else (None, 0)
    except (_NeedsTarfile, ShardReadError):
        return None
    split = _split_member(name) if name else None
    return split[0] if split else None


class ShardReader:
    """Samples of a shard directory (``*.tar`` + ``index.zarr`` + ``manifest.json``).

    ``len(reader)``, ``reader.keys()``, ``key in reader``, ``reader[key]`` (random access:
    one seek + read of exactly that sample) and ``iter(reader)`` (every shard in index order,
    sequentially). ``verify_shards=True`` checks each shard's sha256 against the manifest the
    first time it is touched (once per process). Picklable (holds no open files), so it can be
    used from DataLoader workers.
    """

    def __init__(self, out_dir: str | os.PathLike, *, verify_shards: bool = False, verify_samples: bool | str = True):
        from shards.index import read_index

        self.out_dir = Path(out_dir)
        self.index = read_index(self.out_dir)
        self.verify_shards = verify_shards
        self.verify_samples = verify_samples
        self._verified: dict[int, bool] = {}

    # -- mapping-like access --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def keys(self) -> list[str]:
        return list(self.index.keys)

    def __contains__(self, key: object) -> bool:
        return key in self.index

    @property
    def scales(self) -> tuple[int, ...]:
        return self.index.scales

    @property
    def fingerprints(self) -> dict[str, str]:
        return dict(self.index.fingerprints)

    def shard_paths(self) -> list[Path]:
        return [self.index.shard_path(i) for i in range(len(self.index.shards))]

    def _check_shard(self, shard_number: int) -> Path:
        path = self.index.shard_path(shard_number)
        if not path.is_file():
            raise ShardReadError(f"{path}: missing (named by {self.out_dir / 'index.zarr'})")
        if self.verify_shards and not self._verified.get(shard_number):
            expected = self.index.shards[shard_number].sha256
            actual = file_sha256(path)
            if actual != expected:
                size = path.stat().st_size
                what = "truncated" if size < self.index.shards[shard_number].size else "altered"
                raise ShardReadError(f"{path}: sha256 mismatch ({what}; manifest {expected[:12]}…, file {actual[:12]}…)")
            self._verified[shard_number] = True
        return path

    def raw(self, key: str | int) -> RawSample:
        """The undecoded members of one sample (random access)."""
        row = key if isinstance(key, int) else self.index.position(key)
        if not 0 <= row < len(self.index):
            raise IndexError(f"sample {row} out of range (0..{len(self.index) - 1})")
        shard_number = int(self.index.shard[row])
        path = self._check_shard(shard_number)
        offset, size = int(self.index.offset[row]), int(self.index.size[row])
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                chunk = handle.read(size)
        except OSError as exc:
            raise ShardReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
        expected_key = self.index.keys[row]
        found = peek_key(chunk)
        if found is not None and found != expected_key:
            raise ShardReadError(f"{path}: index says {expected_key!r} is at byte {offset}, found {found!r}")
        if len(chunk) != size:
            raise ShardReadError(f"{path}: truncated (sample {expected_key!r} needs bytes {offset}..{offset + size}, file ends at {offset + len(chunk)})")
        raw = parse_sample_bytes(chunk, str(path))
        if raw.key != expected_key:
            raise ShardReadError(f"{path}: index says {expected_key!r} is at byte {offset}, found {raw.key!r}")
        raw.offset = offset
        return raw

    def __getitem__(self, key: str | int) -> ShardSample:
        raw = self.raw(key)
        shard_number = int(self.index.shard[key if isinstance(key, int) else self.index.position(key)])
        return _decode(raw, str(self.index.shard_path(shard_number)), verify=self.verify_samples)

    def get(self, key: str, default=None):
        return self[key] if key in self else default

    # -- sequential access ----------------------------------------------------------------------
    def iter_shard_samples(self, shard_number: int) -> Iterator[ShardSample]:
        """Samples of one indexed shard in order; checks them against the index (keys, count)."""
        path = self._check_shard(shard_number)
        rows = self.index.rows_of_shard(shard_number)
        delivered = 0
        for raw in iter_raw_samples(path):
            if delivered >= len(rows):
                raise ShardReadError(f"{path}: holds more samples than the index lists ({len(rows)})")
            expected_key = self.index.keys[rows[delivered]]
            if raw.key != expected_key:
                raise ShardReadError(f"{path}: sample {delivered} is {raw.key!r}, index says {expected_key!r}")
            delivered += 1
            yield _decode(raw, str(path), verify=self.verify_samples)
        if delivered != len(rows):
            raise ShardReadError(f"{path}: delivered {delivered} samples, index lists {len(rows)}")

    def __iter__(self) -> Iterator[ShardSample]:
        for shard_number in range(len(self.index.shards)):
            yield from self.iter_shard_samples(shard_number)

    def iter_samples(self, *, skip_bad_shards: bool = False, problems: list[str] | None = None) -> Iterator[ShardSample]:
        """Like ``iter(reader)``; with ``skip_bad_shards`` a bad shard is reported into
        ``problems`` (one line each) and the others are still read. Samples of a bad shard that
        were decoded before the damage are yielded (their checksums passed)."""
        for shard_number in range(len(self.index.shards)):
            try:
                yield from self.iter_shard_samples(shard_number)
            except ShardReadError as exc:
                if not skip_bad_shards:
                    raise
                if problems is not None:
                    problems.append(str(exc))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_verified"] = {}
        return state


__all__ = ["RawSample", "ShardReadError", "ShardReader", "file_sha256", "iter_raw_samples", "iter_shard", "parse_sample_bytes"]
