"""The one training loop shared by the old-model scripts and every BCT method.

A training script is a :class:`Method` (the loss hook) plus :func:`main`. The loop owns devices,
AMP, DDP, gradient clipping, the learning-rate schedule, logging, checkpoints, preemption and
exact resume; a method only says how the loss is computed from the batch's new embeddings.
"""
import argparse
import dataclasses
import os
import random
import signal
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from backbones import build_backbone
from losses import CombinedMarginLoss, PartialFC
from utils.checkpoint import CheckpointManager
from utils.config import get_config
from utils.dataset import MXFaceDataset, build_loader, check_data_config, to_model_input
from utils.distributed import DistInfo, add_launcher_args, cleanup, init_distributed
from utils.errors import UserError, require, run_cli
from utils.io import atomic_torch_save
from utils.logging_utils import SpeedLogger, setup_logger
from utils.schedule import lr_multiplier


@dataclasses.dataclass
class TrainContext:
    """What a method hook may look at: config, process info, models, data and progress."""
    cfg: Any
    dist: DistInfo
    backbone: torch.nn.Module          # the training backbone (DDP-wrapped when several processes run)
    classifier: PartialFC
    dataset: MXFaceDataset
    steps_per_epoch: int
    total_steps: int
    logger: Any
    epoch: int = 0
    global_step: int = 0

    @property
    def device(self):
        return self.dist.device

    @property
    def progress(self):
        """Fraction of the schedule done, in [0, 1]."""
        return self.global_step / max(self.total_steps, 1)


