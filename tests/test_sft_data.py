"""Fine-tuning data: shapes / JSONL sources -> prepared shards per task, the mixture, per-task losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CM3LEON_OVERRIDES, PALETTE_OVERRIDES, REPO_ROOT, experiment_config
from cm3jax import vocab as vocab_lib
from cm3jax.config import validate
from cm3jax.data import records, shapes
from cm3jax.data.pipeline import make_dataset, sft_examples, sft_tasks
from cm3jax.data.prepare import prepare
from cm3jax.data.sft_sources import ShapesSftSource
from cm3jax.data.tasks import TASKS, get_task
from cm3jax.errors import ConfigError, UserError
from cm3jax.tokenizers.image import load_image_tokenizer
from cm3jax.tokenizers.text import TextTokenizer

TRAIN, VALIDATION = 24, 6
VQA_TRAIN = 36  # config.sft.shapes_records.vqa: a task may have more records than the others
MIXTURE = {"caption": 0.1, "vqa": 0.2, "edit": 0.3, "grounded": 0.4}


def sft_config(directory="", **overrides):
    """experiments/shapes_sft.py on palette-tokenized 32x32 scenes, every task of TASKS from shapes."""
    return experiment_config("shapes_sft", {
        **PALETTE_OVERRIDES, **CM3LEON_OVERRIDES, "init_from": "", "model.image_grid": 0,
        "prepare.shapes_records.train": TRAIN, "prepare.shapes_records.validation": VALIDATION,
        "prepare.records_per_shard": 12, "prepare.num_workers": 1, "data.source": f"prepared:{directory}",
        "sft.sources": {task: "shapes" for task in TASKS}, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Every task of TASKS prepared from the shapes source (the mixture = all of them)."""
    directory = tmp_path_factory.mktemp("sft_data")
    config = sft_config(directory, **{"sft.mixture": {task: 1.0 for task in TASKS},
                                      "sft.shapes_records": {"vqa": {"train": VQA_TRAIN, "validation": VALIDATION}}})
    report = prepare(config, str(directory))
    return directory, config, report


