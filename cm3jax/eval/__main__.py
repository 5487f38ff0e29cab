"""`python -m cm3jax.eval --workdir=DIR --task=reconstruction [--n=256] [--lpips_weights=PATH]`.

Evaluates a trained run and writes DIR/eval/<task>.json (plus a PNG grid for visual
tasks). Tasks so far:
  reconstruction   a `vqgan` workdir: PSNR, SSIM, LPIPS (with --lpips_weights), codebook
                   usage / perplexity over the validation images of its config, and — on
                   the shapes benchmark — how often the shapes oracle reads the same scene
                   from the reconstruction as from the original.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from absl import app, flags

from cm3jax import logs
from cm3jax.data.prepare import open_split
from cm3jax.errors import UserError, exit_on_user_error
from cm3jax.eval.reconstruction import evaluate_reconstruction, oracle_agreement, reconstruct, save_grid
from cm3jax.models import perceptual
from cm3jax.tokenizers.image import VQGANTokenizer

TASKS = ("reconstruction",)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints + config.json).")
_TASK = flags.DEFINE_enum("task", "reconstruction", TASKS, "What to evaluate.")
_N = flags.DEFINE_integer("n", 256, "Validation images to evaluate.")
_LPIPS = flags.DEFINE_string("lpips_weights", "", "LPIPS weights (.npz or lpips .pth); '' skips LPIPS.")


def _run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"--workdir={workdir}: no config.json (not a cm3jax run directory)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


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
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    save_grid(images[:16], reconstructions[:16], os.path.join(out, "reconstruction.png"))
    with open(os.path.join(out, "reconstruction.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


@exit_on_user_error
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    logs.quiet_third_party_logs()
    result = evaluate_tokenizer(_WORKDIR.value, _N.value, _LPIPS.value)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
