"""Training data path throughput next to raw JPEG decoding, on synthetic 112×112 face-like records.

Writes ``--images`` JPEG records (insightface layout) to a temporary folder, then measures:
  raw_decode_per_s  ``cv2.imdecode`` of the same JPEG bytes already in memory (one thread);
  samples_per_s     the path one training loader worker runs: read record → decode → flip → uint8
                    collated batch (``MXFaceDataset(uint8=True).get_batch``; the trainer normalises
                    on the device), in one process;
  float_samples_per_s  the same with the float32 normalisation in the worker (feature extraction);
  loader_*          a real ``build_loader`` DataLoader with ``--workers`` processes, end to end.
Raw decoding and the worker paths run back to back on each batch, in rotating order, for
``--rounds`` rounds; each batch's fastest time counts, so load from other programs disturbs the
ratios less. The last output line is a JSON object of the figures.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import cv2
import numpy as np
import torch
from tqdm import tqdm

from utils.dataset import MXFaceDataset, build_loader
from utils.distributed import DistInfo
from utils.errors import UserError, run_cli
from utils.recordio import IR_SIZE, IRHeader, MXIndexedRecordIO, encode_image, pack

SIZE = 112


def face_like(rng, size=SIZE):
    """An RGB uint8 image: background gradient, skin ellipse, eyes, nose, mouth, blur and sensor noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size / 112)
    background = rng.uniform(40, 220, 3) + (yy[..., None] - 56) * rng.uniform(-0.6, 0.6, 3)
    skin = rng.uniform([150, 100, 80], [240, 190, 160])
    cx, cy = 56 + rng.normal(0, 3), 62 + rng.normal(0, 3)
    face = ((xx - cx) / rng.uniform(32, 40)) ** 2 + ((yy - cy) / rng.uniform(42, 50)) ** 2 < 1
    image = np.where(face[..., None], skin * (1 - 0.002 * (yy[..., None] - cy)), background)
    for ex, ey, rx, ry, shade in ((38.3, 51.7, 7, 3.5, 0.35), (73.5, 51.5, 7, 3.5, 0.35),
                                  (56.0, 71.7, 4, 8, 0.8), (56.0, 92.3, 15, 3.5, 0.55)):
        part = ((xx - ex) / rx) ** 2 + ((yy - ey) / ry) ** 2 < 1
        image[part] *= shade
    image = cv2.GaussianBlur(image, (0, 0), 1.5) + rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_records(folder, count, seed):
    """``folder/train.rec/.idx/property`` with ``count`` images (record 0 = insightface header)."""
    rng = np.random.default_rng(seed)
    prefix = os.path.join(folder, "train")
    classes = max(1, count // 16)
    with MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w") as writer:
        writer.write_idx(0, pack(IRHeader(2, [count + 1, count + 1], 0, 0), b""))
        for key in tqdm(range(1, count + 1), desc="writing records", leave=False, disable=None):
            label = float((key - 1) * classes // count)
            writer.write_idx(key, pack(IRHeader(0, label, key, 0), encode_image(face_like(rng))))
    with open(os.path.join(folder, "property"), "w") as handle:
        handle.write(f"{classes},{SIZE},{SIZE}\n")


def measure(folder, batch_size, workers, rounds):
    raw_set = MXFaceDataset(folder, train=True, input_size=SIZE, seed=0, uint8=True)
    float_set = MXFaceDataset(folder, train=True, input_size=SIZE, seed=0)
    jpegs = [np.frombuffer(raw_set.record.read_idx(int(k)), np.uint8)[IR_SIZE:] for k in raw_set.keys]
    batches = [np.arange(i, i + batch_size) for i in range(0, len(raw_set) - batch_size + 1, batch_size)]
    if not batches:
        raise UserError(f"--images {len(raw_set)} is fewer than one batch of {batch_size}")
    used = len(batches) * batch_size
    cv2.setNumThreads(0)
    torch.set_num_threads(1)

    def decode(batch):
        for i in batch.tolist():
            cv2.imdecode(jpegs[i], cv2.IMREAD_COLOR)

    steps = (decode, raw_set.get_batch, float_set.get_batch)
    times = np.full((len(steps), len(batches)), np.inf)
    for round_ in tqdm(range(rounds), desc="single-process rounds", leave=False, disable=None):
        for b, batch in enumerate(batches):
            for step in np.roll(np.arange(len(steps)), round_ + b).tolist():
                start = time.perf_counter()
                steps[step](batch)
                times[step, b] = min(times[step, b], time.perf_counter() - start)

    info = DistInfo(0, 0, 1, torch.device("cpu"))
    loader_rates = []
    for epoch in range(2):
        raw_set.set_epoch(epoch)
        loader = build_loader(raw_set, batch_size, info, seed=0, num_workers=workers)
        start, seen = None, 0
        for images, _, _ in loader:
            if start is None:  # the first batch includes the workers' start-up
                start = time.perf_counter()
                continue
            seen += images.shape[0]
        if seen:
            loader_rates.append(seen / (time.perf_counter() - start))
    mean_bytes = float(np.mean([j.size for j in jpegs]))
    raw, path, float_path = (used / t.sum() for t in times)
    return raw, path, float_path, max(loader_rates, default=0.0), mean_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="synthetic records to write (default 4096)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 1 or args.workers < 0 or args.batch_size < 1 or args.rounds < 1:
        raise UserError("--images, --batch-size and --rounds must be positive and --workers >= 0")
    with tempfile.TemporaryDirectory(prefix="bench-dataloader-") as folder:
        write_records(folder, args.images, args.seed)
        raw, path, float_path, loader, mean_bytes = measure(folder, args.batch_size, args.workers, args.rounds)
    figures = {"samples_per_s": round(path, 1), "raw_decode_per_s": round(raw, 1), "ratio": round(path / raw, 3),
               "float_samples_per_s": round(float_path, 1), "float_ratio": round(float_path / raw, 3),
               "loader_samples_per_s": round(loader, 1), "workers": args.workers, "images": args.images,
               "mean_jpeg_bytes": round(mean_bytes, 1)}
    print(f"images: {args.images} synthetic {SIZE}x{SIZE} JPEGs, mean {mean_bytes:.0f} bytes, batch {args.batch_size}")
    print(f"raw cv2.imdecode:             {raw:9.1f} images/s (one thread)")
    print(f"training path, one worker:    {path:9.1f} samples/s (read, decode, flip, uint8 collate)  "
          f"ratio {path / raw:.3f}")
    print(f"float32 path, one worker:     {float_path:9.1f} samples/s (… and normalise in the worker)  "
          f"ratio {float_path / raw:.3f}")
    print(f"DataLoader, {args.workers} worker(s):      {loader:9.1f} samples/s end to end "
          f"({loader / max(args.workers, 1):.1f} per worker)")
    print(json.dumps(figures))


if __name__ == "__main__":
    run_cli(main)
