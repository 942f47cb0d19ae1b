"""The GPU readiness check on the CPU (--cpu-smoke): every part runs in its own process under its own
limit, a failing or hanging part is reported and the others still run, and the report and logs stay."""
import json
import os
import time

from tests.helpers import python

PIPELINE = ("old_model", "features", "train_UniBCT", "train_NCCL")


def _report(proc, out):
    with open(os.path.join(out, "report.json")) as handle:
        report = json.load(handle)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == report
    return report


def test_cpu_smoke_reports_every_part_when_one_fails(tmp_path):
    out = str(tmp_path / "check")
    proc = python("tools/gpu_check/gpu_check.py", "--cpu-smoke", "--out", out, "--pipeline-methods", "UniBCT,NCCL",
                  "--fail-part", "amp_overflow", timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = _report(proc, out)
    parts = report["parts"]
    failed = parts.pop("amp_overflow")
    assert failed["status"] == "failed" and "made to fail" in failed["log_tail"], failed
    with open(failed["log"]) as handle:
        assert "made to fail" in handle.read()
    assert parts.pop("two_rank_partial_fc")["result"]["backend"] == "gloo"
    assert {name: entry["status"] for name, entry in parts.items()} == {name: "ok" for name in parts}
    assert list(parts)[:4] == list(PIPELINE) and len(parts) == 14
    faults = parts["faults"]["result"]["scenarios"]
    assert len(faults) == 5 and all(s["ok"] and all(code != 0 for code in s["exit_codes"]) for s in faults.values())
    assert set(report["figures"]["fault_seconds_to_exit"]) == set(faults)
    assert all(os.path.isfile(entry["log"]) for entry in parts.values())
    assert parts["old_model"]["result"]["resumed_from_step"] == 3 and parts["old_model"]["result"]["backend"] == "gloo"
    assert parts["features"]["result"]["chunks"] == 4
    assert not parts["train_UniBCT"]["result"]["reembedding_sharded"]
    assert parts["deterministic_resume"]["result"]["max_abs_diff"] <= 1e-6
    figures = report["figures"]
    assert set(figures["method_images_per_s"]) == {"ArcFace", "MixBCT", "BCT", "UniBCT", "NCCL", "L2", "AdvBCT"}
    assert set(figures["backbone_ms_per_step"]) == {"fp16", "fp16_channels_last"}
    assert figures["host_syncs_per_step"]["NCCL"]["aten::nonzero"] >= 0
    assert {"trainer_channels_last", "trainer_compile", "softmax_linear"} <= set(figures["trainer_samples_per_s_last_step"])
    paths = report["paths"]
    assert paths["cuda"] == [] and paths["nccl"] == []   # nothing ran on CUDA: every path is listed as not exercised
    reasons = {path.split(" (", 1)[0]: path for path in paths["not_on_cuda"]}
    assert "(failed" in reasons["AMP overflow: step skipped and scale halved by optimizer_step"]
    assert reasons["UniBCT refinement: re-embedding, rank-0 refinement, broadcast"].endswith("(CPU smoke)")
    assert reasons["MixBCT mixing of old rows read by the loader workers"].endswith("(not selected)")
    assert "NOT exercised on CUDA" in proc.stdout


def _processes_naming(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if text.encode() in handle.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def test_a_part_past_its_limit_is_killed_with_its_processes(tmp_path):
    out = str(tmp_path / "check")
    start = time.time()
    proc = python("tools/gpu_check/gpu_check.py", "--cpu-smoke", "--out", out, "--parts", "old_model,amp_overflow",
                  "--limit", "old_model=6", timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    parts = _report(proc, out)["parts"]
    assert parts["old_model"]["status"] == "timeout", parts["old_model"]
    assert 6 <= parts["old_model"]["seconds"] <= 6 + 8, parts["old_model"]
    assert parts["amp_overflow"]["status"] == "ok"
    assert time.time() - start < 60
    assert _processes_naming(out) == []   # torchrun, its workers and their loader workers are gone


def test_budget_skips_a_part_whose_limit_does_not_fit(tmp_path):
    out = str(tmp_path / "check")
    proc = python("tools/gpu_check/gpu_check.py", "--cpu-smoke", "--out", out, "--parts", "old_model,amp_overflow",
                  "--budget", "40", "--limit", "amp_overflow=30", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _report(proc, out)
    assert report["parts"]["old_model"]["status"] == "skipped"
    assert report["parts"]["old_model"]["reason"].startswith("budget: limit 150 s")
    assert report["parts"]["amp_overflow"]["status"] == "ok" and report["ok"]
    assert report["seconds"] < 40
