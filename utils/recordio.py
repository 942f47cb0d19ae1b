"""MXNet RecordIO (``.rec`` + ``.idx``) reader and writer, byte-compatible with ``mxnet.recordio``.

On disk a record is ``uint32 magic 0xced7230a``, ``uint32 lrec = (cflag << 29) | length``, then
``length`` payload bytes zero-padded to a multiple of 4. A writer splits the payload wherever the
magic word occurs at a 4-byte-aligned offset (parts get cflag 1 first, 2 middle, 3 last; the magic
word itself is dropped); a reader joins the parts and re-inserts it. The ``.idx`` file holds text
lines ``key<TAB>offset`` (offset of the record's magic word).

An image record's payload is ``struct 'IfQQ'`` (flag, label, id, id2; 24 bytes, little-endian),
then ``flag`` float32 label values when ``flag > 0`` (the scalar label is then 0), then the encoded
image. Readers open their file lazily in each process (the pid is stored), so a reader can be
pickled into DataLoader workers and reopens there.
"""
import array
import collections
import contextlib
import mmap
import numbers
import os
import struct
import warnings

import cv2
import numpy as np

from utils.errors import UserError
from utils.io import atomic_path

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_MASK = (1 << 29) - 1
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)
_RECORD_HEAD = struct.Struct("<II")
_FLAG, _LABEL = struct.Struct("<I"), struct.Struct("<f")
HEADER_DTYPE = np.dtype([("flag", "<u4"), ("label", "<f4"), ("id", "<u8"), ("id2", "<u8")])

_IMREAD = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # pixels as stored, like MXNet's imdecode
IRHeader = collections.namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = "Image record header: flag (label count, 0 = scalar), label, id, id2."


def _padded(length):
    return (length + 3) & ~3


_PID = [os.getpid()]  # this process's pid, refreshed in forked children (cheaper than os.getpid per read)


def _refresh_pid():
    _PID[0] = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


