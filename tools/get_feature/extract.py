"""Step 2 of the pipeline: embed the new training split with the old model (``get_feature.py``).

Also run by ``get_avg_feature.py <config> --SD …`` when the feature files are missing. torch and
the model code are imported when an extraction runs, so the options can be added to a parser
without them (steps 3 and 4 start fast).
"""
import os

import numpy as np

from utils.chunk_cache import CHUNK_ROWS
from utils.config import add_launcher_args
from utils.deployed import add_preprocess_arg, load_model, model_kind, parse_preprocessing
from utils.errors import UserError, require
from utils.io import atomic_np_save
from utils.old_features import sd_rec
from utils.scenarios import feature_path, parse_sd


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
    parser.add_argument("--model", default=None, metavar="FILE",
                        help="a deployed old model (ONNX or TorchScript) instead of the config's model.pt")
    parser.add_argument("--input_size", type=int, default=None,
                        help="input size of --model (default: the config's input_size, else 112)")
    add_preprocess_arg(parser, what="--model")
    return add_launcher_args(parser)


def extract_from_args(cfg, args):
    """:func:`extract_features` with the options of :func:`add_sd_args` and :func:`add_extract_args`."""
    require(cfg is not None or (args.model and args.dataset),
            "give the old model's config, or a deployed model with --model FILE and the data with --dataset")
    return extract_features(cfg, args.SD, args.dataset, args.output, args.batch_size, args.num_workers,
                            args.local_rank, args.cache_dir, args.chunk_size, args.model, args.input_size,
                            parse_preprocessing(args.preprocess) if args.model else None, args.dist_timeout_minutes)


def extract_features(cfg, sd, rec=None, output=None, batch_size=256, num_workers=None, local_rank=None,
                     cache_dir=None, chunk_size=CHUNK_ROWS, model_file=None, input_size=None, preprocessing=None,
                     timeout_minutes=None):
    """Step 2: embed the SD's split with the config's old model (``<cfg.output>/model.pt``), or with a
    deployed model (``model_file``: ONNX or TorchScript, fed as ``preprocessing`` says, :mod:`utils.deployed`).

    Works single-process and under torchrun / torch.distributed.launch (chunks are dealt to the
    ranks). Finished chunks are kept in a :class:`~utils.chunk_cache.ChunkCache` under
    ``cache_dir``, so an interrupted run resumes where it stopped. Rank 0 then writes
    ``<SD>_feature.npy`` (raw float32 embeddings; with ``preprocessing.flip_sum`` each plus its
    mirror image's) and ``<SD>_label.npy`` (int64) in dataset order, removes the cache and returns
    their paths; other ranks return None. ``cfg`` may be None with a deployed model and ``rec``.
    """
    import torch

    from backbones import load_backbone
    from utils.chunk_cache import ChunkCache, file_stamp
    from utils.dataset import MXFaceDataset
    from utils.distributed import fail_together, process_group
    from utils.embedding import ModelRunner, embed_dataset
    from utils.trainer import AMP_DTYPES

    dim, _ = parse_sd(sd)
    input_size = input_size or (cfg.input_size if cfg is not None else 112)
    deployed = preprocessing is not None
    rec = os.path.abspath(rec) if rec else sd_rec(cfg.rec, sd)
    paths = feature_path(sd, "feature", output), feature_path(sd, "label", output)
    device = cfg.get("device") if cfg is not None else None
    with process_group(local_rank, device, timeout_minutes) as dist_info:
        with fail_together():   # a file missing on one node's disk stops every process at once
            if model_file is None:
                model_file = os.path.join(cfg.output, "model.pt")
                if not os.path.isfile(model_file):
                    raise UserError(f"old model not found: {model_file} (train it first: train_old_softmax.py "
                                    f"or train_old_arc.py {cfg.config_path})")
            if deployed:
                model = load_model(model_file, input_size, dist_info.device)
                runner = ModelRunner(model, dist_info.device, amp=False, flip=preprocessing.flip_sum,
                                     preprocessing=preprocessing)
                described = dict(runtime=model_kind(model_file), preprocessing=preprocessing.describe())
            else:
                runner = model = load_backbone(model_file, cfg.network, cfg.network_width, input_size,
                                               dist_info.device)
                described = dict(network=cfg.network, width=cfg.network_width)
            size = int(ModelRunner(model, dist_info.device, amp=False)(
                torch.zeros(2, 3, input_size, input_size, dtype=torch.uint8))[0].shape[1])
            if dim is not None and size != dim:
                raise UserError(f"{model_file} makes {size}-d embeddings but --SD {sd} says f{dim}")
            dataset = MXFaceDataset(rec, train=False, input_size=input_size, uint8=True)
        amp = cfg is not None and cfg.fp16 and not deployed and dist_info.device.type == "cuda"
        amp_dtype = AMP_DTYPES[cfg.get("amp_dtype", "float16")] if amp else None
        precision = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[amp_dtype]
        inputs = dict(model=file_stamp(model_file), rec=file_stamp(dataset.rec_path),
                      idx=file_stamp(dataset.idx_path), **described, input_size=input_size, precision=precision)
        cache = ChunkCache(f"get_feature/{sd}", inputs, len(dataset), chunk_size, cache_dir)
        workers = (cfg.num_workers if cfg is not None else 2) if num_workers is None else num_workers
        embed_dataset(runner, dataset, batch_size, dist_info, workers, amp=amp, amp_dtype=amp_dtype or torch.float16,
                      desc=f"embedding {os.path.basename(dataset.rec_path)}", cache=cache,
                      require_finite=f"old model {model_file} on {dataset.rec_path}")
        if not dist_info.is_main:
            return None
        cache.write_npy(paths[0], "embedding")
        atomic_np_save(paths[1], dataset.labels.astype(np.int64))
        cache.clear()
        return paths
