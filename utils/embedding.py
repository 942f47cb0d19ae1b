"""Embedding images with a model: one runner and one loop, for step 2, UniBCT's re-embedding and IJB evaluation.

:class:`ModelRunner` turns a batch of images into float32 embeddings (PyTorch module or ONNX
session; input scaling by :func:`~utils.dataset.to_model_input`; AMP on CUDA; optional mirror
image). :func:`embed_rows` is the loop: the rows of a dataset in chunks of consecutive rows,
dealt round-robin to the ranks, gathered on rank 0, optionally kept in a
:class:`~utils.chunk_cache.ChunkCache` so an interrupted run resumes. :func:`embed_dataset` is
the two together for a training-style dataset.
"""
import contextlib

import cv2
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from utils.chunk_cache import CHUNK_ROWS, chunk_ranges, regroup, span_rows
from utils.dataset import PIXEL_CENTRE, PIXEL_SCALE, batch_loader, to_model_input
from utils.distributed import DistInfo, broadcast, comm_device, fail_together, gather
from utils.errors import UserError


class ModelRunner:
    """A model as a function of image batches: ``runner(images) → (embeddings,)`` (float32 numpy, B×d),
    or ``(embeddings, mirror-image embeddings)`` with ``flip``.

    ``model``: a torch module (a DDP wrapper is unwrapped, as its forward would synchronise ranks
    that may run different numbers of batches; it runs in eval mode and gets its training flag
    back after each call; AMP on CUDA when ``amp``, in ``amp_dtype``, fp16 by default) or an onnxruntime
    ``InferenceSession``.
    uint8 images become ``(x − 127.5)·scale`` on the device; float images are used as they are.
    ``preprocessing`` (a :class:`utils.deployed.Preprocessing`, for a deployed model) replaces the
    centre and ``scale`` by its mean and std and may reverse the channels.
    """

    def __init__(self, model, device, amp=True, scale=PIXEL_SCALE, flip=False, preprocessing=None,
                 amp_dtype=torch.float16):
        if isinstance(model, DistributedDataParallel):
            model = model.module
        self.model, self.device, self.scale, self.flip = model, torch.device(device), scale, flip
        self.centre, self.bgr = PIXEL_CENTRE, False
        if preprocessing is not None:
            self.scale, self.centre, self.bgr = preprocessing.scale, preprocessing.centre, preprocessing.bgr
        self.onnx = not isinstance(model, torch.nn.Module)
        self.amp = amp and self.device.type == "cuda" and not self.onnx
        self.amp_dtype = amp_dtype

    @torch.no_grad()
    def __call__(self, images):
        x = to_model_input(images.to(self.device, non_blocking=True), self.scale, self.centre, self.bgr)
        if self.flip:
            x = torch.cat([x, torch.flip(x, dims=[3])])
        if self.onnx:
            out = self.model.run(None, {self.model.get_inputs()[0].name: x.cpu().numpy()})[0].astype(np.float32)
        else:
            was_training = self.model.training
            self.model.eval()
            with torch.autocast("cuda", dtype=self.amp_dtype) if self.amp else contextlib.nullcontext():
                out = self.model(x).float().cpu().numpy()
            self.model.train(was_training)
        return (out[:len(images)], out[len(images):]) if self.flip else (out,)


def _pending(cache, spans, dist_info, use=None):
    """Chunks still to embed: rank 0 asks the cache (``use`` receives the finished ones), every rank
    gets the same list."""
    todo = np.ones(len(spans), np.uint8)
    if cache is not None and dist_info.rank == 0:
        todo = np.isin(np.arange(len(spans)), cache.pending(use)).astype(np.uint8)
    if dist_info.world_size > 1:
        todo = broadcast(torch.from_numpy(todo).to(comm_device(dist_info.device))).cpu().numpy()
    return np.flatnonzero(todo).tolist()


