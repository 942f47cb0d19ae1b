"""The demo pipeline end to end in its quick form: every stage runs and the reports have the documented schema."""
import json
import os

from tests.helpers import python

METHODS = ["independent", "L2", "BCT", "UniBCT", "NCCL", "AdvBCT", "MixBCT"]
METRICS = {"TAR@FAR=1e-4", "TAR@FAR=1e-3", "TAR@FAR=1e-2", "top1", "TPIR@FPIR=1e-1"}


def test_quick_demo_end_to_end(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    proc = python("tools/run_demo.py", "--quick", "--out", str(out), "--data", str(data), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    stages = ["data", "split", "old_model", "features", "prototypes", "denoise"]
    stages += [f"train_{m}" for m in METHODS] + ["eval_old"] + [f"eval_{m}" for m in METHODS]
    for stage in stages:
        assert report["seconds"][stage] > 0, stage
        assert f"[{stage}] done" in proc.stdout
    rows = report["rows"]
    for row in rows:
        assert set(row) == {"method", "test", "metric", "value"}
        assert row["metric"] in METRICS and row["test"] in ("self", "cross")
        assert 0.0 <= row["value"] <= 1.0
    seen = {(r["method"], r["test"], r["metric"]) for r in rows}
    assert {("old", "self", m) for m in METRICS} <= seen
    for method in METHODS:
        assert {(method, t, m) for t in ("self", "cross") for m in METRICS} <= seen
    table = (out / "results.md").read_text()
    assert "| MixBCT | cross |" in table and "compatible" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in METHODS:
        assert os.path.isfile(out / method / "model.pt")


def test_demo_rejects_unknown_method(tmp_path):
    proc = python("tools/run_demo.py", "--quick", "--methods", "MixBCT,Foo", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --methods: unknown method 'Foo' (expected some of "
                                                "L2, BCT, UniBCT, NCCL, AdvBCT, MixBCT)"]