class MXRecordIO:
    """Sequential RecordIO file: ``flag`` 'r' (``read``) or 'w' (``write``).

    Writing goes to a temporary file renamed over ``path`` by :meth:`close` (a ``with`` block that
    raises discards it). Reading memory-maps the file; corrupt records raise :class:`UserError`.
    """

    def __init__(self, path, flag):
        if flag not in ("r", "w"):
            raise UserError(f"{path}: RecordIO flag must be 'r' or 'w', got {flag!r}")
        self.path = os.fspath(path)
        self.flag = flag
        self._pid = None
        self._handle = None
        self._data = b""
        self._pos = 0
        if flag == "r":
            if not os.path.isfile(self.path):
                raise UserError(f"RecordIO file not found: {self.path}")
            self._size = os.path.getsize(self.path)
        else:
            self._outputs = contextlib.ExitStack()
            self._handle = open(self._outputs.enter_context(atomic_path(self.path)), "wb")
            self._outputs.callback(self._handle.close)

    # -- reading -------------------------------------------------------------------------------
    def _ensure_open(self):
        """(Re)open the memory map in this process (after a fork the parent's map is not used)."""
        if self._pid == _PID[0]:
            return
        self._pid = _PID[0]
        self._data = b""
        if self._size:
            with open(self.path, "rb") as handle:
                self._data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            if len(self._data) != self._size:
                raise UserError(f"{self.path}: file size changed from {self._size} to {len(self._data)} bytes "
                                "while it was open")

    def _where(self, offset, key):
        return f"{self.path}: record at offset {offset}" + ("" if key is None else f" (key {key})")

    def _record(self, offset, key=None):
        """Payload of the record starting at byte ``offset`` and the offset just past it."""
        if self._pid != _PID[0]:
            self._ensure_open()
        data, size = self._data, self._size
        if offset + 8 <= size:  # fast path: a whole (single-part) record
            magic, lrec = _RECORD_HEAD.unpack_from(data, offset)
            end = offset + 8 + _padded(lrec)
            if magic == MAGIC and lrec <= LENGTH_MASK and end <= size:
                return data[offset + 8:offset + 8 + lrec], end
        parts, pos = [], offset
        while True:
            if pos + 8 > size:
                raise UserError(f"{self._where(offset, key)} is truncated: header at byte {pos} needs 8 bytes, "
                                f"the file has {size}")
            magic, lrec = _RECORD_HEAD.unpack_from(data, pos)
            if magic != MAGIC:
                raise UserError(f"{self._where(offset, key)}: bad magic 0x{magic:08x} at byte {pos}, "
                                f"expected 0x{MAGIC:08x} (corrupt file or wrong .idx)")
            cflag, length = lrec >> 29, lrec & LENGTH_MASK
            if cflag not in ((0, 1) if not parts else (2, 3)):
                raise UserError(f"{self._where(offset, key)}: part flag {cflag} at byte {pos} is out of sequence "
                                f"(expected {'0 or 1' if not parts else '2 or 3'})")
            end = pos + 8 + _padded(length)
            if end > size:
                raise UserError(f"{self._where(offset, key)} is truncated: needs bytes up to {end}, "
                                f"the file has {size}")
            parts.append(data[pos + 8:pos + 8 + length])
            pos = end
            if cflag in (0, 3):
                break
        return (parts[0] if len(parts) == 1 else MAGIC_BYTES.join(parts)), pos

    def read(self):
        """Next record's payload (bytes), or ``None`` at the end of the file."""
        self._require("r", "read")
        if self._pos >= self._size:
            return None
        payload, self._pos = self._record(self._pos)
        return payload

    # -- writing -------------------------------------------------------------------------------
    def write(self, buf):
        """Append one record (payload bytes), split at aligned magic words as MXNet's writer does."""
        self._require("w", "write")
        buf = bytes(buf)
        length = len(buf)
        if length > LENGTH_MASK:
            raise UserError(f"{self.path}: record of {length} bytes exceeds the RecordIO limit of {LENGTH_MASK}")
        write = self._handle.write
        start, pos = 0, buf.find(MAGIC_BYTES)
        while pos >= 0:
            if pos % 4:
                pos = buf.find(MAGIC_BYTES, pos + 1)
                continue
            write(_RECORD_HEAD.pack(MAGIC, (2 if start else 1) << 29 | (pos - start)))
            write(buf[start:pos])
            start = pos + 4
            pos = buf.find(MAGIC_BYTES, start)
        write(_RECORD_HEAD.pack(MAGIC, (3 if start else 0) << 29 | (length - start)))
        write(buf[start:] if start else buf)
        write(b"\0" * (_padded(length) - length))

    # -- common --------------------------------------------------------------------------------
    def _require(self, flag, action):
        if self.flag != flag:
            raise UserError(f"{self.path}: cannot {action} a RecordIO file opened with flag {self.flag!r}")
        if flag == "w" and self._handle is None:
            raise UserError(f"{self.path}: cannot {action}: the writer is closed")

    def tell(self):
        """Byte position: where the next record is read from or written to."""
        return self._handle.tell() if self.flag == "w" else self._pos

    def reset(self):
        """Reading: go back to the first record. Writing: discard everything written so far."""
        if self.flag == "r":
            self._pos = 0
        else:
            self._require("w", "reset")
            self._handle.seek(0)
            self._handle.truncate()

    def close(self):
        """Reading: release the map. Writing: flush and move the file into place."""
        if self.flag == "w":
            if self._handle is not None:
                self._handle = None
                self._outputs.close()
        else:
            if isinstance(self._data, mmap.mmap) and self._pid == _PID[0]:
                self._data.close()
            self._data, self._pid = b"", None

    def _abort(self, exc_info):
        if self._handle is not None:
            self._handle = None
            self._outputs.__exit__(*exc_info)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if exc_info[0] is not None and self.flag == "w":
            self._abort(exc_info)
        else:
            self.close()

    def __getstate__(self):
        if self.flag == "w":
            raise TypeError(f"{self.path}: a RecordIO writer cannot be pickled")
        state = dict(self.__dict__)
        state.update(_data=b"", _pid=None)
        return state


