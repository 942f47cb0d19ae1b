"""The one training loop shared by the old-model scripts and every BCT method.

A training script is a :class:`Method` (the loss hook), the builders of its backbone and classifier,
and :func:`main`. The loop owns devices, AMP, DDP, gradient clipping, the learning-rate schedule,
logging, checkpoints, preemption and exact resume; a method only says how the loss is computed from
the batch's new embeddings. One :class:`TrainState` is what the loop advances, what a checkpoint
holds and what every method hook receives as ``ctx``. In the order a run goes: :func:`build_models`
fills it, then :func:`train_one_epoch` per epoch inside :func:`train`.
"""
import argparse
import dataclasses
import functools
import os
import signal
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from utils.checkpoint import CheckpointManager, StopFlag, rng_state, seed_everything, set_rng_state
from utils.config import add_config_args, get_config
from utils.dataset import (MXFaceDataset, build_loader, check_data_config, set_loader_epoch, stop_workers,
                           to_model_input)
from utils.distributed import (DistInfo, add_launcher_args, agree_on_overflow, average_gradients, broadcast, cleanup,
                               fail_together, init_distributed, largest_on_any_rank, set_timeout, world)
from utils.errors import StoppedBySignal, UserError, require, run_cli
from utils.io import atomic_torch_save
from utils.logging_utils import SpeedLogger, setup_logger
from utils.schedule import run_multiplier


@dataclasses.dataclass
class TrainState:
    """The one state of a run: the loop advances it, a checkpoint holds it (:meth:`state_dict`,
    :meth:`load_state_dict`) and every method hook receives it as ``ctx``.

    ``backbone`` is the backbone that trains (DDP-wrapped when several processes run, compiled when
    asked), ``plain_backbone`` the module inside it (checkpointed, saved as ``model.pt``);
    :func:`build_models` fills the models, optimiser, scheduler and scaler. A loaded checkpoint's RNG
    states wait in ``pending_rng`` until :meth:`restore_rng`.
    """
    cfg: Any
    dist: DistInfo
    backbone: torch.nn.Module = None
    classifier: torch.nn.Module = None         # the Partial FC classifier (losses.PartialFC)
    dataset: MXFaceDataset = None
    steps_per_epoch: int = 0
    total_steps: int = 0
    logger: Any = None
    epoch: int = 0
    global_step: int = 0
    batch_rows: dict = dataclasses.field(default_factory=dict)   # this batch's per-image rows, on the device
    batch: int = 0                             # batches of ``epoch`` done
    plain_backbone: torch.nn.Module = None
    extra: dict = dataclasses.field(default_factory=dict)        # the method's trainable modules, by name
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    method: Any = None
    replicated_params: list = dataclasses.field(default_factory=list)  # trainable, held whole by every process
    pending_rng: dict = None

    @property
    def device(self):
        return self.dist.device

    @property
    def progress(self):
        """Fraction of the schedule done, in [0, 1]."""
        return self.global_step / max(self.total_steps, 1)

    @functools.cached_property
    def clipped_params(self):
        """The parameters clipped to one gradient norm: the backbone's, the method's that go with it, and
        the classifier's when it asks (``clip_with_backbone``); listed once, on the first step."""
        params = [*self.plain_backbone.parameters(), *self.method.clipped_with_backbone()]
        if getattr(self.classifier, "clip_with_backbone", False):
            params += list(self.classifier.parameters())
        return params

    def _parts(self):
        """The checkpointed objects, by checkpoint key (each has state_dict/load_state_dict)."""
        return {"backbone": self.plain_backbone, "classifier": self.classifier, "optimizer": self.optimizer,
                "scheduler": self.scheduler, "scaler": self.scaler, "method": self.method}

    def state_dict(self):
        state = {key: part.state_dict() for key, part in self._parts().items()}
        state["extra"] = {name: module.state_dict() for name, module in self.extra.items()}
        state.update(rng=rng_state(self.device), epoch=self.epoch, batch=self.batch, global_step=self.global_step,
                     world_size=world()[1])
        return state

    def load_state_dict(self, state):
        saved, size = state.get("world_size"), world()[1]
        require(saved in (None, size), f"the checkpoint of step {state['global_step']} was saved by a run of {saved} "
                                       f"processes but this run has {size}: resume with {saved} processes (the "
                                       "classifier and its optimiser state are split over the processes) or train "
                                       "into a new output folder")
        for key, part in self._parts().items():
            part.load_state_dict(state[key])
        for name, module in self.extra.items():
            module.load_state_dict(state["extra"][name])
        self.epoch, self.batch, self.global_step = state["epoch"], state["batch"], state["global_step"]
        self.pending_rng = state["rng"]

    def restore_rng(self):
        """Put back the loaded RNG states (once)."""
        if self.pending_rng is not None:
            set_rng_state(self.pending_rng, self.device)
            self.pending_rng = None