class Method:
    """The loss hook. The base class is plain classification (ArcFace or softmax through Partial FC).

    Subclasses override :meth:`compute_loss` and, when they need them, :meth:`setup`
    (load old features, build modules), :meth:`extra_modules` (trainable modules: optimised,
    gradient-averaged over ranks, checkpointed), :meth:`on_epoch_start` and
    :meth:`state_dict`/:meth:`load_state_dict` (non-parameter state such as queues).
    """

    name = "independent"

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self, ctx: TrainContext):
        pass

    def extra_modules(self):
        return {}

    def clipped_with_backbone(self):
        """Parameters of the extra modules clipped to one gradient norm together with the backbone."""
        return []

    def on_epoch_start(self, epoch, ctx: TrainContext):
        pass

    def compute_loss(self, embeddings, labels, indices, ctx: TrainContext):
        """Return ``(loss, {part: value})`` for one batch; ``embeddings`` are fp32, un-normalised."""
        loss = ctx.classifier(embeddings, labels)
        return loss, {"cls": loss.detach()}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it after each step (agreed over all ranks)."""

    def __init__(self):
        self.raised = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached": float(np_state[4])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _build_optimizer(cfg, param_groups):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UserError(f"config {cfg.config_path}: optimizer '{cfg.optimizer}' is not supported (expected sgd or adamw)")


def _check_config(cfg):
    require(cfg.rec, f"config {cfg.config_path}: `rec` (training data) is not set")
    require(not cfg.dali, f"config {cfg.config_path}: dali=True is not supported; use the built-in loader (dali=False)")
    require(not cfg.val_targets, f"config {cfg.config_path}: val_targets (.bin verification) is not supported; "
                                 "leave it empty and evaluate with tools/ijbc_eval/ijbc_eval.py")
    require(cfg.lr_schedule in ("poly", "step"), f"config {cfg.config_path}: lr_schedule must be poly or step, got '{cfg.lr_schedule}'")
    require(cfg.batch_size > 0 and cfg.num_epoch > 0, f"config {cfg.config_path}: batch_size and num_epoch must be positive")
    require(0 < cfg.sample_rate <= 1, f"config {cfg.config_path}: sample_rate must be in (0, 1], got {cfg.sample_rate}")


def train(cfg, method: Method, classifier="arcface", local_rank=None, resume=False):
    """Train ``method`` with config ``cfg``; writes ``<output>/model.pt`` (backbone state_dict)."""
    _check_config(cfg)
    info = init_distributed(local_rank, cfg.device)
    device, rank, world = info.device, info.rank, info.world_size
    cfg.output = os.path.abspath(cfg.output)
    _seed_everything(cfg.seed + rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    amp = device.type == "cuda" and bool(cfg.fp16)

    dataset = MXFaceDataset(cfg.rec, train=True, input_size=cfg.input_size, seed=cfg.seed, uint8=True)
    check_data_config(cfg, dataset)
    steps_per_epoch = len(dataset) // (cfg.batch_size * world)
    require(steps_per_epoch > 0, f"{cfg.rec}: {len(dataset)} images are fewer than one global batch "
                                 f"({cfg.batch_size} x {world} processes)")
    total_steps = steps_per_epoch * cfg.num_epoch
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    backbone = build_backbone(cfg).to(device)
    logger = setup_logger(cfg.output, rank)
    ddp_backbone = backbone
    if world > 1:
        with warnings.catch_warnings():  # newer torch renames broadcast_buffers; the behaviour is the same
            warnings.simplefilter("ignore", FutureWarning)
            ddp_backbone = DistributedDataParallel(backbone, device_ids=[device.index] if device.type == "cuda" else None,
                                                   broadcast_buffers=False, bucket_cap_mb=16)
    margin = CombinedMarginLoss(cfg.scale, *cfg.margin_list, cfg.interclass_filtering_threshold) \
        if classifier == "arcface" else None
    pfc = PartialFC(margin, cfg.embedding_size, cfg.num_classes, cfg.sample_rate).to(device)
    ctx = TrainContext(cfg, info, ddp_backbone, pfc, dataset, steps_per_epoch, total_steps, logger)
    method.setup(ctx)
    extra = method.extra_modules()
    for module in extra.values():
        module.to(device)
        for param in module.parameters():
            dist.broadcast(param.data, 0)
    extra_params = [p for m in extra.values() for p in m.parameters() if p.requires_grad]
    clipped_params = [*backbone.parameters(), *method.clipped_with_backbone()]

    param_groups = [{"params": [p for p in backbone.parameters() if p.requires_grad]},
                    {"params": list(pfc.parameters())}]
    if extra_params:
        param_groups.append({"params": extra_params})
    optimizer = _build_optimizer(cfg, param_groups)
    warmup_steps = steps_per_epoch * cfg.warmup_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(
        step, total_steps, warmup_steps, cfg.lr_schedule, cfg.lr_power, steps_per_epoch, cfg.lr_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    checkpoints = CheckpointManager(cfg.output, rank, world, cfg.keep_checkpoints, log=logger.warning)
    start_epoch, start_batch, global_step, rng = 0, 0, 0, None
    if resume or cfg.resume:
        state = checkpoints.load_latest()
        if state is None:
            logger.info(f"resume requested but no checkpoint under {checkpoints.folder}: starting from scratch")
        else:
            backbone.load_state_dict(state["backbone"])
            pfc.load_state_dict(state["classifier"])
            for name, module in extra.items():
                module.load_state_dict(state["extra"][name])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            method.load_state_dict(state["method"])
            start_epoch, start_batch, global_step = state["epoch"], state["batch"], state["global_step"]
            rng = state["rng"]
            logger.info(f"resumed from step {global_step} (epoch {start_epoch}, batch {start_batch})")

    def save_checkpoint(epoch, batch):
        checkpoints.save(global_step, {
            "backbone": backbone.state_dict(), "classifier": pfc.state_dict(),
            "extra": {name: module.state_dict() for name, module in extra.items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "method": method.state_dict(), "rng": _rng_state(),
            "epoch": epoch, "batch": batch, "global_step": global_step})

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=os.path.join(cfg.output, "tensorboard"))
        logger.info(f"config {cfg.config_path}: {len(dataset)} images, {cfg.num_classes} classes, "
                    f"{world} process(es) on {device}, {steps_per_epoch} steps/epoch, {total_steps} steps, "
                    f"method {method.name}")
    speed = SpeedLogger(cfg.frequent, total_steps, cfg.batch_size * world, logger, writer)

    stopped = False
    ddp_backbone.train()
    pfc.train()
    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.num_epoch):
            if global_step >= last_step:
                break
            ctx.epoch = epoch
            first_batch = start_batch if epoch == start_epoch else 0
            if first_batch == 0:
                if rng is not None:
                    _set_rng_state(rng)
                method.on_epoch_start(epoch, ctx)
                ddp_backbone.train()
            dataset.set_epoch(epoch)
            batches = iter(build_loader(dataset, cfg.batch_size, info, cfg.seed, cfg.num_workers,
                                        shuffle=True, drop_last=True, start_batch=first_batch))
            if first_batch and rng is not None:
                _set_rng_state(rng)  # after the loader drew its seed, as the uninterrupted run did
            rng = None
            batch = first_batch
            for images, labels, indices in batches:
                images = to_model_input(images.to(device, non_blocking=True))
                labels = labels.to(device, non_blocking=True)
                indices = indices.to(device, non_blocking=True)
                ctx.global_step = global_step
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    embeddings = ddp_backbone(images)
                loss, parts = method.compute_loss(embeddings.float(), labels, indices, ctx)
                optimizer_step(loss, optimizer, scaler, clipped_params, cfg.clip_grad, extra_params, world)
                scheduler.step()
                global_step += 1
                batch += 1
                parts = {"loss": loss.detach(), **parts}
                if rank == 0:
                    speed(global_step, epoch, {k: v.item() if torch.is_tensor(v) else v for k, v in parts.items()},
                          scheduler.get_last_lr()[0], scaler.get_scale() if amp else None)
                if cfg.save_every_steps and global_step % cfg.save_every_steps == 0 and batch < steps_per_epoch:
                    save_checkpoint(epoch, batch)
                if _any_rank(stop.raised, device) or global_step >= last_step:
                    stopped = stop.raised
                    break
            if stopped or batch < steps_per_epoch:
                save_checkpoint(epoch, batch)
                break
            save_checkpoint(epoch + 1, 0)
    if stopped:
        logger.info(f"stopped by signal at step {global_step}; checkpoint saved in {checkpoints.folder}. "
                    f"Resume with the same command plus --resume (or resume = True in the config).")
    elif rank == 0:
        atomic_torch_save(backbone.state_dict(), os.path.join(cfg.output, "model.pt"))
        logger.info(f"saved {os.path.join(cfg.output, 'model.pt')} after {global_step} steps")
    if writer is not None:
        writer.close()
    dist.barrier()
    return os.path.join(cfg.output, "model.pt")


def _any_rank(flag, device):
    """True on every rank if ``flag`` is true on any rank."""
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32,
                          device=device if dist.get_backend() == "nccl" else "cpu")
    if dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def optimizer_step(loss, optimizer, scaler, clipped_params, clip_grad=5.0, replicated_params=(), world_size=1):
    """Backward of ``loss`` and one optimiser step through the AMP ``scaler``.

    Gradients of ``replicated_params`` (method modules outside DDP) are averaged over the
    processes, those of ``clipped_params`` (the backbone) clipped to norm ``clip_grad`` (0 = off).
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    _average_gradients(replicated_params, world_size)
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(clipped_params, clip_grad)
    scaler.step(optimizer)
    scaler.update()


def _average_gradients(params, world):
    """Average the gradients of replicated method modules (the backbone is handled by DDP)."""
    if world == 1:
        return
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world


def main(method_class=Method, classifier="arcface", description=None):
    """Command-line entry of every training script: ``script.py CONFIG [--resume]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", help="config module (a .py file)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    add_launcher_args(parser)
    args = parser.parse_args()

    def run():
        cfg = get_config(args.config)
        try:
            train(cfg, method_class(cfg), classifier, args.local_rank, args.resume)
        finally:
            cleanup()

    run_cli(run)