class MXIndexedRecordIO(MXRecordIO):
    """RecordIO file with a ``.idx`` index: random access by integer key.

    ``keys`` lists the keys in index order; ``read_idx(key)`` returns a payload; ``write_idx(key,
    buf)`` appends a record and its index line. Both files are written atomically on close.
    """

    def __init__(self, idx_path, path, flag):
        self.idx_path = os.fspath(idx_path)
        if flag == "r" and not os.path.isfile(self.idx_path):
            raise UserError(f"RecordIO index file not found: {self.idx_path}")
        super().__init__(path, flag)
        if flag == "r":
            self._keys, self._offsets = _parse_idx(self.idx_path)
            self._check_index()
        else:
            self._keys, self._offsets = array.array("q"), None
            self._idx_handle = open(self._outputs.enter_context(atomic_path(self.idx_path)), "w")
            self._outputs.callback(self._idx_handle.close)
        self._key_list = None

    def _check_index(self):
        keys, offsets = self._keys, self._offsets
        order = np.argsort(keys, kind="stable")
        self._sorted_keys, self._sorted_offsets = keys[order], offsets[order]
        dup = np.flatnonzero(self._sorted_keys[1:] == self._sorted_keys[:-1])
        if dup.size:
            raise UserError(f"{self.idx_path}: key {self._sorted_keys[dup[0]]} appears more than once")
        beyond = np.flatnonzero((offsets < 0) | (offsets + 8 > self._size))
        if beyond.size:
            i = beyond[0]
            raise UserError(f"{self.idx_path} line {i + 1}: key {keys[i]} has offset {offsets[i]}, beyond the "
                            f"{self._size} bytes of {self.path} (truncated .rec or wrong .idx)")
        self._contiguous = bool(len(keys) and self._sorted_keys[-1] - self._sorted_keys[0] == len(keys) - 1)

    @property
    def keys(self):
        """Keys in index order (list of int)."""
        if self._key_list is None or len(self._key_list) != len(self._keys):
            self._key_list = [int(k) for k in self._keys]
        return self._key_list

    @property
    def key_array(self):
        """Keys in index order (int64 array)."""
        return self._keys if isinstance(self._keys, np.ndarray) else np.array(self._keys, dtype=np.int64)

    def offsets_of(self, keys):
        """Byte offsets (int64 array) of the records with these keys; unknown key → UserError."""
        keys = np.asarray(keys, dtype=np.int64)
        self._require("r", "look up")
        sorted_keys = self._sorted_keys
        if self._contiguous:
            pos = keys - (sorted_keys[0] if len(sorted_keys) else 0)
            found = (pos >= 0) & (pos < len(sorted_keys))
        else:
            pos = np.searchsorted(sorted_keys, keys)
            found = pos < len(sorted_keys)
            found[found] = sorted_keys[pos[found]] == keys[found]
        if not found.all():
            raise UserError(f"{self.idx_path}: key {keys[~found][0]} is not in the index")
        return self._sorted_offsets[pos]

    def read_idx(self, key):
        """Payload of the record with ``key``."""
        offset = int(self.offsets_of([key])[0])
        return self._record(offset, key)[0]

    def read_at(self, offset, key=None):
        """Payload of the record whose magic word is at byte ``offset`` (``key`` only names it in errors)."""
        return self._record(offset, key)[0]

    def read_headers(self, offsets, chunk=65536):
        """Image-record headers at these record offsets, read without touching the images.

        Returns :class:`IRHeader` of arrays: flag (uint32), label (float32: the scalar label, or the
        first label value when flag > 0), id and id2 (uint64). Vectorised over the memory map.
        """
        offsets = np.asarray(offsets, dtype=np.int64)
        out = np.empty(len(offsets), HEADER_DTYPE)
        self._ensure_open()
        window = 8 + IR_SIZE + 4
        steps = np.arange(window)
        data = np.frombuffer(self._data, np.uint8) if self._size else np.zeros(1, np.uint8)
        try:
            for lo in range(0, len(offsets), chunk):
                offs = offsets[lo:lo + chunk]
                raw = data[np.minimum(offs[:, None] + steps, self._size - 1)]
                lrec = raw[:, :8].copy().view("<u4")
                header = raw[:, 8:8 + IR_SIZE].copy().view(HEADER_DTYPE)[:, 0]
                first = raw[:, 8 + IR_SIZE:].copy().view("<f4")[:, 0]
                length = lrec[:, 1] & LENGTH_MASK
                need = IR_SIZE + 4 * (header["flag"] > 0)
                plain = ((lrec[:, 0] == MAGIC) & (lrec[:, 1] >> 29 == 0) & (length >= need)
                         & (offs + 8 + _padded(length.astype(np.int64)) <= self._size))
                header["label"] = np.where(header["flag"] > 0, first, header["label"])
                out[lo:lo + chunk] = header
                for i in np.flatnonzero(~plain).tolist():  # multi-part or damaged: full read + checks
                    h, _ = unpack(self._record(int(offs[i]))[0], f"{self.path}: record at offset {offs[i]}")
                    label = float(h.label[0]) if h.flag > 0 else h.label
                    out[lo + i] = (h.flag, label, h.id, h.id2)
        finally:
            del data
        return IRHeader(out["flag"], out["label"], out["id"], out["id2"])

    def write_idx(self, key, buf):
        """Append a record with integer ``key`` and its index line."""
        self._require("w", "write")
        key = int(key)
        self._idx_handle.write(f"{key}\t{self.tell()}\n")
        self.write(buf)
        self._keys.append(key)

    def reset(self):
        super().reset()
        if self.flag == "w":
            self._idx_handle.seek(0)
            self._idx_handle.truncate()
            self._keys = array.array("q")


