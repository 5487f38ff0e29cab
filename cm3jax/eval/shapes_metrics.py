"""Exact shapes-benchmark metrics for generated images and captions (`cm3jax.data.shapes`).

Text->image: each prompt is parsed into its objects and the generated image is read back
by the pixel oracle. Image->text: each generated caption is parsed back into objects and
compared with the true scene. Both report the fraction of exactly right scenes, the mean
per-attribute accuracy (`shapes.attribute_accuracy`), the accuracy by number of true
objects, and the accuracy over scenes with a HELD_OUT (colour, shape) pair.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cm3jax.data.shapes import (HELD_OUT, ShapeObject, attribute_accuracy, oracle, parse_caption,
                                scene_match)


def _has_held_out(objects: Sequence[ShapeObject]) -> bool:
    return any((o.color, o.shape) in HELD_OUT for o in objects)


def scene_summary(predicted: Sequence[list[ShapeObject] | None],
                  expected: Sequence[Sequence[ShapeObject]]) -> dict:
    """Scene and attribute accuracies of predicted scenes (None = unreadable: all wrong): the
    keys of `text2image_oracle`."""
    if not expected:
        raise ValueError("no scenes to score")
    correct = np.asarray([p is not None and scene_match(p, e) for p, e in zip(predicted, expected)])
    per_scene = [attribute_accuracy(p, e) if p is not None
                 else dict.fromkeys(attribute_accuracy(e, e), 0.0)  # every attribute wrong
                 for p, e in zip(predicted, expected)]
    counts = np.asarray([len(e) for e in expected])
    held_out = np.asarray([_has_held_out(e) for e in expected])
    return {
        "n": len(expected),
        "oracle_accuracy": float(correct.mean()),
        "attribute_accuracy": {k: float(np.mean([s[k] for s in per_scene])) for k in per_scene[0]},
        "by_object_count": {str(c): float(correct[counts == c].mean())
                            for c in sorted(set(counts))},
        "heldout_oracle_accuracy": float(correct[held_out].mean()) if held_out.any() else None,
        "correct": correct.tolist(),
    }


def text2image_oracle(prompts: Sequence[str], images: np.ndarray) -> dict:
    """Scores images generated from shapes captions by reading them back with `oracle`.

    `images` is uint8 [N, R, R, 3], one per prompt. Returns {'n', 'oracle_accuracy' (scenes
    matching the prompt exactly), 'attribute_accuracy' (mean of `attribute_accuracy`),
    'by_object_count' ({'1': accuracy, ...} by the prompt's object count),
    'heldout_oracle_accuracy' (over prompts with a HELD_OUT pair; None without any),
    'correct' (whether each image matches its prompt exactly)}.
    ValueError if a prompt does not parse (naming its index) or the counts differ.
    """
    expected = []
    for i, prompt in enumerate(prompts):
        objects = parse_caption(prompt)
        if objects is None:
            raise ValueError(f"prompt {i} is not a shapes caption: {prompt!r}")
        expected.append(objects)
    return image_oracle(images, expected)


def image_oracle(images: np.ndarray, expected: Sequence[Sequence[ShapeObject]]) -> dict:
    """`scene_summary` of the scenes `oracle` reads from uint8 images [N, R, R, 3], one per
    expected scene (ValueError if the counts differ)."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) != len(expected):
        raise ValueError(f"need one [R, R, 3] image per scene: {len(expected)} scenes, "
                         f"images of shape {images.shape}")
    return scene_summary([oracle(image) for image in images], expected)


def image2text_oracle(captions: Sequence[str],
                      true_objects: Sequence[Sequence[ShapeObject]]) -> dict:
    """Scores generated captions against the true scenes by parsing them (`parse_caption`).

    Same keys as `text2image_oracle` (counts and held-out pairs from the true scenes), plus
    'unparseable': the number of captions that do not parse, each scored wrong on every
    attribute.
    """
    if len(captions) != len(true_objects):
        raise ValueError(f"{len(captions)} captions for {len(true_objects)} scenes")
    predicted = [parse_caption(text) for text in captions]
    return {**scene_summary(predicted, true_objects), "unparseable": sum(p is None for p in predicted)}
