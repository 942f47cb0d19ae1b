"""Old-feature files (steps 2–4): their names, the split an SD refers to, and embedding a dataset.

``SD`` ("scenario detail") names one set of old features, ``<name>_<split>``, by convention
``f<d>_<old backbone>_<old loss>_<split>`` (e.g. ``f128_r18_softmax_class70``). Files live in
``feature_save/<scenario>/`` under the repository root (or a folder the user gives), named
``<SD>_<kind>.npy``:

=========================  ============================  ======================================
kind                       file                          content
=========================  ============================  ======================================
``feature``                ``<SD>_feature.npy``          N×d float32 raw old embeddings, dataset order
``label``                  ``<SD>_label.npy``            N int64 labels, dataset order
``avg_feature``            ``<SD>_avg_feature.npy``      C×d float32 class prototypes, row c = class c
``credible_ratio_<100T>``  ``<SD>_credible_ratio_<100T>_feature.npy``  N uint8 0/1 denoising mask
=========================  ============================  ======================================
"""
import contextlib
import os
import re

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from backbones import load_backbone
from utils.chunk_cache import ChunkCache, chunk_ranges, file_stamp, regroup, span_rows
from utils.config import ROOT
from utils.dataset import MXFaceDataset, batch_loader, to_model_input
from utils.distributed import add_launcher_args, cleanup, init_distributed
from utils.errors import UserError
from utils.io import atomic_np_save, safe_np_load

FEATURE_ROOT = os.path.join(ROOT, "feature_save")
SCENARIOS = {"class70": "OPclass", "class30": "OPclass", "data70": "OPdata", "data30": "OPdata",
             "class100": "EXclass", "data100": "EXdata"}
SPLITS = {"class70": "train_part_70_class", "class30": "train_part_30_class",
          "data70": "train_part_70_data", "data30": "train_part_30_data",
          "class100": "train", "data100": "train"}
_KIND = re.compile(r"(feature|label|avg_feature|credible_ratio_\d+)")
CHUNK_ROWS = 16384        # rows per chunk: the unit of gathering to rank 0 and of resuming


def parse_sd(sd):
    """``(embedding size or None, split suffix)`` of an SD: ``<any name>_<split>`` as the published tools
    take it (``f128_r18_softmax_class70``, ``myrun_class70``); the size is read from an ``f<d>`` first part."""
    parts = str(sd).split("_")
    if len(parts) < 2 or parts[-1] not in SCENARIOS or not all(re.fullmatch(r"[A-Za-z0-9.\-]+", p) for p in parts):
        raise UserError(f"--SD '{sd}': expected <name>_<split> with split one of {', '.join(SCENARIOS)} and a "
                        f"name of letters, digits, '.', '-', '_' (e.g. f128_r18_softmax_class70)")
    return (int(parts[0][1:]) if re.fullmatch(r"f[1-9]\d*", parts[0]) else None), parts[-1]


def scenario_of(sd):
    """``OPclass``/``OPdata``/``EXclass``/``EXdata`` from the SD's split suffix."""
    return SCENARIOS[parse_sd(sd)[1]]


def split_rec(rec, sd):
    """The rec prefix of the split an SD names, beside ``rec`` (a prefix or a folder holding train.rec).

    ``class70`` → ``<dir>/train_part_70_class`` …; ``class100``/``data100`` → ``<dir>/train``.
    """
    if not rec:
        raise UserError("the config sets no `rec`; give the data with --dataset")
    folder = rec if os.path.isdir(rec) else os.path.dirname(rec)
    return os.path.join(folder, SPLITS[parse_sd(sd)[1]])


def credible_kind(T):
    """File kind of the denoising mask of ratio ``T``: ``credible_ratio_<round(100·T)>``."""
    return f"credible_ratio_{int(round(100 * float(T)))}"


def feature_path(sd, kind, root=None):
    """Path of an SD's ``kind`` file in folder ``root`` (default ``<repo>/feature_save/<scenario>``)."""
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise UserError(f"unknown feature file kind {kind!r} (feature, label, avg_feature, credible_ratio_<100T>)")
    folder = os.path.abspath(root) if root else os.path.join(FEATURE_ROOT, scenario_of(sd))
    suffix = "_feature" if kind.startswith("credible_ratio_") else ""
    return os.path.join(folder, f"{sd}_{kind}{suffix}.npy")


