"""Training-step time of every BCT method relative to plain ArcFace, and UniBCT's prototype refinement.

    python tools/benchmark/bench_methods.py [--quick] [--device cpu|cuda] [--methods MixBCT,NCCL,…]

One optimiser step = backbone forward (AMP fp16 on CUDA), the method's ``compute_loss`` (old
features memory-mapped from a temporary ``.npy``, as in training), backward, gradient clipping and
the SGD step, on one process; data loading is excluded (the batch stays on the device, its dataset
indices on the CPU, as the training loop hands them to the method). Each method's run (backbone,
classifier, optimiser, method state) is built for its turn and freed after it, so the peak GPU
memory printed for a method is its own. Defaults:
CPU r18 at 112 px, batch 32, 10,000 classes, 512-d; CUDA r50, batch 128, 65,402 classes (MS1MV3
class70), 512-d. Every method (and the ArcFace baseline) is timed for ``--steps`` steps after
``--warmup`` steps, in ``--rounds`` interleaved rounds; the per-step figure is the fastest step
(the least disturbed by other load; the median is printed beside it). Because whole steps are
noisy on a shared CPU, each method's loss forward + backward on fixed embeddings (the only part
that differs) is also timed many times, giving ``relative_from_loss_time`` = 1 + (loss time −
ArcFace loss time) / ArcFace step time. Targets are judged on the whole-step ratio on a GPU and on
the loss-time ratio on a CPU. UniBCT is timed after its first refine epoch (influence loss on).
The refinement of one class of 600 images (S, row softmax, one (I − λA)ᵀ solve, the weighted
mean) is timed separately. On a shared CPU, ``--threads 1`` avoids OpenMP threads spinning
against other processes.
Targets: MixBCT, BCT, L2 ≤ 1.05× ArcFace; NCCL, AdvBCT ≤ 1.3×; UniBCT refinement < 50 ms.
The last output line is a JSON object of the figures.
"""
import argparse
import gc
import importlib
import json
import os
import sys
import tempfile
import time
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch

from backbones import get_model
from losses import CombinedMarginLoss, PartialFC
from utils.config import get_config, write_config
from utils.errors import require, run_cli
from utils.feature_stats import class_prototypes, credible_mask
from utils.trainer import (Method, TrainState, autocast_dtype, backbone_autocast, logits_autocast_dtype,
                           optimizer_step)

METHODS = ("MixBCT", "BCT", "UniBCT", "NCCL", "L2", "AdvBCT")
TARGETS = {"MixBCT": 1.05, "BCT": 1.05, "L2": 1.05, "NCCL": 1.3, "AdvBCT": 1.3, "UniBCT": 1.05}
REFINE_TARGET_MS = 50.0


class _Data:
    """What a method reads from the dataset: its length and labels."""

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)


