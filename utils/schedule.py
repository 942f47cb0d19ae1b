"""Learning-rate schedules as per-step multipliers (for ``torch.optim.lr_scheduler.LambdaLR``)."""
from utils.errors import UserError


def lr_multiplier(step, total_steps, warmup_steps=0, schedule="poly", power=2.0,
                  steps_per_epoch=1, lr_steps=()):
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warm-up over ``warmup_steps``, then either polynomial decay to 0 at ``total_steps``
    (``(1 - t)^power`` with t = (step − warmup_steps) / (total_steps − warmup_steps)) or step decay
    (×0.1 at each epoch listed in ``lr_steps``). As the published PolyScheduler: a negative
    ``warmup_steps`` (``warmup_epoch = -1``) means no warm-up and a decay that starts at t = −w / (T − w),
    i.e. the whole schedule times (T / (T − w))^power; steps past ``total_steps`` give (t − 1)^power.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "poly":
        span = max(total_steps - warmup_steps, 1)
        done = max(step - warmup_steps, 0)
        return (1.0 - done / span) ** power
    if schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return 0.1 ** sum(epoch >= boundary for boundary in lr_steps)
    raise ValueError(f"unknown lr_schedule '{schedule}' (expected poly or step)")


def run_multiplier(cfg, steps_per_epoch, global_batch):
    """The multiplier of a training config's run, as the published scripts size it.

    The poly horizon and the warm-up count ``num_image // global_batch`` steps per epoch
    (``cfg.num_image``: the config's value, or the data's count), ``num_epoch`` and ``warmup_epoch``
    epochs of them; the step schedule counts the ``steps_per_epoch`` batches actually trained.
    """
    schedule_epoch = int(cfg.num_image) // global_batch
    if schedule_epoch < 1:
        raise UserError(f"config {cfg.get('config_path', '')}: num_image = {cfg.num_image} is fewer than one "
                        f"global batch ({global_batch}), so the learning-rate schedule has no step")
    total, warmup = schedule_epoch * cfg.num_epoch, schedule_epoch * cfg.warmup_epoch
    lr_steps = tuple(cfg.lr_steps)
    return lambda step: lr_multiplier(step, total, warmup, cfg.lr_schedule, cfg.lr_power, steps_per_epoch, lr_steps)
