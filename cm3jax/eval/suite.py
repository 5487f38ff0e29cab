"""The evaluations `python -m cm3jax.eval` runs, one function per task, each writing
DIR/eval/<task>.json; `evaluate_all` runs every section a demo directory has and writes
DIR/eval.json and DIR/report.md."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Iterator

import ml_collections
import numpy as np
from absl import logging

from cm3jax import runs
from cm3jax.data.pipeline import prepared_dir
from cm3jax.data.prepare import open_split
from cm3jax.data.records import ArrayRecordDocuments, split_paths
from cm3jax.errors import UserError
from cm3jax.eval import coco, fid, generation, grid, report, sft
from cm3jax.eval.reconstruction import evaluate_reconstruction, oracle_agreement, reconstruct, save_grid
from cm3jax.eval.retrieval import evaluate_retrieval
from cm3jax.models import inception, perceptual
from cm3jax.retrieval.encoder import RetrievalEncoder
from cm3jax.sampling.generate import Generator
from cm3jax.tokenizers.image import VQGANTokenizer

# Sub-directories of a demo directory (launch/demo.sh) and the section each one feeds.
DEMO_STAGES = {"vqgan": "vqgan", "retriever": "retrieval", "lm": ("text2image", "image2text"), "sft": "sft"}
STAGE_TIMES = "stage_times.json"  # written by launch/demo.sh: {stage: seconds}


def write_result(workdir: str, task: str, result: dict) -> str:
    """Writes DIR/eval/<task>.json; returns the eval directory."""
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{task}.json"), "w") as f:
        json.dump(result, f, indent=2)
    return out


def _run_config(workdir: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(runs.read_config(workdir, "cm3jax training run"))


def validation_images(config: ml_collections.ConfigDict, n: int) -> np.ndarray:
    """The first `n` decodable images of the run's validation source."""
    source = open_split(config, "validation")
    images = [r["image"] for r in (source[i] for i in range(len(source))) if "error" not in r][:n]
    if not images:
        raise UserError("the run's validation source holds no readable images")
    return np.stack(images)


def evaluate_tokenizer(workdir: str, n: int, lpips_weights: str = "") -> dict:
    """Reconstruction metrics of the VQGAN in `workdir`; writes DIR/eval/reconstruction.{json,png}."""
    config = _run_config(workdir)
    tokenizer = VQGANTokenizer.load(workdir)
    images = validation_images(config, n)
    lpips_net = perceptual.load(lpips_weights) if lpips_weights else None
    result = evaluate_reconstruction(tokenizer, images, lpips_net=lpips_net)
    _, reconstructions = reconstruct(tokenizer, images)
    if config.prepare.sources.validation == "shapes":
        result["oracle_agreement"] = oracle_agreement(images, reconstructions)
    result["step"] = tokenizer.step
    out = write_result(workdir, "reconstruction", result)
    save_grid(images[:16], reconstructions[:16], os.path.join(out, "reconstruction.png"))
    return result


def evaluate_retriever(workdir: str, n: int) -> dict:
    """Recall@k of the retriever in `workdir` on n validation documents; writes DIR/eval/retrieval.json."""
    config = _run_config(workdir)
    directory = prepared_dir(config)
    paths = split_paths(directory, "validation") if directory else []
    if not paths:
        raise UserError(f"{workdir}: its data ({config.data.source}) has no validation split to evaluate on")
    documents = ArrayRecordDocuments(paths)
    records = [documents[i] for i in range(min(n, len(documents)))]
    result = evaluate_retrieval(RetrievalEncoder.load(workdir), records)
    write_result(workdir, "retrieval", result)
    return result


def feature_extractor(generator: Generator, inception_weights: str) -> fid.FeatureExtractor | None:
    """Inception pool3 features from `inception_weights`, else the re-ranker's image tower
    (a different metric, named so in the output), else None (no FID)."""
    if inception_weights:
        return fid.InceptionFeatures(inception.load_inception_weights(inception_weights))
    if generator.reranker is None:
        return None
    return fid.DualEncoderFeatures(generator.reranker, generator.model.image_tokenizer)


def evaluate_generation(workdir: str, task: str, options: generation.GenerationEvalOptions,
                        index: str | None = None, inception_weights: str = "",
                        generator: Generator | None = None) -> dict:
    """`task` = 'text2image' or 'image2text' on the LM run in `workdir`; writes DIR/eval/<task>.json."""
    generator = generator or Generator.load(workdir, index=index)
    out = os.path.join(workdir, "eval")
    if task == "text2image":
        result = generation.evaluate_text2image(generator, options, out,
                                                feature_extractor(generator, inception_weights))
    else:
        result = generation.evaluate_image2text(generator, options, out)
    result["step"] = generator.model.step
    write_result(workdir, task, result)
    return result


def evaluate_sft(workdir: str, options: generation.GenerationEvalOptions,
                 generator: Generator | None = None) -> dict:
    """The SFT tasks (VQA, captioning, editing, grounded generation; cm3jax/eval/sft.py) on the
    LM run in `workdir`, without retrieval; writes DIR/eval/sft.{json,png}."""
    generator = generator or Generator.load(workdir, index="", reranker="")
    result = sft.evaluate_sft(generator, options, os.path.join(workdir, "eval"))
    result["step"] = generator.model.step
    write_result(workdir, "sft", result)
    return result


FID_BATCH = 64  # captions per text2image call and reference images per feature batch of --task=fid
FID_GRID = 8  # reference images (over their generations) in DIR/eval/fid.png


