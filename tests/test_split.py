"""Split tool: exact membership, relabelling, record 0, ids, property files, rounding, errors."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from utils.config import ROOT
from utils.errors import UserError
from utils.recordio import IRHeader, MAGIC, MXIndexedRecordIO, pack, unpack

TOOL = os.path.join(ROOT, "tools", "split_dataset", "split_dataset_ms1mv3.py")
_spec = importlib.util.spec_from_file_location("split_dataset_ms1mv3", TOOL)
split_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(split_tool)

# dataset order = keys 1..26; counts: label 0 ×1, 1 ×2, 2 ×5, 3 ×3, 4 ×15
LABELS = [2, 4, 1, 2, 4, 4, 0, 3, 2, 4, 4, 1, 3, 4, 4, 2, 4, 4, 3, 4, 2, 4, 4, 4, 4, 4]
EXPECTED = {  # split → (source keys in order, label offset, num_classes)
    "train_part_30_class": ([3, 7, 12], 0, 2),  # round(0.3·5) = round(1.5) = 2 identities
    "train_part_70_class": ([1, 2, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26],
                            2, 3),
    # per identity: n=1 → 1 (and also in 70), n=2 → 1, n=5 → round(1.5) = 2, n=3 → 1, n=15 → round(4.5) = 4
    "train_part_30_data": ([1, 2, 3, 4, 5, 6, 7, 8, 10], 0, 5),
    "train_part_70_data": ([7, 9, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26], 0, 5),
}


def image_bytes(key):
    return b"img-%03d" % key + (MAGIC.to_bytes(4, "little") if key % 4 == 0 else b"")


def make_source(folder):
    prefix = os.path.join(folder, "train")
    n = len(LABELS)
    with MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w") as writer:
        writer.write_idx(0, pack(IRHeader(2, [n + 1, n + 6], 0, 0), b""))
        for key, label in enumerate(LABELS, 1):
            value = [float(label), 0.25] if key % 5 == 0 else float(label)  # some label arrays
            writer.write_idx(key, pack(IRHeader(0, value, key * 10, key), image_bytes(key)))
        for label in range(5):  # identity records, ignored
            writer.write_idx(n + 1 + label, pack(IRHeader(2, [1, 2], 0, 0), b""))
    with open(os.path.join(folder, "property"), "w") as handle:
        handle.write("5,112,112\n")


def test_split_membership_relabelling_and_layout(tmp_path, capsys):
    make_source(str(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    split_tool.main(["--root", str(tmp_path)])
    summary = capsys.readouterr().out
    assert "train_part_70_data" in summary and "18" in summary
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    names = sorted(os.listdir(tmp_path))
    assert not [n for n in names if n.startswith(".tmp")]
    for name, (source_keys, offset, classes) in EXPECTED.items():
        assert (tmp_path / f"{name}.property").read_text() == f"{classes},112,112\n"
        reader = MXIndexedRecordIO(str(tmp_path / f"{name}.idx"), str(tmp_path / f"{name}.rec"), "r")
        count = len(source_keys)
        assert reader.keys == list(range(count + 1))
        header0, _ = unpack(reader.read_idx(0))
        assert header0.flag == 2 and header0.label.tolist() == [count + 1, count + 1]
        for key, source in enumerate(source_keys, 1):
            header, image = unpack(reader.read_idx(key))
            assert image == image_bytes(source)
            assert (header.id, header.id2) == (source * 10, source)
            expected_label = LABELS[source - 1] - offset
            if source % 5 == 0:
                assert header.flag == 2 and header.label.tolist() == [expected_label, 0.25]
            else:
                assert header.flag == 0 and header.label == expected_label


def test_split_to_other_folder_and_ratio(tmp_path):
    make_source(str(tmp_path / "src"))
    split_tool.main(["--root", str(tmp_path / "src"), "--ratio", "0.2", "--out", str(tmp_path / "out")])
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == sorted(f"train_part_{part}_{kind}.{ext}" for part in (20, 80) for kind in ("class", "data")
                           for ext in ("rec", "idx", "property"))
    assert (tmp_path / "out" / "train_part_20_class.property").read_text() == "1,112,112\n"
    assert (tmp_path / "out" / "train_part_80_class.property").read_text() == "4,112,112\n"
    with pytest.raises(UserError, match=r"--ratio 0.1 leaves train_part_10_class empty"):  # round(0.5) = 0
        split_tool.main(["--root", str(tmp_path / "src"), "--ratio", "0.1", "--out", str(tmp_path / "out2")])
    assert not os.path.exists(tmp_path / "out2")


@pytest.mark.parametrize("ratio", [0.3, 0.25, 0.45, 0.7, 0.15])
def test_split_plan_rounds_like_python(ratio):
    counts = np.arange(1, 301)
    labels = np.repeat(np.arange(len(counts)), counts)
    plan = split_tool.split_plan(labels, len(counts), ratio)
    small, large = plan[f"{round(ratio * 100)}_data"][0], plan[f"{100 - round(ratio * 100)}_data"][0]
    taken = np.bincount(labels[small], minlength=len(counts))
    assert taken.tolist() == [max(1, round(ratio * int(n))) for n in counts]
    left = np.bincount(labels[large], minlength=len(counts))
    assert left.tolist() == [1 if n == 1 else n - max(1, round(ratio * int(n))) for n in counts]
    assert plan[f"{round(ratio * 100)}_class"][2] == round(ratio * len(counts))


def test_split_cli_errors(tmp_path):
    result = subprocess.run([sys.executable, TOOL, "--root", str(tmp_path), "--ratio", "0.5"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: --ratio must be in (0, 1)")
    assert "Traceback" not in result.stderr
    with pytest.raises(UserError, match=r"expected .*train\.rec and .*train\.idx"):
        split_tool.main(["--root", str(tmp_path)])
