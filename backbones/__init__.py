"""Face backbones by name: iresnet r18…r200, MobileFaceNet ``mbf``, ViT ``vit_t``…``vit_l``.

Every backbone maps (B, 3, S, S) images to (B, num_features) embeddings; parameter names follow
insightface arcface_torch so its published ``state_dict`` files load unchanged.
"""
import torch

from backbones.iresnet import IRESNET_LAYERS, check_int, iresnet
from backbones.mobilefacenet import MobileFaceNet
from backbones.vit import VIT_VARIANTS, vit
from utils.errors import UserError
from utils.io import safe_torch_load

MODEL_NAMES = tuple(IRESNET_LAYERS) + ("mbf",) + tuple(VIT_VARIANTS)

# the state_dict entry whose length is the embedding size, per family
_EMBEDDING_KEYS = {"r": "features.weight", "mbf": "features.layers.3.weight", "vit": "feature.3.weight"}

# top-level key prefixes of classifier heads, which a backbone file must not hold
_HEAD_PREFIXES = ("fc_softmax", "classifier.", "head.", "partial_fc.", "pfc.")


def get_model(name, num_features=512, dropout=0.0, width=64, input_size=112):
    """Build backbone ``name`` (see :data:`MODEL_NAMES`); an unknown name raises UserError."""
    if name not in MODEL_NAMES:
        raise UserError(f"unknown network '{name}' (expected one of {', '.join(MODEL_NAMES)})")
    num_features = check_int(num_features, 1, "embedding size")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {dropout!r}")
    if name in IRESNET_LAYERS:
        return iresnet(name, num_features, dropout, width, input_size)
    if name == "mbf":
        return MobileFaceNet(num_features, dropout, width, input_size)
    return vit(name, num_features, dropout, width, input_size)


BACKBONE_AMP = ("body", "none", "all")


def build_backbone(cfg):
    """The backbone a training config describes (network, embedding_size, dropout, width, input size);
    ``backbone_amp = "body"`` runs the final layers of iresnet and MobileFaceNet in fp32 (``fp32_head``)."""
    amp = cfg.get("backbone_amp", "body")
    if amp not in BACKBONE_AMP:
        raise UserError(f"config {cfg.get('config_path', '')}: backbone_amp '{amp}' is not supported "
                        f"(expected one of {', '.join(BACKBONE_AMP)})")
    model = get_model(cfg.network, num_features=cfg.embedding_size, dropout=cfg.dropout,
                      width=cfg.network_width, input_size=cfg.input_size)
    model.fp32_head = amp == "body"
    return model


def _family(network):
    if network in IRESNET_LAYERS:
        return "r"
    return "mbf" if network == "mbf" else "vit"


def _listing(keys, limit=5):
    keys = sorted(keys)
    more = f", … ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def held_backbone(state):
    """What a state_dict holds, in words: ``an iresnet r18 of width 8 with 16-d embeddings``, or its first keys."""
    for family, key in _EMBEDDING_KEYS.items():
        if key in state and state[key].dim() == 1:
            break
    else:
        return f"no backbone of this toolkit (first keys {_listing(list(state)[:3])})"
    size = f"{state[key].shape[0]}-d embeddings"
    if family == "r":
        blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        name = next((n for n, layers in IRESNET_LAYERS.items() if layers == blocks), f"(blocks {blocks})")
        width = f" of width {state['conv1.weight'].shape[0]}" if "conv1.weight" in state else ""
        return f"an iresnet {name}{width} with {size}"
    if family == "mbf":
        return f"a MobileFaceNet with {size}"
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return f"a ViT of {depth} blocks with {size}"


def load_backbone(path, network, width=64, input_size=112, device="cpu"):
    """Load a backbone ``state_dict`` file (``model.pt``) into ``network``; return it in eval mode.

    The embedding size is read from the file; ``module.`` prefixes (DDP) are stripped. Every key
    must match (strict): missing keys, extra keys (e.g. a classifier head) or shapes that differ
    from ``network`` at ``width``/``input_size`` raise UserError.
    """
    if network not in MODEL_NAMES:
        raise UserError(f"unknown network '{network}' (expected one of {', '.join(MODEL_NAMES)})")
    state = safe_torch_load(path)
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"{path} is not a backbone state_dict (expected a mapping of parameter names to "
                        "tensors, as model.pt holds)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    heads = [k for k in state if k.startswith(_HEAD_PREFIXES)]
    if heads:
        raise UserError(f"{path} holds classifier-head keys ({_listing(heads)}); model.pt must hold the "
                        "backbone only")
    embedding_key = _EMBEDDING_KEYS[_family(network)]
    if embedding_key not in state or state[embedding_key].dim() != 1:
        raise UserError(f"{path} was saved from a different backbone than {network} "
                        f"(missing keys {embedding_key}); the file holds {held_backbone(state)}")
    model = get_model(network, num_features=int(state[embedding_key].shape[0]), width=width,
                      input_size=input_size)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        detail = "; ".join(part for part in (
            f"missing keys {_listing(missing)}" if missing else "",
            f"unexpected keys {_listing(unexpected)}" if unexpected else "") if part)
        raise UserError(f"{path} was saved from a different backbone than {network} ({detail}); "
                        f"the file holds {held_backbone(state)}")
    wrong = [f"{k}: saved {tuple(state[k].shape)}, expected {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise UserError(f"{path} does not match {network} with width={width}, input_size={input_size} "
                        f"({len(wrong)} shape mismatch(es), first {wrong[0]})")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
