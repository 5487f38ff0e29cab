"""Supervised fine-tuning eval on the shapes benchmark: VQA, captioning, editing, grounded generation.

Every task is prompted in its SFT format (cm3jax/data/tasks.py, through `Generator`) and
scored exactly: VQA answers by exact match with `shapes.vqa_examples`' answer, captions by
parsing them back into objects (`parse_caption`) and by CIDEr-D against the true caption,
edited and grounded images by reading them back with the shapes oracle. Everything is
decoded greedily, without classifier-free guidance: fine-tuning trains no unconditional
(`<mask:0>`) stream, and every task has one right answer. Measured on the demo's fine-tune
at step 800 (64 scenes): grounded 0.78 near-greedy vs 0.61 with top-p 0.9 and 0.48 with
CFG 2; edits 0.36 near-greedy vs 0.22 top-p and 0.31 with image guidance 1.5
(docs/benchmarks.md).
Each task is one decoder call per scene set.

Scene sets (cm3jax/eval/shapes_prompts.py, `--prompts` scenes each):
  scene     1-3 objects, training colour/shape pairs: the main numbers;
  heldout   one object with a held-out pair, edits free to make any pair: `heldout_` keys;
  single    one object, training pairs: edit and grounded only, `_single` keys.

An image answer passes through the image tokenizer, which is not exact: the oracle reads
the demo VQGAN's round trip of 1-3-object scenes right ~81% of the time (single objects
94%). `edit_ceiling` / `grounded_ceiling` are that agreement on each set's *expected*
output images, the most a perfect model could score; the `_single` keys measure the
image tasks where the tokenizer loses little.

Keys (each also with the `heldout_` prefix): `vqa_accuracy`, `vqa_accuracy_by_kind`
({kind: {'n', 'accuracy'}}), `vqa_questions`; `caption_oracle_accuracy`,
`caption_attribute_accuracy`, `cider`, `bleu4`; `edit_success`, `edit_attribute_accuracy`,
`edit_success_by_operation` ({operation: {'n', 'accuracy'}}), `edit_ceiling`;
`grounded_accuracy`, `grounded_attribute_accuracy`, `grounded_ceiling`; `examples`. Then
`edit_success_single`, `edit_ceiling_single`, `grounded_accuracy_single`,
`grounded_ceiling_single`, the options, `seconds` and `grid` (sft.png).
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from cm3jax.data import shapes
from cm3jax.eval import grid, shapes_metrics, shapes_prompts
from cm3jax.eval.generation import GenerationEvalOptions, caption_scores
from cm3jax.eval.reconstruction import ImageTokenizer, reconstruct
from cm3jax.sampling.generate import Generator

OPERATIONS = ("recolour", "reshape", "resize", "move", "remove", "add")  # of shapes.edit_example
_VERBS = {"turn": "reshape", "move": "move", "remove": "remove", "add": "add"}  # 'make' is recolour or resize
QUESTION_KINDS = {  # question prefix -> kind, of shapes.vqa_examples; the first matching prefix wins
    "how many objects": "count", "how many": "count_shape", "what colour": "colour", "what size": "size",
    "what shape": "shape", "where is": "position", "is there": "exists"}
VQA_MAX_NEW_TOKENS = 8  # answers are one or two words
GRID_COLUMNS = 8  # scenes in sft.png, and examples per task in the JSON
SINGLE_KEYS = ("edit_success", "edit_ceiling", "grounded_accuracy", "grounded_ceiling")
TASK_STREAMS = ("vqa", "edit")  # tasks drawing random examples, each from its own seeded stream


def question_kind(question: str) -> str:
    """The kind of a `shapes.vqa_examples` question (a QUESTION_KINDS value)."""
    for prefix, kind in QUESTION_KINDS.items():
        if question.startswith(prefix):
            return kind
    raise ValueError(f"not a shapes VQA question: {question!r}")


def edit_operation(instruction: str) -> str:
    """The OPERATIONS entry a `shapes.edit_example` instruction asks for: its first word, and
    for 'make the ... X' whether X is a size (resize) or a colour (recolour)."""
    words = instruction.split()
    if words and words[0] == "make":
        return "resize" if words[-1] in shapes.SIZES else "recolour"
    if not words or words[0] not in _VERBS:
        raise ValueError(f"not a shapes edit instruction: {instruction!r}")
    return _VERBS[words[0]]


def grouped_accuracy(groups: Sequence[str], correct: Sequence[bool], names: Sequence[str]) -> dict:
    """{name: {'n': examples in group `name`, 'accuracy': their fraction correct (None when n = 0)}}."""
    groups, correct = np.asarray(groups), np.asarray(correct, bool)
    return {name: {"n": int((groups == name).sum()),
                   "accuracy": float(correct[groups == name].mean()) if (groups == name).any() else None}
            for name in names}


def vqa_scores(answers: Sequence[str], truths: Sequence[str], questions: Sequence[str]) -> dict:
    """Exact-match accuracy of the stripped answers, overall and by question kind."""
    if not len(answers) == len(truths) == len(questions) or not answers:
        raise ValueError(f"need as many answers ({len(answers)}) as truths ({len(truths)}) and questions "
                         f"({len(questions)}), at least one")
    correct = [a.strip() == t for a, t in zip(answers, truths)]
    return {"vqa_accuracy": float(np.mean(correct)), "vqa_questions": len(correct),
            "vqa_accuracy_by_kind": grouped_accuracy([question_kind(q) for q in questions], correct,
                                                     list(dict.fromkeys(QUESTION_KINDS.values())))}


def edit_scores(images: np.ndarray, instructions: Sequence[str],
                expected: Sequence[Sequence[shapes.ShapeObject]]) -> dict:
    """How often the oracle reads the expected edited scene from each edited image, overall
    and by edit operation, and the attribute accuracies."""
    oracle = shapes_metrics.image_oracle(images, expected)
    return {"edit_success": oracle["oracle_accuracy"], "edit_attribute_accuracy": oracle["attribute_accuracy"],
            "edit_success_by_operation": grouped_accuracy([edit_operation(t) for t in instructions],
                                                          oracle["correct"], OPERATIONS)}


def grounded_scores(images: np.ndarray, scenes: Sequence[Sequence[shapes.ShapeObject]]) -> dict:
    """How often the oracle reads each layout's scene from its generated image, and the attribute accuracies."""
    oracle = shapes_metrics.image_oracle(images, scenes)
    return {"grounded_accuracy": oracle["oracle_accuracy"], "grounded_attribute_accuracy": oracle["attribute_accuracy"]}


