"""Every shipped config resolves to the merged values recorded before configs/scenarios.py existed.

``tests/data/shipped_configs.json`` holds the merged configs of commit 6ff64e0 (each config restating
all its keys), paths relative to the repository root; CHANGED_SINCE_SNAPSHOT lists every value changed
on purpose since then.
"""
import glob
import json
import os
import re

import pytest

from configs import scenarios
from utils.config import ROOT, get_config
from utils.errors import UserError

SNAPSHOT = os.path.join(ROOT, "tests", "data", "shipped_configs.json")
# values deliberately changed since the snapshot, where the published value became the default:
# (regular expression on the config path, {key: value})
CHANGED_SINCE_SNAPSHOT = [
    (r"/UniBCT/", {"refine_normalize": False}),
    (r"/(BCT|UniBCT)/", {"warmup_epoch": -1}),                              # published BCT and UniBCT configs
    (r"/(MixBCT|L2)/configs/OPclass_", {"num_classes": 93431, "num_image": 3625372}),   # the OPdata counts
    (r"/OPdata_", {"num_image": 3625372}),                                  # 5,179,510 − 1,554,138
    (r"_data30\.py$", {"num_image": 1554138}),
]


def changed_since_snapshot(path):
    changes = {}
    for pattern, values in CHANGED_SINCE_SNAPSHOT:
        if re.search(pattern, path):
            changes.update(values)
    return changes


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
    values listed in CHANGED_SINCE_SNAPSHOT."""
    with open(SNAPSHOT) as handle:
        snapshot = json.load(handle)
    paths = [p for p in shipped_configs() if (p.startswith("configs/") if method == "old" else f"/{method}/" in p)]
    assert paths
    for path in paths:
        merged = get_config(os.path.join(ROOT, path))
        merged.pop("config_path")
        got = {key: plain(value) for key, value in merged.items()}
        want = dict(snapshot[path], **changed_since_snapshot(path))
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


def test_changes_since_the_snapshot_are_exactly_the_listed_ones():
    """Each listed change touches the configs it names (13 UniBCT, 13 BCT + 13 UniBCT, 12 MixBCT/L2 OPclass,
    21 OPdata, 3 data30 old models) and every listed value differs from the snapshot's."""
    paths = shipped_configs()
    counts = [sum(bool(re.search(pattern, p)) for p in paths) for pattern, _ in CHANGED_SINCE_SNAPSHOT]
    assert counts == [13, 26, 12, 21, 3]
    with open(SNAPSHOT) as handle:
        snapshot = json.load(handle)
    differing = {(p, k) for p in paths for k, v in changed_since_snapshot(p).items() if snapshot[p][k] != v}
    assert len(differing) == 13 + 26 + 2 * 12 + 21 + 3


def test_set_overrides_the_file():
    """``--set KEY=VALUE``: Python literals, other text as a string, paths resolved like the file's."""
    path = os.path.join(ROOT, "configs", "demo", "independent.py")
    cfg = get_config(path, ["lr=0.3", "rec=dataset/mine", "margin_list=(1.0, 0.5, 0.0)", "fp16=True", "seed=7"])
    assert (cfg.lr, cfg.margin_list, cfg.fp16, cfg.seed) == (0.3, (1.0, 0.5, 0.0), True, 7)
    assert cfg.rec == os.path.join(ROOT, "dataset", "mine")
    assert get_config(path, {"output": "/tmp/run"}).output == "/tmp/run"
    with pytest.raises(UserError, match=r"^--set bogus: unknown key\(s\) for config .*independent.py"):
        get_config(path, ["bogus=1"])
    with pytest.raises(UserError, match=r"^--set 'lr': expected KEY=VALUE with KEY a config key$"):
        get_config(path, ["lr"])


def test_set_values_fit_the_default_type():
    """A ``--set`` value must fit the type of the key's default in the bases (None default: anything)."""
    path = os.path.join(ROOT, "BCT_methods", "UniBCT", "configs", "EXclass_ms1mv3_r18_to_r50_UniBCT_arc_to_arc_f512.py")
    cfg = get_config(path, ["num_epoch=2.0", "lr=1", "refine_epochs=[1, 2]", "resume=auto", "num_classes=(1,)"])
    assert (cfg.num_epoch, type(cfg.lr), cfg.refine_epochs, cfg.resume, cfg.num_classes) == (2, float, (1, 2), "auto", (1,))
    for item, expected in (("num_epoch=2.5", "an integer"), ("lr=0.1.5", "a number"), ("fp16=1", "True or False"),
                           ("network=5", "a text"), ("lr_steps=3", "a tuple"), ("loss_weight=None", "a number"),
                           ("resume=1", "True, False or a text")):
        with pytest.raises(UserError, match=rf"^--set {item.split('=')[0]}=.*: expected {expected}"):
            get_config(path, [item])


def test_set_on_the_command_line(tmp_path):
    """Every training script and the feature tools take ``--set``; an unknown key is one line, exit 2."""
    from tests.helpers import python

    for command in (["train_old_arc.py", "configs/demo/independent.py"],
                    ["tools/get_feature/get_feature.py", "configs/demo/old_softmax.py", "--SD", "f8_r18_arc_class70"]):
        proc = python(*command, "--set", "lr=0.1", "bogus_key=1")
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert proc.stderr.startswith("error: --set bogus_key: unknown key(s) for config ")
