"""The demo's stage runner: :class:`Pipeline` runs each stage as a subprocess with its own log, and evaluates models in process."""
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time

from utils.errors import UserError
from utils.io import atomic_np_savez, safe_np_load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Pipeline:
    """Runs stages in order, one log file each, timing them; ``--reuse`` skips finished stages.

    ``reuse_evaluations`` (the studies): :meth:`evaluate` also reads back a model's stored results
    when all of them are newer than the model and the old embeddings and hold the same resamples.
    """

    def __init__(self, out, env, reuse, input_size=None, reuse_evaluations=False):
        self.out, self.env, self.reuse, self.input_size = out, env, reuse, input_size
        self.reuse_evaluations = reuse_evaluations
        self.seconds = {}
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)

    def stage(self, name, command, done_when=()):
        """Run ``command`` (argv list, python scripts relative to the repo root) unless its outputs exist."""
        self.parallel([(name, command, done_when)], jobs=1)

    def parallel(self, stages, jobs, idle_work=None):
        """Run independent stages ``(name, command, done_when)``, up to ``jobs`` at a
        time, each with an equal share of the CPU threads.

        ``idle_work(finished, threads)`` is called in this process whenever no stage is waiting and
        fewer than ``jobs`` run (the last round), with the names of the stages done so far and the
        threads left free; it does one piece of work and returns False when none is ready.
        """
        threads = max(1, (os.cpu_count() or 1) // jobs)
        env = dict(self.env, OMP_NUM_THREADS=str(threads)) if jobs > 1 else self.env
        pending, running = list(stages), {}
        while pending or running:
            while pending and len(running) < jobs:
                name, command, done_when = pending.pop(0)
                if self.reuse and done_when and all(os.path.exists(p) for p in done_when):
                    print(f"[{name}] reused ({', '.join(os.path.relpath(p, ROOT) for p in done_when)})", flush=True)
                    self.seconds[name] = 0.0
                    continue
                log = os.path.join(self.logs, f"{name}.log")
                print(f"[{name}] running … (log: {os.path.relpath(log, ROOT)})", flush=True)
                handle = open(log, "w")
                handle.write(f"$ python {shlex.join(command)}\n")   # the command, to rerun the stage by hand
                handle.flush()
                proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env,
                                        stdout=handle, stderr=subprocess.STDOUT)
                running[name] = (proc, handle, log, time.time())
            if idle_work is not None and not pending and len(running) < jobs and \
                    idle_work(set(self.seconds), max(1, (os.cpu_count() or 1) - threads * len(running))):
                self._collect(running)
                continue
            time.sleep(0.2)
            self._collect(running)

    def _collect(self, running):
        """Note the stages of ``running`` that have ended (one that ends during ``idle_work`` is timed when
        that work returns); a failed one stops the others and is raised."""
        for name, (proc, handle, log, start) in list(running.items()):
            if proc.poll() is None:
                continue
            handle.close()
            del running[name]
            self.seconds[name] = round(time.time() - start, 1)
            if proc.returncode != 0:
                for other, *_ in running.values():
                    other.terminate()
                raise UserError(f"stage '{name}' failed (exit {proc.returncode}): {_last_line(log)} — see {log}")
            print(f"[{name}] done in {self.seconds[name]:.1f} s", flush=True)

    def evaluate(self, name, model, network, width, data, old_embeddings=None, resamples=0):
        """IJB-C 1:1 and 1:N of one model, self-test and (with ``old_embeddings``) cross-test.

        The model embeds the images once (``ijbc_eval.evaluate`` with saved embeddings); the other
        protocols, and the cross-test against the old model's saved embeddings, are computed from
        them (``restore_embs``), as a user would with -E. Returns ``([(test, result, result file)],
        embeddings file)``; with ``resamples`` each result file holds its figures over the resamples.
        """
        from tools.ijbc_eval.ijbc_eval import evaluate

        folder = os.path.join(self.out, "eval")
        os.makedirs(folder, exist_ok=True)
        stage, log = f"eval_{name}", os.path.join(self.logs, f"eval_{name}.log")
        stored = self._stored_results(folder, name, model, old_embeddings, resamples)
        if stored is not None:
            print(f"[{stage}] reused ({os.path.relpath(folder, ROOT)}/{name}_*.json)", flush=True)
            self.seconds[stage] = 0.0
            return stored
        print(f"[{stage}] running … (log: {os.path.relpath(log, ROOT)})", flush=True)
        start = time.time()
        options = dict(data_path=data, resamples=resamples)
        results = []
        try:
            with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
                first = os.path.join(folder, f"{name}_self_11.npz")
                results.append(("self", evaluate(model, network, width=width, input_size=self.input_size,
                                                 num_workers=1, save_embeddings=True, save_result=first, **options),
                                first))
                runs = [("self", True, first)]
                if old_embeddings is not None:
                    cross = os.path.join(folder, f"{name}_cross_embs.npz")
                    with safe_np_load(first) as new, safe_np_load(old_embeddings) as old:
                        atomic_np_savez(cross, embs=new["embs"], embs_f=new["embs_f"],
                                        embs_old=old["embs"], embs_f_old=old["embs_f"])
                    runs += [("cross", False, cross), ("cross", True, cross)]
                for test, one_to_n, source in runs:
                    path = os.path.join(folder, f"{name}_{test}_{'1N' if one_to_n else '11'}.npz")
                    results.append((test, evaluate(restore_embs=source, one_to_n=one_to_n, save_result=path,
                                                   **options), path))
        except (UserError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"stage '{stage}' failed: {exc} — see {log}") from None
        self.seconds[stage] = round(time.time() - start, 1)
        print(f"[{stage}] done in {self.seconds[stage]:.1f} s", flush=True)
        return results, first

    def _stored_results(self, folder, name, model, old_embeddings, resamples):
        """:meth:`evaluate`'s return value read from the result files of an earlier call, or None unless
        evaluations are reused and every file is there, newer than its inputs and of ``resamples``."""
        if not self.reuse_evaluations:
            return None
        tests = [("self", "11"), ("self", "1N")] + ([("cross", "11"), ("cross", "1N")] if old_embeddings else [])
        stems = [(test, os.path.join(folder, f"{name}_{test}_{tag}")) for test, tag in tests]
        inputs = [p for p in (model, old_embeddings) if p is not None]
        if not all(os.path.exists(stem + ".json") and os.path.exists(stem + ".npz") for _, stem in stems) or \
                min(os.path.getmtime(stem + ".json") for _, stem in stems) < max(map(os.path.getmtime, inputs)):
            return None
        results = []
        for test, stem in stems:
            with open(stem + ".json") as handle:
                result = json.load(handle)
            if result.get("bootstrap", {}).get("resamples", 0) != resamples:
                return None
            results.append((test, result, stem + ".npz"))
        return results, stems[0][1] + ".npz"


@contextlib.contextmanager
def torch_threads(count):
    """torch's intra-op threads set to ``count`` inside the block (unchanged when None)."""
    import torch

    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _last_line(path):
    with open(path, errors="replace") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    return lines[-1] if lines else "no output"
