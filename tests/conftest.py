"""Shared test setup: 8 fake CPU devices and the tiny experiment config.

The XLA flag must be in the environment before jax creates its CPU backend, so it is
set here, at conftest import time, before any test module imports jax.
"""

from __future__ import annotations

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=8"
if DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", "").split():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# tiny_lm trains on prepared shapes data; unit tests use the synthetic source at these
# small shapes instead (no prepare step, 16 rows of 64 tokens).
SYNTHETIC_OVERRIDES = {
    "data.source": "synthetic",
    "data.seq_len": 64,
    "data.global_batch_size": 16,
    "model.max_len": 128,
    "vocab.text_size": 200,
    "vocab.image_codes": 48,
    "vocab.num_masks": 4,
}

# The shapes benchmark tokenizes images with a trained VQGAN; tests that prepare shapes data
# use the exact palette quantiser instead, on 32x32 scenes at 16x16 codes per image.
PALETTE_OVERRIDES = {
    "prepare.image_tokenizer": "palette",
    "prepare.resolution": 32,
    "data.seq_len": 1024,  # 256-code scenes: a document and its two neighbours fit a row
    "model.max_len": 1024,
    "prepare.downsample": 2,
    "vocab.image_codes": 16,
}
PALETTE_FLAGS = tuple(f"--config.{key}={value}" for key, value in PALETTE_OVERRIDES.items())

# experiments/shapes_retriever.py's image tower over the palette codes (16x16, 16 codes).
PALETTE_RETRIEVER_OVERRIDES = {
    **PALETTE_OVERRIDES,
    "retriever.codebook_size": 16,  # = vocab.image_codes of the palette tokenizer
    "retriever.code_grid": 16,
    "retriever.code_patch": 2,
}

# A 1-layer, width-32 version of experiments/shapes_retriever.py over palette-tokenized data:
# tests need a real retriever workdir (config, checkpoints), not a good one. Callers add
# total_steps / checkpoint.every_steps.
TINY_RETRIEVER_OVERRIDES = {
    **PALETTE_RETRIEVER_OVERRIDES,
    "retriever.text_layers": 1,
    "retriever.vision_layers": 1,
    "retriever.text_width": 32,
    "retriever.vision_width": 32,
    "retriever.text_heads": 2,
    "retriever.vision_heads": 2,
    "retriever.text_mlp_dim": 64,
    "retriever.vision_mlp_dim": 64,
    "retriever.projection_dim": 32,
    "data.global_batch_size": 16,
    "optim.warmup_steps": 4,
    "optim.learning_rate": 3e-3,
    "eval_every": 0,
}

# experiments/tiny_lm.py uses RoPE and a small-model init; `tiny_config` puts CM3leon's
# choices back, so unit tests exercise the paper's architecture unless they override it.
CM3LEON_OVERRIDES = {
    "model.position": "learned",
    "model.init_std": 0.006,
    "model.zero_init_output": True,
}

# Architecture switches of the Chameleon-style ("modern") variant.
MODERN_OVERRIDES = {
    "model.activation": "swiglu",
    "model.position": "rope",
    "model.norm": "rmsnorm",
    "model.norm_params": True,
    "model.qk_norm": True,
    "model.tie_embeddings": False,
}


def _load_experiment(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"experiments_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def experiment_config(name: str, overrides: dict | None = None):
    """experiments/<name>.py's config (a fresh copy) with dotted-key overrides applied."""
    config = _load_experiment(REPO_ROOT / "experiments" / f"{name}.py").get_config()
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"override of unknown config field {key!r}")
        node[leaf] = value
    return config


def tiny_config(overrides: dict | None = None, **kwargs):
    """experiments/tiny_lm.py's config on the synthetic source, with dotted-key overrides applied.

    `tiny_config({"mesh.fsdp": 2})` or `tiny_config(seed=3)` (top-level keys only as kwargs).
    """
    return experiment_config("tiny_lm", {**SYNTHETIC_OVERRIDES, **CM3LEON_OVERRIDES, **(overrides or {}),
                                         **kwargs})


@pytest.fixture(name="tiny_config")
def tiny_config_fixture():
    """The `tiny_config(overrides)` factory, as a fixture."""
    return tiny_config


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO_ROOT


def prepare_palette_shapes(directory, train: int, validation: int, per_shard: int):
    """Prepares `train` / `validation` shapes scenes with the palette tokenizer into `directory`."""
    from cm3jax.data.prepare import prepare

    prepare(experiment_config("shapes_data", {
        **PALETTE_OVERRIDES, "prepare.shapes_records.train": train,
        "prepare.shapes_records.validation": validation, "prepare.records_per_shard": per_shard,
        "prepare.num_workers": 1}), str(directory))
    return directory


SAMPLE_WORLD_LM_STEPS = 6


@pytest.fixture(scope="session")
def sample_world(tmp_path_factory):
    """{'data', 'retriever', 'index', 'lm'}: one small but complete run for the sampler and server tests.

    Palette-tokenized shapes (120 train / 24 validation), a tiny dual encoder, its retrieval
    build, and experiments/tiny_lm.py trained SAMPLE_WORLD_LM_STEPS steps with retrieval.
    """
    from cm3jax.retrieval import build as build_lib
    from cm3jax.train.loop import train

    root = tmp_path_factory.mktemp("sample_world")
    data = str(prepare_palette_shapes(root / "data", 120, 24, per_shard=60))
    retriever = str(root / "retriever")
    train(experiment_config("shapes_retriever", {**TINY_RETRIEVER_OVERRIDES, "data.source": f"prepared:{data}",
                                                 "total_steps": 20, "log_every": 20,
                                                 "checkpoint.every_steps": 20}), retriever)
    index = str(root / "index")
    retrieval = {**PALETTE_OVERRIDES, "data.source": f"prepared:{data}", "retrieval.encoder": retriever,
                 "retrieval.neighbours": index, "retrieval.chunk_docs": 60}
    build_lib.build(experiment_config("tiny_lm", retrieval), index)
    lm = str(root / "lm")
    # Learned positions: the sampler tests check the context bound they set.
    train(experiment_config("tiny_lm", {**retrieval, **CM3LEON_OVERRIDES, "retrieval.enabled": True,
                                        "total_steps": SAMPLE_WORLD_LM_STEPS,
                                        "checkpoint.every_steps": SAMPLE_WORLD_LM_STEPS, "eval_every": 0,
                                        "log_every": SAMPLE_WORLD_LM_STEPS}), lm)
    return {"data": data, "retriever": retriever, "index": index, "lm": lm}
