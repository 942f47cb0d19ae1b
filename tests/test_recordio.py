"""RecordIO: exact bytes of MXNet's format, multi-part records, index files, headers, corruption."""
import multiprocessing
import os
import pickle
import struct

import numpy as np
import pytest

from utils.errors import UserError
from utils.recordio import (IRHeader, MAGIC, MXIndexedRecordIO, MXRecordIO, decode_image, encode_image, pack,
                            relabel, unpack)

M = bytes.fromhex("0a23d7ce")  # 0xced7230a little-endian


def lrec(cflag, length):
    return struct.pack("<I", cflag << 29 | length)


def write_rec(path, payloads):
    with MXRecordIO(str(path), "w") as writer:
        for payload in payloads:
            writer.write(payload)
    return path.read_bytes()


def read_all(path):
    reader = MXRecordIO(str(path), "r")
    out = []
    while (record := reader.read()) is not None:
        out.append(record)
    return out


@pytest.mark.parametrize("payload, expected", [
    (b"abc", M + bytes.fromhex("03000000") + b"abc\0"),
    (b"abcd", M + bytes.fromhex("04000000") + b"abcd"),
    (b"", M + bytes.fromhex("00000000")),
    # magic at aligned offset 4: parts 'AAAA' (cflag 1) and 'BBBBBB' (cflag 3), magic dropped
    (b"AAAA" + M + b"BBBBBB", M + bytes.fromhex("04000020") + b"AAAA" + M + bytes.fromhex("06000060") + b"BBBBBB\0\0"),
    # magic at offsets 0 and 4: empty first (cflag 1) and middle (cflag 2) parts
    (M + M + b"xy", M + bytes.fromhex("00000020") + M + bytes.fromhex("00000040") + M + bytes.fromhex("02000060")
     + b"xy\0\0"),
    # magic as the last aligned word: empty last part
    (b"abcd" + M, M + lrec(1, 4) + b"abcd" + M + lrec(3, 0)),
    # magic at an unaligned offset, or cut by the end: no split
    (b"ab" + M + b"cd", M + lrec(0, 8) + b"ab" + M + b"cd"),
    (b"abcd" + M[:3], M + lrec(0, 7) + b"abcd" + M[:3] + b"\0"),
])
def test_record_bytes_match_mxnet_writer(tmp_path, payload, expected):
    path = tmp_path / "x.rec"
    assert write_rec(path, [payload]) == expected
    assert read_all(path) == [payload]


def test_sequential_round_trip_tell_and_reset(tmp_path):
    payloads = [b"", b"a", b"ab" + M, M * 3, os.urandom(1001), b"q" * 4 + M + b"z"]
    path = tmp_path / "seq.rec"
    with MXRecordIO(str(path), "w") as writer:
        positions = []
        for payload in payloads:
            positions.append(writer.tell())
            writer.write(payload)
    assert positions[:3] == [0, 8, 20]
    reader = MXRecordIO(str(path), "r")
    assert [reader.read() for _ in payloads] == payloads
    assert reader.read() is None and reader.tell() == path.stat().st_size
    reader.reset()
    assert reader.read() == payloads[0]


def test_indexed_files_exact_and_random_access(tmp_path):
    idx, rec = tmp_path / "t.idx", tmp_path / "t.rec"
    with MXIndexedRecordIO(str(idx), str(rec), "w") as writer:
        writer.write_idx(0, b"abc")
        writer.write_idx(7, b"abcd" + M)
        writer.write_idx(3, b"")
        assert writer.keys == [0, 7, 3]
    assert idx.read_text() == "0\t0\n7\t12\n3\t32\n"
    assert rec.read_bytes() == (M + lrec(0, 3) + b"abc\0" + M + lrec(1, 4) + b"abcd" + M + lrec(3, 0)
                                + M + lrec(0, 0))
    reader = MXIndexedRecordIO(str(idx), str(rec), "r")
    assert reader.keys == [0, 7, 3]
    assert [reader.read_idx(k) for k in (3, 7, 0)] == [b"", b"abcd" + M, b"abc"]
    assert reader.offsets_of([7, 3]).tolist() == [12, 32]
    with pytest.raises(UserError, match="key 5 is not in the index"):
        reader.read_idx(5)


