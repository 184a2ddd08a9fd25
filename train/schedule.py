"""Learning-rate and EMA (tau) schedules: pure functions of the step (no optimizer, no state)."""

from __future__ import annotations

import math


def lr(step: int, *, peak: float, total: int, warmup: int) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``total``.

    The value is for the step about to be taken: lr(0) = peak / warmup (not 0, which would waste a step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total <= warmup:
        return peak
    t = min(1.0, (step - warmup) / (total - warmup))
    return peak * 0.5 * (1.0 + math.cos(math.pi * t))


def ema_tau(step: int, *, base: float, total: int) -> float:
    """BYOL's EMA decay of the target: tau = 1 - (1 - base) * (cos(pi * step / total) + 1) / 2, from ``base`` to 1."""
    t = min(1.0, step / total) if total > 0 else 1.0
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0