def _parse_idx(path):
    """Keys and offsets (int64 arrays, file order) of a ``.idx`` file; bad lines → UserError."""
    with open(path, "rb") as handle:
        text = handle.read()
    lines = text.count(b"\n") + (0 if text.endswith(b"\n") or not text else 1)
    if text.count(b"\t") == lines:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                values = np.fromstring(text, dtype=np.int64, sep=" ") if lines else np.zeros(0, np.int64)
            except (ValueError, DeprecationWarning):
                values = None
        if values is not None and values.size == 2 * lines:
            pairs = values.reshape(-1, 2)
            return np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])
    for number, line in enumerate(text.split(b"\n"), 1):
        fields = line.strip().split(b"\t")
        if len(fields) != 2 or not all(f.strip().lstrip(b"-").isdigit() for f in fields):
            raise UserError(f"{path} line {number}: expected 'key<TAB>offset' (two integers), "
                            f"got {line[:60].decode('latin-1')!r} (truncated or garbled index)")
    raise UserError(f"{path}: unreadable index (expected lines 'key<TAB>offset')")


def pack(header, payload):
    """Record payload for an image: the 'IfQQ' header (+ label array) then ``payload`` bytes.

    As in MXNet, a numeric label gives flag 0; a sequence of labels gives flag = its length, the
    float32 values after the header and a scalar label field of 0.
    """
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        header, prefix = header._replace(flag=0), b""
    else:
        label = np.asarray(header.label, dtype="<f4").ravel()
        header, prefix = header._replace(flag=label.size, label=0.0), label.tobytes()
    try:
        return struct.pack(IR_FORMAT, *header) + prefix + bytes(payload)
    except struct.error as exc:
        raise UserError(f"cannot pack record header {tuple(header)}: {exc}") from None


def unpack(record, source="record"):
    """``(IRHeader, image bytes)`` of a record payload; label is a float32 array when flag > 0."""
    if len(record) < IR_SIZE:
        raise UserError(f"{source}: {len(record)} bytes is shorter than the {IR_SIZE}-byte image header")
    header = IRHeader(*struct.unpack_from(IR_FORMAT, record))
    start = IR_SIZE
    if header.flag > 0:
        start += 4 * header.flag
        if len(record) < start:
            raise UserError(f"{source}: header announces {header.flag} labels but the record has "
                            f"{len(record)} bytes (needs at least {start})")
        header = header._replace(label=np.frombuffer(record, "<f4", header.flag, IR_SIZE).copy())
    return header, bytes(record[start:])


def relabel(record, label, source="record"):
    """``record`` with its class label (the scalar label, or ``label[0]`` when flag > 0) set to ``label``."""
    if len(record) < IR_SIZE:
        raise UserError(f"{source}: {len(record)} bytes is shorter than the {IR_SIZE}-byte image header")
    at = IR_SIZE if _FLAG.unpack_from(record)[0] > 0 else 4
    if len(record) < at + 4:
        raise UserError(f"{source}: the header announces a label array but the record ends at byte {len(record)}")
    return record[:at] + _LABEL.pack(label) + record[at + 4:]


def encode_image(image, quality=95):
    """JPEG bytes of an RGB (H×W×3) or grey (H×W) uint8 image."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise UserError(f"encode_image: expected an H×W×3 RGB or H×W grey uint8 array, got {image.dtype} "
                        f"{image.shape}")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise UserError(f"encode_image: JPEG encoding failed for an image of shape {image.shape}")
    return buf.tobytes()


def decode_image(buf, rgb=True, source="image"):
    """H×W×3 uint8 image (RGB, or OpenCV's BGR with ``rgb=False``) from JPEG/PNG bytes; EXIF orientation ignored."""
    data = np.frombuffer(buf, np.uint8)
    try:
        image = cv2.imdecode(data, _IMREAD) if data.size else None
    except cv2.error:
        image = None
    if image is None:
        raise UserError(f"{source}: cannot decode the image bytes (expected JPEG or PNG)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if rgb else image