def _progress(batches: Iterator[np.ndarray], what: str, total: int,
              head: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Passes `batches` through, logging `done / total` after each and keeping the first
    grid-width images in `head`."""
    done = 0
    for batch in batches:
        done += len(batch)
        head.extend(batch[:FID_GRID - len(head)])
        logging.info("fid: %s %d / %d", what, done, total)
        yield batch


def _fid_generations(generator: Generator, captions: list[str], options: generation.GenerationEvalOptions,
                     retrieve: int) -> Iterator[np.ndarray]:
    """One image per caption (the re-ranker's best of `options.num_samples`), FID_BATCH
    captions per call, each call with its own seed drawn from `options.seed`."""
    for i, start in enumerate(range(0, len(captions), FID_BATCH)):
        seed = int(np.random.default_rng([options.seed, i]).integers(2 ** 31))
        yield generation.generate_images(generator, captions[start:start + FID_BATCH],
                                 dataclasses.replace(options, seed=seed), options.guidance, retrieve)


def evaluate_fid(workdir: str, prompts_path: str, images_dir: str, n: int,
                 options: generation.GenerationEvalOptions, index: str | None = None,
                 inception_weights: str = "") -> dict:
    """Zero-shot MS-COCO FID of the LM run in `workdir`: one image for each of `n` random
    captions of the COCO captions file `prompts_path` against those captions' images in
    `images_dir` (centre-cropped, resized to the model's resolution). Both sets are streamed
    through the feature extractor FID_BATCH images at a time. Writes DIR/eval/fid.json and
    DIR/eval/fid.png (the first reference images over their generations).

    Raises:
      UserError: a bad captions file or image, n out of range, or no feature extractor (no
        --inception_weights and no dual encoder in the run).
    """
    items = coco.sample_captions(coco.read_captions(prompts_path), n, options.seed)
    generator = Generator.load(workdir, index=index)
    extractor = feature_extractor(generator, inception_weights)
    if extractor is None:
        raise UserError(f"--task=fid: {workdir} has no dual encoder to take image features from: pass "
                        "--inception_weights=pt_inception-2015-12-05-6726825d.pth (pytorch-fid's weights)")
    retrieve = options.retrieve if generator.retriever is not None else 0
    resolution = generator.model.image_tokenizer.resolution
    reference_head: list[np.ndarray] = []
    generated_head: list[np.ndarray] = []
    # The reference set first: a missing image fails the run before any generation.
    reference = fid.image_stats(extractor, _progress(
        coco.load_reference(images_dir, [item.file_name for item in items], resolution, FID_BATCH),
        "reference images", n, reference_head))
    generated = fid.image_stats(extractor, _progress(
        _fid_generations(generator, [item.caption for item in items], options, retrieve),
        "generated images", n, generated_head))
    result = fid.fid_result(extractor, generated, reference)
    result.update(prompts=prompts_path, images=images_dir, n=n, guidance=options.guidance, top_p=options.top_p,
                  retrieve=retrieve, num_samples=options.num_samples, seed=options.seed,
                  step=generator.model.step)
    out = os.path.join(workdir, "eval")
    grid.save_rows([np.stack(reference_head), np.stack(generated_head)], os.path.join(out, "fid.png"),
                   FID_GRID)
    result["grid"] = {"path": "fid.png", "rows": ["COCO reference images", "generated"],
                      "prompts": [item.caption for item in items[:len(reference_head)]]}
    write_result(workdir, "fid", result)
    return result


def _stage_times(root: str) -> dict:
    path = os.path.join(root, STAGE_TIMES)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def evaluate_all(root: str, n: int, options: generation.GenerationEvalOptions, inception_weights: str = "") -> dict:
    """Every section a demo directory `root` holds (vqgan/, retriever/, lm/, and sft/ of
    `launch/demo.sh --sft`: the SFT tasks on lm/ and sft/, 'before' and 'after'), as
    ROOT/eval.json plus ROOT/report.md; each section's own JSON and grids stay in its
    workdir's eval/.

    Raises:
      UserError: `root` holds none of the demo's stage directories.
    """
    present = [stage for stage in DEMO_STAGES if runs.checkpoint_steps(os.path.join(root, stage))]
    if not present:
        raise UserError(f"--task=all: {root} holds none of {', '.join(f'{s}/' for s in DEMO_STAGES)} with "
                        "checkpoints (a launch/demo.sh directory)")
    result: dict = {}
    seconds: dict = {}
    lm_generator = None  # loaded by the lm/ stage, reused for the SFT eval's 'before'
    for stage in present:
        workdir = os.path.join(root, stage)
        start = time.perf_counter()
        if stage == "vqgan":
            result["vqgan"] = evaluate_tokenizer(workdir, n)
        elif stage == "retriever":
            section = evaluate_retriever(workdir, n)
            result["retrieval"] = {"recall_at_1": section["text_to_image_recall_at_1"],
                                   "recall_at_5": section["text_to_image_recall_at_5"], **section}
        elif stage == "sft":
            result["sft"] = {"before": evaluate_sft(os.path.join(root, "lm"), options, lm_generator),
                             "after": evaluate_sft(workdir, options)}
        else:
            lm_generator = Generator.load(workdir)
            for task in DEMO_STAGES["lm"]:
                result[task] = evaluate_generation(workdir, task, options, inception_weights=inception_weights,
                                                   generator=lm_generator)
        seconds[f"eval_{stage}"] = round(time.perf_counter() - start, 1)
    result["wall_time_seconds"] = {**_stage_times(root), **seconds}
    with open(os.path.join(root, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    report.write_report(root, result)
    return result
