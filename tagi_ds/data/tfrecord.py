"""TFRecord files of `tf.train.Example` records, read and written without TensorFlow.

A TFRecord file is a sequence of records, each framed as
    uint64 length (little endian) | uint32 masked crc32c(length bytes) | data | uint32 masked crc32c(data)
and each P3 record's data is a serialized `tf.train.Example`: a map feature name → one of bytes_list / float_list /
int64_list.

Why this module and not a package (checked with `pip download --no-deps`, reading each package's code):
- `tfrecord` 1.14.6 reads the framing but never checks either CRC (it reads them into a buffer and drops them), raises
  bare RuntimeErrors without file or offset, and needs numpy, protobuf and `crc32c` (an LGPL C extension) for its
  writer; its example_pb2 is gencode for protobuf 5.26.
- `tfrecord-slow` 0.6.0 handles the framing only (no Example decoding); CRC checks need the same `crc32c` extension.
- `tfrecord-lite` 0.0.8 is a Cython/C++ source package (needs a compiler) that also ignores the CRCs; `tfrecords`
  0.3.1 is a prebuilt C++ blob without Example decoding.
None verifies data offline with what this project already installs, so the reader is here: framing, CRC check, and
the few protobuf wire-format rules an Example needs (about 150 lines, no new dependency). CRC32C is computed with
numpy from byte-position tables, ~8x a pure-Python byte loop (bench/tfrecord.py prints both, and the read rates).

Reading streams: one record in memory at a time. A bad CRC, a truncated file or an undecodable Example is a
DataError naming the file, the record index and its byte offset.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Collection, Iterable, Iterator, Literal, Optional, Union

import numpy as np

from ..errors import DataError
from ..io_utils import atomic_path

# ------------------------------------------------------------------------------------------------------- crc32c
_POLY = 0x82F63B78  # Castagnoli, reflected
_CHUNK = 4096       # bytes handled by one vectorised table look-up
_tables: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None


def _build_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CRC is linear over GF(2): a message's raw CRC is the XOR of each byte's contribution, which depends only on
    the byte and how many bytes follow it. by_distance[d, b]: contribution of byte b followed by d bytes;
    init_after[n]: what the initial 0xFFFFFFFF register becomes after n bytes; shift[k, b]: the register byte k
    (= b) advanced over a whole chunk, so chunks chain as state = shift(state) ^ raw(chunk)."""
    byte_table = np.zeros(256, np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        byte_table[i] = c

    def zero_byte(s: np.ndarray) -> np.ndarray:  # advance registers over one 0x00 byte
        return byte_table[s & 0xFF] ^ (s >> np.uint32(8))

    by_distance = np.empty((_CHUNK, 256), np.uint32)
    by_distance[0] = byte_table
    init_after = np.empty(_CHUNK, np.uint32)
    init = np.array([0xFFFFFFFF], np.uint32)
    shift = np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None]  # (4, 256)
    for d in range(_CHUNK):
        if d:
            by_distance[d] = zero_byte(by_distance[d - 1])
        init_after[d] = init[0]
        init = zero_byte(init)
        shift = zero_byte(shift)
    return by_distance, init_after, shift


