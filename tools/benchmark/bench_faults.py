"""Time from an injected fault to the end of the whole job, for each way a multi-process run fails.

    python tools/benchmark/bench_faults.py [--device cpu|cuda] [--out DIR]

Each scenario trains a tiny r18 on a small synthetic set through ``faulty_train.py`` (the old
ArcFace script with a fault at step 5) under ``torchrun``, with 2 loader workers per process, and
measures the seconds from the fault (the time the faulty process prints) to the exit of every
launcher, with their exit statuses. On a machine with GPUs, ``--device cuda`` runs the same over
NCCL when the host has a GPU per process (else over gloo on CUDA). The last output line is a JSON object.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tools.synthetic import make_synthetic  # noqa: E402
from utils.config import write_config  # noqa: E402
from utils.distributed import BACKEND_VARIABLE, free_port  # noqa: E402
from utils.errors import run_cli  # noqa: E402

FAULTY = os.path.join(ROOT, "tools", "benchmark", "faulty_train.py")
# name: (fault, faulty rank, nodes, processes per node, config keys)
SCENARIOS = {
    "exception, 1 process": ("raise", 0, 1, 1, {}),
    "exception on rank 0 of 2": ("raise", 0, 1, 2, {}),
    "exception on rank 1 of 2": ("raise", 1, 1, 2, {}),
    "rank 1 killed (SIGKILL), 2 nodes x 1 process": ("kill", 1, 2, 1, {}),
    "rank 1 hangs, step_timeout_minutes = 0.1": ("stall", 1, 1, 2, {"step_timeout_minutes": 0.1}),
}


def _config(folder, data, device, name, keys):
    keys = dict(network="r18", network_width=8, input_size=32, embedding_size=16, rec=data, batch_size=4, num_epoch=3,
                num_workers=2, frequent=1, fp16=True, device=device, output=os.path.join(folder, name), **keys)
    return write_config(os.path.join(folder, f"{len(os.listdir(folder))}.py"), **keys)


def run_scenario(folder, data, device, name, timeout):
    """Seconds from the fault to each launcher's exit, and their exit statuses."""
    fault, rank, nodes, per_node, keys = SCENARIOS[name]
    cfg, port = _config(folder, data, device, name.split(",")[0].replace(" ", "_"), keys), free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", FAULT=fault, FAULT_STEP="5", FAULT_RANK=str(rank))
    if device == "cuda" and torch.cuda.device_count() < nodes * per_node:   # the "nodes" share this host's GPUs
        env[BACKEND_VARIABLE] = "gloo"
    launchers, ended = [], {}
    for node in range(nodes):
        command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node_rank={node}",
                   f"--nproc_per_node={per_node}", "--master_addr=127.0.0.1", f"--master_port={port}", FAULTY, cfg]
        log = open(os.path.join(folder, f"{len(os.listdir(folder))}.log"), "w+")
        launchers.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True), log))
    deadline = time.time() + timeout
    while len(ended) < nodes and time.time() < deadline:
        for node, (proc, _) in enumerate(launchers):
            if node not in ended and proc.poll() is not None:
                ended[node] = time.time()
        time.sleep(0.05)
    text = ""
    for proc, log in launchers:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        with log:
            log.seek(0)
            text += log.read()
    injected = re.search(r"injecting \w+ at ([\d.]+)", text)
    if injected is None:
        return {"ok": False, "note": "the fault was never reached", "log_tail": text[-1500:]}
    start = float(injected.group(1))
    seconds = [round(ended[n] - start, 1) if n in ended else None for n in range(nodes)]
    codes = [proc.returncode for proc, _ in launchers]
    backend = re.search(r"process\(es\) on \S+ \((\w+)\)", text)
    return {"seconds_to_exit": seconds, "exit_codes": codes, "backend": backend.group(1) if backend else None,
            "ok": all(s is not None for s in seconds) and all(c != 0 for c in codes)}


def run_all(folder, device, timeout=180, deadline=None):
    """Every scenario in ``folder`` (data, configs, logs), one line printed each; ``{scenario: result}``. Each
    scenario may take ``timeout`` seconds, and none runs past ``deadline`` (a ``time.time()``)."""
    os.makedirs(folder, exist_ok=True)
    data = os.path.join(folder, "data")
    make_synthetic.main(["--out", data, "--identities", "6", "--images-per-identity", "16", "--ijb-identities", "2",
                         "--workers", "0"])
    runs = os.path.join(folder, "runs")
    os.makedirs(runs, exist_ok=True)
    results = {}
    for name in SCENARIOS:
        left = timeout if deadline is None else min(timeout, deadline - time.time())
        results[name] = result = run_scenario(runs, data, device, name, left)
        print(f"{name}: {'every process ended' if result['ok'] else 'NOT ALL ENDED'}, seconds from the fault to each "
              f"launcher's exit {result.get('seconds_to_exit')}, exit codes {result.get('exit_codes')}, "
              f"backend {result.get('backend')}", flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL; one GPU per process)")
    parser.add_argument("--out", default=None, help="folder for the data, configs and logs (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds a scenario may take before it is killed")
    args = parser.parse_args(argv)
    folder = args.out or tempfile.mkdtemp(prefix="bench-faults-")
    results = run_all(folder, args.device, args.timeout)
    print(json.dumps({"device": args.device, "folder": folder, "scenarios": results}))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