class Method:
    """The loss hook. The base class is plain classification (ArcFace or softmax through Partial FC).

    Subclasses override :meth:`compute_loss` and, when they need them, :meth:`setup`
    (load old features, build modules), :meth:`extra_modules` (trainable modules: optimised,
    gradient-averaged over ranks, checkpointed), :meth:`on_epoch_start` and
    :meth:`state_dict`/:meth:`load_state_dict` (non-parameter state such as queues).
    """

    name = "independent"
    # the loader's workers live across epochs; a method that starts processes of its own during training
    # (a DataLoader with workers) sets False: forking beside live workers and their queue threads can hang
    persistent_workers = True

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self, ctx: TrainState):
        pass

    def extra_modules(self):
        return {}

    def per_image_arrays(self):
        """Per-image files the loader's workers read for each batch ({config key: PerImageArray}); their rows
        reach :meth:`compute_loss` in ``ctx.batch_rows`` (see :meth:`~utils.old_features.PerImageArray.rows`)."""
        return {}

    def clipped_with_backbone(self):
        """Parameters of the extra modules clipped to one gradient norm together with the backbone."""
        return []

    def on_epoch_start(self, epoch, ctx: TrainState):
        pass

    def compute_loss(self, embeddings, labels, indices, ctx: TrainState):
        """Return ``(loss, {part: value})`` for one batch; ``embeddings`` are fp32, un-normalised.

        ``labels`` are on the training device; ``indices`` (the images' dataset positions) stay on
        the CPU as the loader made them; the rows of :meth:`per_image_arrays` are in ``ctx.batch_rows``.
        Parts may be tensors: they are read only on logging steps.
        """
        loss = ctx.classifier(embeddings, labels)
        return loss, {"cls": loss.detach()}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _build_optimizer(cfg, param_groups):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UserError(f"config {cfg.config_path}: optimizer '{cfg.optimizer}' is not supported (expected sgd or adamw)")


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast_dtype(cfg, device):
    """The backbone's autocast dtype (``amp_dtype``) when AMP runs (``fp16`` on CUDA), else None."""
    if torch.device(device).type != "cuda" or not cfg.fp16:
        return None
    return AMP_DTYPES[cfg.get("amp_dtype", "float16")]


def logits_autocast_dtype(cfg, device):
    """The dtype of Partial FC's cosine logits under AMP (``amp_logits``), or None (fp32). Under bfloat16 they stay
    fp32: its 8-bit mantissa would make them about ten times coarser than fp16's."""
    dtype = autocast_dtype(cfg, device)
    return dtype if dtype == torch.float16 and cfg.amp_logits else None


def backbone_autocast(cfg, device):
    """The autocast context of the backbone's forward in training (``fp16``, ``amp_dtype``, ``backbone_amp``)."""
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float16,
                          enabled=dtype is not None and cfg.backbone_amp != "none")


TF32_SETTINGS = {False: (False, False), True: (True, True), "conv": (False, True)}   # (matrix products, convolutions)


def set_precision(cfg):
    """TF32 on CUDA from ``tf32``: False full fp32 everywhere, True TF32 for fp32 matrix products and
    convolutions, "conv" for convolutions only (PyTorch's own default, what the published runs had)."""
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = TF32_SETTINGS[cfg.get("tf32", False)]