def round_trip_ceiling(image_tokenizer: ImageTokenizer, images: np.ndarray,
                       scenes: Sequence[Sequence[shapes.ShapeObject]]) -> float:
    """Fraction of the true `images` of `scenes` the oracle reads right after the image
    tokenizer's round trip (encode, decode): the best an image generated through it can score."""
    return shapes_metrics.image_oracle(reconstruct(image_tokenizer, images)[1], scenes)["oracle_accuracy"]


def _rng(options: GenerationEvalOptions, kind: str, task: str) -> np.random.Generator:
    return np.random.default_rng([options.seed, shapes_prompts.KINDS.index(kind), TASK_STREAMS.index(task)])


def _text_tasks(generator: Generator, scenes: list, images: np.ndarray, options: GenerationEvalOptions,
                kind: str) -> dict:
    """VQA (every `vqa_examples` question of every scene) and captioning scores of one set."""
    rng = _rng(options, kind, "vqa")
    qa = [(i, q, a) for i, scene in enumerate(scenes) for q, a in shapes.vqa_examples(scene, rng)]
    questions, truths = [q for _, q, _ in qa], [a for _, _, a in qa]
    answers = generator.vqa(images[[i for i, _, _ in qa]], questions, max_new_tokens=VQA_MAX_NEW_TOKENS,
                            seed=options.seed)
    captions = generator.image2text(images, seed=options.seed)
    caption = caption_scores(captions, scenes)
    return {**vqa_scores(answers, truths, questions),
            "caption_oracle_accuracy": caption["oracle_accuracy"],
            "caption_attribute_accuracy": caption["attribute_accuracy"],
            "cider": caption["cider"], "bleu4": caption["bleu4"],
            "examples": {"vqa": [{"question": q, "truth": t, "answer": a}
                                 for q, t, a in zip(questions, truths, answers)][:GRID_COLUMNS],
                         "caption": [{"truth": shapes.caption(s), "generated": c}
                                     for s, c in zip(scenes, captions)][:GRID_COLUMNS]}}


