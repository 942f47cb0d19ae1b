"""Pack a folder of aligned face crops into an insightface RecordIO training set.

    python tools/pack_rec.py ROOT OUT_PREFIX [--workers 4] [--quality 95] [--overwrite]

``ROOT/<identity>/<image>`` (jpg/png/bmp): identity folders in sorted order become labels 0..C−1,
images in sorted order inside each. Writes ``OUT_PREFIX.rec``/``.idx`` in the insightface layout
(record 0: flag 2, label ``[N+1, N+1+C]``; images 1..N: flag 0, label, id = key, the JPEG bytes;
then one identity record per class with its key range ``[first, last+1)``), the property file
``num_classes,height,width`` (``OUT_PREFIX.property``; the folder's ``property`` when the prefix
ends in ``train``, as insightface's ``train.rec``) and ``OUT_PREFIX.labels.tsv`` (``label<TAB>identity``).
JPEG files are stored byte for byte (as insightface's packer); other formats are encoded as JPEG.
Every file is written under a temporary name and renamed at the end (the ``.idx`` last), so a
failed run leaves no set behind. See docs/data.md.
"""
import argparse
import contextlib
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cv2
import numpy as np
from tqdm import tqdm

from utils.errors import UserError, require, run_cli
from utils.image_folder import list_identities
from utils.io import atomic_path
from utils.recordio import IRHeader, MXIndexedRecordIO, encode_image, pack

JPEG_START = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
FLOAT32_EXACT = 1 << 24          # record 0's float32 label indexes keys exactly up to here


