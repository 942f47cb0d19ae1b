"""Parts that run the repository's own scripts on a small synthetic set, as users run them: the old model
over 2 processes (cut and resumed), its features, every method, and one-process trainer variants."""
import os
import re
import sys

import numpy as np
import torch

from tools.gpu_check.runner import run_limited
from tools.synthetic import make_synthetic
from utils.chunk_cache import CHUNK_ROWS
from utils.config import write_config
from utils.distributed import free_port
from utils.feature_stats import class_prototypes, credible_mask

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IDENTITIES, PER_IDENTITY = 16, 8
IMAGES = IDENTITIES * PER_IDENTITY
FEATURE_CHUNK = 32            # rows per chunk of the 2-process extraction: 4 chunks, 2 from each rank
SD = "f64_r18_arc_class100"


def synthetic_data(ctx):
    """The shared synthetic training set (made once; make_synthetic renames it into place when complete)."""
    data = os.path.join(ctx.shared, "data")
    if not os.path.isdir(data):
        make_synthetic.main(["--out", data, "--identities", str(IDENTITIES), "--images-per-identity",
                             str(PER_IDENTITY), "--ijb-identities", "2", "--workers", "0"])
    return data


def model_keys(ctx):
    """Config keys of the small r18 every script part trains (2 epochs, AMP, 2 loader workers)."""
    return dict(network="r18", network_width=64 if ctx.cuda else 8, input_size=112 if ctx.cuda else 32,
                embedding_size=64, batch_size=16 if ctx.cuda else 8, num_epoch=2, lr=0.05, fp16=True, frequent=1,
                num_workers=2, seed=3, rec=synthetic_data(ctx))


def launch(ctx, script, *args, processes=2):
    """Run a repository script (``torchrun`` with 2 processes, or python with 1) within the part's remaining
    time; returns its seconds, raises when it fails."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    if not ctx.cuda:
        env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                                    f"--master_port={free_port()}"] if processes > 1 else [])
    command = [*launcher, script, *args]
    print("$ " + " ".join(command), flush=True)
    code, seconds = run_limited(command, ctx.remaining(), env=env, cwd=ROOT)
    if code != 0:
        raise RuntimeError(f"{script} exited with {code}")
    return seconds


def training_log(output):
    with open(os.path.join(output, "training.log")) as handle:
        return handle.read()


def run_facts(output):
    """What a run's ``training.log`` shows: device, backend, AMP scaler, resume, epoch boundary, last speed."""
    log = training_log(output)
    found = re.search(r"\d+ process\(es\) on (\S+) \((\w+)\)", log)
    speeds = re.findall(r"Speed ([\d.]+) samples/sec", log)
    resumed = re.search(r"resumed from step (\d+)", log)
    return {"device": found.group(1) if found else None, "backend": found.group(2) if found else None,
            "grad_scaler": "Fp16 Grad Scale" in log, "resumed_from_step": int(resumed.group(1)) if resumed else None,
            "epoch_boundary": "Epoch: 1" in log, "samples_per_s": float(speeds[-1]) if speeds else None,
            "model": os.path.isfile(os.path.join(output, "model.pt"))}


def old_model(ctx):
    """2 processes: the old ArcFace model with AMP, cut after 3 steps and finished with ``--resume``
    (checkpoint agreement, loader workers, an epoch boundary)."""
    out = os.path.join(ctx.work, "out")
    keys = dict(model_keys(ctx), output=out, save_every_steps=1)
    cut = write_config(os.path.join(ctx.work, "cut.py"), max_steps=3, **keys)
    full = write_config(os.path.join(ctx.work, "config.py"), **keys)
    seconds = launch(ctx, "train_old_arc.py", cut) + launch(ctx, "train_old_arc.py", full, "--resume")
    facts = run_facts(out)
    facts.update(seconds=seconds, ok=facts["resumed_from_step"] == 3 and facts["grad_scaler"] == ctx.cuda
                 and facts["epoch_boundary"] and facts["model"])
    return facts