def embed_rows(embed_batch, make_loader, num_rows, widths, dist_info, cache=None, chunk_rows=CHUNK_ROWS, keep=True,
               require_finite=None):
    """The embedding loop over rows ``0..num_rows−1`` of a dataset, on every rank of ``dist_info``.

    Rows go in chunks of consecutive rows (``cache.ranges``, else ``chunk_rows`` per chunk), dealt
    round-robin to the ranks. ``make_loader(rows)`` iterates over batches of those rows in order;
    ``embed_batch(batch)`` returns ``(row indices, {name: float32 rows × widths[name]})``. After
    each round rank 0 receives that round's chunks (each row checked to arrive exactly once, in
    order). With a :class:`~utils.chunk_cache.ChunkCache` rank 0 saves each chunk on arrival, and
    chunks saved by an earlier run are not embedded again. Rank 0 returns ``{name: num_rows ×
    width array}`` when ``keep`` (chunks of an earlier run included), else None (the chunks are in
    the cache); other ranks return None. ``require_finite`` (a description of the model and data,
    or None): a row with NaN/inf stops the run with a UserError starting with it, before its chunk
    is kept.
    """
    rank, world = dist_info.rank, dist_info.world_size
    spans = cache.ranges if cache is not None else chunk_ranges(num_rows, chunk_rows)
    out = {name: np.empty((num_rows, width), np.float32) for name, width in widths.items()} \
        if keep and rank == 0 else None

    def place(k, arrays):
        start, stop = spans[k]
        for name, array in arrays.items():
            out[name][start:stop] = array

    pending = _pending(cache, spans, dist_info, place if out is not None else None)
    mine = pending[rank::world]
    chunks = regroup((embed_batch(batch) for batch in make_loader(span_rows(spans[k] for k in mine))),
                     [spans[k] for k in mine])
    names, bounds = list(widths), np.cumsum([0, *widths.values()])
    longest = max((stop - start for start, stop in spans), default=0)
    for _ in range((len(pending) + world - 1) // world):
        item = next(chunks, None)
        local = (mine[item[0]], np.concatenate([item[1][n] for n in names], axis=1)) if item else None
        gathered = _gather_chunk(local, longest, int(bounds[-1]), dist_info)
        with fail_together():   # rank 0 checks the rows of every rank: the others must stop with it
            for k, rows in gathered:
                bad = np.flatnonzero(~np.isfinite(rows).all(axis=1)) if require_finite else ()
                if len(bad):
                    raise UserError(f"{require_finite}: row {spans[k][0] + int(bad[0])} contains NaN or inf")
                arrays = {name: rows[:, bounds[i]:bounds[i + 1]] for i, name in enumerate(names)}
                if cache is not None:
                    cache.save(k, **arrays)
                if out is not None:
                    place(k, arrays)
    next(chunks, None)  # lets the loader finish and regroup check that every row came
    return out


def _loader(dataset, indices, batch_size, num_workers, pin_memory):
    if hasattr(dataset, "get_batch"):  # MXFaceDataset decodes whole batches at once
        return batch_loader(dataset, indices, batch_size, num_workers, pin_memory)
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers,
                      pin_memory=pin_memory)


