"""MS-COCO captions and reference images for the zero-shot FID protocol (`--task=fid`).

`read_captions` reads a COCO captions file (captions_val2014.json), `sample_captions` draws the
seeded random captions to prompt with (the paper: 30k from val2014), and `load_reference`
streams those captions' images centre-cropped to a square and resized to the model's resolution.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from cm3jax.data.images import BadRecordError, decode_image
from cm3jax.errors import UserError


class Caption(NamedTuple):
    """One annotation of a COCO captions file."""

    image_id: int
    caption: str
    file_name: str


def _field(path: str, where: str, record, name: str, kind: type):
    """record[name] checked to be a `kind`; UserError naming the file and the field otherwise."""
    value = record.get(name) if isinstance(record, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"{path}: {where}.{name} is missing or not a {kind.__name__} (not a COCO captions file)")
    return value


def read_captions(path: str) -> list[Caption]:
    """(image_id, caption, file_name) of every annotation of a COCO captions JSON, in file order.

    Raises:
      UserError: the file is missing, not JSON, or lacks a field (`annotations`, `images`,
        their `image_id` / `caption` / `id` / `file_name`), or an annotation names an image
        the file does not list.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read the captions file {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise UserError(f"{path}: not JSON: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a COCO captions file (a JSON object with annotations and images)")
    images = _field(path, "file", data, "images", list)
    annotations = _field(path, "file", data, "annotations", list)
    file_names = {_field(path, f"images[{i}]", image, "id", int): _field(path, f"images[{i}]", image, "file_name", str)
                  for i, image in enumerate(images)}
    out = []
    for i, annotation in enumerate(annotations):
        image_id = _field(path, f"annotations[{i}]", annotation, "image_id", int)
        if image_id not in file_names:
            raise UserError(f"{path}: annotations[{i}].image_id {image_id} is not the id of any entry of images")
        out.append(Caption(image_id, _field(path, f"annotations[{i}]", annotation, "caption", str).strip(),
                           file_names[image_id]))
    return out


def sample_captions(items: Sequence[Caption], n: int, seed: int = 0) -> list[Caption]:
    """`n` of `items` drawn at random without replacement, a pure function of (items, n, seed).

    Raises:
      UserError: n < 1 or more than there are captions.
    """
    if not 1 <= n <= len(items):
        raise UserError(f"--n={n}: need between 1 and the {len(items)} captions the file holds")
    chosen = np.random.default_rng(seed).choice(len(items), size=n, replace=False)
    return [items[i] for i in chosen]


def _reference_image(path: str, resolution: int) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            return decode_image(f.read(), resolution, path)
    except OSError as e:
        raise UserError(f"cannot read the reference image {path}: {e.strerror or e}") from e
    except BadRecordError as e:
        raise UserError(f"reference image {e}") from e


def load_reference(images_dir: str, file_names: Sequence[str], resolution: int,
                   batch_size: int = 64) -> Iterator[np.ndarray]:
    """uint8 [<=batch_size, R, R, 3] batches of `images_dir/file_name`, in order: each image as
    RGB, its shorter side resized to `resolution` (bicubic) and the centre square kept — the
    training data's decoding (`cm3jax.data.images.decode_image`).

    A generator: only one batch is in memory at a time.

    Raises:
      UserError: an image is missing or unreadable (raised when its batch is reached).
    """
    for start in range(0, len(file_names), batch_size):
        yield np.stack([_reference_image(os.path.join(images_dir, name), resolution)
                        for name in file_names[start:start + batch_size]])
