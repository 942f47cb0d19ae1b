"""Commands under a time limit: a command that runs past it is stopped with every process it started."""
import contextlib
import os
import signal
import subprocess
import time

TIMEOUT_EXIT = 124   # a part whose inner command ran out of time exits with this code (as timeout(1) does)


class CommandTimeout(Exception):
    """A command ran past its limit and was killed with its processes."""


def _parent_table():
    """``{pid: parent pid}`` of every process (Linux ``/proc``; empty elsewhere)."""
    table = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    table[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return table


def _descendants(roots):
    table, found = _parent_table(), set(roots)
    while True:
        more = {pid for pid, parent in table.items() if parent in found} - found
        if not more:
            return found
        found |= more


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(root):
    """SIGKILL ``root`` (a session leader) and every process below it, its own sessions included (torchrun
    starts its workers in new sessions): the tree is frozen with SIGSTOP until no new process appears."""
    frozen = set()
    while True:
        fresh = _descendants({root} | frozen) - frozen
        if not fresh:
            break
        for pid in fresh:
            _signal(pid, signal.SIGSTOP)
        frozen |= fresh
    for pid in frozen | {root}:
        _signal(pid, signal.SIGKILL)
    try:
        os.killpg(root, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_limited(command, limit, log=None, env=None, cwd=None):
    """Run ``command`` in a new session for at most ``limit`` seconds, its output appended to the file
    ``log`` (None: to this process's output); returns ``(exit code, seconds)``. Past the limit, or when this
    process is interrupted, its whole process tree is killed (then :class:`CommandTimeout` is raised)."""
    start = time.time()
    with open(log, "a") if log else contextlib.nullcontext() as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT if log else None, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(limit, 0.1))
        except BaseException as exc:
            kill_tree(proc.pid)
            proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise CommandTimeout(f"ran past its limit of {limit:.0f} s: {' '.join(command)}") from None
            raise
    return code, round(time.time() - start, 1)


def log_tail(path, lines=20):
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""