def _check_config(cfg):
    require(cfg.rec, f"config {cfg.config_path}: `rec` (training data) is not set")
    require(not cfg.dali, f"config {cfg.config_path}: dali=True is not supported; use the built-in loader (dali=False)")
    require(not cfg.val_targets, f"config {cfg.config_path}: val_targets (.bin verification) is not supported; "
                                 "leave it empty and evaluate with tools/ijbc_eval/ijbc_eval.py")
    require(cfg.lr_schedule in ("poly", "step"), f"config {cfg.config_path}: lr_schedule must be poly or step, got '{cfg.lr_schedule}'")
    require(cfg.batch_size > 0 and cfg.num_epoch > 0, f"config {cfg.config_path}: batch_size and num_epoch must be positive")
    require(0 < cfg.sample_rate <= 1, f"config {cfg.config_path}: sample_rate must be in (0, 1], got {cfg.sample_rate}")
    require(isinstance(cfg.get("compile", False), (bool, str)),
            f"config {cfg.config_path}: compile must be False, True or a torch.compile backend name, got {cfg.compile!r}")
    require(cfg.get("amp_dtype", "float16") in AMP_DTYPES,
            f"config {cfg.config_path}: amp_dtype must be float16 or bfloat16, got {cfg.get('amp_dtype')!r}")
    require(cfg.get("tf32", False) in TF32_SETTINGS,
            f"config {cfg.config_path}: tf32 must be False, True or 'conv', got {cfg.get('tf32')!r}")
    require(cfg.resume in (False, True, "auto"),
            f"config {cfg.config_path}: resume must be False, True or 'auto', got {cfg.resume!r}")


def trainable_params(modules):
    return [p for module in modules for p in module.parameters() if p.requires_grad]


