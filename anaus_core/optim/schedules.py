"""Learning-rate and EMA-momentum schedules (plain functions of the step; no scheduler state).

* ``cosine_schedule_with_warmup``: linear warm-up ``base * (step + 1) / warmup`` (so step 0 has a
  small non-zero lr, unlike the official code's 0), then cosine from ``base`` to ``final`` over
  the remaining steps; ``final`` is an absolute lr (lightly's schedulers use multipliers).
* ``cosine_momentum``: BYOL's ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``, from ``base``
  (0.99) at step 0 to 1 at ``total``.
* ``scaled_lr``: ``base_lr * batch_size / 256`` (global batch).
"""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """Linear scaling rule: ``base_lr * batch_size / 256`` (0.3 x 192 / 256 = 0.225)."""
    return base_lr * batch_size / 256.0


def cosine_schedule_with_warmup(step: int, total: int, warmup: int, base: float, final: float = 0.0) -> float:
    """Learning rate at optimiser step ``step`` (0-based) of ``total``."""
    if total < 1 or step < 0 or warmup < 0:
        raise ValueError(f"cosine_schedule_with_warmup: bad step={step}, total={total}, warmup={warmup}")
    if step < warmup:
        return base * (step + 1) / warmup
    decay_steps = max(total - warmup, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_momentum(step: int, total: int, base: float = 0.99) -> float:
    """EMA decay tau at ``step``: ``base`` at 0, 1 at ``total`` (clamped beyond)."""
    if total < 1 or step < 0:
        raise ValueError(f"cosine_momentum: bad step={step}, total={total}")
    progress = min(step / total, 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
