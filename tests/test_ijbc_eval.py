"""IJB evaluation end to end on a tiny synthetic IJB-C set: self/cross-test, saved results, CLI, errors, ONNX."""
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from backbones import get_model
from helpers import chunk_files, free_port, python
from tools.ijbc_eval import metrics
from tools.ijbc_eval.ijbc_eval import build_parser, evaluate, main
from tools.ijbc_eval.meta import load_cached, load_meta
from utils.errors import UserError

SCRIPT = os.path.join("tools", "ijbc_eval", "ijbc_eval.py")
TINY = dict(network="r18", width=8, input_size=32, num_workers=0, plot=False, verbose=False)


def _save_model(path, seed, features=16):
    torch.manual_seed(seed)
    model = get_model("r18", num_features=features, width=8, input_size=32)
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def ijb(tmp_path_factory):
    from tools.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("ijb")
    data = root / "data"
    make_synthetic.main(["--out", str(data), "--identities", "2", "--images-per-identity", "1",
                         "--ijb-identities", "8", "--workers", "0"])
    return SimpleNamespace(root=root, data=str(data), new=_save_model(root / "new.pt", 0),
                           old=_save_model(root / "old.pt", 1), wide=_save_model(root / "wide.pt", 2, features=32))


def _metrics_of(result):
    skip = {"test", "model", "network", "model_old", "network_old"}
    return {k: v for k, v in result.items() if k not in skip}


