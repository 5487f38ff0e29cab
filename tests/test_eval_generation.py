"""Generation evals (cm3jax/eval/generation.py, suite.py, report.py) and `cm3jax.eval --task=all`
on the session's small trained world (tests/conftest.py: sample_world)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cm3jax.data import shapes
from cm3jax.eval import grid, shapes_prompts, suite
from cm3jax.eval.generation import GenerationEvalOptions
from cm3jax.sampling.generate import Generator

OPTIONS = GenerationEvalOptions(n=3, seed=0, guidance=2.0, retrieve=1)


@pytest.fixture(scope="module")
def generator(sample_world):
    return Generator.load(sample_world["lm"])


def _fraction(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


@pytest.mark.parametrize("kind", shapes_prompts.KINDS)
def test_scene_sets_are_seeded_and_of_their_kind(kind):
    scenes = shapes_prompts.scenes(kind, 40, seed=3)
    assert scenes == shapes_prompts.scenes(kind, 40, seed=3)
    assert scenes != shapes_prompts.scenes(kind, 40, seed=4)
    counts = {len(s) for s in scenes}
    held_out = [any((o.color, o.shape) in shapes.HELD_OUT for o in s) for s in scenes]
    expected_counts = {"single": {1}, "heldout": {1}, "multi": {2, 3}, "scene": {1, 2, 3}}[kind]
    assert counts == expected_counts
    assert all(held_out) if kind == "heldout" else not any(held_out)
    assert [shapes.parse_caption(c) for c in shapes_prompts.captions(scenes)] == scenes


def test_unknown_scene_kind():
    with pytest.raises(ValueError, match="unknown scene kind"):
        shapes_prompts.scenes("many", 2)


def test_save_rows_stacks_each_set_per_group(tmp_path):
    a, b = np.full((3, 2, 2, 3), 10, np.uint8), np.full((3, 2, 2, 3), 200, np.uint8)
    a[2] = 50
    assert grid.save_rows([a, b], tmp_path / "g.png", columns=2) == (4, 8)
    png = np.asarray(Image.open(tmp_path / "g.png"))
    assert (png[0:2, 0:4] == 10).all() and (png[2:4, 0:4] == 200).all()  # group 0: set a over set b
    assert (png[4:6, 0:2] == 50).all() and (png[6:8, 0:2] == 200).all()  # group 1: image 2
    assert (png[4:8, 2:4] == 0).all()  # empty cell
    with pytest.raises(ValueError, match="one shape"):
        grid.save_rows([a, b[:2]], tmp_path / "bad.png")


def test_text2image_section(sample_world, generator, tmp_path):
    result = suite.evaluate_generation(sample_world["lm"], "text2image", OPTIONS, generator=generator)
    for key in ("oracle_accuracy", "oracle_accuracy_no_cfg", "oracle_accuracy_no_retrieval",
                "oracle_accuracy_multi", "heldout_oracle_accuracy"):
        assert _fraction(result[key]), key
    assert result["retrieve"] == 1 and result["n"] == 3
    assert result["fid"]["features"] == "dual_encoder_image" and np.isfinite(result["fid"]["fid"])
    out = os.path.join(sample_world["lm"], "eval")
    assert json.load(open(os.path.join(out, "text2image.json"))) == json.loads(json.dumps(result))
    width, height = Image.open(os.path.join(out, "text2image.png")).size
    resolution = generator.model.image_tokenizer.resolution
    assert (width, height) == (3 * resolution, 8 * resolution)


def test_image2text_section(sample_world, generator):
    result = suite.evaluate_generation(sample_world["lm"], "image2text", OPTIONS, generator=generator)
    for key in ("oracle_accuracy", "heldout_oracle_accuracy"):
        assert _fraction(result[key]), key
    assert result["cider"] >= 0.0 and 0.0 <= result["bleu4"] <= 1.0
    assert len(result["examples"]) == 3 and all(set(e) == {"truth", "generated"} for e in result["examples"])
    assert [shapes.parse_caption(e["truth"]) for e in result["examples"]] == shapes_prompts.scenes("scene", 3, 0)


def test_eval_all_writes_eval_json_and_report(sample_world, tmp_path):
    root = tmp_path / "demo"
    root.mkdir()
    for stage in ("lm", "retriever"):
        os.symlink(sample_world[stage], root / stage)
    os.symlink(sample_world["lm"], root / "sft")  # an LM run stands in for the fine-tune of launch/demo.sh --sft
    (root / suite.STAGE_TIMES).write_text(json.dumps({"lm": 12.5}))
    result = subprocess.run([sys.executable, "-m", "cm3jax.eval", f"--workdir={root}", "--task=all", "--n=16",
                             "--prompts=2", "--retrieve=1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(root / "eval.json"))
    assert set(report) == {"retrieval", "text2image", "image2text", "sft", "wall_time_seconds"}
    assert set(report["sft"]) == {"before", "after"} and _fraction(report["sft"]["after"]["vqa_accuracy"])
    assert _fraction(report["retrieval"]["recall_at_1"])
    assert _fraction(report["text2image"]["oracle_accuracy"]) and _fraction(report["image2text"]["oracle_accuracy"])
    assert "fid" in report["text2image"] and report["image2text"]["cider"] >= 0.0
    assert report["wall_time_seconds"]["lm"] == 12.5 and report["wall_time_seconds"]["eval_lm"] > 0
    markdown = (root / "report.md").read_text()
    assert "`text2image.oracle_accuracy`" in markdown and "`retrieval.recall_at_1`" in markdown
    assert "(lm/eval/text2image.png)" in markdown and "(lm/eval/image2text.png)" in markdown
    assert "| VQA accuracy (exact answer) (`vqa_accuracy`) |" in markdown and "(sft/eval/sft.png)" in markdown
    assert "vqgan" not in report  # no vqgan/ here: the section is simply absent


def test_eval_all_on_a_directory_without_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cm3jax.eval", f"--workdir={tmp_path}", "--task=all"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --task=all:")
