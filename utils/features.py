"""Old-feature files (steps 2–4): their names, the split an SD refers to, and embedding a dataset.

``SD`` ("scenario detail") names one set of old features, ``f<d>_<old backbone>_<old loss>_<split>``
(e.g. ``f128_r18_softmax_class70``). Files live in ``feature_save/<scenario>/`` under the repository
root (or a folder the user gives), named ``<SD>_<kind>.npy``:

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
from utils.config import ROOT
from utils.dataset import MXFaceDataset, batch_loader
from utils.distributed import add_launcher_args, cleanup, init_distributed
from utils.errors import UserError
from utils.feature_stats import check_finite_rows
from utils.io import atomic_np_save, safe_np_load

FEATURE_ROOT = os.path.join(ROOT, "feature_save")
SCENARIOS = {"class70": "OPclass", "class30": "OPclass", "data70": "OPdata", "data30": "OPdata",
             "class100": "EXclass", "data100": "EXdata"}
SPLITS = {"class70": "train_part_70_class", "class30": "train_part_30_class",
          "data70": "train_part_70_data", "data30": "train_part_30_data",
          "class100": "train", "data100": "train"}
_KIND = re.compile(r"(feature|label|avg_feature|credible_ratio_\d+)")
GATHER_ROWS = 1 << 16     # rows per rank sent to rank 0 in one collective


def parse_sd(sd):
    """``(embedding size, split suffix)`` of an SD such as ``f128_r18_softmax_class70``."""
    parts = str(sd).split("_")
    if (len(parts) < 2 or not re.fullmatch(r"f[1-9]\d*", parts[0]) or parts[-1] not in SCENARIOS
            or not all(re.fullmatch(r"[A-Za-z0-9.\-]+", p) for p in parts)):
        raise UserError(f"--SD '{sd}': expected f<dim>_<old backbone>_<old loss>_<split> with split one of "
                        f"{', '.join(SCENARIOS)} (e.g. f128_r18_softmax_class70)")
    return int(parts[0][1:]), parts[-1]


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


def _shard(num_rows, rank, world_size):
    return num_rows * rank // world_size, num_rows * (rank + 1) // world_size


def _loader(dataset, start, stop, batch_size, num_workers, pin_memory):
    if hasattr(dataset, "get_batch"):  # MXFaceDataset decodes whole batches at once
        return batch_loader(dataset, range(start, stop), batch_size, num_workers, pin_memory)
    return DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, num_workers=num_workers,
                      pin_memory=pin_memory)


@torch.no_grad()
def embed_dataset(model, dataset, batch_size, dist_info, num_workers=2, amp=True, desc="embedding"):
    """Embed every item of ``dataset`` with ``model`` (eval mode, raw outputs).

    Each rank embeds a contiguous share; rank 0 gathers the shares and returns one float32 N×d
    array in dataset order (checked: every index exactly once); other ranks return None. Items are
    ``(image, label, index)``. AMP (fp16) is used on CUDA when ``amp``. A DDP-wrapped model is
    unwrapped (its forward would synchronise ranks that may run different numbers of batches).
    """
    if batch_size < 1 or num_workers < 0:
        raise UserError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    device = dist_info.device
    start, stop = _shard(len(dataset), dist_info.rank, dist_info.world_size)
    loader = _loader(dataset, start, stop, batch_size, num_workers, device.type == "cuda")
    use_amp = amp and device.type == "cuda"
    if isinstance(model, DistributedDataParallel):
        model = model.module
    was_training = model.training
    model.eval()
    local, local_index, filled = None, np.full(stop - start, -1, np.int64), 0
    for images, _, index in tqdm(loader, desc=desc, disable=not dist_info.is_main, mininterval=5):
        with torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext():
            embeddings = model(images.to(device, non_blocking=True)).float().cpu().numpy()
        if local is None:
            local = np.empty((stop - start, embeddings.shape[1]), np.float32)
        local[filled:filled + len(embeddings)] = embeddings
        local_index[filled:filled + len(embeddings)] = np.asarray(index, dtype=np.int64)
        filled += len(embeddings)
    model.train(was_training)
    if local is None:
        local = np.zeros((0, 0), np.float32)
    return _gather_rows(local, local_index, len(dataset), dist_info)


def _gather_rows(local, local_index, num_rows, dist_info):
    """Rows of every rank placed at their dataset indices on rank 0 (None elsewhere)."""
    if dist_info.world_size == 1:
        out, seen = local, np.bincount(local_index[local_index >= 0], minlength=num_rows)
    else:
        out, seen = _gather_blocks(local, local_index, num_rows, dist_info)
    if dist_info.rank != 0:
        return None
    bad = np.flatnonzero(seen != 1)
    if len(bad):
        raise RuntimeError(f"embedding is incomplete: dataset index {bad[0]} was embedded {seen[bad[0]]} times")
    if dist_info.world_size == 1 and (local_index != np.arange(num_rows)).any():
        out = out[np.argsort(local_index)]
    return out


def _gather_blocks(local, local_index, num_rows, dist_info):
    """Gather (rows, indices) to rank 0 in blocks of GATHER_ROWS per rank; rank 0 scatters them."""
    world, rank = dist_info.world_size, dist_info.rank
    comm = dist_info.device if dist.get_backend() == "nccl" else torch.device("cpu")
    maxima = torch.tensor([len(local), local.shape[1]], dtype=torch.int64, device=comm)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    longest, dim = int(maxima[0]), int(maxima[1])
    out = np.empty((num_rows, dim), np.float32) if rank == 0 else None
    seen = np.zeros(num_rows, np.int64) if rank == 0 else None
    for begin in range(0, longest, GATHER_ROWS):
        rows = min(GATHER_ROWS, longest - begin)
        part, where = local[begin:begin + rows], local_index[begin:begin + rows]
        block = torch.zeros((rows, dim), dtype=torch.float32, device=comm)
        ids = torch.full((rows,), -1, dtype=torch.int64, device=comm)
        block[:len(part)] = torch.from_numpy(np.ascontiguousarray(part)).to(comm)
        ids[:len(where)] = torch.from_numpy(where).to(comm)
        blocks = [torch.empty_like(block) for _ in range(world)] if rank == 0 else None
        id_lists = [torch.empty_like(ids) for _ in range(world)] if rank == 0 else None
        dist.gather(block, blocks, dst=0)
        dist.gather(ids, id_lists, dst=0)
        if rank == 0:
            for values, where in zip(blocks, id_lists):
                where = where.cpu().numpy()
                valid = where >= 0
                out[where[valid]] = values.cpu().numpy()[valid]
                seen += np.bincount(where[valid], minlength=num_rows)
    return out, seen


def add_sd_args(parser):
    """``--SD`` (required) and ``--output`` (folder of the feature files)."""
    parser.add_argument("--SD", required=True,
                        help="scenario detail f<dim>_<old backbone>_<old loss>_<split>, e.g. f128_r18_softmax_class70")
    parser.add_argument("--output", default=None,
                        help="folder of the feature files (default: feature_save/<scenario> in the repository)")
    return parser


def add_extract_args(parser):
    """Options of the extraction (step 2): data override, batch size, loader workers, launcher."""
    parser.add_argument("--dataset", default=None,
                        help="rec prefix or folder to embed (default: the SD's split beside the config's rec)")
    parser.add_argument("--batch_size", type=int, default=256, help="images per forward pass and process")
    parser.add_argument("--num_workers", type=int, default=None, help="loader workers (default: the config's)")
    return add_launcher_args(parser)


def _embedding_size(model, input_size, device):
    with torch.no_grad():
        return int(model(torch.zeros(2, 3, input_size, input_size, device=device)).shape[1])


def extract_features(cfg, sd, rec=None, output=None, batch_size=256, num_workers=None, local_rank=None):
    """Step 2: embed the SD's split with the config's old model (``<cfg.output>/model.pt``).

    Works single-process and under torchrun / torch.distributed.launch (each rank embeds a share).
    Rank 0 writes ``<SD>_feature.npy`` (raw float32 embeddings) and ``<SD>_label.npy`` (int64) in
    dataset order and returns their paths; other ranks return None.
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
        if size != dim:
            raise UserError(f"{model_file} makes {size}-d embeddings but --SD {sd} says f{dim}")
        dataset = MXFaceDataset(rec, train=False, input_size=cfg.input_size)
        workers = cfg.num_workers if num_workers is None else num_workers
        features = embed_dataset(model, dataset, batch_size, dist_info, workers, amp=cfg.fp16,
                                 desc=f"embedding {os.path.basename(dataset.rec_path)}")
        if not dist_info.is_main:
            return None
        with about_file(f"old model {model_file} on {dataset.rec_path}"):
            check_finite_rows(features)
        atomic_np_save(paths[0], features)
        atomic_np_save(paths[1], dataset.labels.astype(np.int64))
        return paths
    finally:
        cleanup()
