"""Hugging Face safetensors checkpoints, read tensor by tensor and written shard by shard.

A checkpoint is `model.safetensors`, or shards named in `model.safetensors.index.json`'s
`weight_map`. The format is an 8-byte little-endian header length, a JSON header
({name: {dtype, shape, data_offsets}}) and the raw little-endian tensor bytes. Tensors are
read through a memory map, one at a time, so a converter holds one tensor (not a
shard, not the model) in host memory besides what it has already placed on devices.
bfloat16 is numpy's `ml_dtypes.bfloat16` (a jax dependency): no torch, no safetensors package.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from cm3jax.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def _read_header(path: str) -> tuple[dict, int]:
    """(header without __metadata__, byte offset of the data) of one safetensors file."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + length


def shard_files(directory: str) -> dict[str, str]:
    """{tensor name: shard path} of the checkpoint in `directory`.

    Raises:
      UserError: no checkpoint there, an unreadable index, or a shard the index names that
        does not exist (every missing shard is named).
    """
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index_path}: not a readable safetensors index ({e!r})") from e
        files = {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
        missing = sorted({path for path in files.values() if not os.path.isfile(path)})
        if missing:
            raise UserError(f"{index_path} names shards that are missing: {', '.join(missing)}")
        return files
    single = os.path.join(directory, SINGLE_FILE)
    if not os.path.isfile(single):
        raise UserError(f"{directory} has neither {INDEX_FILE} nor {SINGLE_FILE}: not a Hugging Face "
                        "safetensors checkpoint")
    return {name: single for name in _read_header(single)[0]}


class TensorReader:
    """Reads the tensors of a safetensors checkpoint directory one at a time, shard by shard."""

    def __init__(self, directory: str):
        self.directory = directory
        self.files = shard_files(directory)
        self._headers: dict[str, tuple[dict, int]] = {}

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint."""
        return set(self.files)

    def _entry(self, name: str) -> tuple[str, dict, int]:
        if name not in self.files:
            raise UserError(f"{self.directory}: the checkpoint has no tensor {name}")
        path = self.files[name]
        if path not in self._headers:
            self._headers[path] = _read_header(path)
        header, start = self._headers[path]
        if name not in header:
            raise UserError(f"{path}: the index puts {name} in this shard, but it is not there")
        return path, header[name], start

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the header alone."""
        return tuple(self._entry(name)[1]["shape"])

    def read(self, name: str) -> np.ndarray:
        """The tensor as a numpy array (a copy, in its stored dtype)."""
        path, entry, start = self._entry(name)
        if entry["dtype"] not in DTYPES:
            raise UserError(f"{path}: {name} has dtype {entry['dtype']}, which cm3jax cannot read")
        begin, end = entry["data_offsets"]
        dtype, shape = np.dtype(DTYPES[entry["dtype"]]), tuple(entry["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise UserError(f"{path}: {name} holds {end - begin} bytes, its shape {shape} needs "
                            f"{dtype.itemsize * int(np.prod(shape))}")
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
        return np.array(data.view(dtype).reshape(shape))

    def by_shard(self, names: set[str]) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) for `names`, shard after shard, so each shard file is visited once."""
        for path in sorted(set(self.files.values())):
            for name in sorted(n for n in names if self.files[n] == path):
                yield name, self.read(name)


def write_checkpoint(directory: str, tensors: Iterator[tuple[str, np.ndarray]],
                     max_shard_bytes: int = 4 << 30) -> None:
    """Writes (name, array) pairs as safetensors shards of at most `max_shard_bytes` (one
    tensor may exceed it) plus `model.safetensors.index.json`, or one `model.safetensors`
    when everything fits in one shard. Holds one shard's tensors in memory at a time."""
    os.makedirs(directory, exist_ok=True)
    shards: list[list[str]] = []
    weight_map: dict[str, str] = {}
    batch: dict[str, np.ndarray] = {}

    def flush() -> None:
        if batch:
            name = f"part-{len(shards):05d}.safetensors"
            _write_file(os.path.join(directory, name), batch)
            shards.append(list(batch))
            weight_map.update({tensor: name for tensor in batch})
            batch.clear()

    for name, array in tensors:
        if batch and sum(a.nbytes for a in batch.values()) + array.nbytes > max_shard_bytes:
            flush()
        batch[name] = np.ascontiguousarray(array)
    flush()
    if len(shards) == 1:
        os.replace(os.path.join(directory, "part-00000.safetensors"), os.path.join(directory, SINGLE_FILE))
        return
    renamed = {}
    for k, names in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(directory, f"part-{k:05d}.safetensors"), os.path.join(directory, final))
        renamed.update({tensor: final for tensor in names})
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in set(renamed.values()))
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": renamed}, f, indent=2)


def _write_file(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """One safetensors file holding `tensors` (format metadata 'pt', as transformers writes)."""
    header, offset = {}, 0
    for name, array in tensors.items():
        if array.dtype not in DTYPE_NAMES:
            raise UserError(f"cannot write {name}: dtype {array.dtype} has no safetensors name")
        header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in tensors.values():
            f.write(array.tobytes())
