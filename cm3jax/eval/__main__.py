"""`python -m cm3jax.eval --workdir=DIR --task=reconstruction|retrieval [--n=N] [--lpips_weights=PATH]`.

Evaluates a trained run and writes DIR/eval/<task>.json (plus a PNG grid for visual
tasks). Tasks so far:
  reconstruction   a `vqgan` workdir: PSNR, SSIM, LPIPS (with --lpips_weights), codebook
                   usage / perplexity over the validation images of its config, and — on
                   the shapes benchmark — how often the shapes oracle reads the same scene
                   from the reconstruction as from the original.
  retrieval        a `retriever` workdir: text->image and image->text recall@1/5/10 with
                   the first N validation documents of its prepared data as the memory.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from absl import app, flags

from cm3jax import logs, runs
from cm3jax.data.pipeline import prepared_dir
from cm3jax.data.prepare import open_split
from cm3jax.data.records import ArrayRecordDocuments, split_paths
from cm3jax.errors import UserError, exit_on_user_error
from cm3jax.eval.retrieval import evaluate_retrieval
from cm3jax.eval.reconstruction import evaluate_reconstruction, oracle_agreement, reconstruct, save_grid
from cm3jax.models import perceptual
from cm3jax.retrieval.encoder import RetrievalEncoder
from cm3jax.tokenizers.image import VQGANTokenizer

TASKS = ("reconstruction", "retrieval")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints + config.json).")
_TASK = flags.DEFINE_enum("task", "reconstruction", TASKS, "What to evaluate.")
_N = flags.DEFINE_integer("n", 256, "Validation images (reconstruction) or documents (retrieval) to evaluate.")
_LPIPS = flags.DEFINE_string("lpips_weights", "", "LPIPS weights (.npz or lpips .pth); '' skips LPIPS.")


def _write(workdir: str, task: str, result: dict) -> str:
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


def evaluate_tokenizer(workdir: str, n: int, lpips_weights: str) -> dict:
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
    out = _write(workdir, "reconstruction", result)
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
    _write(workdir, "retrieval", result)
    return result


@exit_on_user_error
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    logs.quiet_third_party_logs()
    if _TASK.value == "retrieval":
        result = evaluate_retriever(_WORKDIR.value, _N.value)
    else:
        result = evaluate_tokenizer(_WORKDIR.value, _N.value, _LPIPS.value)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