def features(ctx):
    """2 processes extract the old model's features in chunks of 32 rows, so both ranks' chunks are
    gathered; then the prototypes and credible mask the methods read."""
    out = os.path.join(ctx.work, "features")
    seconds = launch(ctx, "tools/get_feature/get_feature.py", os.path.join(ctx.shared, "old_model", "config.py"),
                     "--SD", SD, "--dataset", synthetic_data(ctx), "--output", out, "--cache_dir",
                     os.path.join(ctx.work, "cache"), "--batch_size", "16", "--chunk_size", str(FEATURE_CHUNK))
    vectors, labels = np.load(os.path.join(out, f"{SD}_feature.npy")), np.load(os.path.join(out, f"{SD}_label.npy"))
    np.save(os.path.join(out, f"{SD}_avg_feature.npy"), class_prototypes(vectors, labels))
    np.save(os.path.join(out, f"{SD}_credible.npy"), credible_mask(vectors, labels, 0.9))
    chunks = -(-len(vectors) // FEATURE_CHUNK)
    finite = bool(np.isfinite(vectors).all())
    return {"seconds": seconds, "rows": len(vectors), "chunks": chunks, "finite": finite,
            "ok": len(vectors) == IMAGES and finite and chunks >= 2}


def _method_keys(method, files):
    """Each method's old-feature keys and sizes fit for the small set (UniBCT refines at the epoch boundary)."""
    return {"MixBCT": dict(old_embedding=files["feature"], credible_old_feature=files["credible"]),
            "BCT": dict(old_prototype=files["avg_feature"]),
            "UniBCT": dict(old_prototype=files["avg_feature"], old_embedding=files["feature"], refine_epochs=(1,)),
            "NCCL": dict(old_embedding=files["feature"], queue_size=64),
            "L2": dict(old_embedding=files["feature"]),
            "AdvBCT": dict(old_embedding=files["feature"])}[method]


def train_method(ctx, method):
    """2 processes train ``method`` through its script on the old features until two steps past the epoch
    boundary."""
    folder = os.path.join(ctx.shared, "features", "features")
    files = {kind: os.path.join(folder, f"{SD}_{kind}.npy") for kind in ("feature", "avg_feature", "credible")}
    out, keys = os.path.join(ctx.work, "out"), model_keys(ctx)
    steps = IMAGES // (2 * keys["batch_size"]) + 2
    config = write_config(os.path.join(ctx.work, "config.py"), method=method, output=out, max_steps=steps,
                          **_method_keys(method, files), **keys)
    seconds = launch(ctx, f"BCT_methods/{method}/train.py", config)
    facts = run_facts(out)
    refined = method != "UniBCT" or "UniBCT: prototypes refined" in training_log(out)
    facts.update(seconds=seconds, images=IMAGES, reembedding_sharded=IMAGES > CHUNK_ROWS,
                 ok=facts["model"] and facts["epoch_boundary"] and refined)
    return facts


def _finite_weights(path):
    return all(torch.isfinite(t).all() for t in torch.load(path, weights_only=True).values() if t.is_floating_point())


def train_variant(ctx, script="train_old_arc.py", **keys):
    """One process trains 8 steps of the small model through ``script`` with the config ``keys``."""
    out = os.path.join(ctx.work, "out")
    config = write_config(os.path.join(ctx.work, "config.py"), **dict(model_keys(ctx), output=out, max_steps=8, **keys))
    seconds = launch(ctx, script, config, processes=1)
    facts = run_facts(out)
    finite = facts["model"] and _finite_weights(os.path.join(out, "model.pt"))
    facts.update(keys, seconds=seconds, finite_weights=finite, ok=finite)
    return facts


def _max_abs_diff(first, second):
    a, b = (torch.load(path, weights_only=True) for path in (first, second))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def deterministic_resume(ctx):
    """With ``deterministic = True`` (one process, AMP): a run cut after 5 steps and resumed past the epoch
    boundary ends with the same weights as an uninterrupted run."""
    keys = dict(model_keys(ctx), deterministic=True)
    whole, cut = os.path.join(ctx.work, "whole"), os.path.join(ctx.work, "cut")
    seconds = launch(ctx, "train_old_arc.py", write_config(os.path.join(ctx.work, "whole.py"), output=whole, **keys),
                     processes=1)
    seconds += launch(ctx, "train_old_arc.py", write_config(os.path.join(ctx.work, "cut.py"), output=cut, max_steps=5,
                                                            **keys), processes=1)
    seconds += launch(ctx, "train_old_arc.py", write_config(os.path.join(ctx.work, "resume.py"), output=cut, **keys),
                      "--resume", processes=1)
    diff = _max_abs_diff(os.path.join(whole, "model.pt"), os.path.join(cut, "model.pt"))
    resumed = run_facts(cut)["resumed_from_step"] == 5
    print(f"deterministic resume: max |weight difference| {diff:.3g}", flush=True)
    return {"seconds": seconds, "resumed_from_step_5": resumed, "max_abs_diff": diff, "exact": diff == 0.0,
            "device": run_facts(whole)["device"], "ok": resumed and diff <= 1e-6}
