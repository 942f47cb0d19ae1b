"""Resumable row-chunked computations: every finished chunk of rows is kept on disk until the end.

Long embedding passes (old-feature extraction, IJB embedding) split their rows into chunks of
``chunk_rows`` consecutive rows. Each finished chunk is saved atomically as
``<root>/<name>-<key>/chunk_<k>.npz``; a rerun with the same inputs finds the chunks and computes
only the missing ones. ``key`` hashes everything the rows depend on — model and data files by
path, size and modification time, the options, the row and chunk counts — so a retrained model or
an edited data set never reuses stale rows (its rerun starts a new folder). ``inputs.json`` in the
folder says what it belongs to. The caller removes the folder once its final output is written.

Root: ``$BCT_CACHE_DIR`` when set, else ``work_dirs/cache`` in the repository. Deleting the root
(or one ``<name>-<key>`` folder) is always safe; it only loses the work saved there.
"""
import contextlib
import hashlib
import json
import os
import shutil
import zipfile

import numpy as np

from utils.config import ROOT
from utils.errors import require
from utils.io import atomic_np_savez, atomic_open, atomic_path


CHUNK_ROWS = 16384        # default rows per chunk of a dataset embedding pass (gathering and resuming)


def default_root():
    """``$BCT_CACHE_DIR``, else ``<repo>/work_dirs/cache``."""
    return os.environ.get("BCT_CACHE_DIR") or os.path.join(ROOT, "work_dirs", "cache")


def file_stamp(path):
    """``[absolute path, size, mtime in ns]`` of a file: changes whenever the file is rewritten."""
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def cache_key(*inputs, length=12):
    """Hex digest of JSON-serialisable ``inputs``."""
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def chunk_ranges(num_rows, chunk_rows):
    """``[(start, stop), …]`` covering ``range(num_rows)`` in chunks of ``chunk_rows`` rows."""
    require(int(chunk_rows) >= 1, f"--chunk_size (rows per saved chunk) must be >= 1, got {chunk_rows}")
    return [(start, min(start + int(chunk_rows), num_rows)) for start in range(0, num_rows, int(chunk_rows))]


class ChunkCache:
    """Saved chunks of one computation over ``num_rows`` rows (see the module docstring)."""

    def __init__(self, name, inputs, num_rows, chunk_rows, root=None):
        self.ranges = chunk_ranges(num_rows, chunk_rows)
        self.inputs = {"inputs": inputs, "num_rows": int(num_rows), "chunk_rows": int(chunk_rows)}
        self.folder = os.path.join(os.path.abspath(root or default_root()), f"{name}-{cache_key(self.inputs)}")

    def _path(self, k):
        return os.path.join(self.folder, f"chunk_{k:06d}.npz")

    def _rows(self, k):
        start, stop = self.ranges[k]
        return stop - start

    def finished(self, use=None):
        """Chunks saved by an earlier run and still readable; unreadable ones are deleted.

        Each chunk is read in full to check it; ``use(k, arrays)``, when given, receives what was read.
        """
        done = []
        for k in range(len(self.ranges)):
            path = self._path(k)
            if not os.path.isfile(path):
                continue
            try:
                arrays = self.load(k)
                if arrays and all(a.shape[:1] == (self._rows(k),) for a in arrays.values()):
                    done.append(k)
                    if use is not None:
                        use(k, arrays)
                    continue
            except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
                pass
            os.remove(path)
        return done

    def pending(self, use=None):
        """Chunks still to compute (see :meth:`finished` for ``use``); prints a ``resuming: …`` line
        when an earlier run left some."""
        done = self.finished(use)
        if done:
            print(f"resuming: {len(done)} of {len(self.ranges)} chunks already done in {self.folder}", flush=True)
        return sorted(set(range(len(self.ranges))) - set(done))

    def save(self, k, **arrays):
        """Save chunk ``k`` (arrays with one row per row of the chunk) atomically."""
        for name, array in arrays.items():
            if array.shape[:1] != (self._rows(k),):
                raise ValueError(f"chunk {k} of {self.folder}: '{name}' has {array.shape[0]} rows, "
                                 f"expected {self._rows(k)}")
        info = os.path.join(self.folder, "inputs.json")
        if not os.path.isfile(info):
            with atomic_open(info) as handle:
                json.dump(self.inputs, handle, indent=1, default=str)
        atomic_np_savez(self._path(k), **arrays)

    def load(self, k):
        """Arrays of chunk ``k`` as saved."""
        with np.load(self._path(k), allow_pickle=False) as data:
            return {name: data[name] for name in data.files}

    def write_npy(self, path, name, dtype=np.float32):
        """Write array ``name`` of all chunks, in row order, as one ``.npy`` (streamed, atomic)."""
        first = self.load(0)[name]
        shape = (self.ranges[-1][1],) + first.shape[1:]
        with atomic_path(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            for k, (start, stop) in enumerate(self.ranges):
                out[start:stop] = first if k == 0 else self.load(k)[name]
            out.flush()
            del out

    def clear(self):
        """Remove the folder and everything saved in it (and its parent when that is left empty)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.folder))


def span_rows(spans):
    """The row indices of ``(start, stop)`` spans, one span after the other."""
    return [row for start, stop in spans for row in range(start, stop)]


def regroup(batches, spans):
    """Turn a stream of ``(indices, {name: rows})`` batches into one ``(i, {name: rows})`` per span.

    The batches must cover the ``(start, stop)`` spans one after the other, in row order (a batch
    may straddle two spans); a gap, a repeat or a missing tail is an error.
    """
    parts, filled, position = [], 0, 0
    for indices, arrays in batches:
        indices, offset = np.asarray(indices), 0
        while offset < len(indices):
            if position == len(spans):
                raise RuntimeError(f"the loader gave rows beyond the {len(spans)} expected chunks")
            start, stop = spans[position]
            take = min(stop - start - filled, len(indices) - offset)
            parts.append((indices[offset:offset + take], {n: a[offset:offset + take] for n, a in arrays.items()}))
            filled, offset = filled + take, offset + take
            if filled == stop - start:
                got = np.concatenate([p[0] for p in parts])
                if not np.array_equal(got, np.arange(start, stop)):
                    raise RuntimeError(f"the loader gave rows out of order in chunk {start}..{stop - 1}")
                yield position, {n: np.concatenate([p[1][n] for p in parts]) for n in parts[0][1]}
                parts, filled, position = [], 0, position + 1
    if position != len(spans):
        raise RuntimeError(f"the loader stopped after {position} of {len(spans)} chunks")
