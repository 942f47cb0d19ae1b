"""IJB-C / IJB-B protocol files (insightface layout): parsing with line-exact errors, and a parse cache.

Under ``<data>/<IJBC|IJBB>/meta/`` (prefix ``ijbc_`` or ``ijbb_``):
``face_tid_mid.txt`` (image, template, media), ``name_5pts_score.txt`` (image, 10 landmark
coordinates, detector score), ``template_pair_label.txt`` (template1, template2, 0/1) and the 1:N
CSVs (header row; TEMPLATE_ID, SUBJECT_ID first): galleries ``G1``/``G2`` (IJB-B ``S1``/``S2``)
and ``probe_mixed``. Images are under ``<data>/<subset>/loose_crop/``.

Each parsed file is cached as an ``.npz`` keyed by the file's path, size and modification time
(under ``<data>/<subset>/.cache/``, or ``work_dirs/ijb_cache/`` when that folder is read-only), so
an edited file is parsed again; ``force`` re-parses anyway. pandas (the parser) is imported only
when a file is parsed.
"""
import glob
import os
import re
import zipfile
from dataclasses import dataclass, field

import numpy as np

from utils.chunk_cache import cache_key, file_stamp
from utils.config import ROOT
from utils.errors import UserError
from utils.io import atomic_np_savez, npz_member_memmap, safe_np_load

CACHE_VERSION = 1
SUBSETS = {"IJBC": ("ijbc", ("G1", "G2")), "IJBB": ("ijbb", ("S1", "S2"))}


