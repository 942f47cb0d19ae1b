"""The embedding loop: a model over every image of a dataset, in chunks, on one or several ranks.

Used by step 2 (old features, ``tools/get_feature``) and UniBCT's re-embedding of the training set.
"""
import contextlib

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from utils.chunk_cache import CHUNK_ROWS, chunk_ranges, regroup, span_rows
from utils.dataset import batch_loader, to_model_input
from utils.distributed import comm_device
from utils.errors import UserError


def _loader(dataset, indices, batch_size, num_workers, pin_memory):
    if hasattr(dataset, "get_batch"):  # MXFaceDataset decodes whole batches at once
        return batch_loader(dataset, indices, batch_size, num_workers, pin_memory)
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers,
                      pin_memory=pin_memory)


def _pending(cache, num_chunks, dist_info):
    """Chunks still to embed: rank 0 asks the cache, every rank gets the same list."""
    todo = np.ones(num_chunks, np.uint8)
    if cache is not None and dist_info.rank == 0:
        todo = np.isin(np.arange(num_chunks), cache.pending()).astype(np.uint8)
    if dist_info.world_size > 1:
        mask = torch.from_numpy(todo).to(comm_device(dist_info))
        dist.broadcast(mask, 0)
        todo = mask.cpu().numpy()
    return np.flatnonzero(todo).tolist()


@torch.no_grad()
def embed_dataset(model, dataset, batch_size, dist_info, num_workers=2, amp=True, desc="embedding", cache=None,
                  chunk_rows=CHUNK_ROWS, require_finite=None):
    """Embed every item of ``dataset`` (``(image, label, index)`` items) with ``model`` in eval mode.

    Images may be float model input or uint8 (normalised on the device by ``to_model_input``).

    Rows go in chunks of consecutive dataset positions, dealt round-robin to the ranks; after each
    round rank 0 receives that round's chunks (each row checked to arrive exactly once, in order).
    Without ``cache`` rank 0 returns one float32 N×d array in dataset order. With a
    :class:`~utils.chunk_cache.ChunkCache` rank 0 saves each chunk as ``embedding`` on arrival, and
    chunks saved by an earlier run are not embedded again; rank 0 returns the cache (all chunks
    saved). Other ranks return None. ``require_finite`` (a description of the model and data, or
    None): a row with NaN/inf stops the run with a UserError starting with it, before its chunk is
    kept. AMP (fp16) is used on CUDA when ``amp``. A DDP-wrapped model is unwrapped (its forward
    would synchronise ranks that may run different numbers of batches).
    """
    if batch_size < 1 or num_workers < 0:
        raise UserError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    spans = cache.ranges if cache is not None else chunk_ranges(len(dataset), chunk_rows)
    pending = _pending(cache, len(spans), dist_info)
    mine = pending[rank::world]
    use_amp = amp and device.type == "cuda"
    if isinstance(model, DistributedDataParallel):
        model = model.module
    was_training = model.training
    model.eval()

    def embed(images):
        with torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext():
            return model(to_model_input(images.to(device, non_blocking=True))).float().cpu().numpy()

    dim = embed(dataset[0][0][None]).shape[1] if len(dataset) else 0
    loader = _loader(dataset, span_rows(spans[k] for k in mine), batch_size, num_workers, device.type == "cuda")
    progress = tqdm(loader, desc=desc, disable=not dist_info.is_main, mininterval=5)
    chunks = regroup(((index, {"embedding": embed(images)}) for images, _, index in progress),
                     [spans[k] for k in mine])
    out = np.empty((len(dataset), dim), np.float32) if cache is None and rank == 0 else None
    longest = max((stop - start for start, stop in spans), default=0)
    for _ in range((len(pending) + world - 1) // world):
        item = next(chunks, None)
        local = (mine[item[0]], item[1]["embedding"]) if item else None
        for k, rows in _gather_chunk(local, longest, dim, dist_info):
            start, stop = spans[k]
            bad = np.flatnonzero(~np.isfinite(rows).all(axis=1)) if require_finite else ()
            if len(bad):
                raise UserError(f"{require_finite}: row {start + int(bad[0])} contains NaN or inf")
            if out is not None:
                out[start:stop] = rows
            elif rank == 0:
                cache.save(k, embedding=rows)
    next(chunks, None)  # lets the loader finish and regroup check that every row came
    model.train(was_training)
    if rank != 0:
        return None
    return out if cache is None else cache


def _gather_chunk(local, chunk_rows, dim, dist_info):
    """``[(chunk id, rows), …]`` of this round from every rank, on rank 0 (``[]`` elsewhere)."""
    if dist_info.world_size == 1:
        return [local] if local is not None else []
    comm = comm_device(dist_info)
    block = torch.zeros((chunk_rows, dim), dtype=torch.float32, device=comm)
    header = torch.tensor([-1, 0], dtype=torch.int64, device=comm)
    if local is not None:
        block[:len(local[1])] = torch.from_numpy(np.ascontiguousarray(local[1])).to(comm)
        header[0], header[1] = local[0], len(local[1])
    rank0 = dist_info.rank == 0
    blocks = [torch.empty_like(block) for _ in range(dist_info.world_size)] if rank0 else None
    headers = [torch.empty_like(header) for _ in range(dist_info.world_size)] if rank0 else None
    dist.gather(block, blocks, dst=0)
    dist.gather(header, headers, dst=0)
    if not rank0:
        return []
    return [(int(h[0]), b[:int(h[1])].cpu().numpy()) for h, b in zip(headers, blocks) if int(h[0]) >= 0]
