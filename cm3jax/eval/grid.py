"""PNG grids of image sets laid out in aligned rows (originals over reconstructions, prompts'
ground truth over generations, ...)."""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image


def save_rows(rows: Sequence[np.ndarray], path: str | os.PathLike, columns: int = 8) -> tuple[int, int]:
    """Writes a PNG where image i of every set sits in column i % columns, the sets stacked.

    `rows` are uint8 [N, H, W, 3] arrays of one shape; each group of `columns` images shows
    set 0 on top, then set 1, ...; empty cells are black.

    Returns:
      (width, height) of the PNG.
    """
    if not rows or len({r.shape for r in rows}) != 1 or len(rows[0]) == 0 or columns < 1:
        raise ValueError(f"save_rows needs non-empty image sets of one shape and columns >= 1, got "
                         f"{[r.shape for r in rows]} and {columns}")
    n, h, w, _ = rows[0].shape
    k, cols, groups = len(rows), min(n, columns), math.ceil(n / columns)
    grid = np.zeros((k * groups * h, cols * w, 3), np.uint8)
    for i in range(n):
        group, col = divmod(i, columns)
        for j, images in enumerate(rows):
            top = (k * group + j) * h
            grid[top:top + h, col * w:(col + 1) * w] = images[i]
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    Image.fromarray(grid).save(os.fspath(path), format="PNG")
    return grid.shape[1], grid.shape[0]
