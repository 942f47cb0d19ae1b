"""Training dataset: record-0 convention, labels, property files, decoding, flips, sampler, loader."""
import os

import cv2
import numpy as np
import pytest
import torch
from easydict import EasyDict as edict
from torch.utils.data import DistributedSampler

from utils.dataset import (MXFaceDataset, ResumableDistributedSampler, build_loader, check_data_config, set_loader_epoch,
                           find_property, flip_mask, resolve_rec, to_model_input)
from utils.distributed import DistInfo
from utils.errors import UserError
from utils.recordio import IRHeader, MXIndexedRecordIO, pack

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


def png(rgb):
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return buf.tobytes()


def make_rec(prefix, labels, size=8, header0=True, label_arrays=False, seed=0, property_classes=None):
    """Lossless (PNG) random images; returns them (RGB). Record 0 as insightface writes it when header0."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(len(labels), size, size, 3), dtype=np.uint8)
    with MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w") as writer:
        first = 1 if header0 else 0
        if header0:  # images 1..N, then one identity record
            n = len(labels)
            writer.write_idx(0, pack(IRHeader(2, [n + 1, n + 2], 0, 0), b""))
        for i, (label, image) in enumerate(zip(labels, images)):
            value = [float(label), 0.5] if label_arrays else float(label)
            writer.write_idx(first + i, pack(IRHeader(0, value, first + i, 0), png(image)))
        if header0:
            writer.write_idx(len(labels) + 1, pack(IRHeader(2, [1, len(labels) + 1], 0, 0), b""))
    if property_classes is not None:
        with open(prefix + ".property", "w") as handle:
            handle.write(f"{property_classes},{size},{size}\n")
    return images


def normalised(rgb):
    return torch.from_numpy((rgb.astype(np.float32) / 255 - 0.5) / 0.5).permute(2, 0, 1)


def test_record0_convention_labels_and_pixels(tmp_path):
    prefix = str(tmp_path / "set")
    images = make_rec(prefix, [2, 0, 1, 1, 5], property_classes=9)
    ds = MXFaceDataset(prefix, train=False, input_size=8)
    assert len(ds) == 5 and ds.keys.tolist() == [1, 2, 3, 4, 5]  # record 0 and identity record skipped
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [2, 0, 1, 1, 5]
    assert ds.num_classes == 9 and ds.property_path == prefix + ".property"
    image, label, index = ds[3]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and int(label) == 1 and index == 3
    assert torch.allclose(image, normalised(images[3]), atol=1e-6)
    batch, labels, indices = ds.get_batch([4, 0])
    assert batch.shape == (2, 3, 8, 8) and batch.is_contiguous()
    assert torch.allclose(batch[0], normalised(images[4]), atol=1e-6) and labels.tolist() == [5, 2]
    assert indices.tolist() == [4, 0]
    with pytest.raises(IndexError):
        ds[5]


def test_without_header_every_key_is_an_image(tmp_path):
    prefix = str(tmp_path / "train")
    make_rec(prefix, [3, 1, 4], header0=False)
    ds = MXFaceDataset(str(tmp_path), train=False, input_size=8)  # folder → train.rec/.idx
    assert ds.keys.tolist() == [0, 1, 2] and ds.labels.tolist() == [3, 1, 4]
    assert ds.property_path is None and ds.num_classes == 5  # max label + 1


def test_label_arrays_use_the_first_value(tmp_path):
    prefix = str(tmp_path / "arr")
    make_rec(prefix, [3, 1, 4], label_arrays=True)
    ds = MXFaceDataset(prefix, train=False, input_size=8)
    assert ds.keys.tolist() == [1, 2, 3] and ds.labels.tolist() == [3, 1, 4]


def test_property_file_convention(tmp_path):
    make_rec(str(tmp_path / "train"), [0, 1])
    (tmp_path / "property").write_text("7,8,8\n")
    make_rec(str(tmp_path / "train_part_70_class"), [0, 1])
    assert find_property(str(tmp_path / "train.rec")) == str(tmp_path / "property")
    assert find_property(str(tmp_path / "train_part_70_class.rec")) is None  # the folder's file is not its own
    assert MXFaceDataset(str(tmp_path)).num_classes == 7
    (tmp_path / "train_part_70_class.property").write_text("3,8,8\n")
    assert MXFaceDataset(str(tmp_path / "train_part_70_class.rec")).num_classes == 3
    (tmp_path / "property").write_text("seven\n")
    with pytest.raises(UserError, match="property: expected 'num_classes,height,width'"):
        MXFaceDataset(str(tmp_path))


def test_resize_uses_inter_area(tmp_path):
    prefix = str(tmp_path / "big")
    images = make_rec(prefix, [0, 1], size=16)
    ds = MXFaceDataset(prefix, train=False, input_size=8)
    expected = cv2.resize(images[1], (8, 8), interpolation=cv2.INTER_AREA)
    assert torch.allclose(ds[1][0], normalised(expected), atol=1e-6)


def test_flips_are_deterministic_per_seed_epoch_index(tmp_path):
    prefix = str(tmp_path / "f")
    images = make_rec(prefix, list(range(40)))
    ds = MXFaceDataset(prefix, train=True, input_size=8, seed=3)
    flips = flip_mask(3, 0, np.arange(40))
    for i in (int(np.argmax(flips)), int(np.argmin(flips))):
        expected = images[i][:, ::-1] if flips[i] else images[i]
        assert torch.allclose(ds[i][0], normalised(np.ascontiguousarray(expected)), atol=1e-6)
    assert np.array_equal(flip_mask(3, 0, np.arange(40)), flips)
    assert np.array_equal(flip_mask(3, 0, [7, 2]), flips[[7, 2]])  # independent of batch composition
    many = flip_mask(3, 0, np.arange(20000))
    assert 0.48 < many.mean() < 0.52
    assert not np.array_equal(flip_mask(3, 1, np.arange(200)), many[:200])
    assert not np.array_equal(flip_mask(4, 0, np.arange(200)), many[:200])
    ds.set_epoch(1)
    flips1 = flip_mask(3, 1, np.arange(40))
    i = int(np.flatnonzero(flips1 != flips)[0])
    expected = images[i][:, ::-1] if flips1[i] else images[i]
    assert torch.allclose(ds[i][0], normalised(np.ascontiguousarray(expected)), atol=1e-6)


def test_uint8_batches_are_the_exact_pixels_and_normalise_like_the_float_path(tmp_path):
    prefix = str(tmp_path / "u")
    images = make_rec(prefix, list(range(40)), size=16)
    floats = MXFaceDataset(prefix, train=True, input_size=8, seed=3)
    raw = MXFaceDataset(prefix, train=True, input_size=8, seed=3, uint8=True)
    flips = flip_mask(3, 0, np.arange(40))
    order = [int(np.argmax(flips)), int(np.argmin(flips)), 7, 39, 0]
    batch, labels, indices = raw.get_batch(order)
    assert batch.dtype == torch.uint8 and batch.shape == (5, 3, 8, 8) and batch.is_contiguous()
    for row, i in zip(batch, order):
        expected = cv2.resize(images[i], (8, 8), interpolation=cv2.INTER_AREA)
        expected = np.ascontiguousarray(expected[:, ::-1] if flips[i] else expected)
        assert np.array_equal(row.permute(1, 2, 0).numpy(), expected)          # RGB planes, byte for byte
    reference, reference_labels, _ = floats.get_batch(order)
    assert torch.equal(labels, reference_labels) and indices.tolist() == order
    assert torch.allclose(to_model_input(batch), reference, atol=1e-6, rtol=0)
    assert to_model_input(reference) is reference                              # float input passes through
    assert torch.equal(to_model_input(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([-1.0, 1.0]))


@pytest.mark.parametrize("size, world, drop_last", [(23, 2, True), (23, 2, False), (24, 3, True), (5, 4, False)])
def test_sampler_matches_distributed_sampler(size, world, drop_last):
    for rank in range(world):
        ours = ResumableDistributedSampler(size, world, rank, shuffle=True, seed=11, drop_last=drop_last)
        theirs = DistributedSampler(range(size), world, rank, shuffle=True, seed=11, drop_last=drop_last)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)


def test_sampler_disjoint_replicas_and_resume():
    shares = [list(ResumableDistributedSampler(103, 2, rank, seed=5, batch_size=4)) for rank in range(2)]
    assert len(shares[0]) == len(shares[1]) == 51
    assert not set(shares[0]) & set(shares[1]) and len(set(shares[0]) | set(shares[1])) == 102
    resumed = ResumableDistributedSampler(103, 2, 1, seed=5, batch_size=4, start_batch=3)
    assert list(resumed) == shares[1][12:] and len(resumed) == 39
    resumed.set_epoch(2)
    full = ResumableDistributedSampler(103, 2, 1, seed=5, batch_size=4)
    full.set_epoch(2)
    assert list(resumed) == list(full) != shares[1]
    in_order = list(ResumableDistributedSampler(10, 2, 0, shuffle=False))
    assert in_order == [0, 2, 4, 6, 8]
    with pytest.raises(UserError, match="start_batch 20 is beyond"):
        ResumableDistributedSampler(103, 2, 1, batch_size=4, start_batch=20)


def test_check_data_config(tmp_path):
    prefix = str(tmp_path / "c")
    make_rec(prefix, [0, 3, 1])
    ds = MXFaceDataset(prefix, input_size=8)
    cfg = edict(num_classes=None, num_image=None, config_path="run.py")
    assert check_data_config(cfg, ds) == [] and cfg.num_classes == 4 and cfg.num_image == 3
    notes = check_data_config(edict(num_classes=10, num_image=5, config_path="run.py"), ds)
    assert len(notes) == 2  # more classes than labels (unused centres) and a schedule sized for 5 images
    assert "num_image = 5 but " in notes[0] and "c.rec holds 3 images" in notes[0]
    assert notes[1] == "config run.py: num_classes = 10 but the data has 4 classes: 6 classifier centres get no label"
    with pytest.raises(UserError, match=r"c\.rec: image key 2 has label 3, outside 0..2 \(num_classes = 3 from"):
        check_data_config(edict(num_classes=3, num_image=None, config_path="run.py"), ds)
    with open(prefix + ".property", "w") as handle:
        handle.write("6,8,8\n")
    ds = MXFaceDataset(prefix, input_size=8)
    with pytest.raises(UserError, match=r"num_classes = 5 but .*c\.property says 6"):
        check_data_config(edict(num_classes=5, num_image=None), ds)
    assert "2 classifier centres get no label" in check_data_config(edict(num_classes=8, num_image=None), ds)[0]
    with open(prefix + ".property", "w") as handle:
        handle.write("2,8,8\n")
    with pytest.raises(UserError, match=r"label 3, outside 0..1 \(num_classes = 2 from .*c\.property\)"):
        check_data_config(edict(num_classes=None, num_image=None), MXFaceDataset(prefix, input_size=8))
    make_rec(prefix, [0, -1])
    with pytest.raises(UserError, match="label -1, outside"):
        check_data_config(edict(num_classes=None, num_image=None), MXFaceDataset(prefix, input_size=8))


def test_bad_data_is_reported(tmp_path):
    with pytest.raises(UserError, match=r"expected .*nothing\.rec and .*nothing\.idx"):
        resolve_rec(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match=r"expected .*train\.rec and .*train\.idx"):
        MXFaceDataset(str(tmp_path))
    prefix = str(tmp_path / "bad")
    with MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w") as writer:
        writer.write_idx(0, pack(IRHeader(0, 0.0, 0, 0), b"not an image"))
        writer.write_idx(1, pack(IRHeader(0, 1.5, 1, 0), b""))
    with pytest.raises(UserError, match="key 1 has label 1.5, expected an integer"):
        MXFaceDataset(prefix)
    with MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w") as writer:
        writer.write_idx(0, pack(IRHeader(0, 0.0, 0, 0), b"not an image"))
    with pytest.raises(UserError, match=r"bad\.rec: image key 0 \(offset 0\) cannot be decoded"):
        MXFaceDataset(prefix)[0]
    with MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w") as writer:
        writer.write_idx(0, pack(IRHeader(0, [9, 0], 0, 0), b""))
    with pytest.raises(UserError, match=r"record 0 says images are keys 1..8, but .*bad\.idx: key 1 is not in"):
        MXFaceDataset(prefix)


def _collect(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_loader_workers_match_in_process_and_resume(tmp_path):
    prefix = str(tmp_path / "l")
    make_rec(prefix, [i % 5 for i in range(45)])
    ds = MXFaceDataset(prefix, train=True, input_size=8, seed=2)
    ds.set_epoch(1)
    in_process = _collect(build_loader(ds, 4, CPU, seed=2, num_workers=0))
    workers = _collect(build_loader(ds, 4, CPU, seed=2, num_workers=2))
    assert len(in_process) == len(workers) == 11  # drop_last
    for (a, la, ia), (b, lb, ib) in zip(in_process, workers):
        assert a.shape == (4, 3, 8, 8) and torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ia, ib)
        assert torch.equal(la, torch.from_numpy(ds.labels[ia.numpy()]))
    seen = torch.cat([i for _, _, i in workers])
    assert len(set(seen.tolist())) == 44
    resumed = _collect(build_loader(ds, 4, CPU, seed=2, num_workers=0, start_batch=7))
    assert len(resumed) == 4 and all(torch.equal(x[2], y[2]) for x, y in zip(resumed, in_process[7:]))
    ds.set_epoch(2)
    other = _collect(build_loader(ds, 4, CPU, seed=2, num_workers=0))
    assert not torch.equal(other[0][2], in_process[0][2])
    two_ranks = [torch.cat([b[2] for b in build_loader(ds, 4, DistInfo(r, r, 2, torch.device("cpu")), 2, 0)])
                 for r in range(2)]
    assert not set(two_ranks[0].tolist()) & set(two_ranks[1].tolist())
    assert os.path.isfile(prefix + ".rec")


class _RowsOf:
    """A per-image array stand-in: row i is ``[i, worker pid]`` (shows where it was read)."""

    def gather(self, indices):
        return torch.stack([torch.as_tensor(indices), torch.full((len(indices),), os.getpid())], 1)


def test_persistent_workers_follow_the_epoch_and_read_rows(tmp_path):
    """Workers built once live across epochs; each epoch's order, flips and per-image rows equal those
    of a loader built for that epoch in this process, and the rows are read in the workers."""
    prefix = str(tmp_path / "p")
    make_rec(prefix, [i % 5 for i in range(24)])
    ds = MXFaceDataset(prefix, train=True, input_size=8, seed=3)
    ds.set_epoch(0)
    loader = build_loader(ds, 4, CPU, seed=3, num_workers=2, arrays={"ids": _RowsOf()}, persistent=True)
    pids = set()
    for epoch, start in ((0, 0), (1, 0), (2, 2)):
        if epoch:
            set_loader_epoch(loader, epoch, start)
        got = [(a.clone(), b.clone(), c.clone(), {k: v.clone() for k, v in d.items()}) for a, b, c, d in loader]
        ds.set_epoch(epoch)
        expected = _collect(build_loader(ds, 4, CPU, seed=3, num_workers=0, start_batch=start))
        assert len(got) == len(expected) == 6 - start
        for (images, labels, indices, rows), (e_images, e_labels, e_indices) in zip(got, expected):
            assert torch.equal(images, e_images) and torch.equal(labels, e_labels) and torch.equal(indices, e_indices)
            assert torch.equal(rows["ids"][:, 0], indices)
            pids.update(rows["ids"][:, 1].tolist())
    assert os.getpid() not in pids and len(pids) == 2   # read in the same two workers in every epoch
