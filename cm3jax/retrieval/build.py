"""`python -m cm3jax.retrieval.build --config=experiments/X.py --workdir=DIR`.

Embeds the retrieval memory, builds the dense index and precomputes the neighbours of every
document the LM trains and evaluates on. The memory is the train split of the prepared
data (`config.data.source=prepared:DATA`); the encoder is the `task='retriever'` run in
`config.retrieval.encoder`. Writes into DIR:

  embeddings/<split>-<start>.npz   per chunk of `retrieval.chunk_docs` documents: 'memory'
                                   (document embeddings), 'query' (train: embedded again
                                   after query-token dropout), 'has_text', 'has_image'
  index/                           the DenseIndex over the train memory (ids = row numbers)
  neighbours/<split>.npy           int64 [documents, k]: memory rows chosen by the policy
                                   (-1 where fewer than k qualify)
  build.json                       what was built from what, and whether it is complete
                                   (checked when a build resumes and by the LM pipeline)

Chunks are written atomically and skipped when present, so a killed build resumes. On
several hosts each embeds its share of the chunks; process 0 then builds the index and
the neighbours.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cm3jax import logs
from cm3jax.data.neighbours import MANIFEST
from cm3jax.data.pipeline import check_prepared_vocab, prepared_dir
from cm3jax.data.records import ArrayRecordDocuments, split_paths
from cm3jax.errors import ConfigError, UserError
from cm3jax.retrieval.encoder import RetrievalEncoder, document_embeddings
from cm3jax.retrieval.index import DenseIndex, SearchOptions
from cm3jax.retrieval.policy import RetrievalPolicy, drop_query_tokens, select_neighbours
from cm3jax.vocab import from_config as vocab_from_config

SPLITS = ("train", "validation")
QUERY_BATCH = 1024  # queries searched and filtered at once
# config.retrieval fields that do not change what a build writes.
RUN_ONLY_FIELDS = ("enabled", "encoder", "neighbours")


def _documents(directory: str, split: str) -> ArrayRecordDocuments | None:
    paths = split_paths(directory, split)
    return ArrayRecordDocuments(paths) if paths else None


def _atomic_save(path: str, save) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        save(f)
    os.replace(tmp, path)


def embed_chunk(encoder: RetrievalEncoder, records: list[dict], dropout: float, seed: int) -> dict:
    """Memory embeddings of `records`, query embeddings (after token dropout) and modality flags.

    Images are embedded once; with dropout only the texts are embedded a second time.
    """
    texts = [r["text"] for r in records]
    has_text = np.asarray([len(t) > 0 for t in texts])
    has_image = np.asarray([r["image"].size > 0 for r in records])
    grid = (encoder.cfg.code_grid, encoder.cfg.code_grid)
    image = encoder.embed_images(np.stack([r["image"] if r["image"].size else np.zeros(grid, np.int32)
                                           for r in records]))
    memory = document_embeddings(encoder.embed_texts(texts), image, has_text, has_image)
    query = memory
    if dropout > 0:
        rng = np.random.default_rng(seed)
        dropped = [drop_query_tokens(t, dropout, rng) if len(t) else t for t in texts]
        query = document_embeddings(encoder.embed_texts(dropped), image, has_text, has_image)
    return {"memory": memory, "query": query, "has_text": has_text, "has_image": has_image}


def embed_split(encoder: RetrievalEncoder, documents: ArrayRecordDocuments, workdir: str, split: str,
                chunk_docs: int, dropout: float, seed: int) -> None:
    """Writes this host's missing embedding chunks of `split`."""
    os.makedirs(os.path.join(workdir, "embeddings"), exist_ok=True)
    starts = range(0, len(documents), chunk_docs)
    for index, start in enumerate(starts):
        path = _chunk_path(workdir, split, start)
        if index % jax.process_count() != jax.process_index() or os.path.exists(path):
            continue
        began = time.perf_counter()
        records = [documents[i] for i in range(start, min(start + chunk_docs, len(documents)))]
        arrays = embed_chunk(encoder, records, dropout, seed + start)
        _atomic_save(path, lambda f: np.savez(f, **arrays))
        logging.info("embedded %s documents %d-%d of %d (%.0f documents/s)", split, start,
                     start + len(records), len(documents), len(records) / (time.perf_counter() - began))


