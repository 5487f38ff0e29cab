"""The Grain input pipeline: documents -> CM3 transform -> packed rows -> per-host batches.

Two sources feed the same batch schema (cm3jax.data.schema):

* `prepared:DIR` — token documents written by `cm3jax.data.prepare`. Per host:
  shuffle (reshuffled every epoch, seeded) -> repeat -> this host's documents
  (`[process_index::process_count]`, so hosts partition the data exactly) -> document
  layout (caption- or image-first) and the CM3 causal-masked transform, seeded by the
  document's global index -> first-fit packing into rows of `seq_len` (+1 for the shifted
  targets) with segment ids and positions -> batches -> optional worker processes.
* `synthetic` — deterministic packed rows for smoke runs and loop tests; host h reads a
  contiguous block of each global batch, so any host count sees the same global batch.

* `prepared:DIR` with `config.sft.mixture` — fine-tuning examples (cm3jax/data/tasks.py) in
  DIR/<task>/ shards. Per task: shuffle -> repeat; the tasks are interleaved deterministically
  in the mixture's proportions (`grain.MapDataset.mix`: every window of the stream holds each
  task at its weight, so proportions are exact, not sampled) -> this host's examples -> the
  task's template (`SftFormat.encode`; loss on the targets only with `sft.target_only`) ->
  packing as above. Each token carries `task_ids` (1 + the task's index in the mixture) so
  the step reports `loss/<task>`.

The iterator state of any of them (`get_state`/`set_state`) is saved in every checkpoint, so a
resumed run continues with exactly the batch it would have seen.
"""

from __future__ import annotations

import json
import os

import grain
import ml_collections
from absl import flags
import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.data import cm3
from cm3jax.data.neighbours import WithNeighbours, open_neighbours
from cm3jax.data.records import decode_sft_record, split_documents
from cm3jax.data.schema import FIELDS
from cm3jax.data.synthetic import SyntheticDocuments
from cm3jax.data.tasks import SftFormat, get_task
from cm3jax.errors import UserError
from cm3jax.tokenizers.text import load_text_tokenizer

PREPARED = "prepared:"


def prepared_dir(config: ml_collections.ConfigDict) -> str | None:
    """The prepared-data directory of `config.data.source`, or None for 'synthetic'."""
    source = config.data.source
    return source[len(PREPARED):] if source.startswith(PREPARED) else None


def check_prepared_vocab(directory: str, vocab: vocab_lib.Vocab) -> None:
    """Refuses prepared data written in another vocab than the config's."""
    path = os.path.join(directory, "vocab.json")
    if not os.path.exists(path):
        raise UserError(f"config.data.source: {directory} holds no prepared data (no vocab.json); "
                        "run cm3jax.data.prepare first")
    vocab.check_same(vocab_lib.Vocab.load(path), what=f"prepared data in {directory}")


def check_image_grid(directory: str, image_grid: int) -> None:
    """Refuses `model.image_grid` > 0 unless it is the grid of the prepared data's images."""
    path = os.path.join(directory, "image_tokenizer.json")
    if image_grid <= 0 or not os.path.exists(path):
        return
    with open(path) as f:
        grid = int(json.load(f)["grid"])
    if grid != image_grid:
        raise UserError(f"config.model.image_grid={image_grid}, but the images of {directory} are {grid}x{grid} codes")


def sft_tasks(config: ml_collections.ConfigDict) -> list[str]:
    """The fine-tuning tasks of `config.sft.mixture`, in order ([] for pretraining data)."""
    return list(config.sft.mixture) if "sft" in config else []


def prepared_bad_records(config: ml_collections.ConfigDict) -> int:
    """Records of the train split (of every fine-tuning task) that prepare could not read
    (0 for synthetic data)."""
    directory = prepared_dir(config)
    report = os.path.join(directory or "", "prepare_report.json")
    if directory is None or not os.path.exists(report):
        return 0
    with open(report) as f:
        report = json.load(f)
    sections = [report["splits"]] + list(report.get("tasks", {}).values())
    return sum(int(splits.get("train", {}).get("bad_records", 0)) for splits in sections)


class DocumentTransform(grain.transforms.RandomMap):
    """Token record -> CM3 document `{'tokens', 'weights', 'code_positions'}` cut to `max_tokens`."""

    def __init__(self, vocab: vocab_lib.Vocab, config: ml_collections.ConfigDict, split: str = "train"):
        self.vocab, self.max_tokens = vocab, config.data.seq_len + 1
        self.image_first_probability = config.data.image_first_probability
        # Eval measures the document given its neighbours: retrieved tokens never count there.
        self.retrieved_in_loss = config.data.retrieved_in_loss and split == "train"
        self.options = cm3.CM3Options(**config.data.cm3.to_dict())

    def _document(self, record: dict, rng: np.random.Generator) -> np.ndarray:
        image_first = rng.random() < self.image_first_probability
        return cm3.make_document(record["text"], self.vocab.image_id(record["image"].ravel()), self.vocab,
                                 image_first)

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        document = self._document(record, rng)
        tokens, weights = cm3.cm3_transform(document, self.vocab, rng, self.options)
        retrieved = [self._document(r, rng) for r in record.get("retrieved", ())]
        # Retrieved documents go first; the lowest-ranked are dropped until the row fits.
        while retrieved and len(tokens) + sum(len(r) + 1 for r in retrieved) > self.max_tokens:
            retrieved.pop()
        if retrieved:
            tokens, weights = cm3.prepend_retrieved(tokens, weights, retrieved, self.vocab, self.retrieved_in_loss)
        code_positions = cm3.cm3_code_positions(tokens, self.vocab)  # before the cut: needs the whole tail
        return {"tokens": tokens[: self.max_tokens], "weights": weights[: self.max_tokens].astype(np.int32),
                "code_positions": code_positions[: self.max_tokens],
                "task_ids": np.zeros(min(len(tokens), self.max_tokens), np.int32)}


