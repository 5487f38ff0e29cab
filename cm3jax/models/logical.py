"""Logical axis names for activations, resolved by whichever rules the caller activates.

Models annotate activations with names such as ('activation_batch',
'activation_length', 'activation_embed'); they never name mesh axes. The trainer
(or sampler) activates a mesh and a rules table with `activate()`; without one,
`constrain` is a no-op, so a model also runs unsharded in a unit test.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


class _Active(threading.local):
    mesh: Mesh | None = None
    rules: dict | None = None


_ACTIVE = _Active()


def to_partition_spec(names: Sequence[str | None], rules: LogicalRules | dict) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; raises KeyError naming an unknown axis."""
    table = dict(rules)
    mesh_axes = []
    for name in names:
        if name is None:
            mesh_axes.append(None)
        elif name in table:
            mesh_axes.append(table[name])
        else:
            raise KeyError(f"no partitioning rule for logical axis {name!r}")
    return PartitionSpec(*mesh_axes)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
    """Within this context, `constrain` pins activations to `mesh` according to `rules`."""
    previous = (_ACTIVE.mesh, _ACTIVE.rules)
    _ACTIVE.mesh, _ACTIVE.rules = mesh, dict(rules)
    try:
        yield
    finally:
        _ACTIVE.mesh, _ACTIVE.rules = previous


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names (no-op when no rules are active)."""
    if _ACTIVE.mesh is None:
        return x
    spec = to_partition_spec(names, _ACTIVE.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(_ACTIVE.mesh, spec))
