"""Prepared token documents in ArrayRecord shards: the format `prepare` writes and training reads.

One record per (image, caption) pair, msgpack-encoded:
`{"id": str, "text": int32 bytes (text ids), "image": int32 bytes (raw codes, row-major),
"grid": [h, w]}`. Image codes are stored un-offset; the pipeline maps them into the
unified vocab. Supervised fine-tuning examples (`cm3jax.data.tasks`) are stored per task, one
record per example: `{"id": str, "task": str, "parts": {field: int32 bytes}, "shapes": {field:
shape}}` — text ids for a text field, raw codes for an image field. Shards are named `<split>-NNNNN-of-MMMMM.array_record` and are written
to a temporary name and renamed when complete, so a killed prepare never leaves a
shard that looks complete.
"""

from __future__ import annotations

import glob
import os
from typing import Callable, Sequence

import grain
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from cm3jax.errors import UserError


def encode_record(record_id: str, text_ids: np.ndarray, image_codes: np.ndarray) -> bytes:
    """Serialises one token document."""
    image_codes = np.asarray(image_codes, np.int32)
    return msgpack.packb({
        "id": record_id,
        "text": np.asarray(text_ids, np.int32).tobytes(),
        "image": image_codes.tobytes(),
        "grid": list(image_codes.shape),
    })


def decode_record(data: bytes) -> dict:
    """Inverse of `encode_record`: {'id', 'text' int32 [n], 'image' int32 [h, w]}."""
    d = msgpack.unpackb(data)
    return {
        "id": d["id"],
        "text": np.frombuffer(d["text"], np.int32),
        "image": np.frombuffer(d["image"], np.int32).reshape(d["grid"]),
    }


def encode_sft_record(record_id: str, task: str, parts: dict[str, np.ndarray]) -> bytes:
    """Serialises one fine-tuning example: its parts (text ids / raw image codes) by field name."""
    arrays = {name: np.asarray(part, np.int32) for name, part in parts.items()}
    return msgpack.packb({"id": record_id, "task": task,
                          "parts": {name: a.tobytes() for name, a in arrays.items()},
                          "shapes": {name: list(a.shape) for name, a in arrays.items()}})


def decode_sft_record(data: bytes) -> dict:
    """Inverse of `encode_sft_record`: {'id', 'task', 'parts': {field: int32 array}}."""
    d = msgpack.unpackb(data)
    parts = {name: np.frombuffer(raw, np.int32).reshape(d["shapes"][name]) for name, raw in d["parts"].items()}
    return {"id": d["id"], "task": d["task"], "parts": parts}


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def write_shard(path: str, records: Sequence[bytes]) -> None:
    """Writes serialised records to `path` atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    os.replace(tmp, path)


def split_paths(directory: str, split: str) -> list[str]:
    """The complete shards of `split` in a prepared directory, in order."""
    return sorted(glob.glob(os.path.join(directory, f"{split}-*-of-*.array_record")))


def split_documents(directory: str, split: str, decode: Callable[[bytes], dict] = decode_record
                    ) -> "ArrayRecordDocuments":
    """The documents (or fine-tuning examples, with `decode_sft_record`) of `split` in the
    prepared directory named by config.data.source.

    Raises:
      UserError: naming config.data.source when the split has no shards.
    """
    paths = split_paths(directory, split)
    if not paths:
        raise UserError(f"config.data.source: no '{split}' shards in {directory}")
    return ArrayRecordDocuments(paths, decode)


class ArrayRecordDocuments:
    """Grain random-access source over prepared shards, yielding decoded records (`decode`:
    token documents by default, `decode_sft_record` for fine-tuning examples)."""

    def __init__(self, paths: Sequence[str], decode: Callable[[bytes], dict] = decode_record):
        if not paths:
            raise UserError("no prepared ArrayRecord shards given")
        self.paths, self.decode = list(paths), decode
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return self.decode(self._source[index])

    def __repr__(self) -> str:
        return f"ArrayRecordDocuments({len(self.paths)} shards, {len(self)} records)"
