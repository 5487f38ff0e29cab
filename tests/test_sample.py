"""Generation end to end: a trained LM workdir with retrieval -> `Generator` and `cm3jax.sample`.

The session-scoped `sample_world` of conftest: palette-tokenized shapes (120 train / 24
validation documents, 16x16 codes per 32x32 image), a tiny dual encoder, its retrieval
build, and the tiny LM trained a few steps on retrieval-augmented rows. The model is not
good; these tests check that every task runs through the real stack, that its outputs
have the right form, and that bad requests are one clear line with exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import train_cli as cli
from conftest import REPO_ROOT, SAMPLE_WORLD_LM_STEPS
from cm3jax.data import tasks
from cm3jax.data.records import ArrayRecordDocuments, split_paths
from cm3jax.errors import UserError
from cm3jax.sampling.decode import Decoded
from cm3jax.sampling.generate import Generator, TextToImageOptions
from cm3jax.tokenizers.image import load_image_tokenizer

RESOLUTION, GRID = 32, 16


@pytest.fixture(scope="module")
def generator(sample_world):
    return Generator.load(sample_world["lm"])


@pytest.fixture(scope="module")
def validation_images(sample_world):
    records = ArrayRecordDocuments(split_paths(sample_world["data"], "validation"))
    codes = np.stack([records[i]["image"] for i in range(2)])
    return load_image_tokenizer(sample_world["data"]).decode(codes)


def test_load_finds_the_runs_index_and_reranker(generator):
    assert generator.retriever is not None and generator.reranker is not None
    assert generator.model.step == SAMPLE_WORLD_LM_STEPS
    assert generator.model.image_tokens == GRID * GRID


def test_text2image_candidates_split_between_methods_and_reranked(generator):
    prompts = ["a large red circle in the centre", "a small blue square at the top left"]
    results = generator.text2image(prompts, TextToImageOptions(num_samples=3, retrieve=2), seed=0)
    assert [r.prompt for r in results] == prompts
    for result in results:
        # Up to k: the diversity policy skips candidates too close to one already chosen.
        assert 1 <= len(result.retrieved) <= 2 and all(isinstance(c, str) and c for c in result.retrieved)
        assert sorted(c.method for c in result.candidates) == ["cd_k", "top_p", "top_p"]
        scores = [c.score for c in result.candidates]
        assert scores == sorted(scores, reverse=True)
        for candidate in result.candidates:
            assert candidate.pixels.shape == (RESOLUTION, RESOLUTION, 3) and candidate.pixels.dtype == np.uint8
            assert candidate.codes.shape == (GRID, GRID)
            assert 0 <= candidate.codes.min() and candidate.codes.max() < generator.model.vocab.image_codes


def test_text2image_is_deterministic_per_seed(generator):
    options = TextToImageOptions(num_samples=2)
    a, b = (generator.text2image(["a green triangle"], options, seed=5)[0] for _ in range(2))
    for x, y in zip(a.candidates, b.candidates):
        np.testing.assert_array_equal(x.codes, y.codes)


def test_image2text_edit_and_generate_run(generator, validation_images):
    captions = generator.image2text(validation_images, retrieve=1, max_new_tokens=16)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    edited = generator.edit(validation_images, ["make the circle blue", "move it left"])
    assert edited.shape == validation_images.shape and edited.dtype == np.uint8
    outputs = generator.generate(["a red"], max_new_tokens=40)
    assert len(outputs) == 1
    for segment in outputs[0]:
        assert (segment.text is None) != (segment.image is None)


class RecordingDecoder:
    """Stands in for the model's decoder: records the prompt streams, answers `<eos>` (text) or
    an image of code 0 (image tasks) without running the model."""

    def __init__(self, vocab):
        self.vocab, self.calls = vocab, []

    def __call__(self, streams, config, seed=0):
        self.calls.append(([[np.asarray(p).tolist() for p in stream] for stream in streams], config))
        fill = self.vocab.image_id(0) if config.stop_at_image_end else self.vocab.eos_id
        batch = len(streams[0])
        return Decoded(np.full((batch, config.max_new_tokens), fill, np.int32),
                       np.full(batch, config.max_new_tokens, np.int32))


def test_every_task_prompts_with_its_sft_format(generator, validation_images):
    model = generator.model
    recorder = RecordingDecoder(model.vocab)
    recording = Generator(dataclasses.replace(model, decoder=recorder))
    encode, vocab = model.text_tokenizer.encode, model.vocab
    codes = model.image_tokenizer.encode(validation_images)

    def prompts(task, examples):
        fmt = tasks.get_task(task).bind(vocab, encode)
        return [fmt.prompt(example).tolist() for example in examples]

    questions = ["how many objects are there?", "what colour is the circle?"]
    assert recording.vqa(validation_images, questions, max_new_tokens=4) == ["", ""]
    (streams, config), = recorder.calls
    assert streams == [prompts("vqa", [{"image": c, "question": encode(q)} for c, q in zip(codes, questions)])]
    assert config.greedy and config.max_new_tokens == 4

    layouts = ["small red circle [2,2,7,7]", "large blue square [12,12,19,19]; small red plus [1,1,6,6]"]
    images = recording.grounded(layouts, guidance=2.0, top_p=0.5)
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3)
    streams, config = recorder.calls[-1]
    assert streams == [prompts("grounded", [{"layout": encode(t)} for t in layouts]),
                       [[vocab.mask_id(0), vocab.break_id]] * 2]
    assert config.guidance_scales == (2.0,) and config.top_p == 0.5
    recording.grounded(layouts, guidance=1.0)
    assert len(recorder.calls[-1][0]) == 1  # no guidance: no unconditional stream

    recording.text2image(["a red circle"], TextToImageOptions(num_samples=1))
    assert recorder.calls[-1][0][0] == prompts("text2image", [{"caption": encode("a red circle")}])
    recording.image2text(validation_images)
    assert recorder.calls[-1][0][0] == prompts("caption", [{"image": c} for c in codes])
    recording.edit(validation_images, questions)
    assert recorder.calls[-1][0][0] == prompts("edit", [{"source": c, "instruction": encode(q)}
                                                        for c, q in zip(codes, questions)])
    assert len(recorder.calls[-1][0]) == 3 and recorder.calls[-1][1].guidance_scales == (3.0, 1.5)
    recording.edit(validation_images, questions, text_guidance=2.0, image_guidance=1.0)
    assert len(recorder.calls[-1][0]) == 2 and recorder.calls[-1][1].guidance_scales == (2.0,)
    recording.edit(validation_images, questions, text_guidance=1.0, image_guidance=1.0, greedy=True)
    assert len(recorder.calls[-1][0]) == 1 and recorder.calls[-1][1].greedy  # as the SFT eval decodes
    recording.grounded(layouts, guidance=1.0, greedy=True)
    assert recorder.calls[-1][1].greedy and len(recorder.calls[-1][0]) == 1


def test_vqa_and_grounded_run_on_the_model(generator, validation_images):
    answers = generator.vqa(validation_images, ["how many objects are there?"] * 2, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) and a == a.strip() for a in answers)
    images = generator.grounded(["small red circle [2,2,7,7]"], seed=1)
    assert images.shape == (1, RESOLUTION, RESOLUTION, 3) and images.dtype == np.uint8
    greedy = [generator.grounded(["small red circle [2,2,7,7]"], guidance=1.0, greedy=True, seed=s) for s in (1, 2)]
    np.testing.assert_array_equal(*greedy)  # argmax: the seed does not matter


def test_generator_rejects_bad_inputs(generator, validation_images):
    with pytest.raises(UserError, match="uint8"):
        generator.image2text(validation_images.astype(np.float32))
    with pytest.raises(UserError, match="instructions"):
        generator.edit(validation_images, ["only one"])
    with pytest.raises(UserError, match="2 images but 1 questions"):
        generator.vqa(validation_images, ["only one"])
    with pytest.raises(UserError, match="context"):
        generator.text2image(["red " * 900])


# --- the CLI -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    return cli.cpu_env() | {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
                            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _sample(env, workdir, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cm3jax.sample", f"--workdir={workdir}", *flags], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def test_cli_text2image_writes_pngs_and_scores(sample_world, cli_env, tmp_path):
    out = tmp_path / "samples"
    relative = os.path.relpath(sample_world["lm"], REPO_ROOT)  # Orbax needs absolute paths; users type these
    result = _sample(cli_env, relative, "--task=text2image", "--prompt=a large red circle in the centre",
                     "--num_samples=2", "--retrieve=1", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "text2image.json").read_text())
    entry = summary["results"][0]
    assert entry["reranked"] and len(entry["retrieved"]) == 1 and len(entry["candidates"]) == 2
    for name in [entry["best"]] + [c["png"] for c in entry["candidates"]]:
        assert np.asarray(Image.open(out / name)).shape == (RESOLUTION, RESOLUTION, 3)


def test_cli_image2text_reads_an_image_file(sample_world, cli_env, validation_images, tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(validation_images[0]).save(path)
    result = _sample(cli_env, sample_world["lm"], "--task=image2text", f"--image={path}", f"--out={tmp_path}",
                     "--max_new_tokens=16")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "image2text.json").read_text())
    assert summary["results"][0]["image"] == str(path)
    assert isinstance(summary["results"][0]["caption"], str)


def test_cli_vqa_answers_questions_about_image_files(sample_world, cli_env, validation_images, tmp_path):
    paths = [tmp_path / f"scene_{i}.png" for i in range(2)]
    for path, image in zip(paths, validation_images):
        Image.fromarray(image).save(path)
    questions = ["how many objects are there?", "what colour is the circle?"]
    result = _sample(cli_env, sample_world["lm"], "--task=vqa", *(f"--image={p}" for p in paths),
                     *(f"--question={q}" for q in questions), f"--out={tmp_path}", "--max_new_tokens=4")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "vqa.json").read_text())
    assert [(r["image"], r["question"]) for r in summary["results"]] == list(zip(map(str, paths), questions))
    assert all(isinstance(r["answer"], str) for r in summary["results"])


def test_cli_grounded_writes_an_image_per_layout(sample_world, cli_env, tmp_path):
    layouts = ["small red circle [2,2,7,7]", "large blue square [12,12,19,19]"]
    result = _sample(cli_env, sample_world["lm"], "--task=grounded", *(f"--layout={t}" for t in layouts),
                     "--guidance=2", f"--out={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "grounded.json").read_text())
    assert [r["layout"] for r in summary["results"]] == layouts and summary["options"]["guidance"] == 2.0
    for entry in summary["results"]:
        assert np.asarray(Image.open(tmp_path / entry["png"])).shape == (RESOLUTION, RESOLUTION, 3)


@pytest.mark.parametrize("case", ["no_workdir", "unreadable_image", "missing_image", "long_prompt", "no_index",
                                  "vqa_no_image", "vqa_no_question", "vqa_question_count", "grounded_no_layout"])
def test_cli_bad_requests_exit_2_with_one_line(case, sample_world, cli_env, validation_images, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    scene = tmp_path / "scene.png"
    Image.fromarray(validation_images[0]).save(scene)
    workdir, flags, expected = {
        "no_workdir": (str(tmp_path / "nowhere"), ["--prompt=x"], "does not exist"),
        "unreadable_image": (sample_world["lm"], ["--task=image2text", f"--image={garbage}"], "garbage.png"),
        "missing_image": (sample_world["lm"], ["--task=image2text", f"--image={tmp_path / 'absent.png'}"], "absent.png"),
        "long_prompt": (sample_world["lm"], ["--prompt=" + "red " * 900], "context"),
        "no_index": (sample_world["lm"], ["--prompt=x", "--retrieve=1", f"--index={tmp_path / 'no_index'}"], "no_index"),
        "vqa_no_image": (sample_world["lm"], ["--task=vqa", "--question=how many?"], "needs --image"),
        "vqa_no_question": (sample_world["lm"], ["--task=vqa", f"--image={scene}"], "needs --question"),
        "vqa_question_count": (sample_world["lm"], ["--task=vqa", f"--image={scene}", "--question=a?", "--question=b?"],
                               "1 --image but 2 --question"),
        "grounded_no_layout": (sample_world["lm"], ["--task=grounded", "--prompt=x"], "needs --layout"),
    }[case]
    result = _sample(cli_env, workdir, *flags, f"--out={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
