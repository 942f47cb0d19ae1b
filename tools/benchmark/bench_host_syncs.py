"""Operations that make the host wait for the GPU, per training step and method, counted on the CPU.

    python tools/benchmark/bench_host_syncs.py [--steps 3]

A CUDA step stalls whenever the host needs a value computed on the GPU: ``.item()``/``bool()``/``int()``
of a tensor (``aten::_local_scalar_dense``) and boolean indexing or ``nonzero()`` (``aten::nonzero``,
whose output size the host must know). Both are recorded by ``torch.profiler`` on the CPU too, so this
script counts them over ``--steps`` training steps (backbone forward, the method's ``compute_loss``,
backward, clipping, SGD step) of each method on a tiny r18 and random old features, as
``bench_methods.py`` builds them. On the CPU every tensor is on the host, so the counts are an upper
bound: an op on a tensor that stays on the CPU in a CUDA run (the batch's dataset indices) does not
wait for the GPU. Rows of the per-image files the method declares (``per_image_arrays``) are read
outside the counted step, as the loader's workers read them; a method without that hook reads them
inside (a memory-map read and a pageable copy per step). The last output line is a JSON object of the
figures, which ``main`` also returns.
"""
import argparse
import json
import os
import sys
import tempfile
import types
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tools.benchmark.bench_methods import METHODS, build_method, method_config, write_old_features  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.trainer import optimizer_step  # noqa: E402

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")


def count_step_ops(method, ctx, backbone, optimizer, batch, steps):
    """``(Counter of SYNC_OPS over ``steps`` steps, whether the loader supplies the old-feature rows)``."""
    images, labels, indices = batch
    arrays = method.per_image_arrays() if hasattr(method, "per_image_arrays") else {}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    counts = Counter()
    for step in range(steps + 1):   # step 0 warms up, uncounted
        ctx.batch_rows = {name: array.gather(indices) for name, array in arrays.items()}   # the workers' part
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ctx.global_step = step
            loss, _ = method.compute_loss(backbone(images), labels, indices, ctx)
            optimizer_step(loss, optimizer, scaler, backbone.parameters())
        if step:
            counts.update({e.key: e.count for e in prof.key_averages() if e.key in SYNC_OPS})
    return counts, bool(arrays)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sizes = types.SimpleNamespace(network="r18", width=8, input_size=32, batch_size=16, num_classes=200,
                                  embedding_size=64, per_class=3)
    device = torch.device("cpu")
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-syncs-") as folder:
        labels, paths = write_old_features(folder, sizes.num_classes, sizes.per_class, sizes.embedding_size)
        generator = torch.Generator().manual_seed(0)
        indices = torch.randperm(len(labels), generator=generator)[:sizes.batch_size]
        batch = (torch.randn(sizes.batch_size, 3, sizes.input_size, sizes.input_size, generator=generator),
                 torch.from_numpy(labels[indices.numpy()]), indices)
        for name in ("ArcFace", *METHODS):
            cfg = method_config(folder, name, sizes, paths)
            if name == "NCCL":
                cfg.queue_size = 64
            method, ctx, backbone, optimizer = build_method(name, cfg, device, labels, sizes)
            counts, from_loader = count_step_ops(method, ctx, backbone, optimizer, batch, args.steps)
            per_step = {op: counts[op] / args.steps for op in SYNC_OPS}
            figures[name] = dict(per_step, rows_from_loader=from_loader)
            print(f"{name:8s} per step: {per_step['aten::_local_scalar_dense']:.0f} item/bool, "
                  f"{per_step['aten::nonzero']:.0f} nonzero; per-image rows (if any) read "
                  f"{'by the loader workers' if from_loader else 'inside the step'}", flush=True)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    run_cli(main)