def _copy_data(ijb, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(os.path.join(ijb.data, "IJBC"), target / "IJBC", ignore=shutil.ignore_patterns(".cache"))
    return target


# --------------------------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("one_to_n", [False, True])
def test_self_test_equals_cross_test_against_itself(ijb, one_to_n):
    own = evaluate(ijb.new, data_path=ijb.data, one_to_n=one_to_n, **TINY)
    cross = evaluate(ijb.new, data_path=ijb.data, one_to_n=one_to_n, model_file_old=ijb.new, network_old="r18",
                     **TINY)
    assert own["test"] == "self" and cross["test"] == "cross"
    assert _metrics_of(own) == _metrics_of(cross)
    if one_to_n:
        assert set(own["TPIR@FPIR"]) == set(metrics.FPIR_KEYS) and {"G1", "G2", "mixed", "top5"} <= set(own)
    else:
        assert set(own["TAR@FAR"]) == set(metrics.FAR_KEYS) and 0 <= own["AUC"] <= 1


def test_saved_cross_result_and_restore_embs(ijb, tmp_path):
    out = str(tmp_path / "cross.npz")
    result = evaluate(ijb.new, data_path=ijb.data, model_file_old=ijb.old, network_old="r18", save_result=out,
                      save_embeddings=True, **dict(TINY, plot=True))
    with open(out[:-4] + ".json") as handle:
        assert json.load(handle) == json.loads(json.dumps(result))
    assert os.path.isfile(out[:-4] + "_roc.png")
    with np.load(out, allow_pickle=False) as saved:
        assert {"scores", "names", "labels", "embs", "embs_f", "embs_old", "embs_f_old"} <= set(saved.files)
        assert str(saved["test"]) == "cross" and list(saved["names"]) == ["N0D1F1"]
        embs = {k: saved[k] for k in ("embs", "embs_f", "embs_old", "embs_f_old")}
        scores = saved["scores"][0]

    # template1 comes from the old model, template2 from the new one
    meta = load_meta(ijb.data)
    templates = metrics.Templates(meta.templates, meta.medias)
    old = templates.features(embs["embs_old"], embs["embs_f_old"], meta.scores)
    new = templates.features(embs["embs"], embs["embs_f"], meta.scores)
    want = np.sum(old[templates.index(meta.pairs["t1"])] * new[templates.index(meta.pairs["t2"])], 1)
    np.testing.assert_allclose(scores, want, atol=1e-6)
    assert _metrics_of(result) != _metrics_of(evaluate(ijb.new, data_path=ijb.data, **TINY))

    restored = evaluate(restore_embs=out, data_path=ijb.data, plot=False, verbose=False)
    assert restored["test"] == "cross" and _metrics_of(restored) == _metrics_of(result)
    direct_1n = evaluate(ijb.new, data_path=ijb.data, one_to_n=True, model_file_old=ijb.old, **TINY)
    restored_1n = evaluate(restore_embs=out, data_path=ijb.data, one_to_n=True, plot=False, verbose=False)
    assert _metrics_of(restored_1n) == _metrics_of(direct_1n)

    bunch = evaluate(restore_embs=out, data_path=ijb.data, bunch=True, plot=False, verbose=False)
    assert list(bunch["variants"]) == list(metrics.VARIANTS)
    assert bunch["variants"]["N0D1F1"]["TAR@FAR"] == result["TAR@FAR"]
    assert bunch["variants"]["N0D0F0"]["AUC"] != bunch["variants"]["N0D1F1"]["AUC"]

    replot = str(tmp_path / "both.npz")
    main(["-P", out, "-R", replot])
    assert os.path.isfile(replot[:-4] + "_roc.png")


def test_ijbb_layout_and_cache(ijb, tmp_path):
    data = _copy_data(ijb, tmp_path)
    ijbb = data / "IJBB"
    os.rename(data / "IJBC", ijbb)
    for name in os.listdir(ijbb / "meta"):
        new_name = name.replace("ijbc_", "ijbb_").replace("_G1", "_S1").replace("_G2", "_S2")
        os.rename(ijbb / "meta" / name, ijbb / "meta" / new_name)
    meta = load_meta(str(data), "IJBB", one_to_n=True)
    assert set(meta.galleries) == {"S1", "S2"} and os.listdir(ijbb / ".cache")

    marks = ijbb / "meta" / "ijbb_name_5pts_score.txt"
    lines = marks.read_text().splitlines()
    fields = lines[0].split()
    lines[0] = " ".join(fields[:-1] + ["0.123"])
    marks.write_text("\n".join(lines) + "\n")
    assert load_meta(str(data), "IJBB").scores[0] == pytest.approx(0.123)  # edited file → parsed again
    assert load_meta(str(data), "IJBB", force=True).scores[0] == pytest.approx(0.123)

    out = str(tmp_path / "saved.npz")
    evaluate(ijb.new, data_path=ijb.data, save_result=out, save_embeddings=True, **TINY)
    result = evaluate(restore_embs=out, data_path=str(data), subset="IJBB", one_to_n=True, plot=False,
                      verbose=False)
    assert result["subset"] == "IJBB" and {"S1", "S2"} <= set(result)


def test_interrupted_embedding_resumes_from_cached_chunks(ijb, tmp_path, monkeypatch, capsys):
    from tools.ijbc_eval import embed

    cache, calls = str(tmp_path / "cache"), []
    real = embed.Embedder.__call__

    def counting(self, images, crash_at=None):
        calls.append(len(images))
        if len(calls) == crash_at:
            raise KeyboardInterrupt("simulated preemption")
        return real(self, images)

    run = dict(TINY, data_path=ijb.data, model_file_old=ijb.old, network_old="r18", batch_size=4, chunk_size=8,
               cache_dir=cache)
    expected = evaluate(ijb.new, **dict(run, cache_dir=str(tmp_path / "other")))
    num_images = len(load_meta(ijb.data))
    assert num_images > 24
    monkeypatch.setattr(embed.Embedder, "__call__", lambda self, images: counting(self, images, crash_at=11))
    with pytest.raises(KeyboardInterrupt):
        evaluate(ijb.new, **run)
    assert len(chunk_files(cache)) == 2      # calls 1–2 probe the sizes; 3–10 are 4 batches (both models) = 16 images
    calls.clear()
    monkeypatch.setattr(embed.Embedder, "__call__", lambda self, images: counting(self, images))
    resumed = evaluate(ijb.new, **run)
    assert "resuming: 2 of" in capsys.readouterr().out
    assert sum(calls) == 2 * (1 + num_images - 16)    # both models: size probe, then the images after chunk 2
    assert _metrics_of(resumed) == _metrics_of(expected)
    assert not chunk_files(cache)


# --------------------------------------------------------------------------------------------- command line
@pytest.mark.parametrize("argv", [
    ["-m=NEW.pt", "-net=r50"],
    ["-m=NEW.pt", "-net=r50", "-N"],
    ["-m=NEW.pt", "-net=r50", "-m_old=OLD.pt", "-old_net=r18"],
    ["-m=NEW.pt", "-net=r50", "-m_old=OLD.pt", "-old_net=r18", "-N"],
    ["--model_file", "NEW.pt", "--network", "r50", "--model_file_old", "OLD.pt", "--network_old", "r18",
     "--is_one_2_N"],
    ["-m", "NEW.pt", "-net", "r50", "-m_old", "OLD.pt", "-old_net", "r18", "-N"],
])
def test_option_forms(argv):
    args = build_parser().parse_args(argv)
    assert (args.model_file, args.network) == ("NEW.pt", "r50")
    assert args.is_one_2_N == ("-N" in argv or "--is_one_2_N" in argv)
    if len(argv) > 3:
        assert (args.model_file_old, args.network_old) == ("OLD.pt", "r18")


def test_cli_cross_1n_writes_json(ijb, tmp_path):
    out = str(tmp_path / "res.npz")
    proc = python(SCRIPT, f"-m={ijb.new}", "-net=r18", f"-m_old={ijb.old}", "-old_net=r18", "-N",
                  "-d", ijb.data, "--width", "8", "--input_size", "32", "--num_workers", "1", "-R", out)
    assert proc.returncode == 0, proc.stderr
    assert "| mixed |" in proc.stdout
    with open(out[:-4] + ".json") as handle:
        result = json.load(handle)
    assert (result["protocol"], result["test"]) == ("1:N", "cross")
    assert {"top1", "top5", "top10", "TPIR@FPIR", "G1", "G2", "mixed"} <= set(result)
    assert {"1e-2", "1e-1"} <= set(result["TPIR@FPIR"])
    assert os.path.isfile(out[:-4] + "_dir.png")


# --------------------------------------------------------------------------------------------- bad input
def _corrupt(data, case):
    meta = data / "IJBC" / "meta"
    if case == "missing_meta":
        os.remove(meta / "ijbc_template_pair_label.txt")
        return "ijbc_template_pair_label.txt"
    if case == "missing_image":
        os.remove(data / "IJBC" / "loose_crop" / "5.jpg")
        return "line 5: image"
    if case == "unreadable_image":
        (data / "IJBC" / "loose_crop" / "7.jpg").write_bytes(b"not a jpeg")
        return "cannot read image"
    if case == "landmark_fields":
        path = meta / "ijbc_name_5pts_score.txt"
        lines = path.read_text().splitlines()
        lines[2] = " ".join(lines[2].split()[:-1])
        path.write_text("\n".join(lines) + "\n")
        return "ijbc_name_5pts_score.txt line 3: expected 12 fields, found 11"
    if case == "unknown_template":
        path = meta / "ijbc_template_pair_label.txt"
        count = len(path.read_text().splitlines())
        with open(path, "a") as handle:
            handle.write("999999 1 0\n")
        return f"line {count + 1}: unknown template 999999"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["missing_meta", "missing_image", "unreadable_image", "landmark_fields",
                                  "unknown_template"])
