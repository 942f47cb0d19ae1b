"""Training log: a file + console logger on rank 0 and the insightface-style speed line."""
import logging
import os
import sys
import time

import torch

from utils.errors import UserError


def setup_logger(output, rank, name="train"):
    """Logger writing to ``<output>/training.log`` and stdout on rank 0; silent elsewhere."""
    logger = logging.getLogger(f"bct.{name}.{rank}")
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("Training: %(asctime)s-%(message)s")
        try:
            os.makedirs(output, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create output folder {output}: {exc.strerror}") from None
        for handler in (logging.FileHandler(os.path.join(output, "training.log")),
                        logging.StreamHandler(sys.stdout)):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    else:
        logger.setLevel(logging.ERROR)
    return logger


class SpeedLogger:
    """Every ``frequent`` steps: samples/s, loss (+ parts), lr, epoch, step, fp16 scale, ETA; the same
    window means (and the lr) go to TensorBoard.

    Loss parts may be tensors on the GPU: they are summed where they are and read only on logging
    steps, so the other steps never wait for the device. A part named ``…_rows`` is a count, not a
    loss: it is shown after the loss as rows per step (``mixed_rows 19.0/step``), in TensorBoard as
    ``count/<name>``.
    """

    def __init__(self, frequent, total_steps, global_batch, logger, writer=None):
        self.frequent, self.total_steps, self.global_batch = frequent, total_steps, global_batch
        self.logger, self.writer = logger, writer
        self.tic, self.start_step, self.start_time = None, None, None
        self.sums, self.count = {}, 0

    def __call__(self, global_step, epoch, parts, lr, grad_scale=None):
        """Add one step's ``parts``; ``grad_scale``: the AMP scale or a function returning it (or None)."""
        for key, value in parts.items():
            value = value.detach() if torch.is_tensor(value) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        now = time.time()
        if self.tic is None:
            self.tic, self.start_step, self.start_time = now, global_step, now
            return
        if global_step % self.frequent:
            return
        speed = self.frequent * self.global_batch / max(now - self.tic, 1e-9)
        per_step = (now - self.start_time) / max(global_step - self.start_step, 1)
        hours_left = per_step * (self.total_steps - global_step) / 3600
        means = {k: float(v) / self.count for k, v in self.sums.items()}
        if self.writer is not None:
            self.writer.add_scalar("learning_rate", lr, global_step)
            for key, value in means.items():
                self.writer.add_scalar(f"{'count' if key.endswith('_rows') else 'loss'}/{key}", value, global_step)
            self.writer.add_scalar("speed_samples_per_sec", speed, global_step)
        loss = means.pop("loss", 0.0)
        detail = "".join(f" {k} {v:.4f}" for k, v in means.items() if not k.endswith("_rows"))
        counts = "".join(f"   {k} {v:.1f}/step" for k, v in means.items() if k.endswith("_rows"))
        grad_scale = grad_scale() if callable(grad_scale) else grad_scale
        scale = f"   Fp16 Grad Scale: {grad_scale:2.0f}" if grad_scale is not None else ""
        self.logger.info(
            f"Speed {speed:.2f} samples/sec   Loss {loss:.4f} ({detail.strip()}){counts}   "
            f"LearningRate {lr:.6f}   Epoch: {epoch}   Global Step: {global_step}{scale}   "
            f"Required: {hours_left:.2f} hours")
        self.tic, self.sums, self.count = now, {}, 0