@contextlib.contextmanager
def about_file(path):
    """Prefix a :class:`UserError` raised inside with the file it concerns."""
    try:
        yield
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def load_features(sd, root=None):
    """The SD's features (read-only memory map) and labels, checked to be N×d float and N integers."""
    feature_file, label_file = feature_path(sd, "feature", root), feature_path(sd, "label", root)
    for path in (feature_file, label_file):
        if not os.path.isfile(path):
            raise UserError(f"feature file not found: {path} (extract it first: tools/get_feature/get_feature.py "
                            f"<old config> --SD {sd})")
    features = safe_np_load(feature_file, mmap_mode="r")
    labels = safe_np_load(label_file)
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise UserError(f"{feature_file}: expected an N×d float array, got {features.dtype} of shape {features.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{label_file}: expected N integer labels, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != len(features):
        raise UserError(f"{feature_file} has {len(features)} rows but {label_file} has {len(labels)} labels")
    return features, labels


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
        mask = torch.from_numpy(todo).to(_comm_device(dist_info))
        dist.broadcast(mask, 0)
        todo = mask.cpu().numpy()
    return np.flatnonzero(todo).tolist()


def _comm_device(dist_info):
    return dist_info.device if dist.get_backend() == "nccl" else torch.device("cpu")


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
    comm = _comm_device(dist_info)
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


def add_sd_args(parser):
    """``--SD`` (required) and ``--output`` (folder of the feature files)."""
    parser.add_argument("--SD", required=True,
                        help="scenario detail <name>_<split>, e.g. f128_r18_softmax_class70")
    parser.add_argument("--output", default=None,
                        help="folder of the feature files (default: feature_save/<scenario> in the repository)")
    return parser


def add_extract_args(parser):
    """Options of the extraction (step 2): data override, batch size, loader workers, cache, launcher."""
    parser.add_argument("--dataset", default=None,
                        help="rec prefix or folder to embed (default: the SD's split beside the config's rec)")
    parser.add_argument("--batch_size", type=int, default=256, help="images per forward pass and process")
    parser.add_argument("--num_workers", type=int, default=None, help="loader workers (default: the config's)")
    parser.add_argument("--cache_dir", default=None,
                        help="where finished chunks are kept so a rerun resumes (default: $BCT_CACHE_DIR or "
                             "work_dirs/cache)")
    parser.add_argument("--chunk_size", type=int, default=CHUNK_ROWS,
                        help=f"images per saved chunk (default {CHUNK_ROWS})")
    return add_launcher_args(parser)


def extract_from_args(cfg, args):
    """:func:`extract_features` with the options of :func:`add_sd_args` and :func:`add_extract_args`."""
    return extract_features(cfg, args.SD, args.dataset, args.output, args.batch_size, args.num_workers,
                            args.local_rank, args.cache_dir, args.chunk_size)


def _embedding_size(model, input_size, device):
    with torch.no_grad():
        return int(model(torch.zeros(2, 3, input_size, input_size, device=device)).shape[1])


def extract_features(cfg, sd, rec=None, output=None, batch_size=256, num_workers=None, local_rank=None,
                     cache_dir=None, chunk_size=CHUNK_ROWS):
    """Step 2: embed the SD's split with the config's old model (``<cfg.output>/model.pt``).

    Works single-process and under torchrun / torch.distributed.launch (chunks are dealt to the
    ranks). Finished chunks are kept in a :class:`~utils.chunk_cache.ChunkCache` under
    ``cache_dir``, so an interrupted run resumes where it stopped. Rank 0 then writes
    ``<SD>_feature.npy`` (raw float32 embeddings) and ``<SD>_label.npy`` (int64) in dataset order,
    removes the cache and returns their paths; other ranks return None.
    """
    dim, _ = parse_sd(sd)
    model_file = os.path.join(cfg.output, "model.pt")
    if not os.path.isfile(model_file):
        raise UserError(f"old model not found: {model_file} (train it first: train_old_softmax.py or "
                        f"train_old_arc.py {cfg.config_path})")
    rec = os.path.abspath(rec) if rec else split_rec(cfg.rec, sd)
    paths = feature_path(sd, "feature", output), feature_path(sd, "label", output)
    dist_info = init_distributed(local_rank, cfg.get("device"))
    try:
        model = load_backbone(model_file, cfg.network, cfg.network_width, cfg.input_size, dist_info.device)
        size = _embedding_size(model, cfg.input_size, dist_info.device)
        if dim is not None and size != dim:
            raise UserError(f"{model_file} makes {size}-d embeddings but --SD {sd} says f{dim}")
        dataset = MXFaceDataset(rec, train=False, input_size=cfg.input_size, uint8=True)
        precision = "fp16" if cfg.fp16 and dist_info.device.type == "cuda" else "fp32"
        inputs = dict(model=file_stamp(model_file), rec=file_stamp(dataset.rec_path),
                      idx=file_stamp(dataset.idx_path), network=cfg.network, width=cfg.network_width,
                      input_size=cfg.input_size, precision=precision)
        cache = ChunkCache(f"get_feature/{sd}", inputs, len(dataset), chunk_size, cache_dir)
        workers = cfg.num_workers if num_workers is None else num_workers
        embed_dataset(model, dataset, batch_size, dist_info, workers, amp=cfg.fp16,
                      desc=f"embedding {os.path.basename(dataset.rec_path)}", cache=cache,
                      require_finite=f"old model {model_file} on {dataset.rec_path}")
        if not dist_info.is_main:
            return None
        cache.write_npy(paths[0], "embedding")
        atomic_np_save(paths[1], dataset.labels.astype(np.int64))
        cache.clear()
        return paths
    finally:
        cleanup()
