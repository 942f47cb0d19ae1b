"""Training throughput of the demo's new models on this CPU, per setting that PyTorch offers.

    python tools/benchmark/bench_demo_training.py [--data dataset/synthetic] [--steps 60] [--variants base,channels_last]

Each variant trains the demo's independent new model (``configs/demo/independent.py``: r18 layout,
the full profile's width, 32 px, batch 64) for ``--steps`` optimiser steps in a fresh process, as
``run_demo.py`` runs it (``--jobs`` processes side by side, each with its share of the threads), and
prints the images per second of the steps after the first ``--warmup`` ones (read from the
training log's speed lines) and the process's start-up time. Variants:

- ``base``: the demo's settings in the default (contiguous) memory format;
- ``channels_last``: the backbone and its input batches in channels_last memory format (the demo's setting);
- ``compile``: ``torch.compile`` of the training model (inductor), compile time included in start-up;
- ``workers1``: one persistent loader worker per process instead of decoding in the training process.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from configs.demo.settings import Demo
from tools.demo.commands import train_command
from utils.errors import require, run_cli

# each variant is base plus one setting; the demo config itself trains in channels_last
VARIANTS = {"base": {"channels_last": False}, "channels_last": {"channels_last": True},
            "compile": {"channels_last": False, "compile": True},
            "workers1": {"channels_last": False, "num_workers": 1}}
SPEED = re.compile(r"Speed ([0-9.]+) samples/sec")


def run_variant(name, keys, args, folder):
    """``(images/s per process after the warm-up steps, start-up seconds)`` of one variant."""
    demo = Demo(data=os.path.abspath(args.data), out=folder)
    keys = dict(keys, output=os.path.join(folder, name), max_steps=args.steps, frequent=5)
    command = train_command(demo, "independent", keys)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    start = time.time()
    procs = [subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(args.jobs)]
    outputs = [proc.communicate()[0] for proc in procs]
    wall = time.time() - start
    for proc, output in zip(procs, outputs):
        require(proc.returncode == 0, f"variant {name} failed: {output.strip().splitlines()[-1:]}")
    speeds = [float(s) for output in outputs for s in SPEED.findall(output)[args.warmup // 5:]]
    require(speeds, f"variant {name}: no speed line after {args.warmup} steps (raise --steps)")
    images_per_second = statistics.median(speeds)
    startup = wall - args.steps * 64 / images_per_second
    return images_per_second, startup


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(ROOT, "dataset", "synthetic"),
                        help="the demo's synthetic data (make it with run_demo.py or make_synthetic.py)")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per variant")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the speed")
    parser.add_argument("--jobs", type=int, default=2, help="processes side by side, as run_demo.py --jobs")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    for name in names:
        require(name in VARIANTS, f"--variants: unknown variant '{name}' (expected some of {', '.join(VARIANTS)})")
    require(args.steps > args.warmup + 5, f"--steps must exceed --warmup + 5, got {args.steps}")
    require(os.path.isfile(os.path.join(args.data, "train_part_70_class.idx")),
            f"{args.data}: no train_part_70_class split (run tools/run_demo.py first, or make_synthetic.py "
            "and split_dataset_ms1mv3.py)")
    with tempfile.TemporaryDirectory() as folder:
        base = None
        for name in names:
            speed, startup = run_variant(name, VARIANTS[name], args, folder)
            base = base or speed
            print(f"{name:14s} {speed:7.0f} images/s per process ({args.jobs} side by side), "
                  f"{speed / base:.2f}x base, start-up {startup:.1f} s", flush=True)


if __name__ == "__main__":
    run_cli(main)