def embed_dataset(model, dataset, batch_size, dist_info, num_workers=2, amp=True, desc="embedding", cache=None,
                  chunk_rows=CHUNK_ROWS, require_finite=None, amp_dtype=torch.float16):
    """Embed every item of ``dataset`` (``(image, label, index)`` items) with ``model`` (a module or a
    :class:`ModelRunner`) on every rank: :func:`embed_rows` with one array, ``embedding``.

    Images may be float model input or uint8 (scaled on the device, as in training). Without
    ``cache`` rank 0 returns one float32 N×d array in dataset order; with a
    :class:`~utils.chunk_cache.ChunkCache` it returns the cache (all chunks saved as
    ``embedding``). Other ranks return None. AMP (``amp_dtype``, fp16 by default) is used on CUDA when ``amp``.
    A runner with ``flip`` gives each image the sum of its embedding and its mirror image's (flip-sum).
    """
    if batch_size < 1 or num_workers < 0:
        raise UserError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    runner = model if isinstance(model, ModelRunner) else ModelRunner(model, dist_info.device, amp, amp_dtype=amp_dtype)
    dim = runner(dataset[0][0][None])[0].shape[1] if len(dataset) else 0

    def make_loader(rows):
        loader = _loader(dataset, rows, batch_size, num_workers, dist_info.device.type == "cuda")
        return tqdm(loader, desc=desc, disable=not dist_info.is_main, mininterval=5)

    def embed_batch(batch):   # a runner with ``flip`` gives (embeddings, mirror-image embeddings): their sum
        outputs = runner(batch[0])
        return batch[2], {"embedding": outputs[0] if len(outputs) == 1 else outputs[0] + outputs[1]}

    out = embed_rows(embed_batch, make_loader, len(dataset),
                     {"embedding": dim}, dist_info, cache, chunk_rows, keep=cache is None,
                     require_finite=require_finite)
    if dist_info.rank != 0:
        return None
    return out["embedding"] if cache is None else cache


def embed_crops(dataset, runners, batch_size, num_workers=2, dist_info=None, cache=None, chunk_rows=CHUNK_ROWS,
                check=None):
    """``[(embs, embs_f), …]`` (float32, dataset order) of each runner, all in one pass over ``dataset``
    (:func:`embed_rows` over the ranks of ``dist_info``, default this process alone; other ranks get None).

    ``dataset[i] → (crops, i, …)``: one uint8 crop per size of ``dataset.sizes``. A runner (as
    :class:`tools.ijbc_eval.embed.Embedder`: a :class:`ModelRunner` with ``flip``, ``input_size`` and
    ``embedding_size``) embeds the crops of its input size. ``check(batch)`` raises UserError for an
    unusable image. Loader workers use one OpenCV thread.
    """
    if batch_size < 1 or num_workers < 0:
        raise UserError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    dist_info = dist_info or DistInfo(0, 0, 1, runners[0].device)
    pin_memory = any(r.device.type == "cuda" for r in runners)

    def make_loader(rows):
        loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            worker_init_fn=_one_opencv_thread, pin_memory=pin_memory)
        return tqdm(loader, desc="embedding", unit="batch", mininterval=5, disable=not dist_info.is_main)

    def embed_batch(batch):
        if check is not None:
            check(batch)
        arrays = {}
        for i, runner in enumerate(runners):
            arrays[f"embs{i}"], arrays[f"embs_f{i}"] = runner(batch[0][dataset.sizes.index(runner.input_size)])
        return batch[1].numpy(), arrays

    widths = {f"{kind}{i}": r.embedding_size for i, r in enumerate(runners) for kind in ("embs", "embs_f")}
    out = embed_rows(embed_batch, make_loader, len(dataset), widths, dist_info, cache, chunk_rows)
    return None if out is None else [(out[f"embs{i}"], out[f"embs_f{i}"]) for i in range(len(runners))]


def _one_opencv_thread(_):
    """DataLoader worker init: one OpenCV thread per worker process."""
    cv2.setNumThreads(1)


def _gather_chunk(local, chunk_rows, dim, dist_info):
    """``[(chunk id, rows), …]`` of this round from every rank, on rank 0 (``[]`` elsewhere)."""
    if dist_info.world_size == 1:
        return [local] if local is not None else []
    comm = comm_device(dist_info.device)
    block = torch.zeros((chunk_rows, dim), dtype=torch.float32, device=comm)
    header = torch.tensor([-1, 0], dtype=torch.int64, device=comm)
    if local is not None:
        block[:len(local[1])] = torch.from_numpy(np.ascontiguousarray(local[1])).to(comm)
        header[0], header[1] = local[0], len(local[1])
    blocks, headers = gather(block), gather(header)
    if dist_info.rank != 0:
        return []
    return [(int(h[0]), b[:int(h[1])].cpu().numpy()) for h, b in zip(headers, blocks) if int(h[0]) >= 0]
