"""The GPU readiness script runs its whole code path on the CPU with --cpu-smoke."""
import json

from tests.helpers import python


def test_gpu_check_cpu_smoke():
    proc = python("tools/benchmark/gpu_check.py", "--cpu-smoke", "--pipeline-methods", "UniBCT,NCCL",
                  timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report["methods"]) == {"ArcFace", "MixBCT", "BCT", "UniBCT", "NCCL", "L2", "AdvBCT"}
    assert all(v["samples_per_s"] > 0 for v in report["methods"].values())
    assert set(report["arcface_variants"]) == {"default", "channels_last"}
    assert report["ijb_embedding_images_per_s"] > 0
    two_ranks = report["nccl_2_rank"]
    assert two_ranks["backend"] == "gloo" and two_ranks["ok"], two_ranks
    assert abs(two_ranks["distributed"] - two_ranks["single"]) < 1e-3
    pipeline = report["pipeline_2_processes"]
    assert pipeline["ok"] and pipeline["old_model"]["resumed"] and pipeline["old_model"]["backend"] == "gloo", pipeline
    assert set(pipeline["methods"]) == {"UniBCT", "NCCL"}
    assert all(m["model"] and m["epoch_boundary"] for m in pipeline["methods"].values()), pipeline
    paths = report["paths"]
    assert paths["cuda"] == [] and paths["nccl"] == []   # nothing ran on CUDA: every path is listed as not exercised
    assert any("UniBCT" in p for p in paths["not_on_cuda"]) and any("MixBCT" in p for p in paths["not_on_cuda"])
    assert "NOT exercised on CUDA" in proc.stdout
