"""compat_eval's data: the face set, its embedding pass, image features and the protocol's pairs and split.

:class:`FaceSet` reads aligned crops (an image folder or a RecordIO set); :func:`embed` runs every
generation over it in one pass with the toolkit's shared loop (:func:`utils.embedding.embed_crops`:
several processes under torchrun, finished chunks kept for a rerun); :func:`restore` reads the
embeddings saved with ``-E``. :func:`verification_pairs` and :func:`identification_split` draw the
1:1 pairs and the 1:N gallery.
"""
import time

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from tools.ijbc_eval import CHUNK_IMAGES, metrics
from utils.chunk_cache import cache_key, file_stamp
from utils.embedding import embed_crops
from utils.errors import UserError, require
from utils.image_folder import list_identities
from utils.io import numpy_read_errors, safe_np_load

FEATURE_VARIANT = "N1D0F1"      # image feature: embedding + mirrored-image embedding, L2-normalised
READ_OK, READ_FAILED, WRONG_SIZE, DAMAGED = 0, 1, 2, 3


# ------------------------------------------------------------------------------------------- faces
class FaceSet(Dataset):
    """Aligned face crops of an image folder or a RecordIO set: ``labels``, ``names`` (for messages).

    ``ds[i] → (uint8 crops 3×S×S, one per size, index, status, height, width)``; an unreadable or damaged
    image (:func:`decode_image`) or one of the wrong size (without ``resize``) gives zero crops and its
    status; the caller reports it (:meth:`problem`).
    """

    def __init__(self, data=None, rec=None, image_size=112, resize=False, sizes=(112,)):
        self.image_size, self.resize, self.sizes = image_size, resize, tuple(sizes)
        self.record = None
        if rec is not None:
            from utils.dataset import MXFaceDataset

            faces = MXFaceDataset(rec, train=False)
            self.record, self.keys, self.offsets = faces.record, faces.keys, faces.offsets
            self.labels = faces.labels
            self.names = np.array([f"{faces.rec_path} image key {k}" for k in self.keys.tolist()])
            self.source, self.files = faces.rec_path, [faces.rec_path, faces.idx_path]
            identities = np.unique(self.labels).astype(str)
        else:
            identities, files, self.labels = list_identities(data, f"--data {data}")
            self.names, self.source, self.files = np.array(files), data, files
        require(len(identities) >= 2, f"{self.source}: {len(identities)} identity found ({', '.join(identities)}); "
                                      "compatibility testing needs at least 2 identities")
        self.identities = identities

    def __len__(self):
        return len(self.labels)

    def _read(self, index):
        """``(BGR image or None, libjpeg's complaint or "")`` of image ``index``."""
        if self.record is None:
            try:
                with open(str(self.names[index]), "rb") as handle:
                    data = handle.read()
            except OSError:
                return None, ""
        else:
            from utils.recordio import unpack

            payload = self.record.read_at(int(self.offsets[index]), int(self.keys[index]))
            try:
                data = unpack(payload)[1]
            except UserError:
                return None, ""
        return decode_image(data)

    def __getitem__(self, index):
        bgr, complaint = self._read(index)
        height, width = bgr.shape[:2] if bgr is not None else (0, 0)
        status = (DAMAGED if complaint else READ_FAILED) if bgr is None else WRONG_SIZE \
            if not self.resize and (height, width) != (self.image_size, self.image_size) else READ_OK
        crops = []
        for size in self.sizes:
            if status != READ_OK:
                crops.append(np.zeros((3, size, size), np.uint8))
                continue
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            if rgb.shape[:2] != (size, size):
                rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
            crops.append(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        return tuple(torch.from_numpy(c) for c in crops), index, status, height, width

    def describe(self):
        """What its crops depend on (for a :class:`~utils.chunk_cache.ChunkCache` key)."""
        return dict(files=cache_key(*(file_stamp(f) for f in self.files)), image_size=self.image_size,
                    resize=self.resize, sizes=self.sizes)

    def problem(self, index, status, height, width):
        """The one-line message for an image that could not be used."""
        name = self.names[index]
        if status == DAMAGED:
            return f"cannot read image {name}: {self._read(index)[1]} (damaged file: re-save or remove it)"
        if status == READ_FAILED:
            return f"cannot read image {name} (expected a JPEG or PNG file)"
        return (f"{name} is {width}×{height} pixels, expected {self.image_size}×{self.image_size} aligned "
                f"crops (pass --resize to resize every image, or --image_size to expect another size)")


def decode_image(data):
    """``(BGR image or None, complaint)`` of an encoded image: a JPEG without its end-of-image marker, or one
    whose decoding makes libjpeg complain (its message on file descriptor 2 captured, off the screen), gives
    None and the first line of the complaint; an undecodable file None and ""."""
    from tools.pack_rec import JPEG_END, JPEG_START, native_stderr_captured

    if not data:
        return None, ""
    if data.startswith(JPEG_START) and not data.rstrip(b"\0").endswith(JPEG_END):
        return None, "truncated JPEG file (no end-of-image marker)"
    with native_stderr_captured() as (_, read):
        try:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:
            image = None
        complaint = read().strip()
    return (None, complaint.splitlines()[0]) if complaint else (image, "")


# ------------------------------------------------------------------------------------- embeddings
def build_embedders(models, networks, widths, input_sizes, device, preprocessings=None):
    """One :class:`tools.ijbc_eval.embed.Embedder` per generation (the toolkit's model runner; a
    toolkit backbone in AMP fp16 on CUDA)."""
    from tools.ijbc_eval.embed import Embedder

    preprocessings = preprocessings or [None] * len(models)
    return [Embedder(*arguments, device, p, amp=True) for *arguments, p in zip(models, networks, widths, input_sizes,
                                                                               preprocessings)]


class TimedRunner:
    """A model runner (as :class:`tools.ijbc_eval.embed.Embedder`) that adds up the seconds of its calls and
    the images they embedded: the re-extraction cost of its model."""

    def __init__(self, runner):
        self.runner, self.seconds, self.images = runner, 0.0, 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def __call__(self, images):
        start = time.perf_counter()
        out = self.runner(images)
        self.seconds += time.perf_counter() - start
        self.images += len(images)
        return out

    def seconds_per_million(self):
        """Seconds per million images embedded (None before any)."""
        return self.seconds / self.images * 1e6 if self.images else None


def embed(faceset, embedders, batch_size=128, num_workers=2, cache=None, dist_info=None):
    """``[(embs, embs_f), …]`` per embedder (float32, dataset order), all models in one pass over the
    images, over the ranks of ``dist_info`` (other ranks get None), chunks kept in ``cache``."""
    def check(batch):
        _, index, status, height, width = batch
        bad = np.flatnonzero(status.numpy() != READ_OK)
        if len(bad):
            b = bad[0]
            raise UserError(faceset.problem(int(index[b]), int(status[b]), int(height[b]), int(width[b])))

    return embed_crops(faceset, embedders, batch_size, num_workers, dist_info, cache, CHUNK_IMAGES, check)


def image_features(embs, embs_f, flip=True):
    """Image features as the IJB evaluation forms them (:data:`FEATURE_VARIANT`; without the mirror
    image for a deployed model stated ``no_flip``), float32."""
    return metrics.image_features(embs, embs_f, None, FEATURE_VARIANT if flip else FEATURE_VARIANT[:-1] + "0")


def restore(path, faceset=None):
    """``(names, labels, [(embs, embs_f), …])`` saved with ``-E``; checked against the data when given."""
    data = safe_np_load(path)
    require(hasattr(data, "files") and "generations" in data.files and "labels" in data.files,
            f"{path}: not a compat_eval result saved with -E (expected an .npz with 'generations' and 'labels')")
    with data, numpy_read_errors(path):
        names = [str(n) for n in data["generations"]]
        labels = data["labels"].astype(np.int64)
        missing = [k for i in range(len(names)) for k in (f"embs{i}", f"embs_f{i}") if k not in data.files]
        require(not missing, f"{path}: missing arrays {', '.join(missing)}")
        embeddings = [(data[f"embs{i}"], data[f"embs_f{i}"]) for i in range(len(names))]
    for i, (embs, embs_f) in enumerate(embeddings):
        require(embs.ndim == 2 and embs.shape == embs_f.shape and len(embs) == len(labels),
                f"{path}: embs{i}/embs_f{i} must be two {len(labels)}-row matrices of one shape")
    if faceset is not None:
        require(np.array_equal(labels, faceset.labels),
                f"{path}: its {len(labels)} images and labels differ from {faceset.source} (embeddings of another set?)")
    return names, labels, embeddings


# --------------------------------------------------------------------------------------- protocol
def unrank_pairs(ranks):
    """Pairs ``(i, j)``, i < j, of the ``ranks`` in the order (0,1), (0,2), (1,2), (0,3), …"""
    ranks = np.asarray(ranks, np.int64)
    j = np.floor((1 + np.sqrt(1 + 8 * ranks.astype(np.float64))) / 2).astype(np.int64)
    j -= j * (j - 1) // 2 > ranks                  # float rounding, either way
    j += (j + 1) * j // 2 <= ranks
    return ranks - j * (j - 1) // 2, j


def verification_pairs(labels, max_genuine=None, impostors=1_000_000, seed=0):
    """``(first, second, genuine)`` image pairs: all (or ``max_genuine`` sampled) genuine pairs and
    ``impostors`` sampled impostor pairs (all of them when fewer exist), sorted, deterministic for ``seed``."""
    rng = np.random.default_rng([seed, 1])
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    per_identity = sizes * (sizes - 1) // 2
    total_genuine = int(per_identity.sum())
    ranks = np.arange(total_genuine) if max_genuine is None or max_genuine >= total_genuine \
        else np.sort(rng.choice(total_genuine, max_genuine, replace=False))
    identity = np.searchsorted(np.cumsum(per_identity), ranks, "right")
    i, j = unrank_pairs(ranks - (np.cumsum(per_identity) - per_identity)[identity])
    genuine = np.stack([order[starts[identity] + i], order[starts[identity] + j]], 1)

    total = len(labels) * (len(labels) - 1) // 2
    wanted = min(impostors, total - total_genuine)
    draw = np.arange(total) if wanted >= total - total_genuine else \
        np.sort(rng.choice(total, min(total, int(wanted * total / (total - total_genuine) * 1.2) + 1000),
                           replace=False))
    a, b = unrank_pairs(draw)
    different = labels[a] != labels[b]
    keep = np.flatnonzero(different)
    if len(keep) > wanted:
        keep = np.sort(rng.choice(keep, wanted, replace=False))
    impostor = np.stack([a[keep], b[keep]], 1)
    pairs = np.concatenate([np.sort(genuine, 1), impostor])
    return pairs[:, 0], pairs[:, 1], np.r_[np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]


def identification_split(labels, gallery_per_id=1, nonmated_share=0.1, seed=0):
    """``(gallery image mask, probe image mask, mated identities)`` of the open-set 1:N protocol.

    A share ``nonmated_share`` of the identities (at least one) is held out of the gallery: all
    their images are non-mated probes. Every other identity enrols ``gallery_per_id`` random images
    (one gallery template); its other images are mated probes.
    """
    rng = np.random.default_rng([seed, 2])
    labels = np.asarray(labels)
    identities = np.unique(labels)
    held_out = max(1, int(round(nonmated_share * len(identities)))) if nonmated_share > 0 else 0
    require(held_out < len(identities), f"--nonmated_share {nonmated_share} leaves no identity for the gallery")
    mated_identities = np.sort(rng.permutation(identities)[held_out:])
    in_gallery_identity = np.isin(labels, mated_identities)
    order = np.lexsort((rng.random(len(labels)), labels))         # random order inside each identity
    place = np.empty(len(labels), np.int64)
    _, starts = np.unique(labels[order], return_index=True)
    place[order] = np.arange(len(labels)) - np.repeat(starts, np.diff(np.r_[starts, len(labels)]))
    gallery = in_gallery_identity & (place < gallery_per_id)
    return gallery, ~gallery, mated_identities
