"""Image embeddings for IJB evaluation: a model runner (PyTorch ``.pt`` or ONNX) and the extraction loop.

Models see RGB input ``(x − 127.5) · 0.0078125`` at their input size; every image is embedded
as is and horizontally flipped (both kept, so every test variant can be formed later).
"""
import contextlib
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from backbones import load_backbone
from tools.ijbc_eval.align import AlignedFaces, init_worker, umeyama
from tools.ijbc_eval.meta import line_of
from utils.chunk_cache import chunk_ranges, file_stamp, regroup, span_rows
from utils.errors import UserError

CHUNK_IMAGES = 8192   # images per chunk: the unit of resuming an interrupted embedding


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """Embeds uint8 image batches (B, 3, S, S) → (embeddings, flipped-image embeddings), float32 numpy.

    ``.pt``: a backbone state_dict loaded with :func:`backbones.load_backbone` (AMP fp16 on CUDA);
    ``.onnx``: an onnxruntime session (CUDA provider when asked for and available).
    """

    def __init__(self, path, network, width=64, input_size=112, device=None):
        self.path, self.network, self.width, self.input_size = os.fspath(path), network, width, input_size
        self.device = torch.device(device or default_device())
        if not os.path.isfile(self.path):
            raise UserError(f"model file not found: {self.path}")
        if self.path.endswith(".onnx"):
            self.session, self.model = self._onnx_session(), None
        else:
            self.session, self.model = None, load_backbone(self.path, network, width, input_size, self.device)
        self.embedding_size = self(torch.zeros(1, 3, input_size, input_size, dtype=torch.uint8))[0].shape[1]

    def describe(self):
        """What its embeddings depend on (for a :class:`~utils.chunk_cache.ChunkCache` key)."""
        onnx = self.session is not None
        return dict(model=file_stamp(self.path), network=None if onnx else self.network,
                    width=None if onnx else self.width, input_size=self.input_size,
                    runtime="onnx" if onnx else "torch", device=self.device.type)

    def _onnx_session(self):
        try:
            import onnxruntime
        except ImportError:
            raise UserError(f"{self.path} is an ONNX model, which needs onnxruntime (not installed): "
                            f"pip install onnxruntime (or onnxruntime-gpu for CUDA)") from None

        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            session = onnxruntime.InferenceSession(self.path, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise UserError(f"cannot load ONNX model {self.path}: {str(exc).splitlines()[0]}") from None
        shape = session.get_inputs()[0].shape
        if len(shape) != 4 or any(isinstance(s, int) and s != want for s, want in
                                  zip(shape[1:], (3, self.input_size, self.input_size))):
            raise UserError(f"{self.path} expects input of shape {shape}, not (B, 3, {self.input_size}, "
                            f"{self.input_size}); pass the matching --input_size")
        return session

    @torch.no_grad()
    def __call__(self, images):
        x = (images.to(self.device, non_blocking=True).float() - 127.5) * 0.0078125
        x = torch.cat([x, torch.flip(x, dims=[3])])
        if self.session is not None:
            name = self.session.get_inputs()[0].name
            out = self.session.run(None, {name: x.cpu().numpy()})[0].astype(np.float32)
        else:
            amp = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" \
                else contextlib.nullcontext()
            with amp:
                out = self.model(x).float().cpu().numpy()
        return out[:len(images)], out[len(images):]


def alignment_matrices(meta):
    """Similarity matrix of every image; degenerate landmarks raise UserError naming the image."""
    matrices = umeyama(meta.landmarks)
    bad = ~np.isfinite(matrices).all(axis=(1, 2))
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError(f"{meta.files['landmarks']}: landmarks of image {meta.names[row]} are degenerate "
                        f"(all five points coincide)")
    return matrices


def extract(meta, embedders, batch_size=128, num_workers=2, cache=None):
    """``[(embs, embs_f), …]`` (float32, image order) for each embedder, in one pass over the images.

    Images go in chunks (``cache.ranges``, or CHUNK_IMAGES per chunk without a cache). With a
    :class:`~utils.chunk_cache.ChunkCache` each finished chunk is saved, and chunks saved by an
    earlier run are read back instead of being embedded again.
    """
    if batch_size < 1 or num_workers < 0:
        raise UserError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    sizes = sorted({e.input_size for e in embedders})
    dataset = AlignedFaces(meta.image_folder, meta.names, alignment_matrices(meta), sizes)
    spans = cache.ranges if cache is not None else chunk_ranges(len(dataset), CHUNK_IMAGES)
    outputs = [(np.empty((len(dataset), e.embedding_size), np.float32),
                np.empty((len(dataset), e.embedding_size), np.float32)) for e in embedders]
    pending = list(range(len(spans)))
    if cache is not None:   # chunks of an earlier run go straight into the outputs as they are checked
        pending = cache.pending(use=lambda k, arrays: _place(outputs, spans[k], arrays))
    loader = DataLoader(Subset(dataset, span_rows(spans[k] for k in pending)), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, worker_init_fn=init_worker,
                        pin_memory=any(e.device.type == "cuda" for e in embedders))

    def batches():
        for crops, index, readable in tqdm(loader, desc="embedding", unit="batch", mininterval=5):
            if not bool(readable.all()):
                row = int(index[~readable][0])
                path = meta.files["tid_mid"]
                raise UserError(f"cannot read image {os.path.join(meta.image_folder, meta.names[row])} "
                                f"(listed in {path} line {line_of(path, row)})")
            arrays = {}
            for i, embedder in enumerate(embedders):
                arrays[f"embs{i}"], arrays[f"embs_f{i}"] = embedder(crops[sizes.index(embedder.input_size)])
            yield index.numpy(), arrays

    for position, arrays in regroup(batches(), [spans[k] for k in pending]):
        if cache is not None:
            cache.save(pending[position], **arrays)
        _place(outputs, spans[pending[position]], arrays)
    return outputs


def _place(outputs, span, arrays):
    """Copy one chunk's ``embs<i>``/``embs_f<i>`` arrays into the full per-embedder outputs."""
    start, stop = span
    for i, (embs, embs_f) in enumerate(outputs):
        embs[start:stop], embs_f[start:stop] = arrays[f"embs{i}"], arrays[f"embs_f{i}"]
