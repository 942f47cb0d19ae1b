"""tools/pack_rec.py: an image folder → an insightface RecordIO set, byte for byte."""
import os
import shutil
import struct

import cv2
import numpy as np
import pytest

from helpers import python, synthetic_faces
from tools.pack_rec import main, pack_folder, read_label_map
from utils.dataset import MXFaceDataset, find_property, read_property
from utils.errors import UserError
from utils.recordio import MXIndexedRecordIO, unpack


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A make_synthetic training set (3 identities × 4) and the same images as a folder."""
    root = tmp_path_factory.mktemp("pack")
    synthetic_faces(root, 3, 4)
    return root


def test_folder_of_synthetic_jpegs_packs_to_the_same_bytes(synthetic, tmp_path):
    main([str(synthetic / "faces"), str(tmp_path / "train")])
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / name).read_bytes() == (synthetic / "synthetic" / name).read_bytes(), name
    assert read_label_map(str(tmp_path / "train.labels.tsv")) == {0: "person00", 1: "person01", 2: "person02"}
    assert sorted(os.listdir(tmp_path)) == ["property", "train.idx", "train.labels.tsv", "train.rec"]


def test_synthetic_folder_option_packs_to_the_same_set(tmp_path):
    """``make_synthetic.py --folder`` writes the crops as an image folder that packs to its own train.rec."""
    from tools.synthetic import make_synthetic

    make_synthetic.main(["--out", str(tmp_path / "syn"), "--identities", "3", "--images-per-identity", "2",
                         "--ijb-identities", "2", "--workers", "0", "--folder"])
    assert sorted(os.listdir(tmp_path / "syn" / "faces")) == ["person0", "person1", "person2"]
    assert sorted(os.listdir(tmp_path / "syn" / "faces" / "person1")) == ["000.jpg", "001.jpg"]
    main([str(tmp_path / "syn" / "faces"), str(tmp_path / "packed" / "train")])
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "packed" / name).read_bytes() == (tmp_path / "syn" / name).read_bytes(), name


def test_insightface_layout_and_reader_round_trip(tmp_path):
    """Uneven identities, a PNG among JPEGs: record 0, images, identity ranges as MXNet's packer lays them."""
    rng = np.random.default_rng(0)
    files = {"b": ["1.jpg", "2.png"], "a": ["x.jpg"], "c": ["p.jpg", "q.jpg", "r.jpg"]}
    originals = {}
    for identity, names in files.items():
        (tmp_path / "in" / identity).mkdir(parents=True)
        for name in names:
            ramp = np.add.outer(np.arange(20), np.arange(24))[..., None] * 4 + rng.integers(0, 100, 3)
            image = np.clip(ramp, 0, 255).astype(np.uint8)
            path = str(tmp_path / "in" / identity / name)
            cv2.imwrite(path, image)
            originals[path] = image
    pack_folder(str(tmp_path / "in"), str(tmp_path / "out" / "faces"))
    prefix = str(tmp_path / "out" / "faces")
    assert read_property(find_property(prefix + ".rec")) == (3, 20, 24)
    record = MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "r")
    assert record.keys == list(range(10))
    assert record.read_idx(0) == struct.pack("<IfQQ", 2, 0.0, 0, 0) + np.array([7, 10], "<f4").tobytes()
    ranges = [(1, 2), (2, 4), (4, 7)]                 # a: 1 image, b: 2, c: 3 (sorted identity folders)
    for label, (start, stop) in enumerate(ranges):
        key = 7 + label
        assert record.read_idx(key) == struct.pack("<IfQQ", 2, 0.0, key, 0) + np.array([start, stop], "<f4").tobytes()
    order = [("a", "x.jpg"), ("b", "1.jpg"), ("b", "2.png"), ("c", "p.jpg"), ("c", "q.jpg"), ("c", "r.jpg")]
    for key, (identity, name) in enumerate(order, 1):
        header, payload = unpack(record.read_idx(key))
        path = str(tmp_path / "in" / identity / name)
        assert (header.flag, header.label, header.id, header.id2) == (0, "abc".index(identity), key, 0)
        assert payload[:3] == b"\xff\xd8\xff"
        if name.endswith(".jpg"):
            assert payload == open(path, "rb").read()   # JPEG files are stored as they are
        else:
            decoded = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
            assert np.abs(decoded.astype(int) - originals[path]).mean() < 3   # re-encoded at quality 95
    dataset = MXFaceDataset(prefix, train=False, input_size=20, uint8=True)
    assert dataset.labels.tolist() == [0, 1, 1, 2, 2, 2] and dataset.num_classes == 3


def test_unreadable_image_is_named_and_nothing_is_written(synthetic, tmp_path):
    faces = tmp_path / "faces"
    shutil.copytree(synthetic / "faces", faces)
    (faces / "person01" / "005.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"cannot read image .*person01/005\.jpg"):
        pack_folder(str(faces), str(tmp_path / "out" / "set"))
    assert not (tmp_path / "out").exists()      # the folder it created is removed again


def test_damaged_jpeg_is_named_without_libjpeg_noise(synthetic, tmp_path):
    """A JPEG that libjpeg decodes with a complaint, or one cut short, is refused in one line naming it;
    libjpeg's own message is not printed above it."""
    faces = tmp_path / "faces"
    shutil.copytree(synthetic / "faces", faces)
    path = faces / "person01" / "005.jpg"
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 20] = b"\xff" * 20
    path.write_bytes(bytes(data))
    proc = python("tools/pack_rec.py", str(faces), str(tmp_path / "out" / "train"))
    lines = [line.rsplit("\r", 1)[-1] for line in proc.stderr.strip().splitlines()]
    assert proc.returncode == 2 and [line for line in lines if "packing" not in line] == [
        f"error: cannot read image {path}: Corrupt JPEG data: premature end of data segment "
        "(damaged file: re-save or remove it)"], proc.stderr
    assert not (tmp_path / "out").exists()
    path.write_bytes(bytes(data[:len(data) // 2]))
    with pytest.raises(UserError, match=r"005\.jpg: truncated JPEG file \(no end-of-image marker\)"):
        pack_folder(str(faces), str(tmp_path / "out" / "train"))


def test_mixed_sizes_existing_output_and_command_line(tmp_path):
    for identity, size in (("a", 16), ("b", 18)):
        (tmp_path / "in" / identity).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "in" / identity / "0.png"), np.zeros((size, size, 3), np.uint8))
    with pytest.raises(UserError, match="is 18×18 pixels, but .* is 16×16"):
        pack_folder(str(tmp_path / "in"), str(tmp_path / "set"))
    cv2.imwrite(str(tmp_path / "in" / "b" / "0.png"), np.zeros((16, 16, 3), np.uint8))
    pack_folder(str(tmp_path / "in"), str(tmp_path / "set"))
    proc = python("tools/pack_rec.py", str(tmp_path / "in"), str(tmp_path / "set"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'set.rec'}: exists (pass --overwrite to replace it)"
    proc = python("tools/pack_rec.py", str(tmp_path / "in"), str(tmp_path / "set"), "--overwrite")
    assert proc.returncode == 0 and "packed 2 images of 2 identities (16×16)" in proc.stdout
