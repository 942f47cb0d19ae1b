"""The demo's commands: each demo config's file, its training command and a stage command run with its keys."""
import os

from tools.demo.runner import ROOT


def config_file(name):
    """The demo config of ``name`` (``old_softmax``, ``independent`` or a method), relative to the root."""
    if name in ("old_softmax", "independent"):
        return f"configs/demo/{name}.py"
    return os.path.join("BCT_methods", name, "configs", f"demo_{name}.py")


def with_config(demo, command, name, extra=None, sd=None):
    """``command`` (script first) with ``name``'s demo config and ``--set`` for the keys of this run
    (``demo.keys``, then ``extra``) that differ from the file's."""
    from utils.config import get_config

    path = config_file(name)
    overrides = demo.overrides(name, get_config(os.path.join(ROOT, path)), extra, sd)
    return [command[0], path, *command[1:]] + (["--set", *overrides] if overrides else [])


def train_command(demo, name, extra=None, sd=None):
    """The training command of demo config ``name`` in this run (``train_old_*.py`` or the method's)."""
    script = {"old_softmax": "train_old_softmax.py", "independent": "train_old_arc.py"}.get(
        name, os.path.join("BCT_methods", name, "train.py"))
    return with_config(demo, [script], name, extra, sd)
