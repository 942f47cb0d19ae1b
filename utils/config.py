"""Config modules: tiny easydict files merged over ``configs/base.py``.

A config file is Python (it is executed) and defines ``config = edict()`` with the keys it changes.
Keys are merged over ``configs/base.py`` and, for method configs, over the ``base.py`` that sits
in the config's own folder (``BCT_methods/<Method>/configs/base.py`` declares the method's keys).
A key that no base declares is an error, so a typo never silently falls back to a default.

Relative paths in the keys of :data:`PATH_KEYS` are resolved against the repository root, so a
shipped config means the same files whether a script runs from the root or from its method folder.
"""
import argparse
import copy
import importlib.util
import os

from easydict import EasyDict as edict

from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "configs", "base.py")

PATH_KEYS = ("rec", "output", "old_model", "old_embedding", "old_label", "old_prototype",
             "credible_old_feature")


def add_launcher_args(parser: argparse.ArgumentParser):
    """Accept the ``--local_rank``/``--local-rank`` argument that torch.distributed.launch passes."""
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    return parser


def _load_module_config(path):
    spec = importlib.util.spec_from_file_location(
        "cfg_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise UserError(f"config {path} line {exc.lineno}: syntax error: {exc.msg}") from None
    if not hasattr(module, "config"):
        raise UserError(f"config {path} defines no `config` object")
    return module.config


def resolve_path(value):
    """Absolute form of a config path: relative paths are taken from the repository root."""
    if value is None or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(ROOT, value))


def get_config(path):
    """Load the config at ``path`` merged over its bases; returns an EasyDict.

    Adds ``config_name`` (file name without ``.py``) and ``config_path``; ``output`` defaults to
    ``work_dirs/<config_name>``.
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    cfg = copy.deepcopy(_load_module_config(BASE_CONFIG))
    method_base = os.path.join(os.path.dirname(path), "base.py")
    if os.path.isfile(method_base) and os.path.abspath(method_base) not in (BASE_CONFIG, path):
        cfg.update(copy.deepcopy(_load_module_config(method_base)))
    user = _load_module_config(path)
    unknown = sorted(set(user) - set(cfg))
    if unknown:
        raise UserError(f"config {path}: unknown key(s) {', '.join(unknown)} "
                        f"(not declared in configs/base.py or the folder's base.py)")
    cfg.update(user)
    cfg = edict(cfg)
    cfg.config_name = os.path.splitext(os.path.basename(path))[0]
    cfg.config_path = path
    if not cfg.output:
        cfg.output = os.path.join("work_dirs", cfg.config_name)
    for key in PATH_KEYS:
        if isinstance(cfg.get(key), str):
            cfg[key] = resolve_path(cfg[key])
    return cfg
