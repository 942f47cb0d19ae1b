"""Atomic file output and safe loading.

Outputs are written to a temporary file in the destination folder and renamed over the target, so
an interrupted run never leaves a half-written model, checkpoint, feature file or result.
torch is imported by the two functions that need it, so numpy-only commands start fast.
"""
import contextlib
import os
import tempfile
import zipfile

import numpy as np

from utils.errors import UserError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write to output folder {folder}: permission denied")
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """``open`` that writes to a temporary file and renames it over ``path`` on success."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle


def atomic_torch_save(obj, path):
    """``torch.save`` written atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_np_save(path, array):
    """``np.save`` written atomically (``path`` should end in ``.npy``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.asarray(array), allow_pickle=False)


def atomic_np_savez(path, **arrays):
    """``np.savez`` written atomically (``path`` should end in ``.npz``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def safe_torch_load(path, map_location="cpu"):
    """Load a tensor-only file with ``weights_only=True``; pickled objects or corruption → UserError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"model/checkpoint file not found: {path}")
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"cannot load {path}: corrupt or truncated file ({type(exc).__name__})") from None
    except Exception as exc:  # torch raises UnpicklingError for objects outside the allow-list
        if "weights_only" in str(exc) or "Unpickl" in type(exc).__name__:
            raise UserError(f"refusing to load {path}: it contains pickled Python objects, "
                            "only tensors and plain containers are accepted") from None
        raise


@contextlib.contextmanager
def numpy_read_errors(what):
    """Turn numpy's errors while reading ``what`` (a file, or a member of an ``.npz``) into a UserError:
    pickled objects are refused, corrupt or truncated data is named."""
    try:
        yield
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise UserError(f"refusing to load {what}: it contains pickled Python objects") from None
        raise UserError(f"cannot read {what}: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read {what}: corrupt or truncated file ({exc})") from None


def safe_np_load(path, mmap_mode=None):
    """``np.load`` with ``allow_pickle=False``; missing, pickled or corrupt files → UserError.

    Members of an ``.npz`` are read lazily: read them inside :func:`numpy_read_errors`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"file not found: {path}")
    with numpy_read_errors(path):
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)


def npz_member_memmap(path, key):
    """A read-only memory map of member ``key`` of an ``.npz``, or None where one cannot be made.

    Stored (uncompressed) members of plain dtype are mapped where they lie in the zip file, so
    nothing is read or CRC-checked up front; compressed, object or truncated members give None
    (read them with ``np.load`` then, which reports what is wrong).
    """
    with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
        try:
            info = archive.getinfo(f"{key}.npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        handle.seek(info.header_offset)
        local = handle.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        handle.seek(start)
        try:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
        except (ValueError, OSError, EOFError):
            return None
        offset = handle.tell()
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if dtype.hasobject or offset - start + size > info.file_size or size == 0:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
