"""The prepared-data pipeline: CM3 documents packed without crossing, exact host partition, resume."""

from __future__ import annotations

import collections
import subprocess
import sys

import numpy as np
import pytest

import train_cli as cli
from conftest import PALETTE_FLAGS, PALETTE_OVERRIDES, REPO_ROOT, experiment_config, prepare_palette_shapes
from cm3jax import vocab as vocab_lib
from cm3jax.data import cm3, records
from cm3jax.data.pipeline import make_dataset

TRAIN_RECORDS = 48


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_palette_shapes(tmp_path_factory.mktemp("shapes"), TRAIN_RECORDS, 16, per_shard=16)


def _config(prepared, **overrides):
    return experiment_config("tiny_lm", {**PALETTE_OVERRIDES, "data.source": f"prepared:{prepared}",
                                         "data.global_batch_size": 4, **overrides})


def _documents(batch, vocab):
    """Every packed document of a batch, inverted back to its original (pre-CM3) tokens."""
    found = []
    for row in range(len(batch["inputs"])):
        segments = batch["segment_ids"][row]
        for segment in np.unique(segments[segments > 0]):
            where = np.flatnonzero(segments == segment)
            tokens = batch["inputs"][row][where]
            if where[-1] == len(segments) - 1 and batch["loss_mask"][row][where[-1]]:
                # The document fills the row: its final <eos> is the last target.
                tokens = np.append(tokens, batch["targets"][row][where[-1]])
            else:
                # Its <eos> is the last input, whose target belongs to the next document.
                assert batch["loss_mask"][row][where[-1]] == 0
            found.append(cm3.cm3_invert(tokens, vocab))
    return found


def _key(document, vocab):
    """Identity of a document independent of its caption/image order: (text ids, image ids)."""
    types = vocab.token_type(document)
    return (tuple(document[types == vocab_lib.TEXT]), tuple(document[types == vocab_lib.IMAGE]))


def test_rows_hold_whole_cm3_documents_and_never_cross(prepared):
    config = _config(prepared)
    vocab = vocab_lib.from_config(config.vocab)
    batch = next(iter(make_dataset(config, "train", 0, 1)))
    assert batch["inputs"].shape == (4, config.data.seq_len)
    for row in range(4):
        segments = batch["segment_ids"][row]
        # Attention never crosses documents: the loss never asks a document to predict the next.
        boundaries = np.flatnonzero(segments[1:] != segments[:-1])
        assert np.all(batch["loss_mask"][row][boundaries] == 0)
    documents = _documents(batch, vocab)
    assert documents and all(doc[-1] == vocab.eos_id for doc in documents)
    masked = [t for t in batch["inputs"].ravel() if t >= vocab.mask_id(0)]
    assert masked, "the CM3 transform put no sentinels in a whole batch"


def test_hosts_partition_the_documents_exactly(prepared):
    config = _config(prepared)
    vocab = vocab_lib.from_config(config.vocab)
    source = records.ArrayRecordDocuments(records.split_paths(str(prepared), "train"))
    everything = collections.Counter(
        _key(cm3.make_document(source[i]["text"], vocab.image_id(source[i]["image"].ravel()), vocab, False),
             vocab) for i in range(len(source)))
    per_host = []
    for host in (0, 1):
        seen = []
        for batch in make_dataset(config, "train", host, 2):
            seen += [_key(doc, vocab) for doc in _documents(batch, vocab)]
            if len(seen) >= TRAIN_RECORDS // 2:
                break
        per_host.append(collections.Counter(seen[: TRAIN_RECORDS // 2]))
    # One epoch: the two hosts' documents are disjoint and together are every record once.
    assert per_host[0] + per_host[1] == everything


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_resumes_mid_epoch_with_the_same_batch(prepared, workers):
    config = _config(prepared, **{"data.num_workers": workers})
    iterator = iter(make_dataset(config, "train", 0, 1))
    for _ in range(5):
        next(iterator)
    state = iterator.get_state()
    expected = next(iterator)
    resumed = iter(make_dataset(config, "train", 0, 1))
    resumed.set_state(state)
    got = next(resumed)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_inspect_cli_shows_documents_and_throughput(prepared):
    result = subprocess.run(
        [sys.executable, "-m", "cm3jax.data.inspect", f"--config={REPO_ROOT}/experiments/tiny_lm.py",
         f"--workdir={prepared}", "--n=2", *PALETTE_FLAGS], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[IMG" in result.stdout and "<break>" in result.stdout and "<eos>" in result.stdout
    assert "tokens/s" in result.stdout


@pytest.mark.slow
def test_training_on_prepared_data_resumes_exactly(prepared, tmp_path):
    flags = (f"--config={cli.TINY}", f"--config.data.source=prepared:{prepared}", *PALETTE_FLAGS, "--config.total_steps=4",
             "--config.optim.schedule_steps=4", "--config.checkpoint.every_steps=2", "--config.eval_every=0",
             "--config.mesh.fsdp=2", "--config.mesh.tensor=2")

    def run(workdir, *extra):
        result = subprocess.run([sys.executable, "-m", "cm3jax.train", *flags, f"--workdir={workdir}", *extra],
                                env=cli.cpu_env(), capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
        assert result.returncode == 0, result.stderr[-3000:]

    run(tmp_path / "straight")
    run(tmp_path / "resumed", "--config.total_steps=2")
    run(tmp_path / "resumed")
    straight = cli.losses(tmp_path / "straight")
    assert straight == cli.losses(tmp_path / "resumed")
    assert (tmp_path / "straight" / "tokenizer.model").exists()
