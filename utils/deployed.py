"""Deployed models: an ONNX file or a TorchScript export used as the (old) model, with stated preprocessing.

A deployed model is whatever runs in production — e.g. insightface's ``w600k_r50.onnx`` — rather
than a backbone state_dict of this toolkit. :func:`load_model` opens one (onnxruntime session or
``torch.jit.load``) and checks it against the input size it will be fed (the ONNX file's declared
input shape; a trial batch for TorchScript); :class:`Preprocessing` states how uint8 RGB crops
become its input. Both plug into :class:`utils.embedding.ModelRunner`, so step 2, the IJB
evaluation and compat_eval embed with it exactly as with a toolkit model.

A preprocessing is written as one option value, comma-separated keys in any order::

    mean=127.5,std=127.5,rgb,flip_sum          # insightface recognition models (w600k_r50.onnx …)
    mean=123.675/116.28/103.53,std=58.395/57.12/57.375,rgb,no_flip    # ImageNet-style, per channel
    mean=127.5,scale=0.0078125,bgr             # scale = 1/std

``mean``/``std`` are in pixel units (0–255), one value or three in the model's channel order;
``rgb``/``bgr`` is the channel order the model expects; ``flip_sum`` adds the embedding of the
mirrored image, ``no_flip`` does not. Keys left out keep the tool's default.
"""
import dataclasses
import os
import warnings
import zipfile

from utils.errors import UserError, require

ONNX_EXTENSIONS = (".onnx",)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Model input ``(x[channels] − mean) / std`` of uint8 RGB crops; ``flip_sum``: add the mirror image's embedding."""

    mean: tuple = (127.5,)
    std: tuple = (127.5,)
    bgr: bool = False
    flip_sum: bool = False

    @property
    def scale(self):
        """``1 / std`` (one value, or one per channel)."""
        values = tuple(1.0 / s for s in self.std)
        return values[0] if len(values) == 1 else values

    @property
    def centre(self):
        return self.mean[0] if len(self.mean) == 1 else self.mean

    def describe(self):
        """A short text for logs and cache keys."""
        join = "/".join
        return (f"mean={join(f'{m:g}' for m in self.mean)},std={join(f'{s:g}' for s in self.std)},"
                f"{'bgr' if self.bgr else 'rgb'},{'flip_sum' if self.flip_sum else 'no_flip'}")


IJB_PREPROCESSING = Preprocessing(mean=(127.5,), std=(128.0,), flip_sum=True)   # insightface IJB: (x − 127.5)/128


def _numbers(key, text, option):
    try:
        values = tuple(float(v) for v in text.split("/"))
    except ValueError:
        values = ()
    require(len(values) in (1, 3), f"{option}: {key}={text}: expected one number or three separated by '/'")
    return values


def parse_preprocessing(text, default=Preprocessing(), option="--preprocess", allow_flip=True):
    """A :class:`Preprocessing` from ``text`` (see the module doc); keys left out keep ``default``'s."""
    if not text:
        return default
    values = dataclasses.asdict(default)
    for item in (t.strip() for t in text.split(",")):
        key, _, value = item.partition("=")
        if key in ("mean", "std") and value:
            values[key] = _numbers(key, value, option)
        elif key == "scale" and value:
            scale = _numbers(key, value, option)
            require(all(s > 0 for s in scale), f"{option}: scale={value}: must be positive")
            values["std"] = tuple(1.0 / s for s in scale)
        elif item in ("rgb", "bgr"):
            values["bgr"] = item == "bgr"
        elif item in ("flip_sum", "no_flip") and allow_flip:
            values["flip_sum"] = item == "flip_sum"
        else:
            known = "mean=V, std=V, scale=V, rgb, bgr" + (", flip_sum, no_flip" if allow_flip else "")
            raise UserError(f"{option} {text}: unknown item {item!r} (expected {known})"
                            + ("" if allow_flip or item not in ("flip_sum", "no_flip") else
                               "; this tool evaluates with and without the mirror image (variants F1/F0)"))
    require(all(s != 0 for s in values["std"]), f"{option} {text}: std must not be 0")
    return Preprocessing(**values)


def add_preprocess_arg(parser, flag="--preprocess", default_text="mean=127.5,std=127.5,rgb,no_flip", what="the model"):
    parser.add_argument(flag, default=None, metavar="SPEC",
                        help=f"input preprocessing of {what}: mean=V[/V/V],std=V[/V/V] (or scale=V),rgb|bgr,"
                             f"flip_sum|no_flip (default {default_text}); see docs/features.md")


def model_kind(path):
    """``"onnx"``, ``"torchscript"`` or ``"state_dict"`` (a toolkit backbone) for a model file."""
    path = os.fspath(path)
    if path.lower().endswith(ONNX_EXTENSIONS):
        return "onnx"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for name in names):
            return "torchscript"
    return "state_dict"


def load_model(path, input_size, device):
    """An onnxruntime session or a TorchScript module for ``path``, checked for ``(B, 3, S, S)`` input."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"model file not found: {path}")
    kind = model_kind(path)
    if kind == "onnx":
        return _onnx_session(path, input_size, device)
    require(kind == "torchscript", f"{path}: not an ONNX file or a TorchScript export (a toolkit state_dict is "
                                   "read through its config or -net)")
    return _torchscript(path, input_size, device)


def _expected(input_size):
    return f"(B, 3, {input_size}, {input_size})"


def _onnx_session(path, input_size, device):
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"{path} is an ONNX model, which needs onnxruntime (not installed): "
                        f"pip install onnxruntime (or onnxruntime-gpu for CUDA)") from None
    providers = ["CPUExecutionProvider"]
    if getattr(device, "type", str(device)) == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = onnxruntime.InferenceSession(path, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise UserError(f"cannot load ONNX model {path}: {str(exc).splitlines()[0]}") from None
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or any(isinstance(s, int) and s != want for s, want in zip(shape[1:], (3, input_size, input_size))):
        raise UserError(f"{path} expects input of shape {shape}, not {_expected(input_size)}; "
                        "pass the matching --input_size (--input_sizes in compat_eval.py)")
    output = session.get_outputs()[0].shape
    require(len(output) == 2, f"{path} declares output shape {output}, expected (B, d) embeddings")
    return session


def _torchscript(path, input_size, device):
    import torch

    try:
        with warnings.catch_warnings():      # newer torch marks TorchScript deprecated; deployed files still use it
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(path, map_location=device)
    except Exception as exc:  # torch raises RuntimeError and its own types for files that are not TorchScript
        raise UserError(f"cannot load TorchScript model {path}: {str(exc).strip().splitlines()[0]}") from None
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, input_size, input_size, device=device))
    except Exception as exc:  # the scripted forward's own error for a wrong input size
        raise UserError(f"{path} fails on {_expected(input_size)} input ({str(exc).strip().splitlines()[-1]}); "
                        "pass the matching --input_size (--input_sizes in compat_eval.py)") from None
    require(isinstance(out, torch.Tensor) and out.ndim == 2 and len(out) == 2,
            f"{path} returns {getattr(out, 'shape', type(out).__name__)} for {_expected(input_size)} input, "
            f"expected (B, d) embeddings")
    return model
