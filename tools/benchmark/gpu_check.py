"""One-command CUDA readiness check: AMP training steps per method, layout/compile variants, IJB
embedding throughput and a 2-rank NCCL check.

    python tools/benchmark/gpu_check.py                 # on a GPU machine (about 5 minutes on one H100)
    python tools/benchmark/gpu_check.py --cpu-smoke     # the same code paths, tiny sizes, on the CPU

1. Training steps of r50 at 112 px, batch 128, AMP fp16, for plain ArcFace and every BCT method
   (``bench_methods``: backbone forward, the method's loss through Partial FC over 65,402 classes,
   backward, clipping, SGD): samples/s and peak memory.
2. Plain ArcFace steps with the backbone in ``channels_last`` and under ``torch.compile``.
3. IJB embedding throughput of r50 (AMP inference, image + flipped image, as ijbc_eval does).
4. With two or more GPUs: two NCCL processes run a Partial FC step and check that the loss matches
   one process on the same global batch (``--cpu-smoke``: the same check with two gloo processes).
5. What users run, through the real scripts with ``torchrun --nproc_per_node=2`` on a small synthetic
   set, with 2 loader workers per process (persistent across epochs) and 2 epochs: the old model
   trained with AMP, stopped after 3 steps and finished with ``--resume`` (checkpoint agreement by
   ``all_gather_object``, an epoch boundary); its features extracted by 2 processes (the embedding
   ``dist.gather``); then every method (``--pipeline-methods``) until two steps past the epoch boundary:
   UniBCT refines its prototypes there (sharded re-embedding, rank-0 refinement, broadcast), NCCL
   all-reduces inside backward beside DDP's buckets, AdvBCT averages its replicated modules, MixBCT
   mixes old rows read by the loader workers. NCCL with two GPUs; with one GPU the two processes share
   it over gloo (NCCL cannot); ``--cpu-smoke``: gloo on the CPU.
At the end it lists the code paths exercised on CUDA, over NCCL, and those not exercised on CUDA at
all in this run. The last output line is a JSON object of the figures.
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bench_methods
from backbones import get_model
from losses import ArcFace, PartialFC
from tools.ijbc_eval import INPUT_SCALE
from tools.synthetic import make_synthetic
from utils.distributed import cleanup
from utils.embedding import ModelRunner
from utils.errors import require, run_cli
from utils.feature_stats import class_prototypes, credible_mask
from utils.trainer import optimizer_step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def arcface_variants(device, sizes, steps, compile_ok):
    """ms/step of plain ArcFace training: default layout, channels_last, torch.compile."""
    amp = device.type == "cuda"
    results = {}
    variants = ["default", "channels_last"] + (["compile"] if compile_ok else [])
    for variant in variants:
        torch.manual_seed(0)
        backbone = get_model(sizes["network"], num_features=512, width=sizes["width"],
                             input_size=sizes["input_size"]).to(device)
        images = torch.randn(sizes["batch"], 3, sizes["input_size"], sizes["input_size"], device=device)
        if variant == "channels_last":
            backbone = backbone.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        model = torch.compile(backbone) if variant == "compile" else backbone
        pfc = PartialFC(ArcFace(), 512, sizes["classes"]).to(device)
        labels = torch.randint(0, sizes["classes"], (sizes["batch"],), device=device)
        optimizer = torch.optim.SGD([*backbone.parameters(), *pfc.parameters()], lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        times = []
        for step in range(steps + 3):
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                embeddings = model(images)
            loss = pfc(embeddings.float(), labels)
            optimizer_step(loss, optimizer, scaler, backbone.parameters())
            _sync(device)
            if step >= 3:
                times.append(time.perf_counter() - start)
        best = min(times) * 1000
        results[variant] = {"ms_per_step": round(best, 2), "samples_per_s": round(sizes["batch"] * 1000 / best, 1)}
        print(f"ArcFace {variant:13s} {best:8.1f} ms/step  {sizes['batch'] * 1000 / best:9.1f} samples/s", flush=True)
    return results


def embedding_throughput(device, sizes, batches):
    """Images/s of IJB-style embedding through the evaluation's own runner (uint8 image + flip, AMP
    on CUDA, embeddings back on the host), as ``ijbc_eval.py`` runs it."""
    model = get_model(sizes["network"], num_features=512, width=sizes["width"], input_size=sizes["input_size"])
    runner = ModelRunner(model.to(device), device, amp=True, scale=INPUT_SCALE, flip=True)
    images = torch.randint(0, 256, (sizes["eval_batch"], 3, sizes["input_size"], sizes["input_size"]),
                           dtype=torch.uint8)
    with torch.inference_mode():
        runner(images)
        _sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            runner(images)
        _sync(device)
    rate = batches * sizes["eval_batch"] / (time.perf_counter() - start)
    print(f"IJB embedding ({sizes['network']}, image + flip): {rate:.1f} images/s", flush=True)
    return round(rate, 1)


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


def two_rank_check(backend="nccl", classes=10000):
    """Partial FC loss over 2 ranks (``nccl`` on 2 GPUs, ``gloo`` on the CPU) vs one process, same global batch."""
    with tempfile.TemporaryDirectory() as folder:
        result = os.path.join(folder, "result.json")
        mp.spawn(_partial_fc_worker, args=(2, os.path.join(folder, "store"), result, classes, backend), nprocs=2)
        with open(result) as handle:
            values = json.load(handle)
    values["backend"] = backend
    values["abs_diff"] = abs(values["distributed"] - values["single"])
    values["ok"] = values["abs_diff"] < 1e-3
    print(f"{backend} 2-rank Partial FC loss {values['distributed']:.6f} vs one process {values['single']:.6f}: "
          f"{'ok' if values['ok'] else 'MISMATCH'}", flush=True)
    return values


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(path, method=None, **keys):
    """Write a config module; a method's config gets a ``base.py`` beside it declaring the method's keys."""
    if method:
        with open(os.path.join(os.path.dirname(path), "base.py"), "w") as handle:
            handle.write(f"from BCT_methods.{method}.configs.base import config  # noqa: F401\n")
    lines = ["from easydict import EasyDict as edict", "config = edict()"] + [f"config.{k} = {v!r}" for k, v in keys.items()]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def _two_processes(script, *args, cuda):
    """Run ``torchrun --nproc_per_node=2 script args``; returns (seconds, stdout), raises on failure."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1" if not cuda else os.environ.get("OMP_NUM_THREADS", "4"))
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return round(time.time() - start, 1), proc.stdout


