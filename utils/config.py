"""Config modules: tiny easydict files merged over ``configs/base.py``.

A config file is Python (it is executed) and defines ``config = edict()`` with the keys it changes.
Keys are merged over ``configs/base.py`` and, for method configs, over the ``base.py`` that sits
in the config's own folder (``BCT_methods/<Method>/configs/base.py`` declares the method's keys).
A key that no base declares is an error, so a typo never silently falls back to a default.

Every script that takes a config also takes ``--set KEY=VALUE …`` (:func:`add_config_args`): values
applied over the merged file, read as Python literals (``--set lr=0.2 margin_list=(1.0,0.3,0.0)``), a
text that is not a literal as a string (``--set rec=dataset/mine``). Each value must fit the key's default in
the bases (:func:`check_override`), so ``--set num_epoch=one`` stops before anything is written.

Relative paths in the keys of :data:`PATH_KEYS` are resolved against the repository root, so a
shipped config means the same files whether a script runs from the root or from its method folder.
"""
import argparse
import ast
import copy
import importlib.util
import os

from easydict import EasyDict as edict

from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "configs", "base.py")

PATH_KEYS = ("rec", "output", "old_model", "old_embedding", "old_label", "old_prototype",
             "credible_old_feature")


def write_config(path, method=None, **keys):
    """Write a config module setting ``keys`` at ``path``; with ``method`` a ``base.py`` beside it declares
    that method's keys (``BCT_methods/<method>/configs/base.py``). Returns the path."""
    if method:
        with open(os.path.join(os.path.dirname(str(path)), "base.py"), "w") as handle:
            handle.write(f"from BCT_methods.{method}.configs.base import config  # noqa: F401\n")
    lines = ["from easydict import EasyDict as edict", "config = edict()"] + [f"config.{k} = {v!r}" for k, v in keys.items()]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return str(path)


def add_launcher_args(parser: argparse.ArgumentParser):
    """Accept the ``--local_rank``/``--local-rank`` argument that torch.distributed.launch passes, and
    ``--dist_timeout_minutes``."""
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--dist_timeout_minutes", type=float, default=None, metavar="MINUTES",
                        help="several processes: how long one waits for the others in a collective before the "
                             "job stops with an error (default 10)")
    return parser


def add_config_args(parser: argparse.ArgumentParser, positional=True):
    """The ``config`` argument (when ``positional``) and ``--set KEY=VALUE …``, read by :func:`get_config`."""
    if positional:
        parser.add_argument("config", help="config module (a .py file)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="config values over the file's, as Python literals (strings need no quotes)")
    return parser


def parse_overrides(items):
    """``["lr=0.2", "rec=dataset/x"]`` → ``{"lr": 0.2, "rec": "dataset/x"}`` (literal or, failing that, text)."""
    overrides = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY a config key")
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text
    return overrides


# keys whose default is False but that also take a name (checked where they are used)
TEXT_OR_BOOL = ("resume", "compile", "tf32")


def check_override(key, value, default):
    """Raise :class:`UserError` unless ``value`` fits the type of ``default`` (the key's value in the bases);
    returns the value to use.

    A bool default takes True/False (``resume``, ``compile`` and ``tf32`` also a text); an int default a whole number
    (``2.0`` becomes ``2``); a float default a number (an integer becomes a float); a str default a text; a
    tuple or list default a tuple or list (returned as the default's type); a None default anything. None is
    accepted only where the default is None.
    """
    if isinstance(default, bool):
        text = key in TEXT_OR_BOOL
        ok = isinstance(value, bool) or (text and isinstance(value, str))
        expected = "True, False or a text" if text else "True or False"
    elif isinstance(default, int):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
        expected, value = "an integer", int(value) if ok else value
    elif isinstance(default, float):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok, expected = isinstance(value, str), "a text"
    elif isinstance(default, (tuple, list)):
        ok, expected = isinstance(value, (tuple, list)), "a tuple such as (1, 2)"
        value = type(default)(value) if ok else value
    else:
        return value
    if not ok:
        raise UserError(f"--set {key}={value!r}: expected {expected} (the default is {default!r})")
    return value


def format_override(key, value):
    """The ``--set`` item that :func:`parse_overrides` reads back as ``value`` (text unquoted where it can be)."""
    if isinstance(value, str) and parse_overrides([f"{key}={value}"])[key] == value:
        return f"{key}={value}"
    return f"{key}={value!r}"


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


def get_config(path, overrides=None):
    """Load the config at ``path`` merged over its bases, then ``overrides`` (a dict, or ``--set`` items);
    returns an EasyDict. Adds ``config_name`` (file name without ``.py``) and ``config_path``; ``output`` defaults to
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
    defaults = dict(cfg)
    cfg.update(user)
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise UserError(f"--set {', '.join(unknown)}: unknown key(s) for config {path} "
                        f"(not declared in configs/base.py or the folder's base.py)")
    cfg.update({key: check_override(key, copy.deepcopy(value), defaults[key]) for key, value in overrides.items()})
    cfg = edict(cfg)
    cfg.config_name = os.path.splitext(os.path.basename(path))[0]
    cfg.config_path = path
    if not cfg.output:
        cfg.output = os.path.join("work_dirs", cfg.config_name)
    for key in PATH_KEYS:
        if isinstance(cfg.get(key), str):
            cfg[key] = resolve_path(cfg[key])
    return cfg