def test_header_pack_bytes_and_unpack():
    record = pack(IRHeader(0, 3.0, 7, 9), b"IMG")
    assert record == bytes.fromhex("00000000" "00004040" "0700000000000000" "0900000000000000") + b"IMG"
    assert record == struct.pack("IfQQ", 0, 3.0, 7, 9) + b"IMG"  # MXNet packs native 'IfQQ'
    header, image = unpack(record)
    assert header == IRHeader(0, 3.0, 7, 9) and image == b"IMG"

    record = pack(IRHeader(0, [1.0, 2.0], 5, 0), b"X")
    assert record == bytes.fromhex("02000000" "00000000" "0500000000000000" "0000000000000000"
                                   "0000803f" "00000040") + b"X"
    header, image = unpack(record)
    assert header.flag == 2 and header.label.dtype == np.float32 and header.label.tolist() == [1.0, 2.0]
    assert image == b"X"
    assert unpack(pack(IRHeader(2, 4.0, 1, 1), b""))[0].flag == 0  # numeric label → flag 0, as MXNet
    with pytest.raises(UserError, match="announces 3 labels"):
        unpack(bytes.fromhex("03000000") + bytes(20) + bytes(4))
    with pytest.raises(UserError, match="shorter than the 24-byte"):
        unpack(b"short")


def test_relabel_rewrites_only_the_class_label():
    assert relabel(pack(IRHeader(0, 3.0, 7, 9), b"IMG"), 5) == pack(IRHeader(0, 5.0, 7, 9), b"IMG")
    assert relabel(pack(IRHeader(0, [1.0, 2.0], 5, 0), b"X"), 4) == pack(IRHeader(0, [4.0, 2.0], 5, 0), b"X")
    with pytest.raises(UserError, match="src: the header announces a label array"):
        relabel(bytes.fromhex("02000000") + bytes(20), 1, "src")


def test_read_headers_matches_unpack(tmp_path):
    idx, rec = str(tmp_path / "h.idx"), str(tmp_path / "h.rec")
    headers = [IRHeader(0, 4.0, 1, 2), IRHeader(0, [7.0, 1.0], 3, 4), IRHeader(0, 9.0, 5, 6),
               IRHeader(0, [2.0], 7, 8), IRHeader(0, 11.0, 0, 0)]
    images = [b"a" * 5, b"", M, b"bb", b""]
    with MXIndexedRecordIO(idx, rec, "w") as writer:
        for key, (header, image) in enumerate(zip(headers, images)):
            payload = pack(header, image)
            if key == 2:  # id field holding the magic value → a multi-part record
                payload = pack(header._replace(id=MAGIC), image)
            writer.write_idx(key, payload)
    reader = MXIndexedRecordIO(idx, rec, "r")
    got = reader.read_headers(reader.offsets_of(reader.keys), chunk=2)
    assert got.flag.tolist() == [0, 2, 0, 1, 0]
    assert got.label.tolist() == [4.0, 7.0, 9.0, 2.0, 11.0]
    assert got.id.tolist() == [1, 3, MAGIC, 7, 0] and got.id2.tolist() == [2, 4, 6, 8, 0]


def test_writer_is_atomic(tmp_path):
    idx, rec = tmp_path / "a.idx", tmp_path / "a.rec"
    with pytest.raises(RuntimeError):
        with MXIndexedRecordIO(str(idx), str(rec), "w") as writer:
            writer.write_idx(0, b"data")
            assert not rec.exists()
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []


def _child_read(reader, key, queue):
    queue.put(reader.read_idx(key))


def test_reader_reopens_after_fork_and_pickles(tmp_path):
    idx, rec = str(tmp_path / "p.idx"), str(tmp_path / "p.rec")
    with MXIndexedRecordIO(idx, rec, "w") as writer:
        for key in range(4):
            writer.write_idx(key, bytes([key]) * 10)
    reader = MXIndexedRecordIO(idx, rec, "r")
    assert reader.read_idx(1) == b"\1" * 10  # opened in this process
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_read, args=(reader, 2, queue))
    child.start()
    assert queue.get(timeout=30) == b"\2" * 10
    child.join(30)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read_idx(3) == b"\3" * 10 and clone.keys == [0, 1, 2, 3]
    with pytest.raises(TypeError):
        with MXRecordIO(str(tmp_path / "w.rec"), "w") as writer:
            pickle.dumps(writer)