def write_old_features(folder, num_classes, per_class, dim, seed=0):
    """Random class-structured old features (+ prototypes and a 90 % mask) as the training files."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
    features = centres[labels] + 0.5 * rng.standard_normal((len(labels), dim), dtype=np.float32)
    paths = {name: os.path.join(folder, f"{name}.npy") for name in ("feature", "avg_feature", "mask")}
    np.save(paths["feature"], features)
    np.save(paths["avg_feature"], class_prototypes(features, labels, num_classes))
    np.save(paths["mask"], credible_mask(features, labels, 0.9, num_classes=num_classes))
    return labels, paths


def method_config(folder, name, args, paths):
    """Config with the method's published defaults (its configs/base.py), this benchmark's sizes and files."""
    sub = os.path.join(folder, name)
    os.makedirs(sub, exist_ok=True)
    config = write_config(os.path.join(sub, "bench.py"), method=name if name in METHODS else None,
                          network=args.network, embedding_size=args.embedding_size, batch_size=args.batch_size,
                          num_classes=args.num_classes, rec="unused", output=os.path.join(folder, "out"))
    cfg = get_config(config)
    for key, kind in (("old_embedding", "feature"), ("old_prototype", "avg_feature")):
        if key in cfg:
            cfg[key] = paths[kind]
    if name == "MixBCT":
        cfg.credible_old_feature = paths["mask"]
    return cfg


def build_method(name, cfg, device, labels, args):
    """Backbone, classifier, optimiser and the method hook set up on a fake dataset of ``labels``."""
    torch.manual_seed(0)
    backbone = get_model(args.network, num_features=args.embedding_size, width=args.width,
                         input_size=args.input_size).to(device)
    classifier = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), args.embedding_size, args.num_classes).to(device)
    classifier.check_inputs = False  # as the training loop, which checks the labels once
    classifier.autocast_logits = logits_autocast_dtype(cfg, device)
    logger = types.SimpleNamespace(info=lambda *a: None)
    dist_info = types.SimpleNamespace(rank=0, local_rank=0, world_size=1, device=device, is_main=True)
    ctx = TrainState(cfg, dist_info, backbone, classifier, _Data(labels), 1000, 35000, logger, epoch=25)
    method_class = Method if name == "ArcFace" else getattr(importlib.import_module(f"BCT_methods.{name}.losses"), name)
    method = method_class(cfg)
    method.setup(ctx)
    extra = [p for m in method.extra_modules().values() for p in m.to(device).parameters()]
    params = [{"params": backbone.parameters()}, {"params": classifier.parameters()}]
    if extra:
        params.append({"params": extra})
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    return method, ctx, backbone, optimizer


def time_steps(method, ctx, backbone, optimizer, batch, steps, amp):
    """Seconds of each of ``steps`` optimiser steps."""
    images, labels, indices = batch
    scaler = torch.amp.GradScaler("cuda", enabled=amp and autocast_dtype(ctx.cfg, ctx.device) == torch.float16)
    device = ctx.device

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for step in range(steps):
        sync()
        start = time.perf_counter()
        ctx.global_step = step
        with backbone_autocast(ctx.cfg, device):
            embeddings = backbone(images)
        loss, _ = method.compute_loss(embeddings.float(), labels, indices, ctx)
        optimizer_step(loss, optimizer, scaler, backbone.parameters())
        sync()
        times.append(time.perf_counter() - start)
    return times


def time_head(method, ctx, embeddings, labels, indices, repeats):
    """Seconds of each of ``repeats`` runs of the method's loss forward + backward on fixed embeddings."""
    embeddings = embeddings.detach().float().requires_grad_()
    times = []
    for _ in range(repeats):
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        start = time.perf_counter()
        loss, _ = method.compute_loss(embeddings, labels, indices, ctx)
        loss.backward()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        times.append(time.perf_counter() - start)
    return times


