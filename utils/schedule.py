"""Learning-rate schedules as per-step multipliers (for ``torch.optim.lr_scheduler.LambdaLR``)."""


def lr_multiplier(step, total_steps, warmup_steps=0, schedule="poly", power=2.0,
                  steps_per_epoch=1, lr_steps=()):
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warm-up over ``warmup_steps``, then either polynomial decay to 0 at ``total_steps``
    (``(1 - t)^power`` with t the fraction of the post-warm-up steps done) or step decay
    (×0.1 at each epoch listed in ``lr_steps``).
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "poly":
        span = max(total_steps - warmup_steps, 1)
        done = min(max(step - warmup_steps, 0), span)
        return (1.0 - done / span) ** power
    if schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return 0.1 ** sum(epoch >= boundary for boundary in lr_steps)
    raise ValueError(f"unknown lr_schedule '{schedule}' (expected poly or step)")