def _write_three(tmp_path):
    idx, rec = tmp_path / "c.idx", tmp_path / "c.rec"
    with MXIndexedRecordIO(str(idx), str(rec), "w") as writer:
        for key in range(3):
            writer.write_idx(key, b"x" * 10)
    return idx, rec


def test_corrupt_record_files(tmp_path):
    idx, rec = _write_three(tmp_path)
    data = bytearray(rec.read_bytes())
    data[20] ^= 0xFF  # magic word of key 1 (offset 20)
    rec.write_bytes(bytes(data))
    reader = MXIndexedRecordIO(str(idx), str(rec), "r")
    assert reader.read_idx(0) == b"x" * 10
    with pytest.raises(UserError, match=r"c\.rec: record at offset 20 \(key 1\): bad magic 0xced723f5"):
        reader.read_idx(1)

    rec.write_bytes(bytes(data[:20]) + M + bytes(data[24:50]))  # key 2 cut inside its payload
    with pytest.raises(UserError, match=r"offset 40 \(key 2\) is truncated"):
        MXIndexedRecordIO(str(idx), str(rec), "r").read_idx(2)
    rec.write_bytes(bytes(data[:44]))  # key 2 header cut: its offset is past the end
    with pytest.raises(UserError, match=r"c\.idx line 3: key 2 has offset 40, beyond the 44 bytes"):
        MXIndexedRecordIO(str(idx), str(rec), "r")

    rec.write_bytes(M + lrec(2, 4) + b"abcd")  # a middle part where a record must start
    with pytest.raises(UserError, match="part flag 2 .* out of sequence"):
        MXRecordIO(str(rec), "r").read()
    rec.write_bytes(M + lrec(1, 4) + b"abcd")  # first part, then end of file
    with pytest.raises(UserError, match="truncated"):
        MXRecordIO(str(rec), "r").read()


@pytest.mark.parametrize("text, message", [
    ("0\t0\n1\t", r"line 2: expected 'key<TAB>offset'"),
    ("0\t0\n1 20\n", "line 2"),
    ("0\t0\nkey\t20\n", "line 2"),
    ("0\t0\n1\t2.5\n", "line 2"),
    ("0\t0\n0\t20\n", "key 0 appears more than once"),
    ("0\t0\n1\t99999\n", "line 2: key 1 has offset 99999, beyond"),
])
def test_corrupt_index_files(tmp_path, text, message):
    idx, rec = _write_three(tmp_path)
    idx.write_text(text)
    with pytest.raises(UserError, match=message):
        MXIndexedRecordIO(str(idx), str(rec), "r")


def test_missing_files_and_bad_flag(tmp_path):
    with pytest.raises(UserError, match="index file not found"):
        MXIndexedRecordIO(str(tmp_path / "no.idx"), str(tmp_path / "no.rec"), "r")
    with pytest.raises(UserError, match="RecordIO file not found"):
        MXRecordIO(str(tmp_path / "no.rec"), "r")
    with pytest.raises(UserError, match="flag must be 'r' or 'w'"):
        MXRecordIO(str(tmp_path / "no.rec"), "a")


def test_image_codec_is_rgb():
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0] = 250  # red
    decoded = decode_image(encode_image(image))
    assert decoded.shape == (8, 8, 3) and abs(int(decoded[..., 0].mean()) - 250) <= 2
    assert decoded[..., 2].max() <= 5
    grey = decode_image(encode_image(np.full((4, 6), 77, np.uint8)))
    assert grey.shape == (4, 6, 3) and abs(int(grey.mean()) - 77) <= 2
    with pytest.raises(UserError, match="cannot decode"):
        decode_image(b"not an image")
    with pytest.raises(UserError, match="expected an H×W×3"):
        encode_image(np.zeros((4, 4, 3), np.float32))
