"""The resume cache of long embedding passes: chunk bookkeeping, regrouping, streamed assembly."""
import os

import numpy as np
import pytest

from utils.chunk_cache import ChunkCache, cache_key, chunk_ranges, file_stamp, regroup, span_rows
from utils.errors import UserError


def test_chunk_ranges_and_their_rows():
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert span_rows([(4, 6), (9, 10)]) == [4, 5, 9] and span_rows([]) == []
    assert chunk_ranges(8, 4) == [(0, 4), (4, 8)]
    assert chunk_ranges(0, 4) == []
    with pytest.raises(UserError, match="--chunk_size .* must be >= 1"):
        chunk_ranges(10, 0)


def _batches(rows, batch_size):
    for start in range(0, len(rows), batch_size):
        index = rows[start:start + batch_size]
        yield index, {"x": np.asarray(index, np.float32)[:, None] * 2, "y": -np.asarray(index)}


def test_regroup_batches_straddling_chunks():
    spans = [(4, 8), (12, 15), (15, 16)]
    rows = [i for a, b in spans for i in range(a, b)]
    out = list(regroup(_batches(rows, 3), spans))
    assert [position for position, _ in out] == [0, 1, 2]
    for (position, arrays), (a, b) in zip(out, spans):
        np.testing.assert_array_equal(arrays["x"][:, 0], 2 * np.arange(a, b))
        np.testing.assert_array_equal(arrays["y"], -np.arange(a, b))
    assert list(regroup(iter(()), [])) == []


@pytest.mark.parametrize("rows, message", [
    ([0, 1, 3, 2], "out of order"),
    ([0, 1, 2], "stopped after 0 of 1"),
    ([0, 1, 2, 3, 4], "beyond the 1 expected"),
])
def test_regroup_rejects_wrong_rows(rows, message):
    with pytest.raises(RuntimeError, match=message):
        list(regroup(_batches(rows, 2), [(0, 4)]))


def test_cache_save_find_assemble(tmp_path, capsys):
    inputs = {"model": "m.pt"}
    cache = ChunkCache("job/a", inputs, num_rows=10, chunk_rows=4, root=tmp_path)
    assert cache.folder.startswith(str(tmp_path / "job" / "a-"))
    assert cache.finished() == []
    full = np.arange(30, dtype=np.float32).reshape(10, 3)
    for k in (2, 0):
        start, stop = cache.ranges[k]
        cache.save(k, embedding=full[start:stop])
    with pytest.raises(ValueError, match="has 3 rows, expected 4"):
        cache.save(1, embedding=full[:3])
    again = ChunkCache("job/a", inputs, num_rows=10, chunk_rows=4, root=tmp_path)
    assert again.folder == cache.folder and again.finished() == [0, 2]
    seen = {}
    assert again.finished(use=lambda k, arrays: seen.update({k: arrays["embedding"]})) == [0, 2]
    assert sorted(seen) == [0, 2] and np.array_equal(seen[2], full[8:10])
    capsys.readouterr()
    assert again.pending() == [1]
    assert capsys.readouterr().out == f"resuming: 2 of 3 chunks already done in {cache.folder}\n"
    assert os.path.isfile(os.path.join(cache.folder, "inputs.json"))
    # other inputs, row or chunk counts → another folder
    assert ChunkCache("job/a", {"model": "n.pt"}, 10, 4, root=tmp_path).finished() == []
    assert ChunkCache("job/a", inputs, 10, 5, root=tmp_path).folder != cache.folder
    assert ChunkCache("job/a", inputs, 11, 4, root=tmp_path).folder != cache.folder

    cache.save(1, embedding=full[4:8])
    path = str(tmp_path / "out.npy")
    cache.write_npy(path, "embedding")
    reference = str(tmp_path / "reference.npy")
    np.save(reference, full)
    with open(path, "rb") as ours, open(reference, "rb") as theirs:
        assert ours.read() == theirs.read()                       # byte-identical to np.save
    cache.clear()
    assert not os.path.exists(cache.folder)


def test_unreadable_chunks_are_dropped(tmp_path):
    cache = ChunkCache("job", {}, num_rows=8, chunk_rows=4, root=tmp_path)
    cache.save(0, e=np.ones((4, 2), np.float32))
    cache.save(1, e=np.ones((4, 2), np.float32))
    with open(os.path.join(cache.folder, "chunk_000001.npz"), "r+b") as handle:
        handle.truncate(50)
    assert cache.finished() == [0]
    assert not os.path.exists(os.path.join(cache.folder, "chunk_000001.npz"))


def test_default_root_and_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("BCT_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert ChunkCache("x", {}, 4, 2).folder.startswith(str(tmp_path / "elsewhere"))
    target = tmp_path / "file.bin"
    target.write_bytes(b"abc")
    stamp = file_stamp(target)
    assert stamp[:2] == [str(target), 3]
    os.utime(target, ns=(stamp[2], stamp[2] + 1))
    assert cache_key(file_stamp(target)) != cache_key(stamp)
    assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1}) and len(cache_key(1)) == 12