def line_of(path, row, header_rows=0):
    """1-based line number of data row ``row`` (blank lines skipped, after ``header_rows`` lines)."""
    seen = -1
    with open(path, errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if number <= header_rows or not line.strip():
                continue
            seen += 1
            if seen == row:
                return number
    return number


def _read_rows(path, fields, sep=r"\s+", header_rows=0, at_least=False, named=True):
    """DataFrame of the first ``fields`` columns; a row with another field count raises UserError.

    ``at_least``: rows may hold more fields (only the first ``fields`` are kept); ``named``: the
    first column is an image name (read as text).
    """
    import pandas as pd

    names = list(range(fields if at_least else fields + 1))
    try:
        frame = pd.read_csv(path, sep=sep, header=None, names=names, index_col=False, skiprows=header_rows,
                            usecols=range(fields) if at_least else None,
                            dtype={0: str} if named else None,
                            skip_blank_lines=True, engine="c")
    except pd.errors.ParserError as exc:
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if found and not at_least:
            raise UserError(f"{path} line {int(found.group(2)) + header_rows}: expected {fields} fields, "
                            f"found {found.group(3)}") from None
        raise UserError(f"{path}: cannot parse ({str(exc).splitlines()[-1]})") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: file is empty") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    if not at_least:
        extra = frame[fields].notna().to_numpy()
        if extra.any():
            row = int(np.argmax(extra))
            raise UserError(f"{path} line {line_of(path, row, header_rows)}: expected {fields} fields, "
                            f"found {fields + 1}")
        frame = frame.drop(columns=fields)
    if len(frame) == 0:
        raise UserError(f"{path}: no data rows")
    return frame


def _numbers(frame, path, columns, what, integer=False, header_rows=0, fields=None):
    """The columns as a float64 (or int64) array; a missing or non-numeric value raises UserError."""
    import pandas as pd

    values = np.stack([pd.to_numeric(frame[c], errors="coerce").to_numpy(np.float64, na_value=np.nan)
                       for c in columns], axis=1)
    bad = ~np.isfinite(values).all(1)
    if integer:
        bad |= (values != np.round(values)).any(1)
    if bad.any():
        row = int(np.argmax(bad))
        missing = frame.iloc[row].isna().to_numpy()
        if fields is not None and missing.any():
            detail = f"expected {fields} fields, found {int((~missing).sum())}"
        else:
            detail = f"expected {what}"
        raise UserError(f"{path} line {line_of(path, row, header_rows)}: {detail}")
    return values.astype(np.int64) if integer else values


def parse_tid_mid(path):
    """``face_tid_mid.txt`` → image names, template ids, media ids (one row per image)."""
    frame = _read_rows(path, 3)
    ids = _numbers(frame, path, [1, 2], "integer template and media ids", integer=True, fields=3)
    return dict(names=frame[0].to_numpy(dtype=str), templates=ids[:, 0], medias=ids[:, 1])


def parse_landmarks(path):
    """``name_5pts_score.txt`` → image names, landmarks (n×5×2 float32), detector scores (float32)."""
    frame = _read_rows(path, 12)
    values = _numbers(frame, path, list(range(1, 12)), "10 landmark coordinates and a detector score", fields=12)
    return dict(names=frame[0].to_numpy(dtype=str), landmarks=values[:, :10].reshape(-1, 5, 2).astype(np.float32),
                scores=values[:, 10].astype(np.float32))


def parse_pairs(path):
    """``template_pair_label.txt`` → template1, template2 (int64), labels (int8, 0/1)."""
    frame = _read_rows(path, 3, named=False)
    values = _numbers(frame, path, [0, 1, 2], "integer template ids and a 0/1 label", integer=True, fields=3)
    labels = values[:, 2]
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        raise UserError(f"{path} line {line_of(path, int(np.argmax(bad)))}: label must be 0 or 1, "
                        f"got {labels[bad][0]}")
    return dict(t1=values[:, 0], t2=values[:, 1], labels=labels.astype(np.int8))


def parse_csv_1n(path):
    """1:N CSV → unique template ids (first-appearance order) and each one's subject id."""
    frame = _read_rows(path, 2, sep=",", header_rows=1, at_least=True, named=False)
    values = _numbers(frame, path, [0, 1], "integer TEMPLATE_ID and SUBJECT_ID in the first two columns",
                      integer=True, header_rows=1)
    templates, first = np.unique(values[:, 0], return_index=True)
    subjects = values[first, 1]
    row_subject = subjects[np.searchsorted(templates, values[:, 0])]
    bad = row_subject != values[:, 1]
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError(f"{path} line {line_of(path, row, 1)}: template {values[row, 0]} has subject "
                        f"{values[row, 1]} here but {row_subject[row]} on an earlier row")
    order = np.argsort(first, kind="stable")
    return dict(templates=templates[order], subjects=subjects[order])


def _cache_folder(subset_root):
    folder = os.path.join(subset_root, ".cache")
    try:
        os.makedirs(folder, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    return os.path.join(ROOT, "work_dirs", "ijb_cache", cache_key(os.path.abspath(subset_root)))


def _member(path, stored, name):
    mapped = npz_member_memmap(path, name)
    return stored[name] if mapped is None else mapped


def load_cached(path, parser, cache_folder, force=False):
    """``parser(path)`` (dict of arrays), cached in ``cache_folder`` by path, size and mtime (written by rank 0 only)."""
    if not os.path.isfile(path):
        raise UserError(f"meta file not found: {path}")
    key = cache_key(file_stamp(path), CACHE_VERSION, parser.__name__, length=16)
    base = os.path.basename(path)
    cached = os.path.join(cache_folder, f"{base}.{key}.npz")
    if not force and os.path.isfile(cached):
        try:
            with safe_np_load(cached) as stored:   # large members are mapped, not read and CRC-checked
                return {name: _member(cached, stored, name) for name in stored.files}
        except (UserError, ValueError, OSError, zipfile.BadZipFile):
            pass
    arrays = parser(path)
    if os.environ.get("RANK", "0") != "0":   # several processes: rank 0 alone writes the cache
        return arrays
    try:
        for stale in glob.glob(os.path.join(glob.escape(cache_folder), glob.escape(base) + ".*.npz")):
            os.remove(stale)
        atomic_np_savez(cached, **arrays)
    except (OSError, UserError):
        pass
    return arrays


@dataclass
class IJBMeta:
    """The protocol of one subset: images (in ``face_tid_mid`` order) and the 1:1 or 1:N lists."""
    subset: str
    root: str
    image_folder: str
    names: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray
    files: dict
    pairs: dict = None
    galleries: dict = field(default_factory=dict)
    probes: dict = None

    def __len__(self):
        return len(self.names)


def _match_landmarks(tid, marks, tid_path, marks_path):
    """Landmark rows reordered to the image order of ``face_tid_mid``."""
    if len(tid["names"]) == len(marks["names"]) and np.array_equal(tid["names"], marks["names"]):
        return marks["landmarks"], marks["scores"]
    import pandas as pd

    index = pd.Index(marks["names"])
    if not index.is_unique:
        duplicated = index[index.duplicated()][0]
        raise UserError(f"{marks_path}: image {duplicated} is listed twice")
    where = index.get_indexer(tid["names"])
    if (where < 0).any():
        row = int(np.argmax(where < 0))
        raise UserError(f"{tid_path} line {line_of(tid_path, row)}: image {tid['names'][row]} has no row "
                        f"in {marks_path}")
    return marks["landmarks"][where], marks["scores"][where]


def check_templates(known, ids, path, header_rows=0, what="template"):
    """Raise UserError naming the line of the first id in ``ids`` missing from sorted ``known``.

    Compact non-negative ids (as IJB's) are looked up in a presence table (one pass over the
    millions of pair ids), others by binary search.
    """
    ids = np.asarray(ids)
    if len(known) and known[0] >= 0 and known[-1] < 8 * len(known) + (1 << 20):
        present = np.zeros(int(known[-1]) + 1, bool)
        present[known] = True
        clipped = np.clip(ids, 0, len(present) - 1)
        bad = ~present[clipped] | (clipped != ids)
    else:
        pos = np.minimum(np.searchsorted(known, ids), len(known) - 1)
        bad = known[pos] != ids
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError(f"{path} line {line_of(path, row, header_rows)}: unknown {what} {ids[row]} "
                        f"(not in the image list)")


def load_meta(data_path, subset="IJBC", one_to_n=False, force=False):
    """Parse (or load from cache) the files a protocol needs; every listed image must exist."""
    if subset not in SUBSETS:
        raise UserError(f"unknown subset '{subset}' (expected one of {', '.join(SUBSETS)})")
    prefix, gallery_names = SUBSETS[subset]
    root = os.path.join(os.path.abspath(data_path), subset)
    if not os.path.isdir(root):
        raise UserError(f"{subset} data not found: {root} is not a folder (-d/--data_path is the folder "
                        f"holding {subset}/)")
    meta_folder = os.path.join(root, "meta")
    cache = _cache_folder(root)
    files = dict(tid_mid=f"{prefix}_face_tid_mid.txt", landmarks=f"{prefix}_name_5pts_score.txt")
    if one_to_n:
        for name in gallery_names:
            files[name] = f"{prefix}_1N_gallery_{name}.csv"
        files["probe"] = f"{prefix}_1N_probe_mixed.csv"
    else:
        files["pairs"] = f"{prefix}_template_pair_label.txt"
    files = {k: os.path.join(meta_folder, v) for k, v in files.items()}
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise UserError(f"meta file not found: {missing[0]}")
    tid = load_cached(files["tid_mid"], parse_tid_mid, cache, force)
    marks = load_cached(files["landmarks"], parse_landmarks, cache, force)
    landmarks, scores = _match_landmarks(tid, marks, files["tid_mid"], files["landmarks"])
    meta = IJBMeta(subset, root, os.path.join(root, "loose_crop"), tid["names"], tid["templates"],
                   tid["medias"], landmarks, scores, files)
    known = np.unique(meta.templates)
    if one_to_n:
        for name in gallery_names:
            meta.galleries[name] = load_cached(files[name], parse_csv_1n, cache, force)
            check_templates(known, meta.galleries[name]["templates"], files[name], 1)
        meta.probes = load_cached(files["probe"], parse_csv_1n, cache, force)
        check_templates(known, meta.probes["templates"], files["probe"], 1)
    else:
        meta.pairs = load_cached(files["pairs"], parse_pairs, cache, force)
        for side in ("t1", "t2"):
            check_templates(known, meta.pairs[side], files["pairs"])
    return meta


def check_images(meta):
    """Raise UserError naming the first listed image missing from ``loose_crop/``."""
    folder = meta.image_folder
    if not os.path.isdir(folder):
        raise UserError(f"image folder not found: {folder}")
    nested = np.char.find(meta.names.astype(str), "/") >= 0
    present = np.isin(meta.names, np.array(os.listdir(folder), dtype=str))
    if nested.any():
        present[nested] = [os.path.isfile(os.path.join(folder, n)) for n in meta.names[nested]]
    if not present.all():
        row = int(np.argmax(~present))
        path = meta.files["tid_mid"]
        raise UserError(f"{path} line {line_of(path, row)}: image {os.path.join(folder, meta.names[row])} "
                        f"not found")
