"""cdb reader and writer: the format by hand, round trips, and damaged files."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail.cdb import CDB, CDBError, cdb_hash, make


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"", 5381),
        (b"a", (5381 * 33) ^ ord("a")),
        (b"ab", ((((5381 * 33) ^ ord("a")) * 33) ^ ord("b")) & 0xFFFFFFFF),
        (b"127.", 0x7C5406DF),  # worked by hand: 5381*33^49, *33^50, *33^55, *33^46
    ],
)
def test_hash(key: bytes, expected: int) -> None:
    assert cdb_hash(key) == expected


def test_hash_wraps_at_32_bits() -> None:
    h = 5381
    key = bytes(range(256)) * 4
    for c in key:
        h = ((h * 33) ^ c) % 2**32
    assert cdb_hash(key) == h


def test_empty_database_layout() -> None:
    data = make([])
    assert len(data) == 2048
    assert data == struct.pack("<II", 2048, 0) * 256
    assert len(CDB.from_bytes(data)) == 0
    assert CDB.from_bytes(data).get(b"") is None


def test_one_record_layout_by_hand() -> None:
    key, value = b"127.", b"+RELAYCLIENT=\0"
    h = cdb_hash(key)
    data = make([(key, value)])
    record = struct.pack("<II", len(key), len(value)) + key + value
    tables_at = 2048 + len(record)
    header = b"".join(
        struct.pack("<II", tables_at, 2 if i == h & 255 else 0)
        if i <= h & 255
        else struct.pack("<II", tables_at + 16, 0)
        for i in range(256)
    )
    slots = [(0, 0), (0, 0)]
    slots[(h >> 8) % 2] = (h, 2048)
    table = b"".join(struct.pack("<II", *s) for s in slots)
    assert data == header + record + table


def test_get_getall_duplicates_and_misses() -> None:
    pairs = [(b"a", b"1"), (b"b", b""), (b"a", b"2"), (b"", b"empty key"), (b"a", b"3")]
    db = CDB.from_bytes(make(pairs))
    assert db.get(b"a") == b"1"
    assert db.getall(b"a") == [b"1", b"2", b"3"]
    assert db.get(b"b") == b""
    assert db.get(b"") == b"empty key"
    assert db.get(b"c") is None
    assert db.getall(b"c") == []
    assert b"b" in db
    assert b"c" not in db
    assert list(db.items()) == pairs
    assert len(db) == 5


def test_many_keys_share_tables() -> None:
    pairs = [(f"10.{i}.".encode(), str(i).encode()) for i in range(3000)]
    db = CDB.from_bytes(make(pairs))
    for key, value in pairs:
        assert db.get(key) == value
    assert db.get(b"10.3000.") is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=12)), max_size=60))
def test_round_trip_matches_a_dict(pairs: list[tuple[bytes, bytes]]) -> None:
    db = CDB.from_bytes(make(pairs))
    expected: dict[bytes, list[bytes]] = {}
    for key, value in pairs:
        expected.setdefault(key, []).append(value)
    for key, values in expected.items():
        assert db.getall(key) == values
        assert db.get(key) == values[0]
    assert db.get(b"\xff" * 13) is None
    assert list(db.items()) == pairs


def test_open_reads_a_file(tmp_path) -> None:
    path = tmp_path / "x.cdb"
    path.write_bytes(make([(b"k", b"v")]))
    assert CDB.open(path).get(b"k") == b"v"
    assert CDB.open(str(path)).name == str(path)


def test_open_missing_file_is_oserror(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        CDB.open(tmp_path / "missing.cdb")


def test_every_truncation_is_detected() -> None:
    data = make([(b"1.2.3.4", b"D\0"), (b"127.", b"+RELAYCLIENT=\0"), (b"", b"")])
    for cut in range(len(data)):
        with pytest.raises(CDBError, match="not a valid cdb"):
            CDB.from_bytes(data[:cut], "t.cdb")


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, 9999, "outside the file"),  # table 0 points past the end
        (0, 10, "outside the file"),  # ... or into the header
        (4, 100, "outside the file"),  # table 0 claims too many slots
        (2048, 4000, "runs past the hash tables"),  # first record's key length
        (2052, 4000, "runs past the hash tables"),  # first record's data length
    ],
)
def test_corrupt_offsets_are_detected(offset: int, value: int, message: str) -> None:
    data = bytearray(make([(b"k", b"v"), (b"kk", b"vv")]))
    struct.pack_into("<I", data, offset, value)
    with pytest.raises(CDBError, match=message):
        CDB.from_bytes(bytes(data), "bad.cdb")


def test_slot_count_must_match_records() -> None:
    data = bytearray(make([(b"k", b"v")]))
    tables_at = struct.unpack_from("<I", data, 0)[0]
    data += b"\0" * 16  # two extra empty slots claimed by table 255
    struct.pack_into("<II", data, 8 * 255, tables_at + 16, 2)
    with pytest.raises(CDBError, match="1 records but 4 hash slots"):
        CDB.from_bytes(bytes(data))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("end", "outside the records"),  # no room for a record header
        ("header", "outside the records"),
        ("own slot", "runs past the end"),  # reads the slot's hash as a huge key length
    ],
)
def test_slot_pointing_outside_records_is_detected(target: str, message: str) -> None:
    data = bytearray(make([(b"k", b"v")]))
    h = cdb_hash(b"k")
    tpos, tlen = struct.unpack_from("<II", data, 8 * (h & 255))
    slot = tpos + 8 * ((h >> 8) % tlen)
    pointer = {"end": len(data) - 4, "header": 100, "own slot": slot}[target]
    struct.pack_into("<I", data, slot + 4, pointer)
    with pytest.raises(CDBError, match=message):
        CDB.from_bytes(bytes(data)).get(b"k")


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_flipped_bytes_never_raise_anything_but_cdberror(where: int, byte: int) -> None:
    data = bytearray(make([(b"1.2.3.4", b"D\0"), (b"127.", b"+X=1\0"), (b"=h", b"")]))
    data[where % len(data)] = byte
    try:
        db = CDB.from_bytes(bytes(data))
        for key in (b"1.2.3.4", b"127.", b"=h", b"", b"nothing"):
            db.getall(key)
    except CDBError:
        pass


def test_make_refuses_text() -> None:
    with pytest.raises(TypeError):
        make([("k", b"v")])  # type: ignore[list-item]