def refine_time_ms(device, size=600, dim=512, repeats=5):
    """Milliseconds to refine one class of ``size`` images (median of ``repeats`` after a warm-up)."""
    from BCT_methods.UniBCT.losses import refine_prototypes

    rng = np.random.default_rng(1)
    new = rng.standard_normal((size, dim), dtype=np.float32)
    old = rng.standard_normal((size, dim), dtype=np.float32)
    labels = np.zeros(size, dtype=np.int64)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        refine_prototypes(new, old, labels, 1, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times[1:]))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU: r18 at 56 px, batch 16, 2,000 classes)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to time")
    parser.add_argument("--network", default=None)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=3, help="old features per class in the generated file")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    defaults = dict(network="r50" if cuda else "r18", input_size=112, batch_size=128 if cuda else 32,
                    num_classes=65402 if cuda else 10000, steps=20 if cuda else 3, warmup=5 if cuda else 1,
                    rounds=3 if cuda else 2)
    if args.quick:
        defaults.update(dict(num_classes=10000, steps=10, warmup=3, rounds=2) if cuda else
                        dict(input_size=56, batch_size=16, num_classes=2000, steps=2, warmup=1, rounds=2))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    args.methods = [m for m in args.methods.split(",") if m]
    for method in args.methods:
        require(method in METHODS, f"--methods: unknown method '{method}' (expected some of {', '.join(METHODS)})")
    require(args.batch_size <= args.num_classes * args.per_class, "--batch-size is larger than the generated data")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, amp = args.device, args.device.type == "cuda"
    names = ["ArcFace", *args.methods]
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if amp else ''}, {args.network} "
          f"width {args.width} at {args.input_size} px, batch {args.batch_size}, {args.num_classes} classes, "
          f"{args.embedding_size}-d, AMP {'on' if amp else 'off'}, {args.steps} steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} CPU thread(s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as folder:
        labels, paths = write_old_features(folder, args.num_classes, args.per_class, args.embedding_size)
        generator = torch.Generator().manual_seed(0)
        indices = torch.randperm(len(labels), generator=generator)[:args.batch_size]
        batch = (torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=generator).to(device),
                 torch.from_numpy(labels[indices.numpy()]).to(device), indices)  # indices stay on the CPU, as in training
        configs = {name: method_config(folder, name, args, paths) for name in names}
        times, heads, memory = {n: [] for n in names}, {n: [] for n in names}, {}
        for round_index in range(args.rounds):
            for name in names:
                if amp:  # one run resident at a time, so each peak is that method's own
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                method, ctx, backbone, optimizer = build_method(name, configs[name], device, labels, args)
                time_steps(method, ctx, backbone, optimizer, batch, args.warmup, amp)
                times[name] += time_steps(method, ctx, backbone, optimizer, batch, args.steps, amp)
                with torch.no_grad(), backbone_autocast(configs[name], device):
                    embeddings = backbone(batch[0])
                heads[name] += time_head(method, ctx, embeddings, batch[1], batch[2], 5 * args.steps)
                print(f"round {round_index + 1}/{args.rounds} {name}: {min(times[name][-args.steps:]) * 1000:.1f} ms/step",
                      flush=True)
                if amp:
                    memory[name] = max(memory.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2 ** 30)
                del method, ctx, backbone, optimizer, embeddings
        step_ms = {n: float(np.min(t)) * 1000 for n, t in times.items()}
        relative = {n: step_ms[n] / step_ms["ArcFace"] for n in args.methods}
        head_ms = {n: float(np.min(t)) * 1000 for n, t in heads.items()}
        from_heads = {n: 1 + (head_ms[n] - head_ms["ArcFace"]) / step_ms["ArcFace"] for n in args.methods}
        for name in names:
            extra = f"   peak {memory[name]:.2f} GiB" if name in memory else ""
            ratio = ""
            if name in relative:
                ratio = f"   {relative[name]:.3f}x, from the loss time {from_heads[name]:.3f}x (target <= {TARGETS[name]}x)"
            median = float(np.median(times[name])) * 1000
            print(f"{name:8s} {step_ms[name]:9.1f} ms/step (median {median:.1f}), loss fwd+bwd {head_ms[name]:7.2f} ms"
                  f"{ratio}{extra}", flush=True)
    refine_ms = refine_time_ms(device)
    print(f"UniBCT refinement of one class of 600 images ({args.embedding_size}-d on {device}): {refine_ms:.1f} ms "
          f"(target < {REFINE_TARGET_MS:.0f} ms)")
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if amp else None,
              "network": args.network, "input_size": args.input_size, "batch_size": args.batch_size,
              "num_classes": args.num_classes, "embedding_size": args.embedding_size, "amp": amp,
              "cpu_threads": torch.get_num_threads(),
              "step_ms": {k: round(v, 2) for k, v in step_ms.items()},
              "relative_to_arcface": {k: round(v, 3) for k, v in relative.items()},
              "loss_ms": {k: round(v, 3) for k, v in head_ms.items()},
              "relative_from_loss_time": {k: round(v, 3) for k, v in from_heads.items()},
              "unibct_refine_600_ms": round(refine_ms, 2),
              "targets_judged_on": "relative_to_arcface" if amp else "relative_from_loss_time",
              "targets_met": {**{k: (relative if amp else from_heads)[k] <= TARGETS[k] for k in relative},
                              "UniBCT_refine": refine_ms < REFINE_TARGET_MS}}
    if memory:
        result["peak_memory_gib"] = {k: round(v, 2) for k, v in memory.items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)
