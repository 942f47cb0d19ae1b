"""Image embeddings for IJB evaluation: the model files (PyTorch ``.pt``, ONNX, TorchScript) and the extraction pass.

Models see RGB input ``(x − 127.5) · 0.0078125`` at their input size (a deployed model: its stated
preprocessing); every image is embedded
as is and horizontally flipped (both kept, so every test variant can be formed later). The model
runner and the loop are those of step 2 (:mod:`utils.embedding`), so the pass also runs on
several GPUs under torchrun.
"""
import os

import numpy as np
import torch

from backbones import load_backbone
from tools.ijbc_eval import CHUNK_IMAGES
from tools.ijbc_eval.align import AlignedFaces, umeyama
from tools.ijbc_eval.meta import line_of
from utils.chunk_cache import file_stamp
from utils.deployed import IJB_PREPROCESSING, load_model, model_kind
from utils.embedding import ModelRunner, embed_crops
from utils.errors import UserError


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder(ModelRunner):
    """Embeds uint8 image batches (B, 3, S, S) → (embeddings, flipped-image embeddings), float32 numpy.

    ``.pt``: a backbone state_dict loaded with :func:`backbones.load_backbone`, run in fp32 as the
    published IJB-C evaluation (``amp``: AMP fp16 on CUDA, faster); an ONNX file or a TorchScript
    export: a deployed model (:mod:`utils.deployed`, fp32). ``preprocessing`` (default
    :data:`utils.deployed.IJB_PREPROCESSING`) turns the uint8 RGB crops into its input.
    """

    def __init__(self, path, network, width=64, input_size=112, device=None, preprocessing=None, amp=False):
        self.path, self.network, self.width, self.input_size = os.fspath(path), network, width, input_size
        self.preprocessing = preprocessing or IJB_PREPROCESSING
        device = torch.device(device or default_device())
        if not os.path.isfile(self.path):
            raise UserError(f"model file not found: {self.path}")
        self.kind = model_kind(self.path)
        if self.kind == "state_dict":
            model = load_backbone(self.path, network, width, input_size, device)
        else:
            model = load_model(self.path, input_size, device)
        super().__init__(model, device, amp=amp and self.kind == "state_dict", flip=True,
                         preprocessing=self.preprocessing)
        self.embedding_size = self(torch.zeros(1, 3, input_size, input_size, dtype=torch.uint8))[0].shape[1]

    def describe(self):
        """What its embeddings depend on (for a :class:`~utils.chunk_cache.ChunkCache` key)."""
        backbone = self.kind == "state_dict"
        return dict(model=file_stamp(self.path), network=self.network if backbone else None,
                    width=self.width if backbone else None, input_size=self.input_size,
                    runtime=self.kind, device=self.device.type, preprocessing=self.preprocessing.describe(),
                    precision="fp16" if self.amp else "fp32")


def alignment_matrices(meta):
    """Similarity matrix of every image; degenerate landmarks raise UserError naming the image."""
    matrices = umeyama(meta.landmarks)
    bad = ~np.isfinite(matrices).all(axis=(1, 2))
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError(f"{meta.files['landmarks']}: landmarks of image {meta.names[row]} are degenerate "
                        f"(all five points coincide)")
    return matrices


def extract(meta, embedders, batch_size=128, num_workers=2, cache=None, dist_info=None):
    """``[(embs, embs_f), …]`` (float32, image order) for each embedder, in one pass over the images.

    Images go in chunks (``cache.ranges``, or CHUNK_IMAGES per chunk without a cache), over the
    ranks of ``dist_info`` (default: this process alone; other ranks return None). With a
    :class:`~utils.chunk_cache.ChunkCache` each finished chunk is saved, and chunks saved by an
    earlier run are read back instead of being embedded again (:func:`utils.embedding.embed_crops`).
    """
    dataset = AlignedFaces(meta.image_folder, meta.names, alignment_matrices(meta),
                           sorted({e.input_size for e in embedders}))

    def check(batch):
        _, index, readable = batch
        if not bool(readable.all()):
            row = int(index[~readable][0])
            path = meta.files["tid_mid"]
            raise UserError(f"cannot read image {os.path.join(meta.image_folder, meta.names[row])} "
                            f"(listed in {path} line {line_of(path, row)})")

    return embed_crops(dataset, embedders, batch_size, num_workers, dist_info, cache, CHUNK_IMAGES, check)
