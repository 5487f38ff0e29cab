"""The SFT eval (cm3jax/eval/sft.py): exact scoring on ground truth and on wrong answers, and
`cm3jax.eval --task=sft` end to end on the session's small trained LM (conftest: sample_world)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import train_cli as cli
from conftest import REPO_ROOT
from cm3jax.data import shapes
from cm3jax.eval import sft, shapes_prompts
from cm3jax.eval.generation import caption_scores
from cm3jax.tokenizers.palette import PaletteTokenizer

RESOLUTION = 32
PALETTE = [shapes.BACKGROUND, *shapes.COLORS.values()]


def scene_set(kind: str = "scene", n: int = 60) -> list[list[shapes.ShapeObject]]:
    return shapes_prompts.scenes(kind, n, seed=1)


def renders(scenes) -> np.ndarray:
    return shapes_prompts.renders(scenes, RESOLUTION)


def edits(scenes, seed: int = 0) -> tuple[list[str], list[list[shapes.ShapeObject]]]:
    rng = np.random.default_rng(seed)
    pairs = [shapes.edit_example(scene, rng) for scene in scenes]
    return [t for t, _ in pairs], [e for _, e in pairs]


def operation_from_scenes(source, edited) -> str:
    """The edit operation, read from the scenes alone (independent of the instruction's words)."""
    if len(edited) != len(source):
        return "add" if len(edited) > len(source) else "remove"
    (old,), (new,) = set(source) - set(edited), set(edited) - set(source)
    changed = [a for a in ("color", "shape", "size", "position") if getattr(old, a) != getattr(new, a)]
    return {"color": "recolour", "shape": "reshape", "size": "resize", "position": "move"}[changed[0]]


def test_edit_operation_reads_every_edit_kind():
    scenes = scene_set(n=200)
    instructions, expected = edits(scenes)
    operations = [sft.edit_operation(t) for t in instructions]
    assert operations == [operation_from_scenes(s, e) for s, e in zip(scenes, expected)]
    assert set(operations) == set(sft.OPERATIONS)
    with pytest.raises(ValueError, match="not a shapes edit instruction"):
        sft.edit_operation("paint it black")


def test_question_kinds_cover_every_vqa_question():
    rng = np.random.default_rng(0)
    questions = [q for scene in scene_set(n=40) for q, _ in shapes.vqa_examples(scene, rng)]
    kinds = {sft.question_kind(q) for q in questions}
    assert kinds == set(sft.QUESTION_KINDS.values())
    assert sft.question_kind("how many objects are there?") == "count"
    assert sft.question_kind("how many circles are there?") == "count_shape"
    with pytest.raises(ValueError, match="not a shapes VQA question"):
        sft.question_kind("why?")


def test_vqa_scores_exact_match_by_kind():
    rng = np.random.default_rng(0)
    qa = [pair for scene in scene_set(n=20) for pair in shapes.vqa_examples(scene, rng)]
    questions, truths = [q for q, _ in qa], [a for _, a in qa]
    right = sft.vqa_scores([f" {t}\n" for t in truths], truths, questions)  # stripped before matching
    assert right["vqa_accuracy"] == 1.0 and right["vqa_questions"] == len(qa)
    assert {k: v["accuracy"] for k, v in right["vqa_accuracy_by_kind"].items()} == dict.fromkeys(
        sft.QUESTION_KINDS.values(), 1.0)
    assert sum(v["n"] for v in right["vqa_accuracy_by_kind"].values()) == len(qa)
    wrong = sft.vqa_scores([t + "s" for t in truths], truths, questions)
    assert wrong["vqa_accuracy"] == 0.0
    assert {v["accuracy"] for v in wrong["vqa_accuracy_by_kind"].values()} == {0.0}
    half = sft.vqa_scores(["yes", "maybe"], ["yes", "no"], ["is there a plus in the centre?"] * 2)
    assert half["vqa_accuracy"] == 0.5 and half["vqa_accuracy_by_kind"]["count"] == {"n": 0, "accuracy": None}
    with pytest.raises(ValueError, match="as many answers"):
        sft.vqa_scores(["yes"], ["yes", "no"], ["is there a plus in the centre?"] * 2)


def test_edit_scores_on_true_and_unedited_images():
    scenes = scene_set()
    instructions, expected = edits(scenes)
    right = sft.edit_scores(renders(expected), instructions, expected)
    assert right["edit_success"] == 1.0 and set(right["edit_attribute_accuracy"].values()) == {1.0}
    by_operation = right["edit_success_by_operation"]
    assert set(by_operation) == set(sft.OPERATIONS)
    assert {v["accuracy"] for v in by_operation.values() if v["n"]} == {1.0}
    assert sum(v["n"] for v in by_operation.values()) == len(scenes)
    unedited = sft.edit_scores(renders(scenes), instructions, expected)  # every edit changes the scene
    assert unedited["edit_success"] == 0.0
    assert {v["accuracy"] for v in unedited["edit_success_by_operation"].values() if v["n"]} == {0.0}


def test_grounded_scores_on_true_and_other_images():
    scenes = scene_set()
    right = sft.grounded_scores(renders(scenes), scenes)
    assert right["grounded_accuracy"] == 1.0 and set(right["grounded_attribute_accuracy"].values()) == {1.0}
    others = scenes[1:] + scenes[:1]
    assert not any(shapes.scene_match(o, s) for o, s in zip(others, scenes))
    wrong = sft.grounded_scores(renders(others), scenes)
    assert wrong["grounded_accuracy"] == 0.0 and wrong["grounded_attribute_accuracy"]["scene"] == 0.0
    with pytest.raises(ValueError, match="one"):
        sft.grounded_scores(renders(scenes[:2]), scenes)


def test_round_trip_ceiling_exact_for_a_lossless_tokenizer_and_lower_for_a_lossy_one():
    scenes = scene_set(n=30)
    images = renders(scenes)
    assert sft.round_trip_ceiling(PaletteTokenizer(PALETTE, RESOLUTION, 1), images, scenes) == 1.0
    coarse = sft.round_trip_ceiling(PaletteTokenizer(PALETTE, RESOLUTION, 4), images, scenes)  # 4x4 patch means
    assert 0.0 <= coarse < 1.0


def test_caption_scores_on_true_and_wrong_captions():
    scenes = scene_set(n=20)
    right = caption_scores(shapes_prompts.captions(scenes), scenes)
    assert right["oracle_accuracy"] == 1.0 and right["bleu4"] == pytest.approx(1.0) and right["cider"] > 1.0
    wrong = caption_scores([shapes.EMPTY_CAPTION] * len(scenes), scenes)
    assert wrong["oracle_accuracy"] == 0.0 and wrong["cider"] < right["cider"]


# --- `python -m cm3jax.eval --task=sft` on a tiny trained LM ------------------------------------

SET_KEYS = ("vqa_accuracy", "vqa_accuracy_by_kind", "vqa_questions", "caption_oracle_accuracy",
            "caption_attribute_accuracy", "cider", "bleu4", "edit_success", "edit_attribute_accuracy",
            "edit_success_by_operation", "edit_ceiling", "grounded_accuracy", "grounded_attribute_accuracy",
            "grounded_ceiling", "examples")
FRACTIONS = ("vqa_accuracy", "caption_oracle_accuracy", "edit_success", "edit_ceiling", "grounded_accuracy",
             "grounded_ceiling")
SINGLE_KEYS = ("edit_success_single", "edit_ceiling_single", "grounded_accuracy_single", "grounded_ceiling_single")


@pytest.fixture(scope="module")
def sft_run(sample_world, tmp_path_factory):
    """`cm3jax.eval --task=sft --prompts=2` on the sample world's LM: (process, sft.json, eval dir)."""
    env = cli.cpu_env() | {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
                           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    process = subprocess.run([sys.executable, "-m", "cm3jax.eval", f"--workdir={sample_world['lm']}",
                              "--task=sft", "--prompts=2", "--seed=3"],
                             env=env, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    out = f"{sample_world['lm']}/eval"
    result = json.load(open(f"{out}/sft.json")) if process.returncode == 0 else None
    return process, result, out


def test_cli_sft_writes_every_key(sft_run):
    process, result, _ = sft_run
    assert process.returncode == 0, process.stderr[-3000:]
    for prefix in ("", "heldout_"):
        for key in SET_KEYS:
            assert prefix + key in result, prefix + key
        for key in FRACTIONS:
            assert 0.0 <= result[prefix + key] <= 1.0, prefix + key
        assert result[prefix + "cider"] >= 0.0
        assert set(result[prefix + "edit_success_by_operation"]) == set(sft.OPERATIONS)
        assert set(result[prefix + "vqa_accuracy_by_kind"]) == set(sft.QUESTION_KINDS.values())
        assert set(result[prefix + "examples"]) == {"vqa", "caption", "edit", "grounded"}
    for key in SINGLE_KEYS:
        assert 0.0 <= result[key] <= 1.0, key
    assert result["vqa_questions"] == sum(v["n"] for v in result["vqa_accuracy_by_kind"].values()) > 2
    assert sum(v["n"] for v in result["edit_success_by_operation"].values()) == 2
    assert (result["n"], result["seed"], result["decoding"]) == (2, 3, "greedy, no guidance")
    assert json.loads(process.stdout.strip().splitlines()[-1]) == result


def test_cli_sft_examples_are_the_seeded_scenes(sft_run):
    _, result, _ = sft_run
    scenes = shapes_prompts.scenes("scene", 2, seed=3)
    assert [e["truth"] for e in result["examples"]["caption"]] == shapes_prompts.captions(scenes)
    assert result["examples"]["grounded"] == [shapes.grounded_layout(s, RESOLUTION) for s in scenes]
    heldout = shapes_prompts.scenes("heldout", 2, seed=3)
    assert [e["truth"] for e in result["heldout_examples"]["caption"]] == shapes_prompts.captions(heldout)


def test_cli_sft_grid(sft_run):
    _, result, out = sft_run
    assert result["grid"]["path"] == "sft.png" and len(result["grid"]["rows"]) == 4
    assert Image.open(f"{out}/sft.png").size == (2 * RESOLUTION, 4 * RESOLUTION)
