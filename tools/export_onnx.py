"""Export a backbone state_dict (``model.pt``) to ONNX, and check it against PyTorch.

    python tools/export_onnx.py MODEL.pt -net=r50 OUT.onnx [--width 64] [--input_size 112] [--opset 17]

Input ``input`` (B, 3, S, S) float, RGB normalised as ``(x − 127.5) · 0.0078125``; output
``embedding`` (B, d); the batch axis is dynamic. When onnxruntime is installed the exported file
is run on a random batch and the largest absolute difference from PyTorch is printed (an error
above ``--tolerance``).
"""
import argparse
import importlib.util
import inspect
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np
import torch

from backbones import MODEL_NAMES, load_backbone
from utils.errors import UserError, require, run_cli
from utils.io import atomic_path


def export(model_file, network, output, width=64, input_size=112, opset=17):
    """Write ``output`` (atomically); returns the eval-mode PyTorch model that was exported."""
    model = load_backbone(model_file, network, width=width, input_size=input_size)
    example = torch.zeros(2, 3, input_size, input_size)
    # the TorchScript exporter: the default before torch 2.5 (no ``dynamo`` argument), asked for by name since
    torchscript = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with atomic_path(output) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), tmp, **torchscript, opset_version=opset, input_names=["input"],
                          output_names=["embedding"],
                          dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}})
    return model


def max_difference(model, onnx_file, input_size, batch=4, seed=0):
    """Largest |ONNX − PyTorch| on a random batch, or None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    x = torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (batch, 3, input_size, input_size))
                         .astype(np.float32))
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    return float(np.abs(got - want).max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_file", help="backbone state_dict (.pt)")
    parser.add_argument("output", help="ONNX file to write (.onnx)")
    parser.add_argument("-net", "--network", default="r50", help="backbone name (default r50)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--input_size", type=int, default=112)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest accepted |ONNX − PyTorch|")
    args = parser.parse_args(argv)
    require(args.network in MODEL_NAMES, f"unknown network '{args.network}' (expected one of {', '.join(MODEL_NAMES)})")
    require(args.output.endswith(".onnx"), f"output must end in .onnx, got {args.output}")
    require(importlib.util.find_spec("onnx") is not None,
            "exporting to ONNX needs the onnx package (not installed): pip install onnx (or pip install -r requirements.txt)")
    model = export(args.model_file, args.network, args.output, args.width, args.input_size, args.opset)
    print(f"wrote {args.output}")
    diff = max_difference(model, args.output, args.input_size)
    if diff is None:
        print("onnxruntime not installed: output not checked")
    else:
        print(f"max abs difference ONNX vs PyTorch: {diff:.3g}")
        if diff > args.tolerance:
            raise UserError(f"{args.output}: ONNX output differs from PyTorch by {diff:.3g} "
                            f"(more than --tolerance {args.tolerance})")


if __name__ == "__main__":
    run_cli(main)
