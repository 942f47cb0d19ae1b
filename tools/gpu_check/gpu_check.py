"""One-command CUDA readiness check for a short GPU window: every part runs in its own process under its
own time limit, most valuable first, and the report survives any part that fails or hangs.

    python tools/gpu_check/gpu_check.py --budget 420 --out work_dirs/gpu_check   # 10-minute window, one GPU
    python tools/gpu_check/gpu_check.py --cpu-smoke                              # the same code, tiny sizes, CPU

A part that fails or runs past its limit (its whole process tree is killed) is reported with the end of
its log, and the next part runs; with ``--budget`` a part whose limit does not fit in the time left is
skipped. Logs stay in ``OUT/logs/<part>.log``; ``OUT/report.json`` is rewritten after every part. The
exit status is 1 when a part failed or timed out. The parts and what to read: docs/training.md
("Checking a GPU machine").
"""
import argparse
import json
import os
import shutil
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch

from tools.gpu_check.parts import PIPELINE_METHODS, Context, all_parts
from tools.gpu_check.report import exercised_paths, figures, print_lists
from tools.gpu_check.runner import TIMEOUT_EXIT, CommandTimeout, log_tail, run_limited
from utils.errors import UserError, require, run_cli
from utils.io import atomic_open

GRACE_S = 3   # a part's process gets this long past its limit to report its own inner timeout


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the script itself)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="start no part whose limit does not fit in what is left of this many seconds")
    parser.add_argument("--out", default=os.path.join("work_dirs", "gpu_check"), help="logs, work and report.json")
    parser.add_argument("--pipeline-methods", default=",".join(PIPELINE_METHODS),
                        help="methods trained by 2 processes through their scripts (comma-separated)")
    parser.add_argument("--parts", default=None, help="run only these parts (comma-separated; default all)")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS", help="change a part's limit")
    parser.add_argument("--fail-part", default=None, metavar="PART", help="tests: make this part raise an error")
    parser.add_argument("--run-part", default=None, help=argparse.SUPPRESS)   # inside a part's own process
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = os.path.abspath(args.out)
    methods = [m for m in args.pipeline_methods.split(",") if m]
    require(set(methods) <= set(PIPELINE_METHODS),
            f"--pipeline-methods: expected some of {', '.join(PIPELINE_METHODS)}, got {args.pipeline_methods}")
    parts = all_parts(methods)
    names = [part.name for part in parts]
    chosen = args.parts.split(",") if args.parts else names
    args.limits = {}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        require(name in names and seconds.replace(".", "", 1).isdigit(), f"--limit: expected PART=SECONDS, got {item}")
        args.limits[name] = float(seconds)
    for option, values in (("--parts", chosen), ("--fail-part", [args.fail_part] if args.fail_part else [])):
        unknown = sorted(set(values) - set(names))
        require(not unknown, f"{option}: unknown part {', '.join(unknown)} (expected some of {', '.join(names)})")
    args.selected = [part for part in parts if part.name in chosen]
    args.cuda = torch.cuda.is_available() and not args.cpu_smoke
    require(args.cuda or args.cpu_smoke, "no CUDA device: run on a GPU machine, or pass --cpu-smoke")
    return args


def run_part_here(args):
    """Inside a part's own process: run it and write its result (exit 124 when its inner command timed out)."""
    part = next(part for part in args.selected if part.name == args.run_part)
    ctx = Context(args.cuda, os.path.join(args.out, "work", part.name), os.path.join(args.out, "work"), args.deadline)
    if args.fail_part == part.name:
        raise RuntimeError(f"--fail-part {part.name}: this part was made to fail")
    try:
        result = part.run(ctx)
    except CommandTimeout as exc:
        print(f"timeout: {exc}", flush=True)
        return TIMEOUT_EXIT
    with atomic_open(os.path.join(args.out, "results", part.name + ".json")) as handle:
        json.dump(result, handle)
    return 0


def _child_command(args, part, deadline):
    command = [sys.executable, os.path.abspath(__file__), "--run-part", part.name, "--out", args.out,
               "--deadline", str(deadline), "--pipeline-methods", args.pipeline_methods]
    return command + (["--cpu-smoke"] if args.cpu_smoke else []) + (["--fail-part", args.fail_part] if args.fail_part else [])