def test_bad_data_raises_one_line_user_error(ijb, tmp_path, case):
    data = _copy_data(ijb, tmp_path)
    expected = _corrupt(data, case)
    with pytest.raises(UserError) as info:
        evaluate(ijb.new, data_path=str(data), **TINY)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_bad_embeddings_and_options(ijb, tmp_path):
    short = str(tmp_path / "short.npz")
    meta = load_meta(ijb.data)
    np.savez(short, embs=np.zeros((len(meta) - 1, 16), np.float32), embs_f=np.zeros((len(meta) - 1, 16), np.float32))
    pickled = str(tmp_path / "pickled.npz")
    np.savez(pickled, embs=np.array([{"a": 1}], dtype=object), embs_f=np.zeros((1, 16), np.float32))
    cases = [
        (dict(restore_embs=short), f"has {len(meta) - 1} rows but the image list has {len(meta)} images"),
        (dict(restore_embs=pickled), "contains pickled Python objects"),
        (dict(model_file=ijb.new, model_file_old=ijb.wide, **TINY), "equal embedding sizes"),
        (dict(model_file=ijb.new, save_result=str(tmp_path / "x.json"), **TINY), "must be a path ending in .npz"),
        (dict(model_file=ijb.new, data_path=str(tmp_path / "nowhere"), **TINY), "is not a folder"),
        (dict(), "exactly one of them"),
    ]
    for kwargs, expected in cases:
        kwargs = dict(dict(data_path=ijb.data, plot=False, verbose=False), **kwargs)
        with pytest.raises(UserError, match=expected):
            evaluate(**kwargs)


def test_cli_bad_input_exits_2_with_one_error_line(ijb, tmp_path):
    data = _copy_data(ijb, tmp_path)
    expected = _corrupt(data, "landmark_fields")
    proc = python(SCRIPT, f"-m={ijb.new}", "-net=r18", "-d", str(data), "--width", "8", "--input_size", "32")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------- ONNX
def test_onnx_export_matches_pytorch(ijb, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from tools import export_onnx

    onnx_file = str(tmp_path / "new.onnx")
    export_onnx.main([ijb.new, "-net=r18", onnx_file, "--width", "8", "--input_size", "32"])
    printed = capsys.readouterr().out
    assert "max abs difference ONNX vs PyTorch" in printed
    assert float(printed.rsplit(":", 1)[1]) < 1e-4

    pt_out, onnx_out = str(tmp_path / "pt.npz"), str(tmp_path / "onnx.npz")
    evaluate(ijb.new, data_path=ijb.data, save_result=pt_out, **TINY)
    evaluate(onnx_file, data_path=ijb.data, save_result=onnx_out, **TINY)
    with np.load(pt_out) as a, np.load(onnx_out) as b:
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)
    with pytest.raises(UserError, match="pass the matching --input_size"):
        evaluate(onnx_file, data_path=ijb.data, **dict(TINY, input_size=112))