def set_determinism(deterministic):
    """Deterministic kernels (exact resume) or cuDNN autotuning. Call before the first CUDA call:
    cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` (set to ``:4096:8`` unless the user set it) when it starts."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic


def build_models(state, method, build_backbone, build_classifier):
    """Fill ``state`` with the backbone (DDP-wrapped over several processes), classifier, method (set up,
    with its modules), optimiser, schedule and scaler; returns it."""
    cfg, device, processes = state.cfg, state.device, state.dist.world_size
    backbone = build_backbone(cfg).to(device)
    if cfg.get("channels_last"):
        backbone = backbone.to(memory_format=torch.channels_last)
    model = backbone
    if processes > 1:
        with warnings.catch_warnings():  # newer torch renames broadcast_buffers; the behaviour is the same
            warnings.simplefilter("ignore", FutureWarning)
            model = DistributedDataParallel(backbone, device_ids=[device.index] if device.type == "cuda" else None,
                                            broadcast_buffers=False, bucket_cap_mb=16)
    if cfg.get("compile"):
        model = torch.compile(model, **({} if cfg.compile is True else {"backend": cfg.compile}))
    classifier = build_classifier(cfg).to(device)
    classifier.check_inputs = False  # every label was checked against num_classes; batches are full
    amp_dtype = autocast_dtype(cfg, device)
    classifier.autocast_logits = logits_autocast_dtype(cfg, device)
    if amp_dtype == torch.bfloat16 and cfg.amp_logits:
        state.logger.info("amp_logits: the cosine logits stay fp32 under bfloat16 (bf16 would make them ~10x coarser)")
    state.plain_backbone, state.backbone, state.classifier, state.method = backbone, model, classifier, method
    method.setup(state)
    extra = method.extra_modules()
    replicated = [classifier] if getattr(classifier, "replicated", False) else []  # held whole, not sharded
    for module in extra.values():
        module.to(device)
    for module in [*extra.values(), *replicated]:
        for param in module.parameters():
            broadcast(param.data)
    param_groups = [{"params": trainable_params([backbone])}, {"params": list(classifier.parameters())}]
    extra_params = trainable_params(extra.values())
    if extra_params:
        param_groups.append({"params": extra_params})
    state.extra, state.replicated_params = extra, extra_params + trainable_params(replicated)
    state.optimizer = _build_optimizer(cfg, param_groups)
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, run_multiplier(cfg, state.steps_per_epoch,
                                                                                        cfg.batch_size * processes))
    state.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16,
                                        growth_interval=cfg.amp_growth_interval)
    return state


@dataclasses.dataclass
class Loop:
    """What the loop does besides the steps: checkpoints, speed logging (rank 0), the stop signal, the last step."""
    checkpoints: CheckpointManager
    speed: Any                 # a SpeedLogger on rank 0, None elsewhere
    stop: StopFlag
    last_step: int

    def save(self, state):
        self.checkpoints.save(state.global_step, state.state_dict())


def train_one_epoch(state, batches, loop):
    """Steps over ``batches`` (the loader's iterator over the rest of epoch ``state.epoch``) up to ``loop.last_step``;
    returns the number of a stop signal that reached any rank (agreed by all), else 0. Saves the
    ``save_every_steps`` checkpoints inside the epoch."""
    cfg, device, processes = state.cfg, state.device, state.dist.world_size
    amp = state.scaler.is_enabled()
    memory_format = torch.channels_last if cfg.get("channels_last") else torch.contiguous_format
    for images, labels, indices, rows in batches:
        images = to_model_input(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        state.batch_rows = {name: value.to(device, non_blocking=True) for name, value in rows.items()}
        with backbone_autocast(cfg, device):
            embeddings = state.backbone(images)
        loss, parts = state.method.compute_loss(embeddings.float(), labels, indices, state)
        optimizer_step(loss, state.optimizer, state.scaler, state.clipped_params, cfg.clip_grad, state.replicated_params,
                       cfg.agree_overflow)
        state.scheduler.step()
        state.global_step += 1
        state.batch += 1
        if loop.speed is not None:
            loop.speed(state.global_step, state.epoch, {"loss": loss.detach(), **parts}, state.scheduler.get_last_lr()[0],
                       state.scaler.get_scale if amp else None)
        if cfg.save_every_steps and state.global_step % cfg.save_every_steps == 0 and state.batch < state.steps_per_epoch:
            loop.save(state)
        # agreeing on the stop signal waits for every rank: with several processes only on logging steps
        if processes == 1 or state.global_step % cfg.frequent == 0:
            signum = largest_on_any_rank(loop.stop.signum, device)
            if signum:
                return signum
        if state.global_step >= loop.last_step:
            return 0
    return 0


def start_speed_log(state, notes):
    """Rank 0's :class:`SpeedLogger` with its TensorBoard writer, after the run's first log lines (``notes``)."""
    from torch.utils.tensorboard import SummaryWriter

    cfg, info = state.cfg, state.dist
    state.logger.info(f"config {cfg.config_path}: {len(state.dataset)} images, {cfg.num_classes} classes, "
                      f"{info.world_size} process(es) on {info.device} ({dist.get_backend()}), {state.steps_per_epoch} "
                      f"steps/epoch, {state.total_steps} steps, method {state.method.name}")
    for note in notes:
        state.logger.info(note)
    writer = SummaryWriter(log_dir=os.path.join(cfg.output, "tensorboard"))
    return SpeedLogger(cfg.frequent, state.total_steps, cfg.batch_size * info.world_size, state.logger, writer)


def train(cfg, method: Method, build_backbone, build_classifier, local_rank=None, resume=False):
    """Train ``method`` with config ``cfg``; writes ``<output>/model.pt`` (backbone state_dict) when the run ends.

    ``build_backbone(cfg)`` and ``build_classifier(cfg)`` make the modules to train (the classifier
    a :class:`~losses.PartialFC`); they are called once the process group exists. ``resume``: continue
    from the last checkpoint, which must exist (``cfg.resume = "auto"``: when one exists). A run stopped
    by SIGTERM/SIGINT saves a checkpoint and raises :class:`~utils.errors.StoppedBySignal`.
    """
    _check_config(cfg)
    set_determinism(cfg.deterministic)
    set_precision(cfg)
    info = init_distributed(local_rank, cfg.device, cfg.dist_timeout_minutes)
    device, rank, world = info.device, info.rank, info.world_size
    cfg.output = os.path.abspath(cfg.output)
    seed_everything(cfg.seed + rank)

    with fail_together():   # data (or an output folder) missing on one node stops every process at once
        dataset = MXFaceDataset(cfg.rec, train=True, input_size=cfg.input_size, seed=cfg.seed, uint8=True)
        data_notes = check_data_config(cfg, dataset)
        steps_per_epoch = len(dataset) // (cfg.batch_size * world)
        require(steps_per_epoch > 0, f"{cfg.rec}: {len(dataset)} images are fewer than one global batch "
                                     f"({cfg.batch_size} x {world} processes)")
        logger = setup_logger(cfg.output, rank)
    total_steps = steps_per_epoch * cfg.num_epoch
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    state = TrainState(cfg, info, dataset=dataset, steps_per_epoch=steps_per_epoch, total_steps=total_steps, logger=logger)
    build_models(state, method, build_backbone, build_classifier)

    checkpoints = CheckpointManager(cfg.output, rank, cfg.keep_checkpoints, log=logger.warning, device=device)
    if (resume or cfg.resume) and checkpoints.resume(state, required=resume or cfg.resume is True):
        logger.info(f"resumed from step {state.global_step} (epoch {state.epoch}, batch {state.batch})")
    speed = start_speed_log(state, data_notes) if rank == 0 else None

    stopped, loader, batches = 0, None, None
    state.backbone.train()
    state.classifier.train()
    set_timeout(cfg.step_timeout_minutes)
    try:
        with StopFlag() as stop:
            loop = Loop(checkpoints, speed, stop, last_step)
            # the point where a resumed run takes up the interrupted one's RNG states: nothing between here and
            # the next step (or on_epoch_start) draws from them (the loader's shuffle and seeds have their own)
            state.restore_rng()
            while state.epoch < cfg.num_epoch and state.global_step < last_step:
                if state.batch == 0:
                    method.on_epoch_start(state.epoch, state)
                    state.backbone.train()
                dataset.set_epoch(state.epoch)
                if loader is None:   # built once: its workers live across epochs (Method.persistent_workers)
                    loader = build_loader(dataset, cfg.batch_size, info, cfg.seed, cfg.num_workers, shuffle=True,
                                          drop_last=True, start_batch=state.batch, arrays=method.per_image_arrays(),
                                          persistent=method.persistent_workers)
                else:
                    set_loader_epoch(loader, state.epoch, state.batch)
                batches = iter(loader)
                stopped = train_one_epoch(state, batches, loop)
                if stopped or state.batch < steps_per_epoch:
                    loop.save(state)
                    break
                state.epoch, state.batch = state.epoch + 1, 0
                loop.save(state)
    finally:
        stop_workers(batches)   # on every exit path: workers that outlive an error would hang the exit
    if not stopped and rank == 0:
        atomic_torch_save(state.plain_backbone.state_dict(), os.path.join(cfg.output, "model.pt"))
        logger.info(f"saved {os.path.join(cfg.output, 'model.pt')} after {state.global_step} steps")
    if speed is not None:
        speed.writer.close()
    dist.barrier()
    if stopped:
        message = (f"stopped by {signal.Signals(stopped).name} at step {state.global_step}; checkpoint saved in "
                   f"{checkpoints.folder}. Resume with the same command plus --resume (or resume = True in the config).")
        logger.info(message)
        raise StoppedBySignal(stopped, message)
    return os.path.join(cfg.output, "model.pt")


def optimizer_step(loss, optimizer, scaler, clipped_params, clip_grad=5.0, replicated_params=(), agree_overflow=True):
    """Backward of ``loss`` and one optimiser step through the AMP ``scaler``.

    Gradients of ``replicated_params`` (method modules outside DDP) are averaged over the processes
    before the scaler looks for inf/NaN, so every rank sees the same gradients; with ``agree_overflow``
    an inf/NaN found on any rank (in its own classifier shard too) makes every rank skip the step and
    back off its scale together. Those of ``clipped_params`` (the backbone, and the method
    modules clipped with it) are clipped to norm ``clip_grad`` (0 = off).
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    average_gradients(replicated_params)
    scaler.unscale_(optimizer)
    if agree_overflow:
        agree_on_overflow(scaler, optimizer)
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(clipped_params, clip_grad)
    scaler.step(optimizer)
    scaler.update()


def main(method_class, build_backbone, build_classifier, description=None):
    """Command-line entry of every training script: ``script.py CONFIG [--set KEY=VALUE …] [--resume]``."""
    parser = add_config_args(argparse.ArgumentParser(description=description))
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint (an error when there is none; resume = 'auto' in "
                             "the config, or --set resume=auto, resumes only when there is one)")
    add_launcher_args(parser)
    args = parser.parse_args()

    def run():
        cfg = get_config(args.config, args.overrides)
        if args.dist_timeout_minutes:
            cfg.dist_timeout_minutes = args.dist_timeout_minutes
        try:
            train(cfg, method_class(cfg), build_backbone, build_classifier, args.local_rank, args.resume)
        except BaseException as exc:
            cleanup(failed=not isinstance(exc, StoppedBySignal))
            raise
        cleanup()

    run_cli(run)
