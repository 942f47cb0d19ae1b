"""Training data: insightface RecordIO face datasets, a resumable distributed sampler, the loader.

``rec`` is a folder holding ``train.rec``/``train.idx`` or a path prefix ``…/name`` for
``name.rec``/``name.idx``. The class count comes from a property file ``num_classes,height,width``:
``<prefix>.property`` (e.g. ``train_part_70_class.property``), or, for the ``train`` prefix, the
folder's ``property`` file (insightface layout); without one it is ``max label + 1``.

Record 0 convention (insightface): if record 0 has flag > 0, ``label[0]`` is one past the last image
key and images are keys ``1 .. label[0]-1``; otherwise every key is an image (index order). The
class label is the scalar label or ``label[0]``.

The loader fetches whole batches: each image is decoded (OpenCV), resized to ``input_size`` with
``INTER_AREA`` when needed, flipped, and split into RGB planes. With ``uint8=True`` (training)
the planes are written straight into a uint8 batch, which is a quarter of the bytes to pin and
copy to the GPU, and :func:`to_model_input` normalises it on the device. Otherwise the planes go
to a reused uint8 array and every 32 images are normalised, ``(x/255 - 0.5)/0.5``, in one
vectorised call straight into a float32 batch. Flips depend only on (seed, epoch, index), so a
resumed run sees the same images.
"""
import os
import signal
import struct
import threading

import cv2
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from utils.errors import UserError
from utils.image_folder import IMAGE_EXTENSIONS
from utils.recordio import IR_SIZE, MXIndexedRecordIO, decode_image, unpack

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_FLAG = struct.Struct("<I")
_CHUNK = 32  # images decoded per normalisation call, so their planes are still in cache