def _evaluate_on_rank(rank, world, port, kwargs, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = evaluate(**kwargs)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(result, handle)
    else:
        assert result is None


def test_embedding_shared_by_two_gloo_ranks_gives_the_same_result(ijb, tmp_path):

    import torch.multiprocessing as mp

    kwargs = dict(TINY, model_file=ijb.new, data_path=ijb.data, model_file_old=ijb.old, network_old="r18",
                  batch_size=4, chunk_size=8, device="cpu", cache_dir=str(tmp_path / "cache"))
    port = free_port()
    out = str(tmp_path / "result.json")
    mp.spawn(_evaluate_on_rank, args=(2, port, kwargs, out), nprocs=2, join=True)
    with open(out) as handle:
        shared = json.load(handle)
    single = json.loads(json.dumps(evaluate(**dict(kwargs, cache_dir=str(tmp_path / "single")))))
    assert _metrics_of(shared) == _metrics_of(single)


# --------------------------------------------------------------------------------------------- bootstrap
def _nested_pairs(value, interval, path=""):
    """(path, value, [low, high]) of every figure that has an interval."""
    if isinstance(interval, dict):
        for key in interval:
            yield from _nested_pairs(value[key], interval[key], f"{path}/{key}")
    else:
        yield path, value, interval


@pytest.mark.parametrize("one_to_n", [False, True])
def test_bootstrap_of_unchanged_subjects_gives_the_reported_figures(ijb, one_to_n, monkeypatch):
    """Resamples that draw every subject once recompute exactly the reported value of every figure."""
    from tools.ijbc_eval import bootstrap

    monkeypatch.setattr(bootstrap, "subject_counts", lambda num, resamples, seed=0: np.ones((resamples, num), np.int32))
    result = evaluate(ijb.new, data_path=ijb.data, one_to_n=one_to_n, model_file_old=ijb.old, resamples=3, **TINY)
    figures = list(_nested_pairs(result, result["CI95"]))
    # 1:N: overall, G1 and G2 (top-k and TPIR each) and mixed (top-k); 1:1: TAR@FAR and AUC
    want = 3 * (len(metrics.TOPK) + len(metrics.FPIR_KEYS)) + len(metrics.TOPK) if one_to_n else len(metrics.FAR_KEYS) + 1
    assert len(figures) == want
    for path, value, (low, high) in figures:
        assert low == pytest.approx(value, abs=1e-12) and high == pytest.approx(value, abs=1e-12), path


def test_bootstrap_pairs_carry_their_subjects(ijb):
    """Genuine 1:1 pairs join templates of one subject, impostor pairs of two (subjects from the 1:N lists)."""
    from tools.ijbc_eval.ijbc_eval import _template_subjects

    meta = load_meta(ijb.data)
    s1 = _template_subjects(ijb.data, "IJBC", meta.pairs["t1"])
    s2 = _template_subjects(ijb.data, "IJBC", meta.pairs["t2"])
    np.testing.assert_array_equal(s1 == s2, meta.pairs["labels"] == 1)


def test_cli_bootstrap_writes_intervals(ijb, tmp_path):
    out = tmp_path / "r.npz"
    proc = python(SCRIPT, "-m", ijb.new, "-net", "r18", "--width", "8", "--input_size", "32", "-d", ijb.data,
                  "--num_workers", "0", "-R", str(out), "--bootstrap", "40")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["bootstrap"]["resamples"] == 40
    low, high = result["CI95"]["TAR@FAR"]["1e-1"]
    assert 0 <= low <= high <= 1 and low < high
    assert "[95 % percentile interval] over 40 subject resamples" in proc.stdout
    low, high = result["CI95"]["AUC"]
    assert f"{100 * result['AUC']:.2f} [{100 * low:.2f}, {100 * high:.2f}]" in proc.stdout
    pairs = result["num_impostor_pairs"]
    assert pairs < 1000 and "| n/m | n/m | n/m |" in proc.stdout and f"this evaluation has {pairs:,}" in proc.stdout
    bad = python(SCRIPT, "-m", ijb.new, "-d", ijb.data, "--bootstrap", "-1")
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "error: --bootstrap must be 0 (off) or a number of resamples, got -1"


@pytest.mark.parametrize("rank, written", [("0", True), ("1", False)])
def test_parse_cache_is_written_by_rank_0_only(tmp_path, monkeypatch, rank, written):
    meta = tmp_path / "meta.txt"
    meta.write_text("1 2\n")
    monkeypatch.setenv("RANK", rank)

    def parse(path):
        return {"values": np.array([1, 2])}

    arrays = load_cached(str(meta), parse, str(tmp_path))
    assert arrays["values"].tolist() == [1, 2]
    assert any(name.endswith(".npz") for name in os.listdir(tmp_path)) == written
