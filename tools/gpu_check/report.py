"""The report of a GPU check: which code paths it exercised on CUDA and over NCCL, and its figures."""
from utils.chunk_cache import CHUNK_ROWS

# (code path, the part that exercises it, a condition on that part's result or None)
PATHS = [
    ("AMP fp16 training with 2 processes: DDP buckets, GradScaler (train_old_arc.py)", "old_model", None),
    ("loader workers (2 per process, persistent) over an epoch boundary", "old_model", None),
    ("checkpoint agreement on --resume (all_gather_object)", "old_model", None),
    ("embedding dist.gather of chunks from both ranks (get_feature.py)", "features", None),
    ("MixBCT mixing of old rows read by the loader workers", "train_MixBCT", None),
    ("BCT influence loss over 2 processes", "train_BCT", None),
    ("UniBCT refinement: re-embedding, rank-0 refinement, broadcast", "train_UniBCT", None),
    (f"UniBCT re-embedding sharded across ranks (more than {CHUNK_ROWS:,} images)", "train_UniBCT",
     lambda result: result.get("reembedding_sharded")),
    ("NCCL all-reduces inside backward beside DDP buckets, queue all-gather", "train_NCCL", None),
    ("L2 loss over 2 processes", "train_L2", None),
    ("AdvBCT replicated-module gradient averaging", "train_AdvBCT", None),
    ("AMP training step of every method (1 process)", "method_steps", None),
    ("AMP overflow: step skipped and scale halved by optimizer_step", "amp_overflow", None),
    ("a failing rank (exception, SIGKILL, hang past the step timeout) ends the whole job", "faults", None),
    ("exact resume with deterministic = True", "deterministic_resume", None),
    ("channels_last through the trainer", "trainer_channels_last", None),
    ("bfloat16 AMP through the trainer (amp_dtype)", "trainer_bf16", None),
    ("train_old_softmax.py linear head under AMP", "softmax_linear", None),
    ("torch.compile (inductor) through the trainer", "trainer_compile", None),
    ("IJB embedding, AMP inference with flip", "ijb_embedding", None),
    ("bare backbone: bf16, channels_last, torch.compile (inductor)", "backbone_variants", None),
    ("Partial FC over 2 processes (loss equal to 1 process)", "two_rank_partial_fc", None),
]
NEVER = ["TF32 (tf32 = True)", "more than 2 processes or several nodes",
         "stop on SIGTERM/SIGINT with loader workers (tested on the CPU only)"]
TITLES = {"cuda": "exercised on CUDA", "nccl": "exercised over NCCL", "not_on_cuda": "NOT exercised on CUDA"}


def _why_not(entry, cuda, condition_met):
    if entry is None:
        return "not selected"
    if entry["status"] != "ok":
        return entry["status"] + (f": {entry['reason']}" if entry.get("reason") else "")
    if not cuda:
        return "CPU smoke"
    return None if condition_met else "not reached by this run's data"


def exercised_paths(parts, cuda):
    """``{"cuda": [...], "nccl": [...], "not_on_cuda": [...]}`` from the parts that ran and succeeded; each
    path not exercised on CUDA says why."""
    lists = {"cuda": [], "nccl": [], "not_on_cuda": []}
    for path, name, condition in PATHS:
        entry = parts.get(name)
        result = (entry or {}).get("result") or {}
        why = _why_not(entry, cuda, condition is None or condition(result))
        if why:
            lists["not_on_cuda"].append(f"{path} ({why})")
            continue
        lists["cuda"].append(path)
        if result.get("backend") == "nccl":
            lists["nccl"].append(path)
    lists["not_on_cuda"] += [f"{path} (no part runs it)" for path in NEVER]
    return lists


def figures(parts):
    """The measured figures of the parts that succeeded."""
    results = {name: entry["result"] for name, entry in parts.items() if entry["status"] == "ok"}
    found = {}
    if "method_steps" in results:
        methods = results["method_steps"]["methods"]
        found["method_images_per_s"] = {name: m["images_per_s"] for name, m in methods.items()}
        found["method_peak_memory_gib"] = {name: m["peak_memory_gib"] for name, m in methods.items()}
    if "backbone_variants" in results:
        found["backbone_ms_per_step"] = {name: v["ms_per_step"] for name, v in results["backbone_variants"]["variants"].items()}
    trainer = {name: result["samples_per_s"] for name, result in results.items() if result.get("samples_per_s")}
    if trainer:
        found["trainer_samples_per_s_last_step"] = trainer
    if "host_syncs" in results:
        found["host_syncs_per_step"] = results["host_syncs"]["per_step"]
    if "ijb_embedding" in results:
        found["ijb_embedding_images_per_s"] = results["ijb_embedding"]["images_per_s"]
    if "faults" in results:
        found["fault_seconds_to_exit"] = {name: r["seconds_to_exit"] for name, r in results["faults"]["scenarios"].items()}
    if "deterministic_resume" in results:
        found["deterministic_resume_max_abs_diff"] = results["deterministic_resume"]["max_abs_diff"]
    return found


def print_lists(paths):
    for key, title in TITLES.items():
        print(f"== {title}: {len(paths[key])}", flush=True)
        for path in paths[key]:
            print(f"   - {path}", flush=True)