def _chunk_path(workdir: str, split: str, start: int) -> str:
    return os.path.join(workdir, "embeddings", f"{split}-{start:010d}.npz")


def load_embeddings(workdir: str, split: str, count: int, chunk_docs: int) -> dict[str, np.ndarray]:
    """All chunks of `split` concatenated: 'memory', 'query', 'has_text', 'has_image'."""
    parts = []
    for start in range(0, count, chunk_docs):
        with np.load(_chunk_path(workdir, split, start), allow_pickle=False) as chunk:
            parts.append({k: chunk[k] for k in chunk.files})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def search_memory(index: DenseIndex, memory: dict, queries: np.ndarray, policy: RetrievalPolicy,
                  query_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Policy-filtered memory rows and scores [Q, k] (-1 / -inf padded) for a batch of queries.

    `query_rows` are the queries' own memory rows (never returned); None for outside queries.
    """
    candidates = min(policy.candidates, index.count)
    scores, ids = index.search(queries, candidates, exclude_ids=query_rows)
    safe = np.maximum(ids, 0)
    own = np.full(len(queries), -1) if query_rows is None else query_rows
    return select_neighbours(own, scores, ids, memory["memory"][safe], memory["has_image"][safe] & (ids >= 0),
                             memory["has_text"][safe] & (ids >= 0), policy)


def neighbours_for(index: DenseIndex, memory: dict, queries: np.ndarray, exclude_self: bool,
                   policy: RetrievalPolicy) -> np.ndarray:
    """Policy-filtered neighbours [len(queries), k] (memory rows, -1 padded), in batches."""
    out = np.full((len(queries), policy.k), -1, np.int64)
    for start in range(0, len(queries), QUERY_BATCH):
        rows = np.arange(start, min(start + QUERY_BATCH, len(queries)))
        out[rows] = search_memory(index, memory, queries[rows], policy, rows if exclude_self else None)[0]
    return out


def build(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Embeds, indexes and precomputes neighbours (see the module docstring); returns build.json."""
    data = prepared_dir(config)
    if data is None:
        raise ConfigError("data.source", "the retrieval memory is prepared data: set prepared:DIR")
    check_prepared_vocab(data, vocab_from_config(config.vocab))
    policy = RetrievalPolicy.from_config(config.retrieval)
    if not config.retrieval.encoder:
        raise ConfigError("retrieval.encoder", "empty: name the workdir of a task='retriever' run")
    try:
        encoder = RetrievalEncoder.load(config.retrieval.encoder)
    except UserError as e:
        raise ConfigError("retrieval.encoder", str(e)) from e
    if encoder.cfg.vision_input != "codes":
        raise ConfigError("retrieval.encoder", f"{encoder.source} reads pixels; the build embeds prepared "
                          "documents, whose images are codes: train the retriever with vision_input='codes'")
    documents = {split: _documents(data, split) for split in SPLITS}
    if documents["train"] is None:
        raise UserError(f"config.data.source: no 'train' shards in {data} (the memory)")
    manifest = {"data": os.path.abspath(data), "encoder": encoder.source, "encoder_checksum": encoder.checksum,
                "k": policy.k, "counts": {s: len(d) for s, d in documents.items() if d is not None},
                "policy": {k: v for k, v in config.retrieval.to_dict().items() if k not in RUN_ONLY_FIELDS}}
    previous = _check_previous_build(workdir, manifest)
    if jax.process_index() == 0 and not (previous or {}).get("complete"):
        _write_manifest(workdir, manifest | {"complete": False})
    chunk = config.retrieval.chunk_docs
    for split, docs in documents.items():
        if docs is not None:
            dropout = policy.query_dropout if split == "train" else 0.0
            embed_split(encoder, docs, workdir, split, chunk, dropout, config.seed)
    multihost_utils.sync_global_devices("cm3jax.retrieval.build: embeddings written")
    if jax.process_index() == 0:
        _index_and_neighbours(config, workdir, encoder, policy, manifest)
    multihost_utils.sync_global_devices("cm3jax.retrieval.build: neighbours written")
    return manifest


def _index_and_neighbours(config, workdir: str, encoder: RetrievalEncoder, policy: RetrievalPolicy,
                          manifest: dict) -> None:
    """Builds (or reloads) the index and writes the missing neighbour files, then marks the build complete."""
    chunk = config.retrieval.chunk_docs
    missing = {split: count for split, count in manifest["counts"].items()
               if not os.path.exists(os.path.join(workdir, "neighbours", f"{split}.npy"))}
    if missing:
        memory = load_embeddings(workdir, "train", manifest["counts"]["train"], chunk)
        index = _index(config, workdir, memory, encoder)
        os.makedirs(os.path.join(workdir, "neighbours"), exist_ok=True)
    if not missing:
        logging.info("%s is complete (every split's neighbour file is written): nothing to do", workdir)
    for split, count in missing.items():
        began = time.perf_counter()
        queries = memory if split == "train" else load_embeddings(workdir, split, count, chunk)
        chosen = neighbours_for(index, memory, queries["query"], split == "train", policy)
        _atomic_save(os.path.join(workdir, "neighbours", f"{split}.npy"), lambda f: np.save(f, chosen))
        found = float(np.mean(chosen >= 0)) if chosen.size else 1.0
        logging.info("neighbours of %d %s documents in %.1fs (%.1f%% of the %d slots filled)",
                     count, split, time.perf_counter() - began, 100 * found, policy.k)
    _write_manifest(workdir, manifest | {"complete": True})


def _index(config, workdir: str, memory: dict, encoder: RetrievalEncoder) -> DenseIndex:
    """The index in WORKDIR/index, built over the memory embeddings and saved if absent."""
    index_dir = os.path.join(workdir, "index")
    options = SearchOptions(backend=config.retrieval.backend, nprobe=config.retrieval.nprobe)
    if os.path.exists(os.path.join(index_dir, "manifest.json")):
        return DenseIndex.load(index_dir, encoder.checksum, options=options)
    nlist = None if config.retrieval.nlist == -1 else config.retrieval.nlist
    index = DenseIndex.build(memory["memory"], np.arange(len(memory["memory"])), encoder_checksum=encoder.checksum,
                             mode=config.retrieval.index, nlist=nlist, seed=config.seed, options=options)
    index.save(index_dir)
    return index


def _write_manifest(workdir: str, manifest: dict) -> None:
    os.makedirs(workdir, exist_ok=True)
    _atomic_save(os.path.join(workdir, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=2).encode()))


def _check_previous_build(workdir: str, manifest: dict) -> dict | None:
    """The previous build.json, after refusing one made from other data, encoder or policy."""
    path = os.path.join(workdir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        previous = json.load(f)
    for key in ("data", "encoder_checksum", "counts", "policy"):
        if previous.get(key) == manifest[key]:
            continue
        what = f"another {key} ({previous.get(key)!r})"
        if key == "policy":
            old, new = previous.get("policy") or {}, manifest["policy"]
            what = "another policy: " + ", ".join(f"retrieval.{k} {old.get(k)!r} -> {new.get(k)!r}"
                             for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k))
        raise UserError(f"{workdir} holds a build with {what}; build into a new --workdir or delete that one")
    return previous


def build_and_print(config: ml_collections.ConfigDict, workdir: str) -> None:
    """`build`, then build.json on stdout (one line)."""
    logs.quiet_third_party_logs()
    print(json.dumps(build(config, workdir)))


if __name__ == "__main__":
    from cm3jax.cli import run_job

    run_job(build_and_print, "Experiment file (data source + retrieval section).",
            "the directory for embeddings, the index and the neighbours")