def crc32c(data: Union[bytes, bytearray, memoryview]) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord uses it."""
    global _tables
    if _tables is None:
        _tables = _build_tables()
    by_distance, init_after, shift = _tables
    a = np.frombuffer(data, np.uint8)
    head = len(a) % _CHUNK  # the partial chunk goes first, so every later chunk is whole
    state = int(init_after[head] ^ np.bitwise_xor.reduce(by_distance[np.arange(head - 1, -1, -1), a[:head]])
                if head else 0xFFFFFFFF)
    if len(a) > head:
        chunks = a[head:].reshape(-1, _CHUNK)                                   # (n, CHUNK)
        raw = np.bitwise_xor.reduce(by_distance[np.arange(_CHUNK - 1, -1, -1), chunks], axis=1)  # (n,)
        for r in raw.tolist():
            state = int(shift[0, state & 0xFF] ^ shift[1, (state >> 8) & 0xFF] ^ shift[2, (state >> 16) & 0xFF]
                        ^ shift[3, state >> 24]) ^ r
    return state ^ 0xFFFFFFFF


def masked_crc32c(data: Union[bytes, bytearray, memoryview]) -> int:
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------------ framing
@dataclass(frozen=True)
class Record:
    index: int    # 0-based position in the file
    offset: int   # byte offset of its length header
    data: bytes


def iter_records(path: str | Path) -> Iterator[Record]:
    """Every record of a TFRecord file, CRCs checked, read one at a time."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: TFRecord file not found")
    with open(path, "rb") as fh:
        index = offset = 0
        while True:
            header = fh.read(12)
            if not header:
                return
            where = f"{path}: record {index} at byte {offset}"
            if len(header) < 12:
                raise DataError(f"{where}: truncated (the file ends inside the 12-byte record header)")
            (length,), (crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if masked_crc32c(header[:8]) != crc:
                raise DataError(f"{where}: length header fails its CRC check (corrupt file, or not a TFRecord)")
            data = fh.read(length)
            footer = fh.read(4)
            if len(data) < length or len(footer) < 4:
                raise DataError(f"{where}: truncated (record of {length} bytes, the file ends first)")
            if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise DataError(f"{where}: data fails its CRC check (corrupt file)")
            yield Record(index, offset, data)
            index += 1
            offset += 16 + length


def _frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data)))


class TFRecordWriter:
    """`with TFRecordWriter(path) as w: w.write(data)`; the file appears under `path` only when the block ends
    without an error (atomic)."""

    def __init__(self, path: str | Path) -> None:
        self._ctx = atomic_path(path)
        self._fh: Optional[IO[bytes]] = None

    def __enter__(self) -> "TFRecordWriter":
        self._fh = open(self._ctx.__enter__(), "wb")
        return self

    def write(self, data: bytes) -> None:
        assert self._fh is not None, "use TFRecordWriter as a context manager"
        self._fh.write(_frame(bytes(data)))

    def __exit__(self, *exc) -> bool:
        assert self._fh is not None
        self._fh.close()
        return bool(self._ctx.__exit__(*exc))


# -------------------------------------------------------------------------------------------- tf.train.Example
Kind = Literal["bytes", "float", "int64"]
_KIND_BY_FIELD = {1: "bytes", 2: "float", 3: "int64"}
_FIELD_BY_KIND = {v: k for k, v in _KIND_BY_FIELD.items()}


@dataclass(frozen=True)
class Feature:
    """One Example feature. `kind` is None when the record sets no list at all (TF reads it as empty)."""

    kind: Optional[Kind]
    values: tuple


