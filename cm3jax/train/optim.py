"""AdamW with linear warmup and cosine / linear decay, global-norm clipping (optax)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak LR, then decay to `min_lr_ratio * peak` at `total_steps`."""
    peak, warmup = optim.learning_rate, optim.warmup_steps
    end = peak * optim.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.min_lr_ratio)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params) -> dict:
    """Weight decay on matrices only: norm scales and biases are not decayed."""

    def is_decayed(path, _):
        return getattr(path[-1], "key", None) not in ("scale", "bias")

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int,
                   mask: Callable[[Any], Any] = decay_mask) -> optax.GradientTransformation:
    """The optimizer of `config.optim` (clip, then AdamW with the schedule; `mask` picks decayed leaves)."""
    return optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.adamw(
            learning_rate_schedule(optim, total_steps),
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=mask,
        ),
    )