def test_every_task_is_prepared_into_its_own_shards(prepared):
    directory, _, report = prepared
    assert sorted(report["tasks"]) == sorted(TASKS) and report["splits"] == {}
    for task in TASKS:
        for split, count in (("train", VQA_TRAIN if task == "vqa" else TRAIN), ("validation", VALIDATION)):
            totals = report["tasks"][task][split]
            assert (totals["records_written"], totals["bad_records"], totals["shards"]) == (count, 0, -(-count // 12))
            assert len(records.split_paths(directory / task, split)) == totals["shards"]


@pytest.mark.parametrize("task", list(TASKS))
def test_records_are_the_sources_examples_tokenized_and_fit_the_template(prepared, task):
    directory, config, _ = prepared
    vocab = vocab_lib.from_config(config.vocab)
    text = TextTokenizer.load(str(directory / "tokenizer.model"))
    image = load_image_tokenizer(str(directory))
    fmt = get_task(task).bind(vocab, text.encode)
    stored = records.split_documents(str(directory / task), "validation", records.decode_sft_record)
    source = ShapesSftSource(task, VALIDATION, config.prepare.resolution, "validation", config.seed)
    for index in range(VALIDATION):
        record, example = stored[index], source[index]
        assert (record["id"], record["task"]) == (example["id"], task)
        for name, part in example["parts"].items():
            expected = text.encode(part) if isinstance(part, str) else image.encode(part)
            np.testing.assert_array_equal(record["parts"][name], expected)
        prompt, target = fmt.split(fmt.encode(record["parts"])["tokens"])
        assert sorted({**prompt, **target}) == sorted(example["parts"])


def test_shapes_edits_change_the_scene_as_the_instruction_says():
    source = ShapesSftSource("edit", 40, 32, "train", seed=3)
    for index in range(40):
        parts = source[index]["parts"]
        before, after = shapes.oracle(parts["source"]), shapes.oracle(parts["edited"])
        assert before != after and parts["instruction"].split()[0] in ("make", "turn", "move", "remove", "add")
        assert not {(o.color, o.shape) for o in after} & shapes.HELD_OUT  # train edits stay in train


def test_rerunning_prepare_keeps_complete_shards(prepared):
    directory, config, report = prepared
    shard = records.split_paths(directory / "vqa", "train")[0]
    before = os.stat(shard).st_mtime_ns
    again = prepare(config, str(directory))
    assert os.stat(shard).st_mtime_ns == before
    assert again["tasks"] == report["tasks"]


def _write_png(path, scene):
    Image.fromarray(shapes.render(scene, 32)).save(path)


def test_jsonl_source_reads_user_examples_and_names_bad_lines(prepared, tmp_path):
    directory, _, _ = prepared
    scene = [shapes.ShapeObject("circle", "red", "large", "centre")]
    _write_png(tmp_path / "a.png", scene)
    lines = [json.dumps({"image": "a.png", "question": "what colour is the circle?", "answer": "red"}),
             json.dumps({"image": "a.png", "question": "how many circles are there?", "answer": "one"}),
             json.dumps({"image": "missing.png", "question": "what is it?", "answer": "x"}),
             "{not json",
             json.dumps({"image": "a.png", "answer": "red"}),
             json.dumps({"image": "a.png", "question": "what is it?", "answer": " "})]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "validation.jsonl").write_text(lines[0] + "\n")
    out = tmp_path / "prepared"
    os.makedirs(out)
    for name in ("tokenizer.model",):  # the same text tokenizer as the shapes data
        (out / name).write_bytes((directory / name).read_bytes())
    config = sft_config(out, **{"sft.mixture": {"vqa": 1.0}, "sft.sources": {"vqa": f"jsonl:{tmp_path}"},
                                "data.max_bad_fraction": 0.9})
    totals = prepare(config, str(out))["tasks"]["vqa"]["train"]
    assert (totals["records_read"], totals["records_written"], totals["bad_records"]) == (6, 2, 4)
    bad = "\n".join(totals["bad_examples"])
    for expected in ("train.jsonl line 3 'image' (missing.png): file not found", "train.jsonl line 4: not UTF-8 JSON",
                     "train.jsonl line 5: no 'question'", "train.jsonl line 6 'answer': empty caption"):
        assert expected in bad
    stored = records.split_documents(str(out / "vqa"), "train", records.decode_sft_record)[0]
    np.testing.assert_array_equal(stored["parts"]["image"],
                                  load_image_tokenizer(str(out)).encode(shapes.render(scene, 32)))


def test_too_many_bad_jsonl_lines_stop_prepare_naming_them(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"image": "nope.png", "caption": "x"}\n')
    config = sft_config(tmp_path / "out", **{"sft.mixture": {"caption": 1.0},
                                             "sft.sources": {"caption": f"jsonl:{tmp_path}"}})
    with pytest.raises(UserError, match=r"caption/train: 1 of 1 records could not be read.*nope\.png"):
        prepare(config, str(tmp_path / "out"))


def test_mixture_proportions_hold_within_two_percent_over_10k_examples(prepared):
    directory, _, _ = prepared
    config = sft_config(directory, **{"sft.mixture": MIXTURE})
    examples = sft_examples(config, str(directory), "train", vocab_lib.from_config(config.vocab))
    task_ids = [int(examples[i]["task_ids"][0]) for i in range(10_000)]
    counts = np.bincount(task_ids, minlength=len(MIXTURE) + 1)[1:] / len(task_ids)
    weights = np.asarray([MIXTURE[task] for task in sft_tasks(config)])  # task_ids follow the config's order
    np.testing.assert_allclose(counts, weights / weights.sum(), atol=0.02)


def _batches(config, directory, state=None, n=1):
    iterator = iter(make_dataset(config, "train", 0, 1))
    if state is not None:
        iterator.set_state(state)
    return [next(iterator) for _ in range(n)], iterator


def test_the_mixture_resumes_exactly_from_its_iterator_state(prepared):
    directory, _, _ = prepared
    config = sft_config(directory, **{"sft.mixture": MIXTURE, "data.global_batch_size": 2})
    _, iterator = _batches(config, directory, n=3)
    state = iterator.get_state()
    expected = next(iterator)
    (resumed,), _ = _batches(config, directory, state)
    for key in expected:
        np.testing.assert_array_equal(resumed[key], expected[key])


@pytest.mark.parametrize("target_only", [True, False])
def test_loss_covers_the_targets_only_when_asked(prepared, target_only):
    directory, config, _ = prepared
    config = sft_config(directory, **{"sft.mixture": {"vqa": 1.0}, "sft.target_only": target_only,
                                      "data.global_batch_size": 2})
    (batch,), _ = _batches(config, directory)
    vocab = vocab_lib.from_config(config.vocab)
    fmt = get_task("vqa").bind(vocab, TextTokenizer.load(str(directory / "tokenizer.model")).encode)
    for row in range(2):
        segments, loss_mask = batch["segment_ids"][row], batch["loss_mask"][row].astype(bool)
        for segment in set(segments[segments > 0].tolist()):
            positions = np.flatnonzero(segments == segment)
            tokens = np.append(batch["inputs"][row][positions], batch["targets"][row][positions[-1]])
            if tokens[-1] != vocab.eos_id:
                continue  # cut at the row's end
            prompt_length = len(tokens) - len(fmt.split(tokens)[1]["answer"]) - 1
            weighted = np.flatnonzero(loss_mask[positions]) + 1  # the weighted target positions in `tokens`
            expected = np.arange(prompt_length if target_only else 1, len(tokens))
            np.testing.assert_array_equal(weighted, expected)
            assert set(batch["task_ids"][row][positions].tolist()) == {1}


@pytest.mark.parametrize("overrides, field", [
    ({"sft.mixture": {"vqa": 1.0, "poems": 1.0}}, "sft.mixture.poems"),
    ({"sft.mixture": {"vqa": 0.0}}, "sft.mixture.vqa"),
    ({"sft.mixture": {"vqa": 1.0}, "retrieval.enabled": True}, "retrieval.enabled"),
])
def test_bad_mixtures_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"^config\.{field}: "):
        validate(sft_config(**overrides), num_devices=1)