class _WireError(ValueError):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _WireError("varint runs past the end of its message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _WireError("varint longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Union[int, memoryview]]]:
    """(field number, wire type, value) of one message; LEN values are memoryviews, fixed32 are raw ints."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise _WireError(f"unsupported wire type {wire} (field {field})")
        if pos > len(buf):
            raise _WireError(f"field {field} runs past the end of its message")
        yield field, wire, value


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _feature(buf: memoryview) -> Feature:
    kind: Optional[str] = None
    values: list = []
    for field, wire, value in _fields(buf):
        if field not in _KIND_BY_FIELD or wire != 2:
            continue  # unknown fields are skipped, as protobuf does
        kind, values = _KIND_BY_FIELD[field], []  # a oneof: the last list set wins
        for f, w, v in _fields(value):
            if f != 1:
                continue
            if kind == "bytes" and w == 2:
                values.append(bytes(v))
            elif kind == "float" and w == 2:  # packed (what TF writes)
                if len(v) % 4:
                    raise _WireError("packed float list length is not a multiple of 4")
                values.extend(struct.unpack(f"<{len(v) // 4}f", v))
            elif kind == "float" and w == 5:
                values.append(struct.unpack("<f", v.to_bytes(4, "little"))[0])
            elif kind == "int64" and w == 2:
                pos = 0
                while pos < len(v):
                    n, pos = _varint(v, pos)
                    values.append(_signed64(n))
            elif kind == "int64" and w == 0:
                values.append(_signed64(v))
            else:
                raise _WireError(f"{kind}_list holds a value of wire type {w}")
    return Feature(kind, tuple(values))  # type: ignore[arg-type]


def parse_example(data: bytes, only: Optional[Collection[str]] = None) -> dict[str, Feature]:
    """A serialized tf.train.Example → {name: Feature}; with `only`, other features are skipped undecoded (P3's
    token-id lists cost most of the decoding time). Raises ValueError on malformed bytes."""
    out: dict[str, Feature] = {}
    for field, wire, features in _fields(memoryview(data)):
        if field != 1 or wire != 2:
            continue
        for f, w, entry in _fields(features):
            if f != 1 or w != 2:
                continue
            key, value = "", None
            for ef, ew, ev in _fields(entry):
                if ef == 1 and ew == 2:
                    try:
                        key = bytes(ev).decode("utf-8")
                    except UnicodeDecodeError:
                        raise _WireError("a feature name is not UTF-8") from None
                elif ef == 2 and ew == 2:
                    value = ev
            if only is None or key in only:  # map semantics: a repeated key keeps its last value
                out[key] = Feature(None, ()) if value is None else _feature(value)
    return out


def iter_examples(path: str | Path, only: Optional[Collection[str]] = None
                  ) -> Iterator[tuple[Record, dict[str, Feature]]]:
    """(record, parsed Example) for every record of a TFRecord file of tf.train.Example."""
    for rec in iter_records(path):
        try:
            yield rec, parse_example(rec.data, only)
        except ValueError as e:
            raise DataError(f"{path}: record {rec.index} at byte {rec.offset}: not a tf.train.Example ({e})") from None


def _len_field(field: int, payload: bytes) -> bytes:
    return _encode_varint((field << 3) | 2) + _encode_varint(len(payload)) + payload


def _encode_varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # negative int64: two's complement, 10 bytes
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


FeatureInput = Union[Feature, Iterable[Union[bytes, str]], Iterable[float], Iterable[int]]


def encode_example(features: dict[str, FeatureInput]) -> bytes:
    """{name: Feature or a list} → serialized tf.train.Example. A plain list's kind follows its first element
    (bytes/str → bytes_list, float → float_list, int/bool → int64_list); give a Feature for an empty list."""
    entries = b""
    for name, feat in features.items():
        if not isinstance(feat, Feature):
            vals = tuple(feat)
            if not vals:
                raise ValueError(f"feature {name!r}: an empty list needs an explicit Feature(kind, ())")
            first = vals[0]
            kind = "bytes" if isinstance(first, (bytes, str)) else "float" if isinstance(first, float) else "int64"
            feat = Feature(kind, vals)  # type: ignore[arg-type]
        if feat.kind == "bytes":
            body = b"".join(_len_field(1, v.encode("utf-8") if isinstance(v, str) else bytes(v)) for v in feat.values)
        elif feat.kind == "float":
            body = _len_field(1, struct.pack(f"<{len(feat.values)}f", *feat.values)) if feat.values else b""
        elif feat.kind == "int64":
            body = _len_field(1, b"".join(_encode_varint(int(v)) for v in feat.values)) if feat.values else b""
        else:
            raise ValueError(f"feature {name!r}: kind must be bytes, float or int64, got {feat.kind!r}")
        feature = _len_field(_FIELD_BY_KIND[feat.kind], body)
        entries += _len_field(1, _len_field(1, name.encode("utf-8")) + _len_field(2, feature))
    return _len_field(1, entries)


def write_examples(path: str | Path, examples: Iterable[dict[str, FeatureInput]]) -> int:
    """Write Examples to a TFRecord file atomically; returns how many."""
    n = 0
    with TFRecordWriter(path) as w:
        for ex in examples:
            w.write(encode_example(ex))
            n += 1
    return n
