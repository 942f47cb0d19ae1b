"""Parts measured inside one process: training steps per method, backbone variants, IJB embedding, host
syncs, an AMP overflow step and Partial FC over 2 ranks."""
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from backbones import get_model
from losses import ArcFace, PartialFC
from tools.benchmark import bench_faults, bench_host_syncs, bench_methods
from tools.ijbc_eval import INPUT_SCALE
from utils.distributed import cleanup
from utils.embedding import ModelRunner
from utils.trainer import optimizer_step

GPU_SIZES = dict(network="r50", width=64, input_size=112, batch=128, classes=65402, eval_batch=256, steps=10)
CPU_SIZES = dict(network="r18", width=8, input_size=32, batch=8, classes=200, eval_batch=16, steps=2)


def sizes(ctx):
    return GPU_SIZES if ctx.cuda else CPU_SIZES


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _backbone(ctx):
    size = sizes(ctx)
    return get_model(size["network"], num_features=512, width=size["width"], input_size=size["input_size"]).to(ctx.device)


def method_steps(ctx):
    """Training steps of ArcFace and every method (``bench_methods``: AMP fp16 backbone, the method's loss
    through Partial FC, backward, clipping, SGD) on one process: images/s and each method's peak memory."""
    size = sizes(ctx)
    common = ["--network", size["network"], "--width", str(size["width"]), "--input-size", str(size["input_size"]),
              "--batch-size", str(size["batch"]), "--num-classes", str(size["classes"])]
    if ctx.cuda:
        args = ["--device", "cuda", *common, "--steps", "10", "--warmup", "3", "--rounds", "1"]
    else:
        args = ["--device", "cpu", *common, "--embedding-size", "64", "--steps", "1", "--warmup", "1", "--rounds", "1"]
    figures = bench_methods.main(args)
    methods = {name: {"ms_per_step": ms, "images_per_s": round(size["batch"] * 1000 / ms, 1),
                      "relative_to_arcface": figures["relative_to_arcface"].get(name, 1.0),
                      "peak_memory_gib": figures.get("peak_memory_gib", {}).get(name)}
               for name, ms in figures["step_ms"].items()}
    return {"methods": methods, "amp": figures["amp"]}


def _variant_step_ms(ctx, dtype, channels_last, compiled):
    """Fastest of ``steps`` ArcFace training steps of the bare backbone under one AMP dtype and layout."""
    size, device = sizes(ctx), ctx.device
    torch.manual_seed(0)
    backbone = _backbone(ctx)
    images = torch.randn(size["batch"], 3, size["input_size"], size["input_size"], device=device)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    model = torch.compile(backbone) if compiled else backbone
    pfc = PartialFC(ArcFace(), 512, size["classes"]).to(device)
    labels = torch.randint(0, size["classes"], (size["batch"],), device=device)
    optimizer = torch.optim.SGD([*backbone.parameters(), *pfc.parameters()], lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=ctx.cuda and dtype == torch.float16)
    times = []
    for step in range(size["steps"] + 3):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=ctx.cuda):
            embeddings = model(images)
        optimizer_step(pfc(embeddings.float(), labels), optimizer, scaler, list(backbone.parameters()))
        _sync(device)
        if step >= 3:
            times.append(time.perf_counter() - start)
    return min(times) * 1000


def backbone_variants(ctx):
    """ms/step of plain ArcFace on the bare backbone: fp16 and (CUDA) bf16 autocast, channels_last and
    (CUDA) ``torch.compile`` with inductor."""
    variants = {"fp16": (torch.float16, False, False), "fp16_channels_last": (torch.float16, True, False)}
    if ctx.cuda:
        variants.update(bf16=(torch.bfloat16, False, False), fp16_compile=(torch.float16, False, True))
    results = {}
    for name, (dtype, channels_last, compiled) in variants.items():
        ms = _variant_step_ms(ctx, dtype, channels_last, compiled)
        results[name] = {"ms_per_step": round(ms, 2), "images_per_s": round(sizes(ctx)["batch"] * 1000 / ms, 1)}
        print(f"ArcFace {name:18s} {ms:8.1f} ms/step", flush=True)
    return {"variants": results, "amp": ctx.cuda}


def ijb_embedding(ctx):
    """Images/s of IJB-style embedding through the evaluation's runner (uint8 image + flip, AMP on CUDA)."""
    size = sizes(ctx)
    runner = ModelRunner(_backbone(ctx), ctx.device, amp=True, scale=INPUT_SCALE, flip=True)
    images = torch.randint(0, 256, (size["eval_batch"], 3, size["input_size"], size["input_size"]), dtype=torch.uint8)
    with torch.inference_mode():
        runner(images)
        _sync(ctx.device)
        start = time.perf_counter()
        for _ in range(size["steps"] * 2):
            runner(images)
        _sync(ctx.device)
    rate = size["steps"] * 2 * size["eval_batch"] / (time.perf_counter() - start)
    print(f"IJB embedding ({size['network']}, image + flip): {rate:.1f} images/s", flush=True)
    return {"images_per_s": round(rate, 1)}