PIPELINE_METHODS = ("MixBCT", "BCT", "UniBCT", "NCCL", "L2", "AdvBCT")


def _method_files(features, sd):
    """Step 3 and 4 outputs of the extracted features: prototypes and a credible mask (as the tools write)."""
    vectors = np.load(os.path.join(features, f"{sd}_feature.npy"))
    labels = np.load(os.path.join(features, f"{sd}_label.npy"))
    files = {kind: os.path.join(features, f"{sd}_{kind}.npy") for kind in ("feature", "avg_feature", "credible")}
    np.save(files["avg_feature"], class_prototypes(vectors, labels))
    np.save(files["credible"], credible_mask(vectors, labels, 0.9))
    return files


def _method_keys(method, files):
    """Each method's old-feature keys and sizes fit for the small set (UniBCT refines at the epoch boundary)."""
    return {"MixBCT": dict(old_embedding=files["feature"], credible_old_feature=files["credible"]),
            "BCT": dict(old_prototype=files["avg_feature"]),
            "UniBCT": dict(old_prototype=files["avg_feature"], old_embedding=files["feature"], refine_epochs=(1,)),
            "NCCL": dict(old_embedding=files["feature"], queue_size=64),
            "L2": dict(old_embedding=files["feature"]),
            "AdvBCT": dict(old_embedding=files["feature"])}[method]


