"""Multitask supervised fine-tuning of the demo LM on the shapes benchmark's SFT variants.

    # the data, tokenized with the pretrained model's own tokenizers (copied from init_from):
    python -m cm3jax.data.prepare --config=experiments/shapes_sft.py --workdir=demo_run/sft_data \
        --config.init_from=demo_run/lm
    # the fine-tune: parameters of demo_run/lm, fresh optimizer, loss on the targets only
    python -m cm3jax.train --config=experiments/shapes_sft.py --workdir=demo_run/sft \
        --config.init_from=demo_run/lm --config.data.source=prepared:demo_run/sft_data
    python -m cm3jax.eval --workdir=demo_run/sft --task=sft     # and on demo_run/lm: before SFT

(`launch/demo.sh --sft` runs exactly these.) The tasks (cm3jax/data/tasks.py) and their
weights are the mixture; `loss/<task>` of each is in metrics.jsonl. Every task's scenes are
drawn afresh (train split: no held-out colour/shape pair, so the eval's held-out sets stay
zero-shot). CM3leon fine-tunes its 7B at LR 5e-5 with 150 warmup steps; this 0.24M-parameter
model, pretrained at 3e-3, needs a larger step to learn four new formats in a few minutes
(docs/decisions.md, "Shapes SFT learning rate").
"""

import importlib.util
import os

import ml_collections

from cm3jax.config import base_config


def _tiny_lm_config() -> ml_collections.ConfigDict:
    """experiments/tiny_lm.py's config: the architecture, vocab and batch the demo LM was trained with."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_lm.py")
    spec = importlib.util.spec_from_file_location("tiny_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    """tiny_lm's architecture fine-tuned on captioning, VQA, editing and grounded generation."""
    c = _tiny_lm_config()
    c.init_from = "demo_run/lm"  # the pretrained LM (launch/demo.sh); its tokenizers tokenize the data
    c.model.image_grid = 6  # as the demo LM was trained (2-D code positions of 6x6-code images)
    c.retrieval = base_config().retrieval  # fine-tuning examples are not retrieval-augmented

    # Weights count examples; the loss is a mean over target tokens, so VQA (answers of ~3 tokens
    # against 37 for an image) is weighted up to get a fair share of the gradient.
    c.sft.mixture = ml_collections.ConfigDict({"caption": 0.1, "vqa": 0.5, "edit": 0.3, "grounded": 0.1})
    c.sft.sources = ml_collections.ConfigDict({task: "shapes" for task in c.sft.mixture})
    c.sft.target_only = True  # loss on answers / edited images only, as in CM3leon's SFT
    # Scenes per task (`c.sft.shapes_records.<task>` gives one task its own counts; 40k VQA
    # scenes instead of 8k measured no better: docs/benchmarks.md).
    c.prepare.shapes_records = ml_collections.ConfigDict({"train": 8000, "validation": 500})
    c.prepare.records_per_shard = 4000

    c.data.source = "prepared:demo_run/sft_data"
    c.data.prepare_if_missing = False  # the SFT data needs init_from's tokenizers: prepare it explicitly
    c.total_steps = 2000
    c.eval_every = 1000
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 150  # CM3leon's SFT warmup
    c.optim.schedule = "cosine"
    c.checkpoint.every_steps = 200
    return c
