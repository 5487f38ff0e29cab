"""Reading a `torch.save`d state dict into numpy, for weight importers (torch imported lazily)."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from cm3jax.errors import UserError


def read_torch_state_dict(path: str, without_torch: str) -> dict[str, np.ndarray]:
    """{key: float32 numpy array} of a PyTorch state-dict file (weights only, never code).

    A checkpoint wrapping it as {'state_dict': ...} is unwrapped. `without_torch` tells the
    user what to do when torch is not installed.

    Raises:
      UserError: torch missing, no such file, or not a readable state dict of tensors.
    """
    try:
        import torch
    except ImportError as e:
        raise UserError(f"reading the PyTorch weights {path} needs torch, which is not installed "
                        f"({without_torch})") from e
    if not os.path.isfile(path):
        raise UserError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or non-torch file
        raise UserError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from e
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not (isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise UserError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return {str(k): v.detach().to("cpu", torch.float32).numpy() for k, v in state.items()}