def looks_like_image_folder(folder):
    """Whether ``folder``'s first identity-like subfolder holds an image (``ROOT/<identity>/<image>``)."""
    subfolders = sorted(e.path for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    return bool(subfolders) and any(e.name.lower().endswith(IMAGE_EXTENSIONS) for e in os.scandir(subfolders[0]))


def resolve_rec(rec):
    """``(rec_path, idx_path)`` for a folder (``train.rec``/``train.idx``) or a path prefix."""
    if not rec:
        raise UserError("training data path (rec) is not set")
    rec = os.fspath(rec)
    if os.path.isdir(rec):
        prefix = os.path.join(rec, "train")
    else:
        prefix = rec[:-4] if rec.endswith((".rec", ".idx")) else rec
    rec_path, idx_path = prefix + ".rec", prefix + ".idx"
    missing = [p for p in (rec_path, idx_path) if not os.path.isfile(p)]
    if missing and os.path.isdir(rec) and looks_like_image_folder(rec):
        raise UserError(f"training data not found: {rec} is an image folder (ROOT/<identity>/<image>), not a RecordIO "
                        f"set; pack it first (python tools/pack_rec.py {rec} OUT/train) and pass the prefix it writes")
    if missing:
        raise UserError(f"training data not found: expected {rec_path} and {idx_path} (missing {', '.join(missing)}); "
                        "rec is a folder holding train.rec/train.idx or a path prefix such as …/train_part_70_class")
    return rec_path, idx_path


def find_property(rec_path):
    """Property file of a ``.rec``: ``<prefix>.property``, or the folder's ``property`` for ``train.rec``."""
    prefix = rec_path[:-4]
    candidates = [prefix + ".property"]
    if os.path.basename(prefix) == "train":
        candidates.append(os.path.join(os.path.dirname(prefix), "property"))
    return next((p for p in candidates if os.path.isfile(p)), None)


def read_property(path):
    """``(num_classes, height, width)`` from a property file ``num_classes,height,width``."""
    with open(path) as handle:
        text = handle.read().strip()
    fields = text.split(",")
    if len(fields) != 3 or not all(f.strip().isdigit() for f in fields):
        raise UserError(f"{path}: expected 'num_classes,height,width' (three integers), got {text[:60]!r}")
    return tuple(int(f) for f in fields)


PIXEL_CENTRE, PIXEL_SCALE = 127.5, 1 / 127.5   # model input (x − 127.5)·scale: [0, 255] → [−1, 1]


def _mix(x):
    """splitmix64 finaliser on a uint64 array."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def _hash(*values):
    """uint64 hash array of integers / integer arrays, combined left to right."""
    h = np.zeros(1, np.uint64)
    for value in values:
        h = _mix(h ^ np.asarray(value, dtype=np.int64).astype(np.uint64))
    return h


def normalise(planes, out):
    """``out = (planes − 127.5)·PIXEL_SCALE`` = ``(planes/255 − 0.5)/0.5`` in one vectorised pass (uint8 →
    float32, same shape; on the CPU, where :func:`to_model_input` does it on the device)."""
    src, dst = planes.reshape(-1, planes.shape[-1]), out.reshape(-1, out.shape[-1])
    result = cv2.addWeighted(src, PIXEL_SCALE, src, 0.0, -PIXEL_CENTRE * PIXEL_SCALE, dst=dst, dtype=cv2.CV_32F)
    if result is not dst:  # OpenCV allocated instead of writing in place
        np.copyto(dst, result)
    return out


def to_model_input(images, scale=PIXEL_SCALE, centre=PIXEL_CENTRE, bgr=False):
    """A uint8 RGB batch (e.g. from ``MXFaceDataset(uint8=True)``) as the model's float input ``(x − centre)·scale``.

    The one input scaling of the toolkit: ``scale`` is ``PIXEL_SCALE`` (training, step 2: ``x/127.5 − 1``,
    equal to :func:`normalise` to float32 rounding) or ``1/128`` (IJB evaluation, as insightface); a
    deployed model may state its own (:mod:`utils.deployed`): ``centre`` and ``scale`` one value or
    one per channel, ``bgr`` to reverse the channels first. Float batches pass through unchanged.
    """
    if images.dtype != torch.uint8:
        return images
    if bgr:
        images = images.flip(1)
    if np.ndim(scale) == 0 and np.ndim(centre) == 0:
        return images.float().mul_(scale).sub_(centre * scale)
    per_channel = dict(dtype=torch.float32, device=images.device)
    return (images.float() - torch.tensor(centre, **per_channel).reshape(-1, 1, 1)) \
        * torch.tensor(scale, **per_channel).reshape(-1, 1, 1)


def flip_mask(seed, epoch, indices):
    """Horizontal-flip decisions (bool array) for dataset ``indices``: a hash of (seed, epoch, index)."""
    return (_hash(seed, epoch, indices) >> np.uint64(63)).astype(bool)


class MXFaceDataset(Dataset):
    """Face images of an insightface RecordIO set: ``ds[i] → (3×S×S float, int64 label, i)``.

    ``uint8=True``: images are 3×S×S uint8 RGB instead (normalise with :func:`to_model_input`).

    ``labels`` (int64, dataset order) are read from the record headers only; ``num_classes`` from
    the property file or ``max label + 1``; ``keys`` and ``offsets`` are the image records' keys and
    byte offsets in dataset order.
    ``train=True`` flips half of the images (deterministically per seed, epoch and index).
    """

    def __init__(self, rec, train=True, input_size=112, seed=0, uint8=False):
        self.rec_path, self.idx_path = resolve_rec(rec)
        if int(input_size) <= 0:
            raise UserError(f"input_size must be positive, got {input_size}")
        self.train, self.input_size, self.seed, self.epoch = bool(train), int(input_size), int(seed), 0
        self.uint8 = bool(uint8)
        self._planes = None
        self.record = MXIndexedRecordIO(self.idx_path, self.rec_path, "r")
        self.keys, self.offsets = self._image_records()
        raw = self.record.read_headers(self.offsets).label
        with np.errstate(invalid="ignore"):
            self.labels = raw.astype(np.int64)
        bad = np.flatnonzero(self.labels != raw)
        if bad.size:
            raise UserError(f"{self.rec_path}: image key {self.keys[bad[0]]} has label {raw[bad[0]]}, "
                            "expected an integer class id")
        self.property_path = find_property(self.rec_path)
        if self.property_path:
            self.num_classes = read_property(self.property_path)[0]
        else:
            self.num_classes = int(self.labels.max()) + 1

    def _image_records(self):
        """Keys and offsets of the image records (insightface record-0 convention)."""
        keys, note = self.record.key_array, ""
        if (keys == 0).any():
            header, _ = unpack(self.record.read_idx(0), f"{self.rec_path}: record 0")
            if header.flag > 0:
                end = int(header.label[0])
                keys = np.arange(1, max(end, 1), dtype=np.int64)
                note = f"record 0 says images are keys 1..{end - 1}, but "
        if not len(keys):
            raise UserError(f"{self.rec_path}: the dataset holds no images")
        try:
            return keys, self.record.offsets_of(keys)
        except UserError as exc:
            raise UserError(f"{self.rec_path}: {note}{exc}") from None

    def set_epoch(self, epoch):
        """Epoch used for the flips (and by :func:`build_loader` for the shuffle); set before each ``iter``."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        images, labels, _ = self.get_batch([index])
        return images[0], labels[0], int(index)

    def get_batch(self, indices, epoch=None):
        """Collated batch ``(images B×3×S×S float32 (uint8), labels int64, indices int64)`` for dataset positions;
        flipped as in ``epoch`` (default: the one :meth:`set_epoch` set)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self.keys)):
            raise IndexError(f"dataset index out of range 0..{len(self.keys) - 1}: {indices.min()}..{indices.max()}")
        epoch = self.epoch if epoch is None else epoch
        flips = flip_mask(self.seed, epoch, indices) if self.train else np.zeros(len(indices), bool)
        records = list(zip(self.keys[indices].tolist(), self.offsets[indices].tolist(), flips.tolist()))
        if self.uint8:
            images = np.empty((len(indices), 3, self.input_size, self.input_size), np.uint8)
            for image, (key, offset, flip) in zip(images, records):
                self._decode_into(key, offset, flip, [image[2], image[1], image[0]])
            return torch.from_numpy(images), torch.from_numpy(self.labels[indices]), torch.from_numpy(indices)
        images = np.empty((len(indices), 3, self.input_size, self.input_size), np.float32)
        planes, targets = self._scratch()
        for lo in range(0, len(indices), _CHUNK):
            chunk = records[lo:lo + _CHUNK]
            for target, (key, offset, flip) in zip(targets, chunk):
                self._decode_into(key, offset, flip, target)
            normalise(planes[:len(chunk)], images[lo:lo + len(chunk)])
        return torch.from_numpy(images), torch.from_numpy(self.labels[indices]), torch.from_numpy(indices)

    def _scratch(self):
        """This thread's reusable uint8 RGB planes (_CHUNK×3×S×S) and, per image, its planes in B, G, R order."""
        owner = (os.getpid(), threading.get_ident())
        if self._planes is None or self._planes[0] != owner:
            planes = np.empty((_CHUNK, 3, self.input_size, self.input_size), np.uint8)
            self._planes = (owner, planes, [[p[2], p[1], p[0]] for p in planes])
        return self._planes[1], self._planes[2]

    def __getstate__(self):
        return dict(self.__dict__, _planes=None)

    def _decode_into(self, key, offset, flip, target):
        """Decode image ``key`` into ``target`` (S×S uint8 planes for OpenCV's B, G, R), resized and flipped."""
        payload = self.record.read_at(offset, key)
        try:
            image = decode_image(memoryview(payload)[IR_SIZE + 4 * _FLAG.unpack_from(payload)[0]:], rgb=False)
        except UserError:
            raise UserError(f"{self.rec_path}: image key {key} (offset {offset}) cannot be decoded "
                            "(expected JPEG or PNG bytes after the header)") from None
        size = self.input_size
        if image.shape[0] != size or image.shape[1] != size:
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        if flip:
            image = cv2.flip(image, 1)
        cv2.split(image, target)


class _Batches(Dataset):
    """Map a list of dataset positions, or ``(epoch, positions)``, to a collated batch (the loader fetches
    whole batches). With ``arrays`` ({name: object with ``gather(indices)``}, e.g. the old features of a
    method) the batch ends with ``{name: its rows}``, read in the loader's workers."""

    def __init__(self, dataset, arrays=None):
        self.dataset, self.arrays = dataset, arrays

    def __getitem__(self, item):
        epoch, indices = item if isinstance(item, tuple) else (None, item)
        batch = self.dataset.get_batch(indices, epoch) if epoch is not None else self.dataset.get_batch(indices)
        if self.arrays is None:
            return batch
        return (*batch, {name: array.gather(batch[2]) for name, array in self.arrays.items()})


class _EpochBatches(BatchSampler):
    """Batches of a :class:`ResumableDistributedSampler`, each as ``(epoch, positions)``: the epoch travels
    with the batch, so workers that live across epochs flip as the epoch requires."""

    def __iter__(self):
        epoch = self.sampler.epoch
        for batch in super().__iter__():
            yield epoch, batch


class ResumableDistributedSampler(Sampler):
    """``DistributedSampler``'s order that can start mid-epoch.

    Shuffles with ``torch.randperm`` seeded by ``seed + epoch`` (identical to
    ``torch.utils.data.DistributedSampler``); rank r takes every W-th index from position r.
    ``drop_last`` drops the tail that does not divide over the replicas (else pads cyclically).
    ``start_batch`` skips the first ``start_batch * batch_size`` indices of this rank's share, so
    a resumed epoch continues with the next batch of the same order.
    """

    def __init__(self, dataset_size, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True,
                 batch_size=1, start_batch=0):
        if not 0 <= rank < num_replicas:
            raise UserError(f"sampler: rank {rank} is not in 0..{num_replicas - 1}")
        if batch_size <= 0:
            raise UserError(f"sampler: batch_size must be positive, got {batch_size}")
        self.dataset_size, self.num_replicas, self.rank = int(dataset_size), int(num_replicas), int(rank)
        self.shuffle, self.seed, self.drop_last, self.batch_size = bool(shuffle), int(seed), bool(drop_last), batch_size
        if self.drop_last:
            self.num_samples = self.dataset_size // self.num_replicas
        else:
            self.num_samples = -(-self.dataset_size // self.num_replicas)
        self.set_epoch(0, start_batch)

    def set_epoch(self, epoch, start_batch=0):
        """Select the epoch's order and the first batch to yield (0 = from the start)."""
        skip = int(start_batch) * self.batch_size
        if start_batch < 0 or skip > self.num_samples:
            raise UserError(f"sampler: start_batch {start_batch} is beyond this epoch's "
                            f"{self.num_samples // self.batch_size} batches of {self.batch_size}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def indices(self):
        """This rank's dataset positions for the current epoch, from ``start_batch`` on (int64 array)."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).numpy()
        else:
            order = np.arange(self.dataset_size)
        total = self.num_samples * self.num_replicas
        order = order[:total] if self.drop_last else np.resize(order, total)
        return order[self.rank:total:self.num_replicas][self.start_batch * self.batch_size:]

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self):
        return self.num_samples - self.start_batch * self.batch_size


def _init_worker(_):
    """One decoding thread per worker; SIGTERM/SIGINT sent to the whole job (Slurm, Ctrl-C) are left to the
    training process, which stops at its next step with a checkpoint (torch's workers die of them, and their
    death stops the training process with an error before it can save)."""
    cv2.setNumThreads(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(dataset, batch_size, dist_info, seed, num_workers, shuffle=True, drop_last=True, start_batch=0,
                 arrays=None, persistent=False):
    """DataLoader of ``(images, labels, indices)`` batches for this rank, for the dataset's current epoch
    (``(images, labels, indices, {name: rows})`` with ``arrays``, see :class:`_Batches`).

    Call ``dataset.set_epoch(e)`` before building it; ``start_batch`` resumes an epoch. Memory is
    pinned on CUDA. ``persistent``: the workers live across epochs; move the loader to the next epoch
    with :func:`set_loader_epoch` (the epoch reaches the workers with each batch). The workers'
    random seeds come from (seed, epoch, rank) of the epoch the loader was built in; nothing in a
    batch depends on them (flips are a hash of seed, epoch and index).
    """
    if num_workers < 0:
        raise UserError(f"num_workers must be >= 0, got {num_workers}")
    epoch = getattr(dataset, "epoch", 0)
    sampler = ResumableDistributedSampler(len(dataset), dist_info.world_size, dist_info.rank, shuffle, seed,
                                          drop_last, batch_size)
    sampler.set_epoch(epoch, start_batch)
    generator = torch.Generator()
    generator.manual_seed(int(_hash(seed, epoch, dist_info.rank)[0] >> np.uint64(1)))
    return DataLoader(_Batches(dataset, arrays), batch_size=None, sampler=_EpochBatches(sampler, batch_size, drop_last),
                      num_workers=num_workers, pin_memory=dist_info.device.type == "cuda", worker_init_fn=_init_worker,
                      generator=generator, persistent_workers=persistent and num_workers > 0)


def stop_workers(batches):
    """End the worker processes behind ``batches`` (a DataLoader iterator) now, on any exit path.

    The workers ignore SIGTERM (:func:`_init_worker`), so once a traceback keeps the iterator alive,
    Python's exit would signal them in vain and wait for them forever; those still alive after
    the iterator's own shutdown are killed.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:
        return
    shutdown()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


def set_loader_epoch(loader, epoch, start_batch=0):
    """Point a :func:`build_loader` loader at ``epoch`` from batch ``start_batch`` (before the next ``iter``)."""
    loader.sampler.sampler.set_epoch(epoch, start_batch)


def batch_loader(dataset, indices, batch_size, num_workers, pin_memory, drop_last=False):
    """DataLoader that decodes whole batches of ``indices`` (a sequence) with ``dataset.get_batch``."""
    return DataLoader(_Batches(dataset), batch_size=None, sampler=BatchSampler(indices, batch_size, drop_last),
                      num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=_init_worker)


def check_data_config(cfg, dataset):
    """Fill ``cfg.num_classes``/``cfg.num_image`` when ``None`` and check the labels against num_classes.

    A config may set more classes than the data has (classifier centres no label uses, as the
    published MixBCT and L2 OPclass configs) and another image count than the data holds
    (``num_image`` sizes the learning-rate schedule, as published); each is returned as a note to
    log. UserError when a label lies outside ``[0, num_classes)`` or num_classes is below the count
    of the data's ``property`` file.
    """
    name = f"config {cfg.get('config_path') or ''}".rstrip()
    notes = []
    count = len(dataset)
    if cfg.get("num_image") is None:
        cfg.num_image = count
    elif int(cfg.num_image) != count:
        notes.append(f"{name}: num_image = {cfg.num_image} but {dataset.rec_path} holds {count} images: the "
                     f"learning-rate schedule is sized for {cfg.num_image} images per epoch")
    if cfg.get("num_classes") is None:
        cfg.num_classes = dataset.num_classes
        source = dataset.property_path or "the largest label + 1"
    elif dataset.property_path and int(cfg.num_classes) < dataset.num_classes:
        raise UserError(f"{name}: num_classes = {cfg.num_classes} but {dataset.property_path} says "
                        f"{dataset.num_classes}")
    else:
        source = name
        if int(cfg.num_classes) > dataset.num_classes:
            notes.append(f"{name}: num_classes = {cfg.num_classes} but the data has {dataset.num_classes} classes: "
                         f"{int(cfg.num_classes) - dataset.num_classes} classifier centres get no label")
    limit = int(cfg.num_classes)
    bad = np.flatnonzero((dataset.labels < 0) | (dataset.labels >= limit))
    if bad.size:
        i = bad[0]
        raise UserError(f"{dataset.rec_path}: image key {dataset.keys[i]} has label {dataset.labels[i]}, "
                        f"outside 0..{limit - 1} (num_classes = {limit} from {source})")
    return notes