def pipeline_check(folder, cuda, methods=PIPELINE_METHODS):
    """Old model (AMP, cut and resumed) → 2-rank feature extraction → each method, each with 2 processes."""
    data = os.path.join(folder, "data")
    make_synthetic.main(["--out", data, "--identities", "16", "--images-per-identity", "8", "--ijb-identities", "2",
                         "--workers", "0"])
    model = dict(network="r18", network_width=64 if cuda else 8, input_size=112 if cuda else 32, embedding_size=64,
                 batch_size=16 if cuda else 8, num_epoch=2, lr=0.05, fp16=True, frequent=1, num_workers=2,
                 seed=3, rec=data)
    old = os.path.join(folder, "old")
    report = {}
    cut = _config(os.path.join(folder, "old_cut.py"), output=old, max_steps=3, save_every_steps=1, **model)
    full = _config(os.path.join(folder, "old_model.py"), output=old, save_every_steps=1, **model)
    seconds, _ = _two_processes("train_old_arc.py", cut, cuda=cuda)
    resumed_seconds, stdout = _two_processes("train_old_arc.py", full, "--resume", cuda=cuda)
    log = open(os.path.join(old, "training.log")).read()
    found = re.search(r"2 process\(es\) on (\S+) \((\w+)\)", log)
    report["old_model"] = {"seconds": seconds + resumed_seconds, "resumed": "resumed from step 3" in stdout,
                           "device": found.group(1) if found else None, "backend": found.group(2) if found else None,
                           "amp": "Fp16 Grad Scale" in log}
    features = os.path.join(folder, "features")
    seconds, _ = _two_processes("tools/get_feature/get_feature.py", full, "--SD", "f64_r18_arc_class100",
                                "--dataset", data, "--output", features, "--cache_dir", os.path.join(folder, "cache"),
                                "--batch_size", "16", cuda=cuda)
    embedding = np.load(os.path.join(features, "f64_r18_arc_class100_feature.npy"))
    report["features"] = {"seconds": seconds, "rows": int(embedding.shape[0]),
                          "finite": bool(np.isfinite(embedding).all())}
    files = _method_files(features, "f64_r18_arc_class100")
    report["methods"] = {}
    for name in methods:
        os.makedirs(os.path.join(folder, name))
        out = os.path.join(folder, name, "out")
        steps = 16 * 8 // (2 * model["batch_size"]) + 2   # two steps into the second epoch
        cfg = _config(os.path.join(folder, name, "config.py"), method=name, output=out, max_steps=steps,
                      **_method_keys(name, files), **model)
        seconds, _ = _two_processes(f"BCT_methods/{name}/train.py", cfg, cuda=cuda)
        log = open(os.path.join(out, "training.log")).read()
        report["methods"][name] = {"seconds": seconds, "model": os.path.isfile(os.path.join(out, "model.pt")),
                                   "epoch_boundary": "Epoch: 1" in log}
    report["ok"] = (report["old_model"]["resumed"] and report["old_model"]["amp"] == cuda
                    and report["features"]["rows"] == 16 * 8 and report["features"]["finite"]
                    and all(m["model"] and m["epoch_boundary"] for m in report["methods"].values()))
    timings = ", ".join(f"{name} {m['seconds']} s" for name, m in report["methods"].items())
    print(f"2-process pipeline over {report['old_model']['backend']} on {report['old_model']['device']}: old model "
          f"{report['old_model']['seconds']} s (resumed: {report['old_model']['resumed']}), features "
          f"{report['features']['seconds']} s ({report['features']['rows']} rows), {timings}: "
          f"{'ok' if report['ok'] else 'FAILED'}", flush=True)
    return report


