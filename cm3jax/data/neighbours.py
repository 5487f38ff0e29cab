"""Joining precomputed retrieval neighbours onto prepared documents (retrieval-augmented LM data).

`cm3jax.retrieval.build` writes, for every document of a prepared split, the rows of its
k neighbours in the train split (the memory). `WithNeighbours` is a Grain source that
returns each document with its neighbours' records under 'retrieved'; the pipeline then
lays them out `r1 <doc> r2 <doc> document` (cm3.prepend_retrieved). Only numpy and the
build's JSON manifest are read here: training never runs the retriever.
"""

from __future__ import annotations

import json
import os

import numpy as np

from cm3jax.errors import UserError

MANIFEST = "build.json"


def read_build_manifest(build_dir: str, where: str) -> dict:
    """build.json of a complete retrieval build; UserError starting with `where` otherwise."""
    path = os.path.join(build_dir, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"{where}: no {MANIFEST}; run python -m cm3jax.retrieval.build first")
    with open(path) as f:
        manifest = json.load(f)
    if not manifest.get("complete"):
        raise UserError(f"{where}: the build is incomplete; re-run cm3jax.retrieval.build to finish it")
    return manifest


def open_neighbours(build_dir: str, data_dir: str, split: str, count: int) -> np.ndarray:
    """int64 [count, k] neighbour rows of `split`, after checking the build matches the data.

    Raises:
      UserError: naming config.retrieval.neighbours when the build is missing, incomplete,
        made from other prepared data, or has another number of documents.
    """
    where = f"config.retrieval.neighbours={build_dir!r}"
    manifest = read_build_manifest(build_dir, where)
    if os.path.abspath(manifest["data"]) != os.path.abspath(data_dir):
        raise UserError(f"{where} was built from {manifest['data']}, not from {os.path.abspath(data_dir)}")
    if manifest["counts"].get(split) != count:
        raise UserError(f"{where} has neighbours for {manifest['counts'].get(split)} {split} documents, "
                        f"the prepared data holds {count}")
    neighbours = np.load(os.path.join(build_dir, "neighbours", f"{split}.npy"), allow_pickle=False)
    memory = manifest["counts"]["train"]
    if neighbours.shape[0] != count or neighbours.max(initial=-1) >= memory:
        raise UserError(f"{where}: neighbours/{split}.npy does not fit {count} documents over a "
                        f"memory of {memory}")
    return neighbours


class WithNeighbours:
    """A random-access source: `documents[i]` plus 'retrieved', its neighbours' records."""

    def __init__(self, documents, neighbours: np.ndarray, memory):
        if len(documents) != len(neighbours):
            raise ValueError(f"{len(documents)} documents but {len(neighbours)} neighbour rows")
        self.documents, self.neighbours, self.memory = documents, neighbours, memory

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> dict:
        record = dict(self.documents[index])
        record["retrieved"] = [self.memory[int(j)] for j in self.neighbours[index] if j >= 0]
        return record