class ExampleTransform(grain.transforms.Map):
    """Fine-tuning record -> `{'tokens', 'weights', 'code_positions', 'task_ids'}` by its task's template."""

    def __init__(self, formats: dict[str, SftFormat], target_only: bool, max_tokens: int):
        self.formats, self.target_only, self.max_tokens = formats, target_only, max_tokens
        self.task_ids = {task: i + 1 for i, task in enumerate(formats)}

    def map(self, record: dict) -> dict:
        out = self.formats[record["task"]].encode(record["parts"], self.target_only)
        out = {k: v[: self.max_tokens] for k, v in out.items()}
        out["weights"] = out["weights"].astype(np.int32)
        out["task_ids"] = np.full(len(out["tokens"]), self.task_ids[record["task"]], np.int32)
        return out


class ToSchema(grain.transforms.Map):
    """A packed row of seq_len + 1 tokens -> the shifted batch schema (picklable for workers)."""

    def __init__(self, vocab: vocab_lib.Vocab):
        self.vocab = vocab

    def map(self, packed: dict) -> dict:
        tokens, segments = packed["tokens"], packed["tokens_segment_ids"]
        # A target counts when it continues the input's document and its CM3 weight is 1.
        same_document = (segments[:-1] == segments[1:]) & (segments[1:] > 0)
        row = {
            "inputs": tokens[:-1],
            "targets": tokens[1:],
            "segment_ids": segments[:-1],
            "positions": packed["tokens_positions"][:-1],
            "loss_mask": same_document & (packed["weights"][1:] > 0),
            "token_type": self.vocab.token_type(tokens[1:]),
            "code_positions": packed["code_positions"][:-1],
            "task_ids": packed["task_ids"][1:],
        }
        return {k: np.asarray(row[k], np.int32) for k in FIELDS}


def _documents(config, directory: str, split: str, vocab: vocab_lib.Vocab) -> grain.MapDataset:
    """Pretraining documents, repeated, each in its CM3 layout (see the module docstring)."""
    documents = split_documents(directory, split)
    if config.retrieval.enabled:
        memory = split_documents(directory, "train")
        neighbours = open_neighbours(config.retrieval.neighbours, directory, split, len(documents))
        documents = WithNeighbours(documents, neighbours, memory)
    documents = grain.MapDataset.source(documents)
    if split == "train":
        documents = documents.shuffle(seed=config.seed)
    return documents.repeat(None).random_map(DocumentTransform(vocab, config, split), seed=config.seed)


def sft_examples(config, directory: str, split: str, vocab: vocab_lib.Vocab) -> grain.MapDataset:
    """Fine-tuning examples of every task of the mixture, interleaved in its proportions."""
    tasks = sft_tasks(config)
    encoder = load_text_tokenizer(directory, vocab).encode
    formats = {task: get_task(task).bind(vocab, encoder) for task in tasks}
    per_task = []
    for task in tasks:
        examples = grain.MapDataset.source(split_documents(os.path.join(directory, task), split, decode_sft_record))
        if split == "train":
            examples = examples.shuffle(seed=config.seed)
        per_task.append(examples.repeat(None))
    mixed = grain.MapDataset.mix(per_task, [float(config.sft.mixture[task]) for task in tasks])
    return mixed.map(ExampleTransform(formats, config.sft.target_only, config.data.seq_len + 1))


def _prepared_dataset(config, directory: str, split: str, process_index: int,
                      process_count: int) -> grain.IterDataset:
    vocab = vocab_lib.from_config(config.vocab)
    check_prepared_vocab(directory, vocab)
    make = sft_examples if sft_tasks(config) else _documents
    documents = make(config, directory, split, vocab)[process_index::process_count]
    seq_plus_one = config.data.seq_len + 1
    fields = ("tokens", "weights", "code_positions", "task_ids")
    rows = grain.experimental.FirstFitPackIterDataset(
        documents.to_iter_dataset(_read_options(config)),
        length_struct={field: seq_plus_one for field in fields},
        num_packing_bins=config.data.packing_bins,
        shuffle_bins=False,
        padding_struct={"tokens": vocab.pad_id, "weights": 0, "code_positions": 0, "task_ids": 0},
    )
    return rows.map(ToSchema(vocab))


def _read_options(config) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch)


def make_dataset(config: ml_collections.ConfigDict, split: str, process_index: int,
                 process_count: int) -> grain.IterDataset:
    """Per-host batches (dicts of int32 [global_batch / process_count, seq_len])."""
    per_host = config.data.global_batch_size // process_count
    directory = prepared_dir(config)
    if directory is None:
        vocab = vocab_lib.from_config(config.vocab)
        rows = grain.MapDataset.source(SyntheticDocuments(vocab, config.data.seq_len, config.seed, split))
        batches = rows.batch(per_host, drop_remainder=True)[process_index::process_count]
        return batches.to_iter_dataset(_read_options(config))
    batches = _prepared_dataset(config, directory, split, process_index, process_count).batch(
        per_host, drop_remainder=True)
    if config.data.num_workers > 0:
        # Grain's workers read absl flags; outside an absl app (tests, notebooks) use defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
    return batches