def exercised_paths(report, cuda, compiled):
    """``{"cuda": [...], "nccl": [...], "not_on_cuda": [...]}``: the code paths of a multi-GPU run and where
    this run exercised them (a path run only on the CPU or over gloo is not "on CUDA"/"over NCCL")."""
    pipeline = report["pipeline_2_processes"]
    two_rank = report["nccl_2_rank"]
    two_rank_backend = two_rank.get("backend") if isinstance(two_rank, dict) else None
    methods = set(pipeline["methods"])
    runs = {   # path: (ran, backend of its processes; None = one process)
        "AMP training step of every method (1 process)": (True, None),
        "backbone in channels_last": ("channels_last" in report["arcface_variants"], None),
        "torch.compile (inductor) of the backbone": (compiled, None),
        "IJB embedding, AMP inference with flip": (True, None),
        "Partial FC over 2 processes (loss equal to 1 process)": (isinstance(two_rank, dict), two_rank_backend),
        "DDP gradient buckets, training with 2 processes": (True, pipeline["old_model"]["backend"]),
        "loader workers (2 per process, persistent, pinned memory)": (True, pipeline["old_model"]["backend"]),
        "epoch boundary with persistent workers": (True, pipeline["old_model"]["backend"]),
        "checkpoint agreement on --resume (all_gather_object)": (True, pipeline["old_model"]["backend"]),
        "embedding dist.gather (get_feature.py)": (True, pipeline["old_model"]["backend"]),
    }
    hooks = {"MixBCT": "MixBCT mixing of old rows read by the loader workers",
             "BCT": "BCT influence loss over 2 processes",
             "UniBCT": "UniBCT refinement: sharded re-embedding, rank-0 refinement, broadcast",
             "NCCL": "NCCL all-reduces inside backward beside DDP buckets, queue all-gather",
             "L2": "L2 loss over 2 processes",
             "AdvBCT": "AdvBCT replicated-module gradient averaging"}
    for name, path in hooks.items():
        runs[path] = (name in methods, pipeline["old_model"]["backend"])
    never = ["bfloat16 AMP (amp_dtype) and TF32", "more than 2 processes or several nodes",
             "stop on SIGTERM/SIGINT with loader workers (tested on the CPU only)"]
    return {"cuda": [p for p, (ran, _) in runs.items() if ran and cuda],
            "nccl": [p for p, (ran, backend) in runs.items() if ran and cuda and backend == "nccl"],
            "not_on_cuda": [p for p, (ran, _) in runs.items() if not (ran and cuda)] + never}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the script itself)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--pipeline-methods", default=",".join(PIPELINE_METHODS),
                        help="methods trained by 2 processes in the pipeline (comma-separated)")
    args = parser.parse_args()
    pipeline_methods = [m for m in args.pipeline_methods.split(",") if m]
    require(set(pipeline_methods) <= set(PIPELINE_METHODS),
            f"--pipeline-methods: expected some of {', '.join(PIPELINE_METHODS)}, got {args.pipeline_methods}")
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    require(cuda or args.cpu_smoke, "no CUDA device: run on a GPU machine, or pass --cpu-smoke")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        sizes = dict(network="r50", width=64, input_size=112, batch=128, classes=65402, eval_batch=256)
        method_args = ["--device", "cuda"]
        steps, eval_batches = 20, 20
    else:
        sizes = dict(network="r18", width=8, input_size=32, batch=8, classes=200, eval_batch=16)
        method_args = ["--device", "cpu", "--network", "r18", "--width", "8", "--input-size", "32",
                       "--batch-size", "8", "--num-classes", "200", "--embedding-size", "64",
                       "--steps", "1", "--warmup", "1", "--rounds", "1"]
        steps, eval_batches = 2, 2
    start = time.time()
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)", "torch": torch.__version__}
    print(f"== training steps per method ({sizes['network']}, {sizes['input_size']} px, batch {sizes['batch']})", flush=True)
    methods = bench_methods.main(method_args)
    report["methods"] = {name: {"ms_per_step": ms, "samples_per_s": round(sizes["batch"] * 1000 / ms, 1),
                                "relative_to_arcface": methods["relative_to_arcface"].get(name, 1.0),
                                "peak_memory_gib": methods.get("peak_memory_gib", {}).get(name)}
                         for name, ms in methods["step_ms"].items()}
    print("== ArcFace layout / compile variants", flush=True)
    report["arcface_variants"] = arcface_variants(device, sizes, steps, compile_ok=cuda and not args.no_compile)
    print("== IJB embedding throughput", flush=True)
    report["ijb_embedding_images_per_s"] = embedding_throughput(device, sizes, eval_batches)
    if cuda and torch.cuda.device_count() >= 2:
        print("== NCCL", flush=True)
        report["nccl_2_rank"] = two_rank_check("nccl")
    elif cuda:
        report["nccl_2_rank"] = "skipped: fewer than 2 GPUs"
    else:
        print("== 2 ranks (gloo: the NCCL check's code on the CPU)", flush=True)
        report["nccl_2_rank"] = two_rank_check("gloo", classes=sizes["classes"])
    print("== 2-process pipeline: old model (AMP, cut + --resume), feature extraction, AdvBCT", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        report["pipeline_2_processes"] = pipeline_check(folder, cuda, pipeline_methods)
    report["seconds"] = round(time.time() - start, 1)
    report["paths"] = exercised_paths(report, cuda, "compile" in report["arcface_variants"])
    for key, title in (("cuda", "exercised on CUDA"), ("nccl", "exercised over NCCL"),
                       ("not_on_cuda", "NOT exercised on CUDA")):
        print(f"== {title}: {len(report['paths'][key])}", flush=True)
        for path in report["paths"][key]:
            print(f"   - {path}", flush=True)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    run_cli(main)