def test_prepare_from_a_missing_init_from_is_named(tmp_path):
    config = sft_config(tmp_path / "out", init_from=str(tmp_path / "no_run"), **{"sft.mixture": {"vqa": 1.0}})
    with pytest.raises(UserError, match=r"^config\.init_from=.*no_run: no vocab\.json there"):
        prepare(config, str(tmp_path / "out"))


def test_a_task_without_a_source_is_named(tmp_path):
    config = sft_config(tmp_path, **{"sft.mixture": {"vqa": 1.0, "edit": 1.0}, "sft.sources": {"vqa": "shapes"}})
    with pytest.raises(UserError, match=r"config\.sft\.sources has no entry for task 'edit'"):
        prepare(config, str(tmp_path))
    config = sft_config(tmp_path, **{"sft.mixture": {"vqa": 1.0}, "sft.sources": {"vqa": "folder:x"}})
    with pytest.raises(UserError, match=r"config\.sft\.sources\.vqa='folder:x': expected one of shapes, jsonl:DIR"):
        prepare(config, str(tmp_path))


def test_task_losses_partition_the_loss(tiny_config):
    """loss/<task> sums and counts add up to the batch's: each target token counts for its own task only."""
    import jax

    from cm3jax.train import lm, partitioning

    config = tiny_config()
    spec = lm.build_state_spec(config, partitioning.make_mesh(validate(config, jax.device_count())))
    batch = next(iter(make_dataset(config, "train", 0, 1)))
    batch["task_ids"] = np.random.default_rng(0).integers(0, 3, batch["inputs"].shape).astype(np.int32)
    _, sums = lm.loss_sums(spec.init()["params"], spec.graphdef, batch, ("a", "b"))
    untasked = batch["loss_mask"] * (batch["task_ids"] == 0)
    assert 0 < float(sums["tokens/a"]) and 0 < float(sums["tokens/b"])
    np.testing.assert_allclose(float(sums["tokens/a"] + sums["tokens/b"]) + untasked.sum(), float(sums["tokens"]))
    assert float(sums["loss/a"] + sums["loss/b"]) < float(sums["loss"])
    means = lm.means(sums)
    np.testing.assert_allclose(float(means["loss/a"]), float(sums["loss/a"] / sums["tokens/a"]), rtol=1e-6)


def test_cli_fine_tunes_a_pretrained_run_with_a_loss_per_task(sample_world, tmp_path):
    """prepare (with the pretrained run's tokenizers) -> train from it -> loss/<task> in metrics.jsonl."""
    from train_cli import cpu_env, metrics

    pretrained = sample_world["lm"]
    overrides = {"init_from": pretrained, "retrieval.enabled": False}
    data = tmp_path / "sft_data"
    prepare(sft_config(data, **overrides, **{"sft.mixture": MIXTURE}), str(data))
    assert (data / "tokenizer.model").read_bytes() == (Path(pretrained) / "tokenizer.model").read_bytes()
    flags = [f"--config.{k}={v}" for k, v in {**PALETTE_OVERRIDES, **CM3LEON_OVERRIDES}.items()]
    result = subprocess.run(
        [sys.executable, "-m", "cm3jax.train", f"--config={REPO_ROOT / 'experiments' / 'shapes_sft.py'}",
         f"--workdir={tmp_path / 'sft'}", *flags, f"--config.init_from={pretrained}", "--config.model.image_grid=0",
         f"--config.data.source=prepared:{data}", "--config.total_steps=3", "--config.eval_every=3",
         "--config.eval_steps=1", "--config.data.global_batch_size=8", "--config.mesh.fsdp=2",
         "--config.mesh.tensor=2"], env=cpu_env(), capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path / "sft")
    assert [row["step"] for row in rows] == [1, 2, 3]
    for task in MIXTURE:
        assert all(row[f"loss/{task}"] > 0 for row in rows)
        assert rows[-1][f"eval_loss/{task}"] > 0
