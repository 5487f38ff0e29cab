"""`python -m cm3jax.eval --workdir=DIR --task=TASK [--n=N] ...`.

Evaluates a trained run and writes DIR/eval/<task>.json (plus a PNG grid for visual tasks):
  reconstruction   a `vqgan` workdir: PSNR, SSIM, LPIPS (with --lpips_weights), codebook
                   usage / perplexity over the validation images of its config, and — on
                   the shapes benchmark — how often the shapes oracle reads the same scene
                   from the reconstruction as from the original.
  retrieval        a `retriever` workdir: text->image and image->text recall@1/5/10 with
                   the first N validation documents of its prepared data as the memory.
  text2image       an LM workdir: shapes-oracle accuracy of images generated for N seeded
                   captions (single objects with and without CFG and retrieval, 2-3 objects,
                   held-out colour/shape pairs) and FID (Inception pool3 with
                   --inception_weights, else the retriever's image tower, named as such).
  image2text       an LM workdir: oracle accuracy, CIDEr-D and BLEU-4 of greedy captions.
  fid              an LM workdir: zero-shot MS-COCO FID (below), into DIR/eval/fid.{json,png}.
  sft              an LM workdir (meant for a fine-tuned one): the SFT task formats on N
                   seeded shapes scenes per set (cm3jax/eval/sft.py): VQA exact-match accuracy
                   by question kind, caption oracle accuracy and CIDEr-D, edit success by
                   operation and grounded (layout -> image) oracle accuracy, each image task
                   beside its image-tokenizer ceiling, held-out pairs under `heldout_` keys and
                   single-object scenes under `_single` keys. Greedy, no guidance, no retrieval.
  all              a launch/demo.sh directory: every section its vqgan/, retriever/ and lm/
                   hold (and, after `launch/demo.sh --sft`, sft on lm/ and sft/: before and
                   after fine-tuning), into DIR/eval.json and DIR/report.md.

Zero-shot MS-COCO FID (CM3leon's protocol):

  python -m cm3jax.eval --workdir=LM_DIR --task=fid --captions=annotations/captions_val2014.json \
      --images=val2014/ --n=30000 --inception_weights=pt_inception-2015-12-05-6726825d.pth \
      [--guidance=3 --top_p=0.9 --retrieve=2 --num_samples=1 --seed=0]

--n random captions of the val2014 captions file (seeded by --seed, without replacement; the
paper uses 30k), one generated image per caption (the re-ranker's best of --num_samples, CFG
--guidance, nucleus --top_p, --retrieve documents when the run has an index). The reference
set is those captions' images from --images (an image with several sampled captions counts
once per caption), centre-cropped to a square and resized (bicubic) to the model's
resolution. Both sets go through the Inception pool3 of pytorch-fid's weights, given by path
(--inception_weights); without them the retriever's image tower is used, reported under its
own name ("dual_encoder_image") and not comparable to FID.
"""

from __future__ import annotations

import json

from absl import app, flags

from cm3jax import logs
from cm3jax.errors import UserError, exit_on_user_error
from cm3jax.eval import suite
from cm3jax.eval.generation import GenerationEvalOptions

TASKS = ("reconstruction", "retrieval", "text2image", "image2text", "fid", "sft", "all")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints + config.json); a demo directory "
                               "for --task=all.")
_TASK = flags.DEFINE_enum("task", "reconstruction", TASKS, "What to evaluate.")
_N = flags.DEFINE_integer("n", 256, "Validation images (reconstruction), documents (retrieval) or COCO captions "
                          "(fid; the protocol uses 30000) to evaluate.")
_PROMPTS = flags.DEFINE_integer("prompts", 64, "Prompts (images) per scene set of text2image / image2text / sft.")
_SEED = flags.DEFINE_integer("seed", 0, "Scene sets (and text2image's sampling noise) of text2image / image2text / "
                            "sft.")
_GUIDANCE = flags.DEFINE_float("guidance", 3.0, "Classifier-free guidance scale of text2image.")
_RETRIEVE = flags.DEFINE_integer("retrieve", 2, "Documents retrieved for text2image (when the run has an index).")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus of the text2image samples.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "text2image candidates per prompt; the re-ranker's best "
                                    "is scored.")
_INDEX = flags.DEFINE_string("index", None, "Retrieval build directory (default: the LM run's own).")
_LPIPS = flags.DEFINE_string("lpips_weights", "", "LPIPS weights (.npz or lpips .pth); '' skips LPIPS.")
_INCEPTION = flags.DEFINE_string("inception_weights", "", "pytorch-fid's pt_inception-2015-12-05 .pth (or our "
                                 ".npz); '' scores FID with the retriever's image tower instead.")

_CAPTIONS = flags.DEFINE_string("captions", "", "fid: the COCO captions JSON the prompts are drawn from "
                                "(captions_val2014.json).")
_IMAGES = flags.DEFINE_string("images", "", "fid: the directory of the captions file's images (val2014/).")


@exit_on_user_error
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    logs.quiet_third_party_logs()
    options = GenerationEvalOptions(n=_PROMPTS.value, seed=_SEED.value, guidance=_GUIDANCE.value,
                                    retrieve=_RETRIEVE.value, top_p=_TOP_P.value, num_samples=_NUM_SAMPLES.value)
    workdir, task = _WORKDIR.value, _TASK.value
    if task == "retrieval":
        result = suite.evaluate_retriever(workdir, _N.value)
    elif task == "reconstruction":
        result = suite.evaluate_tokenizer(workdir, _N.value, _LPIPS.value)
    elif task == "fid":
        if not _CAPTIONS.value or not _IMAGES.value:
            raise UserError("--task=fid needs --captions=captions_val2014.json and --images=val2014/")
        result = suite.evaluate_fid(workdir, _CAPTIONS.value, _IMAGES.value, _N.value, options, _INDEX.value,
                                    _INCEPTION.value)
    elif task == "sft":
        result = suite.evaluate_sft(workdir, options)
    elif task == "all":
        result = suite.evaluate_all(workdir, _N.value, options, _INCEPTION.value)
    else:
        result = suite.evaluate_generation(workdir, task, options, _INDEX.value, _INCEPTION.value)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