def _image_tasks(generator: Generator, scenes: list, images: np.ndarray, options: GenerationEvalOptions,
                 kind: str) -> tuple[dict, list[np.ndarray]]:
    """Editing and grounded-generation scores of one set, and its grid rows (expected edits,
    edits, grounded generations)."""
    tokenizer = generator.model.image_tokenizer
    exclude = frozenset() if kind == "heldout" else shapes.HELD_OUT
    rng = _rng(options, kind, "edit")
    edits = [shapes.edit_example(scene, rng, exclude=exclude) for scene in scenes]
    instructions, expected = [t for t, _ in edits], [e for _, e in edits]
    expected_images = shapes_prompts.renders(expected, tokenizer.resolution)
    edited = generator.edit(images, instructions, text_guidance=1.0, image_guidance=1.0, greedy=True)
    layouts = [shapes.grounded_layout(scene, tokenizer.resolution) for scene in scenes]
    drawn = generator.grounded(layouts, guidance=1.0, greedy=True)
    scores = {**edit_scores(edited, instructions, expected),
              "edit_ceiling": round_trip_ceiling(tokenizer, expected_images, expected),
              **grounded_scores(drawn, scenes),
              "grounded_ceiling": round_trip_ceiling(tokenizer, images, scenes),
              "examples": {"edit": instructions[:GRID_COLUMNS], "grounded": layouts[:GRID_COLUMNS]}}
    return scores, [expected_images, edited, drawn]


def _evaluate_set(generator: Generator, kind: str, options: GenerationEvalOptions,
                  text_tasks: bool) -> tuple[dict, list[np.ndarray]]:
    """Scores of the scene set `kind` (see the module docstring) and its grid rows (truth first)."""
    scenes = shapes_prompts.scenes(kind, options.n, options.seed)
    images = shapes_prompts.renders(scenes, generator.model.image_tokenizer.resolution)
    scores, rows = _image_tasks(generator, scenes, images, options, kind)
    if text_tasks:
        text = _text_tasks(generator, scenes, images, options, kind)
        scores = {**text, **scores, "examples": {**text["examples"], **scores["examples"]}}
    return scores, [images, *rows]


def evaluate_sft(generator: Generator, options: GenerationEvalOptions, out_dir: str) -> dict:
    """The SFT section (keys in the module docstring) of the LM in `generator`; writes
    `out_dir/sft.png`: scenes (the edit sources and grounded layouts' truth) over their
    expected edits, the edits and the grounded generations."""
    start = time.perf_counter()
    result, rows = _evaluate_set(generator, "scene", options, text_tasks=True)
    heldout, _ = _evaluate_set(generator, "heldout", options, text_tasks=True)
    single, _ = _evaluate_set(generator, "single", options, text_tasks=False)
    result.update({f"heldout_{k}": v for k, v in heldout.items()})
    result.update({f"{k}_single": single[k] for k in SINGLE_KEYS})
    columns = min(GRID_COLUMNS, options.n)
    grid.save_rows([r[:columns] for r in rows], os.path.join(out_dir, "sft.png"), columns)
    result.update(n=options.n, seed=options.seed, vqa_max_new_tokens=VQA_MAX_NEW_TOKENS,
                  decoding="greedy, no guidance",
                  seconds=round(time.perf_counter() - start, 1),
                  grid={"path": "sft.png", "rows": ["scenes (edit sources, grounded truth)", "expected edits",
                                                    "edited", "grounded generations"]})
    return result