def host_syncs(ctx):
    """Operations per training step that make the host wait for the GPU, per method (``bench_host_syncs``,
    counted on the CPU: an upper bound)."""
    return {"per_step": bench_host_syncs.main(["--steps", "2" if ctx.cuda else "1"])}


def amp_overflow(ctx):
    """A step whose loss is made infinite: ``optimizer_step`` must leave the weights alone and halve the
    GradScaler's scale; the next, finite, step must update them and keep the scale."""
    size, device = sizes(ctx), ctx.device
    torch.manual_seed(0)
    backbone = _backbone(ctx)
    pfc = PartialFC(ArcFace(), 512, size["classes"]).to(device)
    optimizer = torch.optim.SGD([*backbone.parameters(), *pfc.parameters()], lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16)
    images = torch.randn(size["batch"], 3, size["input_size"], size["input_size"], device=device)
    labels = torch.randint(0, size["classes"], (size["batch"],), device=device)

    def step(loss_factor):
        before, scale = [p.detach().clone() for p in backbone.parameters()], scaler.get_scale()
        with torch.autocast(device.type, dtype=torch.float16, enabled=ctx.cuda):
            embeddings = backbone(images)
        optimizer_step(pfc(embeddings.float(), labels) * loss_factor, optimizer, scaler, list(backbone.parameters()))
        updated = any(not torch.equal(old, new) for old, new in zip(before, backbone.parameters()))
        return {"weights_updated": updated, "scale_before": scale, "scale_after": scaler.get_scale()}

    overflow, finite = step(float("inf")), step(1.0)
    ok = (not overflow["weights_updated"] and overflow["scale_after"] == overflow["scale_before"] / 2
          and finite["weights_updated"] and finite["scale_after"] == finite["scale_before"])
    print(f"AMP overflow step: {overflow}; finite step: {finite}: {'ok' if ok else 'FAILED'}", flush=True)
    return {"overflow_step": overflow, "finite_step": finite, "ok": ok}


def faults(ctx):
    """``bench_faults``: an exception on one rank, a killed rank (2 "nodes"), a hung rank past a 6 s step timeout,
    each through ``torchrun`` with 2 processes: seconds from the fault until every process has ended."""
    results = bench_faults.run_all(ctx.work, "cuda" if ctx.cuda else "cpu", timeout=90, deadline=ctx.deadline - 5)
    return {"scenarios": results, "ok": all(r["ok"] for r in results.values()),
            "backend": "nccl" if all(r.get("backend") == "nccl" for r in results.values()) else "gloo"}


def _partial_fc_worker(rank, world, store, result_file, classes, backend):
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method="file://" + store, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    embeddings = torch.randn(world * 64, 512, device=device)
    labels = torch.randint(0, classes, (world * 64,), device=device)
    pfc = PartialFC(ArcFace(), 512, classes).to(device)
    full = torch.empty(classes, 512, device=device).normal_(0, 0.01, generator=torch.Generator(device).manual_seed(1))
    pfc.weight.data.copy_(full[pfc.class_start:pfc.class_start + pfc.num_local])
    loss = pfc(embeddings[rank * 64:(rank + 1) * 64], labels[rank * 64:(rank + 1) * 64])
    if rank == 0:
        single = torch.nn.functional.cross_entropy(
            ArcFace()(torch.nn.functional.normalize(embeddings) @ torch.nn.functional.normalize(full).t(), labels), labels)
        with open(result_file, "w") as handle:
            json.dump({"distributed": loss.item(), "single": single.item()}, handle)
    cleanup()


def two_rank_partial_fc(ctx):
    """Partial FC loss over 2 ranks (NCCL on 2 GPUs, gloo on the CPU) against one process, same global batch."""
    backend = "nccl" if ctx.cuda else "gloo"
    result = os.path.join(ctx.work, "result.json")
    mp.spawn(_partial_fc_worker, args=(2, os.path.join(ctx.work, "store"), result, 10000 if ctx.cuda else 200, backend),
             nprocs=2)
    with open(result) as handle:
        values = json.load(handle)
    values.update(backend=backend, abs_diff=abs(values["distributed"] - values["single"]))
    values["ok"] = values["abs_diff"] < 1e-3
    print(f"{backend} 2-rank Partial FC loss {values['distributed']:.6f} vs one process {values['single']:.6f}: "
          f"{'ok' if values['ok'] else 'MISMATCH'}", flush=True)
    return values
