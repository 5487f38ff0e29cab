"""`python -m cm3jax.sample --workdir=DIR --task=text2image|image2text|edit|vqa|grounded|generate ...`.

Turns an LM checkpoint into images and captions; writes into --out (default DIR/samples):

  text2image --prompt "..." [--prompt ...] --num_samples N [--retrieve=k] [--guidance=3]
      N candidates per prompt (half top-p with classifier-free guidance, half contrastive
      decoding), re-ranked by the dual encoder; text2image_<i>.png is the best,
      text2image_<i>_<j>.png every candidate, text2image.json the scores.
  image2text --image PATH [--image ...] [--retrieve=k]     captions -> image2text.json
  edit --image PATH --prompt "make the circle blue" [--guidance=3] [--image_guidance=1.5] [--greedy]
      edit_<i>.png and edit.json
  vqa --image PATH --question "how many objects are there?" [--image ... --question ...]
      greedy answers in the SFT vqa template (cm3jax/data/tasks.py) -> vqa.json
  grounded --layout "small red circle [2,2,7,7]; large blue square [12,12,19,19]" [--layout ...]
      [--guidance=3] [--top_p=0.9] [--greedy]   an image per layout (shapes.grounded_layout's text, the
      SFT grounded template): grounded_<i>.png and grounded.json
  generate --prompt "..."      free interleaved text/images: generate.json (+ generate_<i>_<j>.png)

A missing checkpoint, tokenizer or index, a missing --image / --prompt / --question /
--layout, an unreadable image or a prompt longer than the model's context is one `error:`
line and exit code 2. vqa and grounded prompt as the SFT formats do, so they are meant for
a model fine-tuned on those templates; a pretrained model answers them poorly. Fine-tuning
trains no unconditional (`<mask:0>`) stream, so sample a fine-tuned model's edits and grounded
images with `--greedy --guidance=1 --image_guidance=1`, as `cm3jax.eval --task=sft` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from absl import app, flags, logging
from PIL import Image

from cm3jax import logs
from cm3jax.data.images import BadRecordError, decode_image
from cm3jax.errors import UserError, exit_on_user_error
from cm3jax.sampling.generate import Generator, TextToImageOptions

TASKS = ("text2image", "image2text", "edit", "vqa", "grounded", "generate")
_WORKDIR = flags.DEFINE_string("workdir", None, "LM run directory (checkpoints, config.json, tokenizers).")
_TASK = flags.DEFINE_enum("task", "text2image", TASKS, "What to generate.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default WORKDIR/samples).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Caption / instruction / free prompt (repeatable: one batch).")
_IMAGE = flags.DEFINE_multi_string("image", [], "Input image file (repeatable).")
_QUESTION = flags.DEFINE_multi_string("question", [], "vqa: a question per --image (repeatable, in order).")
_LAYOUT = flags.DEFINE_multi_string("layout", [], "grounded: 'SIZE COLOUR SHAPE [x0,y0,x1,y1]; ...' "
                                    "(repeatable: one batch).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 2, "text2image candidates per prompt.")
_RETRIEVE = flags.DEFINE_integer("retrieve", 0, "Documents retrieved from the index and prepended.")
_INDEX = flags.DEFINE_string("index", None, "Retrieval build directory (default: the run's config.retrieval.neighbours).")
_RERANKER = flags.DEFINE_string("reranker", None, "Dual-encoder workdir re-ranking candidates ('' = none).")
_GUIDANCE = flags.DEFINE_float("guidance", 3.0, "Classifier-free guidance scale (text condition).")
_IMAGE_GUIDANCE = flags.DEFINE_float("image_guidance", 1.5, "edit: guidance scale of the source image.")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling threshold.")
_GREEDY = flags.DEFINE_bool("greedy", False, "edit / grounded: argmax decoding instead of top-p (with "
                            "--guidance=1 --image_guidance=1: how fine-tuned models are evaluated).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_CD_ALPHA = flags.DEFINE_float("cd_alpha", 0.1, "Contrastive decoding plausibility threshold alpha.")
_CD_K = flags.DEFINE_integer("cd_k", 5, "Contrastive decoding: alpha is relative to the k-th likeliest token.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 300, "generate / image2text / vqa: tokens at most.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Tensor-parallel devices for the heads (the rest split rows).")


def read_images(paths: list[str], resolution: int) -> np.ndarray:
    """uint8 [N, R, R, 3] from image files (centre-cropped and resized); UserError naming a bad file."""
    if not paths:
        raise UserError(f"--task={_TASK.value} needs --image PATH")
    images = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                images.append(decode_image(f.read(), resolution, path))
        except OSError as e:
            raise UserError(f"--image {path}: cannot read ({e.strerror or e})") from None
        except BadRecordError as e:
            raise UserError(f"--image {path}: {e}") from None
    return np.stack(images)


def _texts(flag: flags.FlagHolder, required: int | None = None) -> list[str]:
    """The values of a repeatable text flag; UserError when absent or not one per --image."""
    if not flag.value:
        raise UserError(f"--task={_TASK.value} needs --{flag.name} \"...\"")
    if required is not None and len(flag.value) != required:
        raise UserError(f"--task={_TASK.value}: {required} --image but {len(flag.value)} --{flag.name}")
    return list(flag.value)


def _save_png(pixels: np.ndarray, out: str, name: str) -> str:
    Image.fromarray(np.asarray(pixels, np.uint8)).save(os.path.join(out, name))
    return name


def text2image(generator: Generator, out: str) -> dict:
    """Runs text2image for every --prompt; returns the JSON summary."""
    options = TextToImageOptions(num_samples=_NUM_SAMPLES.value, guidance=_GUIDANCE.value, top_p=_TOP_P.value,
                                 temperature=_TEMPERATURE.value, contrastive_alpha=_CD_ALPHA.value,
                                 contrastive_k=_CD_K.value, retrieve=_RETRIEVE.value)
    results = generator.text2image(_texts(_PROMPT), options, seed=_SEED.value)
    summary = []
    for i, result in enumerate(results):
        best = _save_png(result.candidates[0].pixels, out, f"text2image_{i}.png")
        summary.append({
            "prompt": result.prompt, "retrieved": result.retrieved, "best": best,
            "reranked": generator.reranker is not None,
            "candidates": [{"png": _save_png(c.pixels, out, f"text2image_{i}_{j}.png"), "method": c.method,
                            "score": c.score} for j, c in enumerate(result.candidates)],
        })
    return {"options": dataclasses.asdict(options), "results": summary}


def image2text(generator: Generator, out: str) -> dict:
    """Captions every --image; returns the JSON summary."""
    images = read_images(_IMAGE.value, generator.model.image_tokenizer.resolution)
    captions = generator.image2text(images, retrieve=_RETRIEVE.value, max_new_tokens=_MAX_NEW_TOKENS.value,
                                    seed=_SEED.value)
    return {"results": [{"image": p, "caption": c} for p, c in zip(_IMAGE.value, captions)]}


def edit(generator: Generator, out: str) -> dict:
    """Edits every --image by its --prompt; returns the JSON summary."""
    images = read_images(_IMAGE.value, generator.model.image_tokenizer.resolution)
    edited = generator.edit(images, _texts(_PROMPT, len(images)), text_guidance=_GUIDANCE.value,
                            image_guidance=_IMAGE_GUIDANCE.value, top_p=_TOP_P.value, seed=_SEED.value,
                            greedy=_GREEDY.value)
    return {"results": [{"image": p, "instruction": t, "png": _save_png(e, out, f"edit_{i}.png")}
                        for i, (p, t, e) in enumerate(zip(_IMAGE.value, _PROMPT.value, edited))]}


def vqa(generator: Generator, out: str) -> dict:
    """Answers every --question about its --image; returns the JSON summary."""
    images = read_images(_IMAGE.value, generator.model.image_tokenizer.resolution)
    questions = _texts(_QUESTION, len(images))
    answers = generator.vqa(images, questions, max_new_tokens=_MAX_NEW_TOKENS.value, seed=_SEED.value)
    return {"results": [{"image": p, "question": q, "answer": a}
                        for p, q, a in zip(_IMAGE.value, questions, answers)]}


def grounded(generator: Generator, out: str) -> dict:
    """Draws an image of every --layout; returns the JSON summary."""
    layouts = _texts(_LAYOUT)
    images = generator.grounded(layouts, guidance=_GUIDANCE.value, top_p=_TOP_P.value, seed=_SEED.value,
                                greedy=_GREEDY.value)
    return {"options": {"guidance": _GUIDANCE.value, "top_p": _TOP_P.value, "greedy": _GREEDY.value,
                        "seed": _SEED.value},
            "results": [{"layout": t, "png": _save_png(image, out, f"grounded_{i}.png")}
                        for i, (t, image) in enumerate(zip(layouts, images))]}


def generate(generator: Generator, out: str) -> dict:
    """Free generation from every --prompt; returns the JSON summary."""
    outputs = generator.generate(_texts(_PROMPT), max_new_tokens=_MAX_NEW_TOKENS.value, top_p=_TOP_P.value,
                                 seed=_SEED.value)
    results = []
    for i, segments in enumerate(outputs):
        parts = []
        for j, segment in enumerate(segments):
            if segment.image is not None:
                parts.append({"image": _save_png(segment.image, out, f"generate_{i}_{j}.png")})
            else:
                parts.append({"text": segment.text})
        results.append({"prompt": _PROMPT.value[i], "output": parts})
    return {"results": results}


def main(argv: list[str]) -> None:
    """Loads the run once, runs the task, writes OUT/<task>.json."""
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise UserError("--workdir (an LM run directory) is required")
    logs.quiet_third_party_logs()
    out = _OUT.value or os.path.join(_WORKDIR.value, "samples")
    start = time.time()
    generator = Generator.load(_WORKDIR.value, index=_INDEX.value, reranker=_RERANKER.value,
                               step=_STEP.value, tensor=_TENSOR.value)
    logging.info(f"loaded {_WORKDIR.value} step {generator.model.step} in {time.time() - start:.1f}s")
    os.makedirs(out, exist_ok=True)
    start = time.time()
    summary = {"text2image": text2image, "image2text": image2text, "edit": edit, "vqa": vqa,
               "grounded": grounded, "generate": generate}[_TASK.value](generator, out)
    summary.update(workdir=_WORKDIR.value, step=generator.model.step, seconds=round(time.time() - start, 2))
    path = os.path.join(out, f"{_TASK.value}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    logging.info(f"wrote {path}")


if __name__ == "__main__":
    app.run(exit_on_user_error(main))