def read_image(path, quality=95):
    """``(JPEG bytes, height, width)`` of an image file; an undecodable file → UserError naming it."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data.startswith(JPEG_START) and not data.rstrip(b"\0").endswith(JPEG_END):
        raise UserError(f"cannot read image {path}: truncated JPEG file (no end-of-image marker)")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    except cv2.error:
        image = None
    if image is None:
        raise UserError(f"cannot read image {path} (expected a JPEG, PNG or BMP file)")
    if not data.startswith(JPEG_START):
        data = encode_image(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), quality)
    return data, image.shape[0], image.shape[1]


@contextlib.contextmanager
def native_stderr_captured():
    """While the block runs, what is written to file descriptor 2 (libjpeg's "Corrupt JPEG data: …") goes to a
    temporary file; yields ``(a file on the real stderr, read)``, ``read()`` giving the text captured so far."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile("w+") as captured, os.fdopen(os.dup(saved), "w") as real:
            os.dup2(captured.fileno(), 2)
            yield real, lambda: (captured.seek(0), captured.read())[1]
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def first_damaged(files):
    """The first of ``files`` whose decoding makes libjpeg complain, as a UserError (one decode at a time)."""
    for path in files:
        with native_stderr_captured() as (_, read):
            read_image(path)
            complaint = read().strip()
        if complaint:
            raise UserError(f"cannot read image {path}: {complaint.splitlines()[0]} (damaged file: re-save or remove it)")


@contextlib.contextmanager
def removed_on_failure(folder):
    """The folders of ``folder``'s path that do not exist yet are removed (when empty) if the block fails."""
    created = []
    while folder and not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    try:
        yield
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


def property_path(prefix):
    """The property file of a set: the folder's ``property`` for a ``train`` prefix, else ``<prefix>.property``."""
    if os.path.basename(prefix) == "train":
        return os.path.join(os.path.dirname(prefix), "property")
    return prefix + ".property"


def output_paths(prefix):
    """The four files of a packed set, in the order they are moved into place (the index last)."""
    return [prefix + ".rec", property_path(prefix), prefix + ".labels.tsv", prefix + ".idx"]


def pack_folder(root, prefix, workers=4, quality=95, overwrite=False):
    """Write the set of ``root`` at ``prefix``; returns ``(images, identities, (height, width))``."""
    prefix = os.path.abspath(prefix[:-4] if prefix.endswith((".rec", ".idx")) else prefix)
    existing = [p for p in output_paths(prefix) if os.path.exists(p)]
    require(overwrite or not existing, f"{existing[0] if existing else ''}: exists (pass --overwrite to replace it)")
    identities, files, labels = list_identities(root)
    count, classes = len(files), len(identities)
    require(count + classes + 1 < FLOAT32_EXACT,
            f"{root}: {count} images and {classes} identities exceed what the float32 record-0 header can index")
    ends = np.cumsum(np.bincount(labels, minlength=classes)) + 1          # key one past each identity's last image
    starts = np.r_[1, ends[:-1]]
    shape = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(removed_on_failure(os.path.dirname(prefix)))
        # entered last to first, so on success they are renamed first to last (the index last)
        tmp = [stack.enter_context(atomic_path(p)) for p in reversed(output_paths(prefix))][::-1]
        writer = stack.enter_context(MXIndexedRecordIO(tmp[3], tmp[0], "w"))
        writer.write_idx(0, pack(IRHeader(2, [count + 1, count + 1 + classes], 0, 0), b""))
        screen, complaints = stack.enter_context(native_stderr_captured())   # restored after the pool's last decode
        pool = stack.enter_context(ThreadPoolExecutor(max(1, workers)))
        bar = stack.enter_context(tqdm(total=count, unit="img", desc=f"packing {os.path.basename(prefix)}",
                                       mininterval=2, file=screen))
        for key, (label, path, (jpeg, height, width)) in enumerate(
                zip(labels.tolist(), files, pool.map(lambda p: read_image(p, quality), files)), 1):
            shape = shape or (height, width)
            require((height, width) == shape, f"{path} is {width}×{height} pixels, but {files[0]} is "
                                              f"{shape[1]}×{shape[0]}: a set holds crops of one size")
            writer.write_idx(key, pack(IRHeader(0, float(label), key, 0), jpeg))
            bar.update()
        if complaints().strip():
            first_damaged(files)
            screen.write(complaints())   # not from an image: shown as it was written
        for label in range(classes):
            key = count + 1 + label
            writer.write_idx(key, pack(IRHeader(2, [float(starts[label]), float(ends[label])], key, 0), b""))
        writer.close()
        with open(tmp[1], "w") as handle:
            handle.write(f"{classes},{shape[0]},{shape[1]}\n")
        with open(tmp[2], "w", encoding="utf-8") as handle:
            handle.writelines(f"{label}\t{name}\n" for label, name in enumerate(identities))
    return count, classes, shape


def read_label_map(path):
    """``{label: identity}`` of a ``.labels.tsv`` file written by :func:`pack_folder`."""
    with open(path, encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle if line.strip()]
    require(all(len(r) == 2 and r[0].isdigit() for r in rows), f"{path}: expected lines 'label<TAB>identity'")
    return {int(label): name for label, name in rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="image folder ROOT/<identity>/<image>")
    parser.add_argument("out_prefix",
                        help="output prefix: writes OUT_PREFIX.rec, .idx, .labels.tsv and the property file "
                             "(the folder's property when the prefix ends in train, as train.rec; else "
                             "OUT_PREFIX.property)")
    parser.add_argument("--workers", type=int, default=4, help="threads reading and checking images (default 4)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for images that are not JPEG files")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing set at OUT_PREFIX")
    args = parser.parse_args(argv)
    require(1 <= args.quality <= 100, f"--quality must lie in 1..100, got {args.quality}")
    count, classes, shape = pack_folder(args.root, args.out_prefix, args.workers, args.quality, args.overwrite)
    prefix = os.path.abspath(args.out_prefix)
    print(f"packed {count} images of {classes} identities ({shape[1]}×{shape[0]}) → {prefix}.rec, .idx, "
          f"{os.path.basename(property_path(prefix))}, {os.path.basename(prefix)}.labels.tsv")


if __name__ == "__main__":
    run_cli(main)
