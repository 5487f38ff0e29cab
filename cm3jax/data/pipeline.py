"""The Grain pipeline: a source, batched, each host reading only its own slice.

Global batch k is rows [k*B, (k+1)*B) of the source. With P hosts, host h reads the
contiguous block [k*B + h*B/P, k*B + (h+1)*B/P), so the global array assembled by
`jax.make_array_from_process_local_data` holds the same rows in the same order for
any number of hosts. The iterator's state (`get_state`/`set_state`) is checkpointed.
"""

from __future__ import annotations

import grain
import ml_collections

from cm3jax import vocab as vocab_lib
from cm3jax.data.synthetic import SyntheticDocuments


def make_source(config: ml_collections.ConfigDict, split: str):
    """The random-access source named by `config.data.source`."""
    vocab = vocab_lib.from_config(config.vocab)
    if config.data.source == "synthetic":
        return SyntheticDocuments(vocab, config.data.seq_len, config.seed, split)
    raise ValueError(f"unknown data source {config.data.source!r}")


def make_dataset(config: ml_collections.ConfigDict, split: str, process_index: int,
                 process_count: int) -> grain.IterDataset:
    """Per-host batches (dicts of int32 [global_batch / process_count, seq_len])."""
    per_host = config.data.global_batch_size // process_count
    dataset = grain.MapDataset.source(make_source(config, split))
    dataset = dataset.batch(per_host, drop_remainder=True)[process_index::process_count]
    options = grain.ReadOptions(num_threads=config.data.num_threads,
                                prefetch_buffer_size=config.data.prefetch)
    return dataset.to_iter_dataset(options)
