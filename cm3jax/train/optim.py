"""AdamW with linear warmup and cosine / linear decay, global-norm clipping (optax), frozen parameters.

Fine-tuning (`config.freeze`): parameters whose path starts with one of the given prefixes
get no updates and keep no Adam moments (`optax.multi_transform` with `set_to_zero`); the
gradient clip then measures only the trained parameters' gradients.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import ml_collections
import optax

from cm3jax.errors import ConfigError

TRAINED, FROZEN = "trained", "frozen"


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


def param_path(path: tuple) -> str:
    """A parameter's key path as 'blocks/attention/query' (the names `config.freeze` uses)."""
    return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def freeze_labels(prefixes: Sequence[str]) -> Callable[[Any], Any]:
    """`params -> labels`: FROZEN where a parameter's path starts with a prefix (whole components:
    'blocks/attention' freezes 'blocks/attention/query', not 'blocks/attention_norm'), else TRAINED.

    Raises:
      ConfigError: naming a prefix of `config.freeze` that matches no parameter.
    """
    prefixes = tuple(p.strip("/") for p in prefixes)

    def labels(params: Any) -> Any:
        paths = jax.tree_util.tree_map_with_path(lambda path, _: param_path(path), params)
        names = jax.tree.leaves(paths)
        for prefix in prefixes:
            if not any(_under(name, prefix) for name in names):
                groups = sorted({"/".join(name.split("/")[:2]) for name in names})
                raise ConfigError("freeze", f"{prefix!r} matches no parameter "
                                            f"(parameters: {', '.join(groups)})")
        return jax.tree.map(lambda name: FROZEN if any(_under(name, p) for p in prefixes) else TRAINED, paths)

    return labels


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int,
                   mask: Callable[[Any], Any] = decay_mask,
                   freeze: Sequence[str] = ()) -> optax.GradientTransformation:
    """The optimizer of `config.optim` (clip, then AdamW with the schedule; `mask` picks decayed leaves).

    `freeze`: parameter path prefixes (`config.freeze`) that get zero updates and no optimizer state.
    """
    train = optax.chain(
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
    if not freeze:
        return train
    return optax.multi_transform({TRAINED: train, FROZEN: optax.set_to_zero()}, freeze_labels(freeze))
