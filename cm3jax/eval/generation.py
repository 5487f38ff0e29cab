"""Text-to-image and image-to-text evaluation of an LM run on the shapes benchmark.

Both directions are scored by the exact shapes oracle (cm3jax/eval/shapes_metrics.py):
text -> image prompts with seeded scene captions (cm3jax/eval/shapes_prompts.py) and reads
the objects back from each generated image; image -> text captions ground-truth renders
and parses the caption back into objects. Each section also names what it varied (CFG,
retrieval, held-out colour/shape pairs), so `eval.json` reads as the ablation table.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from cm3jax.data import shapes
from cm3jax.eval import captioning, grid, shapes_metrics, shapes_prompts
from cm3jax.eval.fid import FeatureExtractor, fid_result
from cm3jax.sampling.generate import Generator, TextToImageOptions


@dataclasses.dataclass(frozen=True)
class GenerationEvalOptions:
    """What the generation evals sample.

    Attributes:
      n: prompts (or images) per scene set.
      seed: scene sets and sampling noise.
      guidance: classifier-free guidance scale of the main text-to-image section.
      retrieve: documents retrieved and prepended (0 when the run has no index).
      top_p: nucleus of the text-to-image samples.
      num_samples: candidates per prompt; the re-ranker's best is scored (1: no re-ranking).
    """

    n: int = 64
    seed: int = 0
    guidance: float = 3.0
    retrieve: int = 2
    top_p: float = 0.9
    num_samples: int = 1


def generate_images(generator: Generator, prompts: list[str], options: GenerationEvalOptions, guidance: float,
                    retrieve: int) -> np.ndarray:
    """The best (first) candidate per prompt, uint8 [N, R, R, 3]."""
    sampling = TextToImageOptions(num_samples=options.num_samples, guidance=guidance, top_p=options.top_p,
                                  retrieve=retrieve)
    return np.stack([r.candidates[0].pixels for r in generator.text2image(prompts, sampling, options.seed)])


def evaluate_text2image(generator: Generator, options: GenerationEvalOptions, out_dir: str,
                        features: FeatureExtractor | None = None) -> dict:
    """Oracle accuracy of generated images, with and without CFG / retrieval, plus FID.

    Writes `out_dir/text2image.png` (ground truth over generations with CFG, without CFG and
    without retrieval, then the multi-object and held-out prompts) and returns the section
    of eval.json: `oracle_accuracy` (single-object prompts), `oracle_accuracy_no_cfg`,
    `oracle_accuracy_no_retrieval`, `oracle_accuracy_multi`, `heldout_oracle_accuracy`,
    attribute accuracies, and `fid` over all generated images when `features` is given.
    """
    retrieve = options.retrieve if generator.retriever is not None else 0
    sets = {kind: shapes_prompts.scenes(kind, options.n, options.seed) for kind in ("single", "multi", "heldout")}
    prompts = {kind: shapes_prompts.captions(scenes) for kind, scenes in sets.items()}
    resolution = generator.model.image_tokenizer.resolution
    truth = {kind: shapes_prompts.renders(scenes, resolution) for kind, scenes in sets.items()}
    runs = {"main": ("single", options.guidance, retrieve), "no_cfg": ("single", 1.0, retrieve),
            "multi": ("multi", options.guidance, retrieve), "heldout": ("heldout", options.guidance, retrieve)}
    if retrieve:
        runs["no_retrieval"] = ("single", options.guidance, 0)
    images = {name: generate_images(generator, prompts[kind], options, g, k) for name, (kind, g, k) in runs.items()}
    scores = {name: shapes_metrics.text2image_oracle(prompts[runs[name][0]], images[name]) for name in runs}
    main = scores["main"]
    result = {
        "oracle_accuracy": main["oracle_accuracy"],
        "attribute_accuracy": main["attribute_accuracy"],
        "oracle_accuracy_no_cfg": scores["no_cfg"]["oracle_accuracy"],
        "oracle_accuracy_no_retrieval": scores.get("no_retrieval", main)["oracle_accuracy"],
        "oracle_accuracy_multi": scores["multi"]["oracle_accuracy"],
        "attribute_accuracy_multi": scores["multi"]["attribute_accuracy"],
        "heldout_oracle_accuracy": scores["heldout"]["oracle_accuracy"],
        "n": options.n, "guidance": options.guidance, "retrieve": retrieve, "top_p": options.top_p,
        "num_samples": options.num_samples, "seed": options.seed,
    }
    if features is not None:
        generated = np.concatenate([images["main"], images["multi"]])
        reference = np.concatenate([truth["single"], truth["multi"]])
        result["fid"] = fid_result(features, generated, reference)
    columns = min(8, options.n)
    grid.save_rows([truth["single"][:columns], images["main"][:columns], images["no_cfg"][:columns],
                    images.get("no_retrieval", images["main"])[:columns], truth["multi"][:columns],
                    images["multi"][:columns], truth["heldout"][:columns], images["heldout"][:columns]],
                   os.path.join(out_dir, "text2image.png"), columns)
    result["grid"] = {"path": "text2image.png", "rows": [
        "single-object prompts (ground truth)", f"generated, CFG {options.guidance:g}", "generated, no CFG",
        "generated, no retrieval" if retrieve else "generated (no index: same as row 2)",
        "multi-object prompts (ground truth)", "generated", "held-out colour/shape prompts (ground truth)",
        "generated"], "prompts": prompts["single"][:columns]}
    return result


def caption_scores(generated: list[str], scenes: list[list[shapes.ShapeObject]]) -> dict:
    """'oracle_accuracy' and 'attribute_accuracy' of the parsed captions against the true
    scenes, 'cider' (CIDEr-D) and 'bleu4' against the scenes' benchmark captions."""
    oracle = shapes_metrics.image2text_oracle(generated, scenes)
    candidates = {i: [captioning.tokenize(c)] for i, c in enumerate(generated)}
    references = {i: [captioning.tokenize(c)] for i, c in enumerate(shapes_prompts.captions(scenes))}
    return {"oracle_accuracy": oracle["oracle_accuracy"], "attribute_accuracy": oracle["attribute_accuracy"],
            "cider": captioning.cider(candidates, references)[0],
            "bleu4": captioning.bleu(candidates, references)["bleu_4"]}


def evaluate_image2text(generator: Generator, options: GenerationEvalOptions, out_dir: str) -> dict:
    """Oracle accuracy, CIDEr and BLEU-4 of greedy captions of ground-truth renders.

    Scenes of one to three objects from the training distribution, plus a held-out set
    (colour/shape pairs never seen in training). Writes `out_dir/image2text.png` and returns
    the eval.json section, with the first captions beside their truth.
    """
    resolution = generator.model.image_tokenizer.resolution
    result = {}
    for kind, prefix in (("scene", ""), ("heldout", "heldout_")):
        scenes = shapes_prompts.scenes(kind, options.n, options.seed)
        images = shapes_prompts.renders(scenes, resolution)
        generated = generator.image2text(images, seed=options.seed)
        truth = shapes_prompts.captions(scenes)
        result.update({f"{prefix}{k}": v for k, v in caption_scores(generated, scenes).items()})
        if kind == "scene":
            columns = min(8, options.n)
            grid.save_rows([images[:columns]], os.path.join(out_dir, "image2text.png"), columns)
            result["examples"] = [{"truth": t, "generated": g} for t, g in zip(truth[:columns], generated)]
    result.update(n=options.n, seed=options.seed, decoding="greedy")
    return result
