"""Named numpy weights <-> shape-only NNX modules, and the `.npz` files that store them
(LPIPS, InceptionV3): storage names are dotted module paths, kernels HWIO."""

from __future__ import annotations

import os
from typing import Iterable, Mapping, TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cm3jax.errors import UserError

Module = TypeVar("Module", bound=nnx.Module)


def variables_by_name(module: nnx.Module) -> dict[str, nnx.Variable]:
    """The module's variables by storage name, e.g. `Mixed_5b.branch1x1.conv.kernel`."""
    return {".".join(map(str, path)): value for path, value in nnx.iter_graph(module)
            if isinstance(value, nnx.Variable)}


def fill(module: Module, variables: Mapping[str, nnx.Variable], arrays: Mapping[str, np.ndarray],
         source: str, what: str) -> Module:
    """`module` (shape-only) with its `variables` (by storage name) set to `arrays` as
    float32; UserError naming `source` and `what` (the network) on a missing or misshapen array."""
    missing = [name for name in variables if name not in arrays]
    if missing:
        raise UserError(f"{source}: missing {what} weights {', '.join(missing)}")
    for name, variable in variables.items():
        value = np.asarray(arrays[name])
        if value.shape != tuple(variable.shape):
            raise UserError(f"{source}: {name} has shape {value.shape}, {what} needs {tuple(variable.shape)}")
        variable.set_value(jnp.asarray(value, jnp.float32))
    return module


def save_npz(variables: Mapping[str, nnx.Variable], path: str) -> None:
    """Stores weights under their storage names in an .npz (np.savez)."""
    np.savez(path, **{name: np.asarray(v[...]) for name, v in variables.items()})


def read_npz(path: str, names: Iterable[str], what: str) -> dict[str, np.ndarray]:
    """The arrays of a `save_npz` file (no pickles); UserError if it is missing, unreadable or
    holds an array whose name is not in `names`."""
    if not os.path.isfile(path):
        raise UserError(f"{what} weights file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable .npz of {what} weights ({e})") from e
    unexpected = sorted(set(arrays) - set(names))
    if unexpected:
        raise UserError(f"{path}: unexpected arrays {', '.join(unexpected)}")
    return arrays
