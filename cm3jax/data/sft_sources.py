"""Sources of supervised fine-tuning examples, one per task (cm3jax/data/tasks.py).

A source yields, per record, the example's parts by field name before tokenization:

    {'id': str, 'task': str, 'parts': {field: str (text field) | uint8 [R, R, 3] (image field)}}

or, for a record that cannot be read, `{'id': str, 'error': 'one-line reason'}` (never
raises), so `cm3jax.data.prepare` can skip and count it. Spec strings (`config.sft.sources`):

    shapes      the shapes benchmark's SFT variant of the task (`ShapesSftSource`), seeded
    jsonl:DIR   DIR/<split>.jsonl, one JSON object a line whose keys are the task's field
                names: text fields hold strings, image fields image paths relative to DIR.
                E.g. vqa: {"image": "a.png", "question": "...", "answer": "..."};
                edit (InstructPix2Pix triples): {"source": "a.png", "instruction": "...",
                "edited": "b.png"}; grounded: {"layout": "...", "image": "c.png"}.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np

from cm3jax.data import shapes
from cm3jax.data.images import BadRecordError, decode_caption, read_image_file
from cm3jax.data.tasks import IMAGE, TASKS, get_task
from cm3jax.errors import UserError

SPEC_FORMS = ("shapes", "jsonl:DIR")
Record = dict[str, Any]


def _shapes_caption(objects, rng, resolution, split):
    return {"image": shapes.render(objects, resolution), "caption": shapes.caption(objects)}


def _shapes_vqa(objects, rng, resolution, split):
    qa = shapes.vqa_examples(objects, rng)
    question, answer = qa[int(rng.integers(len(qa)))]
    return {"image": shapes.render(objects, resolution), "question": question, "answer": answer}


def _shapes_edit(objects, rng, resolution, split):
    exclude = shapes.HELD_OUT if split == "train" else frozenset()  # train edits stay in train
    instruction, edited = shapes.edit_example(objects, rng, exclude=exclude)
    return {"source": shapes.render(objects, resolution), "instruction": instruction,
            "edited": shapes.render(edited, resolution)}


def _shapes_grounded(objects, rng, resolution, split):
    return {"layout": shapes.grounded_layout(objects, resolution), "image": shapes.render(objects, resolution)}


def _shapes_layout(objects, rng, resolution, split):
    return {"layout_map": shapes.layout_map(objects, resolution), "image": shapes.render(objects, resolution)}


def _shapes_long_caption(objects, rng, resolution, split):
    return {"description": shapes.long_description(objects), "image": shapes.render(objects, resolution)}


def _shapes_text2image(objects, rng, resolution, split):
    return {"caption": shapes.caption(objects), "image": shapes.render(objects, resolution)}


_SHAPES_VARIANTS: dict[str, Callable[..., dict]] = {
    "caption": _shapes_caption, "vqa": _shapes_vqa, "edit": _shapes_edit, "grounded": _shapes_grounded, "layout": _shapes_layout,
    "long_caption": _shapes_long_caption, "text2image": _shapes_text2image,
}


class ShapesSftSource:
    """The shapes benchmark's SFT examples of one task; record i depends only on (seed, task, split, i).

    Scenes are drawn as in `shapes.ShapesSource` (so 'validation' scenes hold a held-out
    colour/shape pair); VQA takes one of the scene's `vqa_examples` at random, editing one
    `edit_example` (edits of 'train' scenes never create a held-out pair).
    """

    def __init__(self, task: str, num_records: int, resolution: int, split: str, seed: int = 0):
        get_task(task)
        if split not in shapes.SPLITS or num_records < 0:
            raise UserError(f"shapes SFT source: need a split in {shapes.SPLITS} and num_records >= 0, "
                            f"got {split!r}, {num_records}")
        shapes.geometry(resolution)
        self.task, self.num_records, self.resolution, self.split, self.seed = (
            task, int(num_records), int(resolution), split, int(seed))

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} out of range [0, {self.num_records})")
        task_stream = 1 + list(TASKS).index(self.task)  # tasks draw independent scenes
        rng = np.random.default_rng([self.seed, shapes.SPLITS.index(self.split), task_stream, index])
        objects = shapes.sample_scene(rng, self.split)
        parts = _SHAPES_VARIANTS[self.task](objects, rng, self.resolution, self.split)
        return {"id": f"shapes-{self.task}-{self.split}-{index}", "task": self.task, "parts": parts}

    def __repr__(self) -> str:
        return (f"ShapesSftSource(task={self.task!r}, num_records={self.num_records}, "
                f"resolution={self.resolution}, split={self.split!r}, seed={self.seed})")


class JsonlSftSource:
    """`DIR/<split>.jsonl`: one example of `task` a line (format in the module docstring).

    A line that is not JSON, lacks a field, or names an unreadable image is an error record
    naming the file and line; the other lines are unaffected.
    """

    def __init__(self, task: str, directory: str, split: str, resolution: int):
        self.task, self.fields = task, get_task(task).fields
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self.path, self.resolution = os.path.join(self.directory, f"{split}.jsonl"), int(resolution)
        if not os.path.isfile(self.path):
            raise UserError(f"SFT source for task {task!r}: {self.path} does not exist "
                            f"(one JSON object per line with the fields {[f.name for f in self.fields]})")
        with open(self.path, "rb") as f:
            self._lines = [(n, raw.strip()) for n, raw in enumerate(f.read().split(b"\n"), 1) if raw.strip()]

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> Record:
        number, raw = self._lines[int(index)]
        where = f"{os.path.basename(self.path)} line {number}"
        record_id = f"{self.task}:{where}"
        try:
            entry = json.loads(raw.decode("utf-8"))
            if not isinstance(entry, dict):
                raise BadRecordError(f"{where}: expected a JSON object")
            parts = {field.name: self._part(entry, field.name, field.kind == IMAGE, where) for field in self.fields}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return {"id": record_id, "error": f"{where}: not UTF-8 JSON ({e})"}
        except BadRecordError as e:
            return {"id": record_id, "error": " ".join(str(e).split())}
        return {"id": record_id, "task": self.task, "parts": parts}

    def _part(self, entry: dict, name: str, image: bool, where: str):
        if name not in entry:
            raise BadRecordError(f"{where}: no {name!r} (task {self.task!r} needs "
                                 f"{[f.name for f in self.fields]})")
        if not image:
            return decode_caption(entry[name], f"{where} {name!r}")
        if not isinstance(entry[name], str) or not entry[name]:
            raise BadRecordError(f"{where}: {name!r} must be an image path relative to {self.directory}")
        return read_image_file(os.path.join(self.directory, entry[name]), f"{where} {name!r} ({entry[name]})",
                               self.resolution)

    def __repr__(self) -> str:
        return f"JsonlSftSource(task={self.task!r}, path={self.path!r}, records={len(self)})"


def open_sft_source(task: str, spec: str, split: str, resolution: int, shapes_records: int, seed: int):
    """The source `spec` names for `task` (see the module docstring); UserError naming the spec."""
    scheme, _, rest = spec.partition(":")
    if scheme == "shapes" and not rest:
        return ShapesSftSource(task, shapes_records, resolution, split, seed)
    if scheme == "jsonl" and rest:
        return JsonlSftSource(task, rest, split, resolution)
    raise UserError(f"config.sft.sources.{task}={spec!r}: expected one of {', '.join(SPEC_FORMS)}")