def run_part(args, part, limit):
    """Run ``part`` in its own process under ``limit`` seconds; its report entry."""
    log = os.path.join(args.out, "logs", part.name + ".log")
    result_file = os.path.join(args.out, "results", part.name + ".json")
    work = os.path.join(args.out, "work", part.name)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    if os.path.exists(result_file):
        os.remove(result_file)
    open(log, "w").close()
    start = time.time()
    try:
        code, _ = run_limited(_child_command(args, part, start + limit), limit + GRACE_S, log=log,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=ROOT)
    except CommandTimeout:
        code = TIMEOUT_EXIT
    entry = {"seconds": round(time.time() - start, 1), "log": log}
    if code == 0 and os.path.isfile(result_file):
        with open(result_file) as handle:
            entry["result"] = json.load(handle)
        entry["status"] = "ok" if entry["result"].get("ok", True) else "failed"
        entry["reason"] = None if entry["status"] == "ok" else "its check found a fault (see result)"
    else:
        entry["status"] = "timeout" if code == TIMEOUT_EXIT else "failed"
        entry["reason"] = f"ran past its limit of {limit:.0f} s" if code == TIMEOUT_EXIT else f"exit status {code}"
    if entry["status"] != "ok":
        entry["log_tail"] = log_tail(log)
    return entry


def _why_skipped(args, part, limit, statuses, left):
    missing = [name for name in part.needs if statuses.get(name) != "ok"]
    if part.two_gpus and args.cuda and torch.cuda.device_count() < 2:
        return "fewer than 2 GPUs"
    if missing:
        return f"needs {', '.join(missing)}"
    if left is not None and limit > left:
        return f"budget: limit {limit:.0f} s, {max(left, 0):.0f} s left"
    return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _print_entry(name, entry):
    print(f"-- {name}: {entry['status']}" + (f" ({entry['reason']})" if entry.get("reason") else "")
          + (f" in {entry['seconds']} s, log {entry['log']}" if "seconds" in entry else ""), flush=True)
    if entry.get("log_tail"):
        print("   " + entry["log_tail"].rstrip().replace("\n", "\n   "), flush=True)


def _save(report, args, start):
    """Bring the summary up to date and rewrite ``OUT/report.json`` atomically."""
    report.update(seconds=round(time.time() - start, 1), figures=figures(report["parts"]),
                  paths=exercised_paths(report["parts"], args.cuda),
                  ok=all(e["status"] in ("ok", "skipped") for e in report["parts"].values()))
    with atomic_open(os.path.join(args.out, "report.json")) as handle:
        json.dump(report, handle, indent=1)


def run_parts(args, report):
    """Run the selected parts in order, within ``--budget``; returns whether the check was interrupted."""
    start, interrupted = time.time(), False
    _save(report, args, start)
    for part in args.selected:
        limit = args.limits.get(part.name, part.limit(args.cuda))
        entry = {"limit_s": limit, "about": part.doc}
        left = None if args.budget is None else args.budget - (time.time() - start)
        statuses = {name: e["status"] for name, e in report["parts"].items()}
        why = "interrupted" if interrupted else _why_skipped(args, part, limit, statuses, left)
        if why:
            entry.update(status="skipped", reason=why)
        else:
            print(f"== {part.name} (limit {limit:.0f} s): {part.doc}", flush=True)
            try:
                entry.update(run_part(args, part, limit))
            except KeyboardInterrupt:
                interrupted = True
                entry.update(status="interrupted", reason="the check was interrupted",
                             log=os.path.join(args.out, "logs", part.name + ".log"))
        report["parts"][part.name] = entry
        _print_entry(part.name, entry)
        _save(report, args, start)
    return interrupted


def main(argv=None):
    args = parse_args(argv)
    if args.run_part:
        return run_part_here(args)
    signal.signal(signal.SIGTERM, _interrupt)
    for folder in ("logs", "results", "work"):
        os.makedirs(os.path.join(args.out, folder), exist_ok=True)
    report = {"device": torch.cuda.get_device_name(0) if args.cuda else "cpu (smoke)", "torch": torch.__version__,
              "budget_s": args.budget, "out": args.out, "parts": {}}
    interrupted = run_parts(args, report)
    print_lists(report["paths"])
    counts = {status: sum(e["status"] == status for e in report["parts"].values())
              for status in ("ok", "failed", "timeout", "skipped", "interrupted")}
    path = os.path.join(args.out, "report.json")
    print(f"== {', '.join(f'{n} {s}' for s, n in counts.items() if n)} in {report['seconds']} s; report {path}",
          flush=True)
    print(json.dumps(report))
    if interrupted:
        raise UserError(f"interrupted; the report so far is in {path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
