"""Every shipped config resolves to the merged values recorded before configs/scenarios.py existed.

``tests/data/shipped_configs.json`` holds the merged configs of commit 6ff64e0 (each config restating
all its keys), paths relative to the repository root.
"""
import glob
import json
import os

import pytest

from configs import scenarios
from utils.config import ROOT, get_config
from utils.errors import UserError

SNAPSHOT = os.path.join(ROOT, "tests", "data", "shipped_configs.json")
# defaults deliberately changed since the snapshot: the published behaviour became the default
CHANGED_DEFAULTS = {"UniBCT": {"refine_normalize": False}}


def shipped_configs():
    paths = glob.glob(os.path.join(ROOT, "configs", "f*.py"))
    paths += [p for p in glob.glob(os.path.join(ROOT, "BCT_methods", "*", "configs", "*.py"))
              if not os.path.basename(p).startswith(("base", "demo_"))]
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def plain(value):
    """JSON form of a merged value, paths relative to the repository root."""
    if isinstance(value, str) and os.path.isabs(value) and value.startswith(ROOT):
        return os.path.relpath(value, ROOT)
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


def test_every_shipped_config_is_in_the_snapshot():
    with open(SNAPSHOT) as handle:
        assert sorted(json.load(handle)) == shipped_configs()
    assert len(shipped_configs()) == 101


@pytest.mark.parametrize("method", ["AdvBCT", "BCT", "L2", "MixBCT", "NCCL", "UniBCT", "old"])
def test_shipped_configs_resolve_as_before(method):
    """Every key of the snapshot keeps its value (keys a base declared later are not compared), but for the
    defaults listed in CHANGED_DEFAULTS."""
    with open(SNAPSHOT) as handle:
        snapshot = json.load(handle)
    paths = [p for p in shipped_configs() if (p.startswith("configs/") if method == "old" else f"/{method}/" in p)]
    assert paths
    for path in paths:
        merged = get_config(os.path.join(ROOT, path))
        merged.pop("config_path")
        got = {key: plain(value) for key, value in merged.items()}
        want = dict(snapshot[path], **CHANGED_DEFAULTS.get(method, {}))
        assert {k: got[k] for k in want} == want, path


def test_experiment_paths_from_the_method_folder(monkeypatch):
    """Relative paths mean the same files from the root and from a method folder."""
    path = "BCT_methods/MixBCT/configs/EXclass_ms1mv3_r18_to_r50_MixBCT_softmax_to_arc_f128.py"
    from_root = get_config(os.path.join(ROOT, path))
    monkeypatch.chdir(os.path.join(ROOT, "BCT_methods", "MixBCT"))
    from_folder = get_config(os.path.relpath(os.path.join(ROOT, path)))
    assert from_folder.old_embedding == from_root.old_embedding == os.path.join(
        ROOT, "feature_save", "EXclass", "f128_r18_softmax_class100_feature.npy")
    assert from_folder.rec == os.path.join(ROOT, "dataset", "ms1m-retinaface-t1")


@pytest.mark.parametrize("call, message", [
    (lambda: scenarios.Experiment("OPfoo", "softmax_to_arc_f128"), "scenario 'OPfoo': expected one of"),
    (lambda: scenarios.Experiment("OPclass", "softmax_arc_f128"), "combination 'softmax_arc_f128': expected"),
    (lambda: scenarios.old_model("class70", "softmax", 128), None),
    (lambda: scenarios.old_model("class30", "cosface", 128), "old loss 'cosface': expected one of softmax, arc"),
])
def test_scenario_helper_rejects_unknown_names(call, message):
    if message is None:
        assert call().rec == "dataset/ms1m-retinaface-t1/train_part_70_class"
        return
    with pytest.raises(UserError, match=message):
        call()
