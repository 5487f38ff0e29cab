"""Seeded scene sets the generation evals prompt with (shapes benchmark).

Three kinds, each a pure function of (kind, n, seed):
  single    one object whose (colour, shape) pair occurs in training;
  multi     two or three objects, pairs from training;
  scene     one to three objects, pairs from training (the training distribution);
  heldout   one object with a HELD_OUT (colour, shape) pair, never seen in training
            (zero-shot composition).
"""

from __future__ import annotations

import numpy as np

from cm3jax.data import shapes

KINDS = ("single", "multi", "scene", "heldout")
_SEED_OFFSET = {kind: i for i, kind in enumerate(KINDS)}  # the kinds draw independent streams


def scenes(kind: str, n: int, seed: int = 0) -> list[list[shapes.ShapeObject]]:
    """`n` scenes of `kind` (see the module docstring), canonically sorted objects."""
    if kind not in KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; one of {KINDS}")
    rng = np.random.default_rng([seed, _SEED_OFFSET[kind]])
    out = []
    while len(out) < n:
        if kind == "multi":
            scene = shapes.sample_scene(rng, "train", max_objects=3)
            if len(scene) < 2:
                continue
        else:
            objects = 3 if kind == "scene" else 1
            scene = shapes.sample_scene(rng, "validation" if kind == "heldout" else "train", objects)
        out.append(scene)
    return out


def captions(scene_set: list[list[shapes.ShapeObject]]) -> list[str]:
    """The benchmark caption of each scene."""
    return [shapes.caption(scene) for scene in scene_set]


def renders(scene_set: list[list[shapes.ShapeObject]], resolution: int) -> np.ndarray:
    """uint8 [N, R, R, 3] ground-truth renders of the scenes."""
    return np.stack([shapes.render(scene, resolution) for scene in scene_set])
