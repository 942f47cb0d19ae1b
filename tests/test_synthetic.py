"""Synthetic data: renderer geometry, learnability, and the RecordIO / IJB-C files of make_synthetic."""
import csv
import os

import cv2
import numpy as np
import pytest
from skimage.transform import SimilarityTransform

from tests.helpers import python
from tools.synthetic import faces
from tools.synthetic import make_synthetic as ms
from utils.dataset import MXFaceDataset
from utils.errors import UserError
from utils.recordio import MXIndexedRecordIO, decode_image, unpack

TINY = ["--identities", "4", "--images-per-identity", "3", "--ijb-identities", "4", "--seed", "7"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny data set, built in-process."""
    out = tmp_path_factory.mktemp("syn") / "data"
    ms.main(["--out", str(out), "--workers", "0", *TINY])
    return str(out)


def _skimage_similarity(src, dst):
    if hasattr(SimilarityTransform, "from_estimate"):
        return SimilarityTransform.from_estimate(src, dst)
    transform = SimilarityTransform()
    transform.estimate(src, dst)
    return transform


def _files(folder):
    found = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = handle.read()
    return found


def _lines(path):
    with open(path) as handle:
        return [line.split() for line in handle.read().splitlines()]


def _csv(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


# ---------------------------------------------------------------------------------------------
# renderer
# ---------------------------------------------------------------------------------------------
def test_similarity_transform_matches_skimage():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (6, 5, 2))
    dst = src @ np.array([[0.8, 0.3], [-0.3, 0.8]]) + rng.normal(0, 2, (6, 5, 2)) + 10
    ours = faces.similarity_transform(src, dst)
    for i in range(len(src)):
        reference = _skimage_similarity(src[i], dst[i])
        np.testing.assert_allclose(ours[i], reference.params[:2], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(faces.apply_transform(faces.similarity_transform(src, faces.TEMPLATE),
                                                     src[:, :1]).shape, (6, 1, 2))


def _clean_faces(n, seed=3):
    """Faces without clutter, noise, blur, occluders, marks or hair over the eyes, in loud colours."""
    rng = np.random.default_rng(seed)
    ident, view = faces.sample_identities(rng, n), faces.sample_views(rng, n)
    ident.update(skin=np.full((n, 3), 150, np.float32), lips=np.tile(np.float32([220, 0, 0]), (n, 1)),
                 iris=np.tile(np.float32([40, 160, 255]), (n, 1)), brows=np.full((n, 3), 150, np.float32),
                 hair_top=np.zeros(n, np.float32), hair_back=np.zeros(n, np.float32),
                 mark=np.zeros(n, np.float32), mole=np.zeros((n, 2), np.float32),
                 glasses=np.zeros(n, np.float32), beard=np.zeros(n, np.float32), texture=np.zeros(n, np.float32))
    zeros = np.zeros(n, np.float32)
    view.update(blur=zeros, noise=zeros, grey=zeros, occluder=np.zeros((n, 2), np.float32),
                clutter=np.zeros((n, 3), np.float32), background_texture=zeros, light_gain=zeros + 1,
                light_grad=zeros, contrast=zeros + 1, cast=np.ones((n, 3), np.float32),
                skin_shift=zeros + 1, eye_open=zeros + 1, mouth_open=zeros, brow_raise=zeros,
                background=np.zeros((n, 3), np.float32), background_far=np.zeros((n, 3), np.float32))
    sizes, transform = faces.loose_layout(view, rng)
    images, landmarks = faces.render_loose(ident, view, sizes, transform, rng)
    return images, landmarks


def _centroid(image, centre, radius, weight):
    ys, xs = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    near = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 <= radius ** 2
    w = weight * near
    return np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()


def test_landmarks_locate_pupils_nose_tip_and_mouth_corners():
    """Listed points (before detector noise) vs the drawn features of unaligned photos.

    Pupils: centroid of the dark pixels; nose tip: centroid of its highlight; mouth corners: the
    ends of the red lips along the corner-to-corner axis, sub-pixel from the edge coverage.
    """
    images, landmarks = _clean_faces(24)
    corner_errors = []
    for image, points in zip(images, landmarks):
        img = image.astype(np.float32)
        grey = img.mean(-1)
        eye_distance = np.linalg.norm(points[1] - points[0])
        for eye in points[:2]:
            pupil = _centroid(grey, eye, 0.12 * eye_distance, np.clip(90 - grey, 0, None))
            assert np.linalg.norm(pupil - eye) < 0.5
        tip = _centroid(grey, points[2], 0.12 * eye_distance, grey > 153)
        assert np.linalg.norm(tip - points[2]) < 1.0
        cover = np.clip((img[..., 0] - img[..., 1]) / 220, 0, 1)  # red lips over grey skin
        ys, xs = np.nonzero(cover > 0.02)
        axis = (points[4] - points[3]) / np.linalg.norm(points[4] - points[3])
        along, edge = np.stack([xs, ys], 1) @ axis, 0.8 * (cover[ys, xs] - 0.5)
        corner_errors += [abs((along - edge).min() - points[3] @ axis), abs((along + edge).max() - points[4] @ axis)]
    assert np.mean(corner_errors) < 0.3 and np.max(corner_errors) < 1.25


def test_aligned_render_puts_landmarks_near_the_template():
    rng = np.random.default_rng(5)
    ident, view = faces.sample_identities(rng, 32), faces.sample_views(rng, 32)
    images, points = faces.render_aligned(ident, view, rng)
    assert images.shape == (32, 112, 112, 3) and images.dtype == np.uint8
    error = np.linalg.norm(points - faces.TEMPLATE, axis=-1)
    assert np.median(error) < 4 and error.max() < 15
    small, small_points = faces.render_aligned(ident, view, np.random.default_rng(5), size=56)
    assert small.shape == (32, 56, 56, 3)
    assert np.median(np.linalg.norm(small_points - faces.TEMPLATE / 2, axis=-1)) < 2.5


def test_identity_is_hard_for_raw_pixels_but_above_chance():
    """Nearest class centroid on raw 32×32 grey pixels, 100 identities, held-out images."""
    n, k = 100, 8
    rng = np.random.default_rng(11)
    ident = faces.take(faces.sample_identities(rng, n), np.repeat(np.arange(n), k))
    view = faces.sample_views(rng, n * k)
    images = np.concatenate([faces.render_aligned(faces.take(ident, slice(s, s + 32)),
                                                  faces.take(view, slice(s, s + 32)), rng)[0]
                             for s in range(0, n * k, 32)])
    grey = np.stack([cv2.resize(cv2.cvtColor(i, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
                     for i in images]).reshape(n, k, -1).astype(np.float32)
    centroids = grey[:, : k // 2].mean(1)
    test = grey[:, k // 2:].reshape(-1, grey.shape[-1])
    guess = ((test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    top1 = (guess == np.repeat(np.arange(n), k - k // 2)).mean()
    assert 0.03 < top1 < 0.5


# ---------------------------------------------------------------------------------------------
# make_synthetic: files
# ---------------------------------------------------------------------------------------------
def test_output_is_deterministic_and_independent_of_workers(built, tmp_path):
    again = tmp_path / "again"
    ms.main(["--out", str(again), "--workers", "2", *TINY])
    first, second = _files(built), _files(str(again))
    assert sorted(first) == sorted(second)
    assert all(first[name] == second[name] for name in first)
    other = tmp_path / "other"
    ms.main(["--out", str(other), "--workers", "0", *TINY[:-1], "8"])
    assert _files(str(other))["train.rec"] != first["train.rec"]


def test_training_records_follow_the_insightface_layout(built):
    n, k = 4, 3
    with open(os.path.join(built, "property")) as handle:
        assert handle.read() == "4,112,112\n"
    prefix = os.path.join(built, "train")
    with MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "r") as record:
        assert record.keys == list(range(n * k + 1 + n))
        header, payload = unpack(record.read_idx(0))
        assert header.flag == 2 and list(header.label) == [n * k + 1, n * k + 1 + n] and payload == b""
        for key in range(1, n * k + 1):
            header, payload = unpack(record.read_idx(key))
            assert header.flag == 0 and header.label == (key - 1) // k and header.id == key
            assert decode_image(payload).shape == (112, 112, 3)
        for label in range(n):
            header, payload = unpack(record.read_idx(n * k + 1 + label))
            assert list(header.label) == [1 + label * k, 1 + (label + 1) * k] and payload == b""
    dataset = MXFaceDataset(built, train=False, input_size=56)
    assert len(dataset) == n * k and dataset.num_classes == n
    np.testing.assert_array_equal(dataset.labels, np.repeat(np.arange(n), k))
    image, label, index = dataset[5]
    assert image.shape == (3, 56, 56) and int(label) == 1 and index == 5


def test_ijb_layout_files(built):
    meta = os.path.join(built, "IJBC", "meta")
    crops = os.path.join(built, "IJBC", "loose_crop")
    tid_mid = _lines(os.path.join(meta, "ijbc_face_tid_mid.txt"))
    n = len(tid_mid)
    assert [row[0] for row in tid_mid] == [f"{i}.jpg" for i in range(1, n + 1)]
    assert sorted(os.listdir(crops), key=lambda s: int(s[:-4])) == [row[0] for row in tid_mid]
    template_of = {row[0]: int(row[1]) for row in tid_mid}
    media_of = {row[0]: int(row[2]) for row in tid_mid}
    assert [int(row[1]) for row in tid_mid] == sorted(int(row[1]) for row in tid_mid)

    frames = {}
    for media in media_of.values():
        frames[media] = frames.get(media, 0) + 1
    media_per_template = {}
    for name, media in media_of.items():
        media_per_template.setdefault(template_of[name], set()).add(media)
    assert max(frames.values()) > 1 and min(frames.values()) == 1
    assert max(len(m) for m in media_per_template.values()) > 1

    points = _lines(os.path.join(meta, "ijbc_name_5pts_score.txt"))
    assert [row[0] for row in points] == [row[0] for row in tid_mid]
    for row in points:
        assert len(row) == 12
        image = cv2.imread(os.path.join(crops, row[0]))
        assert 150 <= image.shape[0] <= 250 and 150 <= image.shape[1] <= 250
        xy = np.array(row[1:11], float).reshape(5, 2)
        assert (xy >= 0).all() and (xy[:, 0] < image.shape[1]).all() and (xy[:, 1] < image.shape[0]).all()
        assert 0.5 < float(row[11]) <= 1.0
        aligned = _skimage_similarity(xy, faces.TEMPLATE)
        assert np.median(np.linalg.norm(aligned(xy) - faces.TEMPLATE, axis=1)) < 6

    headers, subject_of, gallery_templates = set(), {}, {}
    csv_rows = 0
    for name in ("ijbc_1N_gallery_G1.csv", "ijbc_1N_gallery_G2.csv", "ijbc_1N_probe_mixed.csv"):
        header, rows = _csv(os.path.join(meta, name))
        headers.add(tuple(header))
        csv_rows += len(rows)
        for row in rows:
            template, subject, number = int(row[0]), int(row[1]), int(row[2].split("/")[1].split(".")[0])
            assert template_of[f"{number}.jpg"] == template and media_of[f"{number}.jpg"] == int(row[3])
            assert subject_of.setdefault(template, subject) == subject
            if "gallery" in name:
                gallery_templates.setdefault(name, {}).setdefault(subject, set()).add(template)
    assert headers == {tuple(ms.CSV_HEADER.split(","))}
    assert csv_rows == n
    g1, g2 = (gallery_templates[f"ijbc_1N_gallery_G{i}.csv"] for i in (1, 2))
    assert not set(g1) & set(g2) and len(g1) + len(g2) == 4
    assert all(len(t) == 1 for t in list(g1.values()) + list(g2.values()))
    gallery = {t for ts in list(g1.values()) + list(g2.values()) for t in ts}
    probes = set(subject_of) - gallery
    assert {subject_of[t] for t in probes} == set(g1) | set(g2)

    pairs = np.array(_lines(os.path.join(meta, "ijbc_template_pair_label.txt")), dtype=np.int64)
    assert set(pairs[:, 0]) <= gallery and set(pairs[:, 1]) <= probes
    same = np.array([subject_of[a] == subject_of[b] for a, b in pairs[:, :2]])
    np.testing.assert_array_equal(pairs[:, 2], same.astype(np.int64))
    assert same.sum() == len(probes) and (~same).sum() > 2 * same.sum()


# ---------------------------------------------------------------------------------------------
# make_synthetic: options and atomic output
# ---------------------------------------------------------------------------------------------
def test_ijb_max_frames_bounds_the_videos_only():
    """``--ijb-max-frames K``: probe videos have 2..K frames; the default (5) is the layout's own."""
    for k in (2, 3, 5):
        layout = ms.ijb_layout(np.random.default_rng([0, 2]), 300, k)
        frames = layout["media_frames"]
        assert frames.min() == 1 and set(np.unique(frames[frames > 1])) == set(range(2, k + 1))
        assert not (frames[layout["gallery"][layout["media_template"]]] > 1).any()
    default, five = ms.ijb_layout(np.random.default_rng([0, 2]), 50), ms.ijb_layout(np.random.default_rng([0, 2]), 50, 5)
    assert all(np.array_equal(default[key], five[key]) for key in default)


@pytest.mark.parametrize("option, value", [("--identities", "1"), ("--images-per-identity", "0"),
                                           ("--ijb-identities", "1"), ("--seed", "-1"), ("--ijb-max-frames", "1")])
def test_bad_options_are_user_errors(tmp_path, option, value):
    args = ["--out", str(tmp_path / "x"), "--workers", "0", *TINY, "--ijb-max-frames", "5"]
    args[args.index(option) + 1] = value
    with pytest.raises(UserError, match=option):
        ms.main(args)
    assert not os.path.exists(tmp_path / "x")


def test_cli_reports_bad_options_in_one_line(tmp_path):
    proc = python("tools/synthetic/make_synthetic.py", "--out", str(tmp_path / "x"), "--identities", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --identities must be at least 2, got 1"


def test_existing_output_needs_overwrite_and_failures_leave_nothing(tmp_path, monkeypatch):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="--overwrite"):
        ms.main(["--out", str(out), "--workers", "0", *TINY])

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ms, "make_ijb", broken)
    with pytest.raises(RuntimeError):
        ms.main(["--out", str(out), "--workers", "0", "--overwrite", *TINY])
    assert sorted(os.listdir(tmp_path)) == ["data"] and os.listdir(out) == ["keep.txt"]
    monkeypatch.undo()
    ms.main(["--out", str(out), "--workers", "0", "--overwrite", *TINY])
    assert sorted(os.listdir(out)) == ["IJBC", "property", "train.idx", "train.rec"]
    assert sorted(os.listdir(tmp_path)) == ["data"]
