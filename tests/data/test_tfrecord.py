"""TFRecord without TensorFlow: CRC32C against published vectors, Example bytes against the protobuf runtime,
round trips, streaming, and corrupt / truncated files named by file, record and byte offset."""
from __future__ import annotations

import os
import struct
import tracemalloc

import pytest

from tagi_ds.data.tfrecord import (Feature, TFRecordWriter, crc32c, encode_example, iter_examples, iter_records,
                                   masked_crc32c, parse_example, write_examples)
from tagi_ds.errors import DataError


def _crc32c_bitwise(data: bytes) -> int:
    """The textbook bit-at-a-time CRC-32C (reflected 0x82F63B78), the reference for the vectorised one."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_crc32c_published_vectors():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC catalogue's check value
    # RFC 3720 (iSCSI) appendix B.4
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert crc32c(b"") == 0


@pytest.mark.parametrize("n", [1, 7, 4095, 4096, 4097, 8192, 3 * 4096 + 11])
def test_crc32c_matches_bitwise_reference_across_chunk_boundaries(n):
    data = os.urandom(n)
    assert crc32c(data) == _crc32c_bitwise(data)
    assert crc32c(memoryview(bytearray(data))) == _crc32c_bitwise(data)


def test_masked_crc_is_tensorflows_formula():
    crc = _crc32c_bitwise(b"abc")
    assert masked_crc32c(b"abc") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------ Example vs protobuf runtime
def _protobuf_example_class():
    """tf.train.Example built from its .proto definition at run time with the protobuf library (the reference
    decoder/encoder; protobuf is installed with tensorboard)."""
    descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")
    from google.protobuf import descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="tagi_test_example.proto", package="tagitest", syntax="proto3")

    def msg(name, *fields, map_entry=False):
        m = fd.message_type.add(name=name)
        if map_entry:
            m.options.map_entry = True
        for fname, num, typ, label, tname in fields:
            f = m.field.add(name=fname, number=num, type=typ, label=label)
            if tname:
                f.type_name = tname
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    msg("BytesList", ("value", 1, F.TYPE_BYTES, rep, None))
    msg("FloatList", ("value", 1, F.TYPE_FLOAT, rep, None))
    msg("Int64List", ("value", 1, F.TYPE_INT64, rep, None))
    feature = msg("Feature", ("bytes_list", 1, F.TYPE_MESSAGE, opt, ".tagitest.BytesList"),
                  ("float_list", 2, F.TYPE_MESSAGE, opt, ".tagitest.FloatList"),
                  ("int64_list", 3, F.TYPE_MESSAGE, opt, ".tagitest.Int64List"))
    feature.oneof_decl.add(name="kind")
    for f in feature.field:
        f.oneof_index = 0
    features = msg("Features", ("feature", 1, F.TYPE_MESSAGE, rep, ".tagitest.Features.FeatureEntry"))
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=".tagitest.Feature")
    msg("Example", ("features", 1, F.TYPE_MESSAGE, opt, ".tagitest.Features"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tagitest.Example"))


FEATURES = {"inputs_pretokenized": ["Is it — ünïcode?\n"], "answer_choices": ["yes", "no", ""],
            "inputs": [0, 1, 300, 2**40, -5], "weight": [0.5, -1.25], "empty": Feature("int64", ())}


def test_our_example_bytes_parse_with_protobuf():
    Example = _protobuf_example_class()
    ex = Example.FromString(encode_example(FEATURES))
    f = ex.features.feature
    assert [v.decode() for v in f["inputs_pretokenized"].bytes_list.value] == FEATURES["inputs_pretokenized"]
    assert [v.decode() for v in f["answer_choices"].bytes_list.value] == FEATURES["answer_choices"]
    assert list(f["inputs"].int64_list.value) == FEATURES["inputs"]
    assert list(f["weight"].float_list.value) == FEATURES["weight"]
    assert f["empty"].WhichOneof("kind") == "int64_list" and not f["empty"].int64_list.value


def test_protobuf_example_bytes_parse_with_ours():
    Example = _protobuf_example_class()
    ex = Example()
    f = ex.features.feature
    f["text"].bytes_list.value.extend([b"a", "ß".encode()])
    f["ids"].int64_list.value.extend([7, -1, 2**62])
    f["w"].float_list.value.extend([0.25, 3.0])
    f["unset"]  # noqa: B018  (a map entry whose Feature sets no list)
    got = parse_example(ex.SerializeToString())
    assert got["text"] == Feature("bytes", (b"a", "ß".encode()))
    assert got["ids"] == Feature("int64", (7, -1, 2**62))
    assert got["w"] == Feature("float", (0.25, 3.0))
    assert got["unset"] == Feature(None, ())
    assert set(parse_example(ex.SerializeToString(), only={"ids"})) == {"ids"}


def test_unpacked_repeated_values_are_read_too():
    # proto2 writers may emit one tagged value per element instead of a packed block
    ints = b"\x08\x05" + b"\x08\x7f"                      # Int64List: field 1 varint, twice
    floats = b"\x0d" + struct.pack("<f", 1.5)            # FloatList: field 1 fixed32
    feat_i, feat_f = b"\x1a" + bytes([len(ints)]) + ints, b"\x12" + bytes([len(floats)]) + floats

    def entry(key: bytes, feat: bytes) -> bytes:
        body = b"\x0a" + bytes([len(key)]) + key + b"\x12" + bytes([len(feat)]) + feat
        return b"\x0a" + bytes([len(body)]) + body

    feats = entry(b"i", feat_i) + entry(b"f", feat_f)
    got = parse_example(b"\x0a" + bytes([len(feats)]) + feats)
    assert got == {"i": Feature("int64", (5, 127)), "f": Feature("float", (1.5,))}


# -------------------------------------------------------------------------------------------------- files
def test_round_trip_and_offsets(tmp_path):
    path = tmp_path / "x.tfrecord-00000-of-00001"
    exs = [{"k": [f"row {i}"], "n": [i]} for i in range(50)]
    assert write_examples(path, exs) == 50
    got = list(iter_examples(path))
    assert [e for _, e in got] == [{"k": Feature("bytes", (f"row {i}".encode(),)), "n": Feature("int64", (i,))}
                                   for i in range(50)]
    offset = 0
    for i, (rec, _) in enumerate(got):  # offsets are the true byte positions of each header
        assert (rec.index, rec.offset) == (i, offset)
        offset += 16 + len(rec.data)
    assert offset == path.stat().st_size
    raw = path.read_bytes()
    assert struct.unpack("<Q", raw[:8])[0] == len(got[0][0].data)


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "a.tfrecord"
    with pytest.raises(RuntimeError):
        with TFRecordWriter(path) as w:
            w.write(b"one")
            raise RuntimeError("killed mid-write")
    assert not path.exists() and not list(tmp_path.iterdir())


def _three_records(tmp_path):
    path = tmp_path / "c.tfrecord"
    write_examples(path, [{"t": [b"x" * 20]}, {"t": [b"y" * 20]}, {"t": [b"z" * 20]}])
    sizes = [16 + len(encode_example({"t": [b"x" * 20]}))] * 3
    return path, bytearray(path.read_bytes()), sizes


def test_flipped_data_byte_names_file_record_and_offset(tmp_path):
    path, raw, sizes = _three_records(tmp_path)
    raw[sizes[0] + 12 + 5] ^= 0x01  # a byte inside record 1's data
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"c\.tfrecord: record 1 at byte {sizes[0]}: data fails its CRC"):
        list(iter_records(path))


def test_flipped_length_byte_is_caught_before_any_read(tmp_path):
    path, raw, sizes = _three_records(tmp_path)
    raw[sizes[0] + sizes[1] + 6] ^= 0x40  # record 2's length becomes huge
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"record 2 at byte {sizes[0] + sizes[1]}: length header fails"):
        list(iter_records(path))


@pytest.mark.parametrize("cut", [3, 12, 30])
def test_truncated_file(tmp_path, cut):
    path, raw, sizes = _three_records(tmp_path)
    path.write_bytes(bytes(raw[: sizes[0] + cut]))  # record 1 cut inside its header or its data
    with pytest.raises(DataError, match=rf"record 1 at byte {sizes[0]}: truncated"):
        list(iter_records(path))


def test_not_an_example_and_not_a_tfrecord(tmp_path):
    path = tmp_path / "bad.tfrecord"
    with TFRecordWriter(path) as w:
        w.write(encode_example({"a": [1]}))
        w.write(b"\x0a\x05\x0a\x03")  # framing fine, protobuf says 5 bytes follow and only 3 do
    with pytest.raises(DataError, match=r"bad\.tfrecord: record 1 at byte \d+: not a tf.train.Example"):
        list(iter_examples(path))
    (tmp_path / "text.tfrecord").write_text("just some text, not records\n")
    with pytest.raises(DataError, match="record 0 at byte 0: length header fails its CRC"):
        list(iter_records(tmp_path / "text.tfrecord"))
    with pytest.raises(DataError, match="not found"):
        list(iter_records(tmp_path / "missing.tfrecord"))


def test_reading_streams(tmp_path):
    """Peak memory while reading does not grow with the file: one record at a time."""
    def peak(n: int) -> int:
        path = tmp_path / f"s{n}.tfrecord"
        write_examples(path, ({"t": [os.urandom(2000)]} for _ in range(n)))
        tracemalloc.start()
        count = sum(1 for _ in iter_examples(path))
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == n
        return peak_bytes

    small, big = peak(100), peak(3000)  # files of ~0.2 MB and ~6 MB
    assert big < 2 * small + 64 * 1024, (small, big)
    assert big < (tmp_path / "s3000.tfrecord").stat().st_size / 10
