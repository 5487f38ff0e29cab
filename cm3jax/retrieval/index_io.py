"""On-disk format of a dense index: plain .npy arrays and a JSON manifest, saved atomically.

A directory holds embeddings.npy, ids.npy, for IVF the lists (ivf_centroids.npy,
ivf_offsets.npy, ivf_rows.npy), and manifest.json, written last. Arrays are read
memory-mapped with allow_pickle=False and checked against the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from cm3jax.errors import UserError
from cm3jax.retrieval.ivf import IvfLists

FORMAT_VERSION = 1
MODES = ("exact", "ivf")
STORAGE_DTYPES = ("float32", "float16")
MANIFEST_FILE = "manifest.json"
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.npy"
CENTROIDS_FILE = "ivf_centroids.npy"
OFFSETS_FILE = "ivf_offsets.npy"
LIST_ROWS_FILE = "ivf_rows.npy"
MANIFEST_FIELDS = (
    "format_version",
    "dim",
    "count",
    "dtype",
    "metric",
    "mode",
    "nlist",
    "kmeans",
    "encoder_checksum",
    "created",
)


def make_manifest(
    embeddings: np.ndarray, ivf: IvfLists | None, encoder_checksum: str, created: str
) -> dict[str, Any]:
    """The JSON manifest of an index over `embeddings` [N, D] (exact mode when `ivf` is None)."""
    kmeans = None if ivf is None else {"iterations": ivf.iterations, "seed": ivf.seed}
    return {
        "format_version": FORMAT_VERSION,
        "dim": embeddings.shape[1],
        "count": embeddings.shape[0],
        "dtype": embeddings.dtype.name,
        "metric": "ip",
        "mode": "exact" if ivf is None else "ivf",
        "nlist": 0 if ivf is None else ivf.nlist,
        "kmeans": kmeans,
        "encoder_checksum": encoder_checksum,
        "created": created,
    }


def write_index(
    target: Path,
    embeddings: np.ndarray,
    ids: np.ndarray,
    ivf: IvfLists | None,
    manifest: dict[str, Any],
) -> Path:
    """Writes the arrays and `manifest` to a temporary directory, then renames it to `target`.

    An existing index (or empty directory) there is replaced; a killed save leaves either the
    old index or none, never a half-written one that loads.

    Raises:
      UserError: if `target` exists and is not an index directory.
    """
    arrays = {EMBEDDINGS_FILE: embeddings, IDS_FILE: ids}
    if ivf is not None:
        arrays[CENTROIDS_FILE] = ivf.centroids
        arrays[OFFSETS_FILE] = ivf.offsets
        arrays[LIST_ROWS_FILE] = ivf.rows
    _check_replaceable(target)
    partial = target.parent / f".{target.name}.partial-{uuid.uuid4().hex}"
    partial.mkdir(parents=True)
    try:
        for name, array in arrays.items():
            _write_npy(partial / name, array)
        _write_json(partial / MANIFEST_FILE, manifest)
        _replace_directory(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of the index in `directory`, checked for format, fields and sizes.

    Raises:
      UserError: a missing or corrupt manifest, another format version, or bad fields.
    """
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{path}: missing (not a dense index directory, or its save never finished)"
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable or corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise UserError(f"{path}: format version {version!r}, this code reads {FORMAT_VERSION}")
    missing = [key for key in MANIFEST_FIELDS if key not in manifest]
    if missing:
        raise UserError(f"{path}: missing fields {missing}")
    if manifest["metric"] != "ip" or manifest["mode"] not in MODES:
        raise UserError(
            f"{path}: unsupported metric {manifest['metric']!r} or mode {manifest['mode']!r}"
        )
    if manifest["dtype"] not in STORAGE_DTYPES:
        raise UserError(f"{path}: unsupported dtype {manifest['dtype']!r}")
    sizes = [manifest[key] for key in ("dim", "count", "nlist")]
    if not all(isinstance(size, int) and size >= 0 for size in sizes):
        raise UserError(f"{path}: dim, count and nlist must be non-negative integers, got {sizes}")
    if manifest["mode"] == "ivf" and not (
        isinstance(manifest["kmeans"], dict) and {"iterations", "seed"} <= manifest["kmeans"].keys()
    ):
        raise UserError(f"{path}: an ivf index needs kmeans {{iterations, seed}}")
    return manifest


def read_arrays(
    directory: Path, manifest: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, IvfLists | None]:
    """Memory-maps the embeddings, ids and (ivf mode) lists that `manifest` describes.

    Raises:
      UserError: a missing or corrupt file, or one whose shape or dtype is not the manifest's.
    """
    count, dim = manifest["count"], manifest["dim"]
    embeddings = _read_npy(directory / EMBEDDINGS_FILE, (count, dim), manifest["dtype"])
    ids = _read_npy(directory / IDS_FILE, (count,), "int64")
    ivf = None
    if manifest["mode"] == "ivf":
        nlist = manifest["nlist"]
        ivf = IvfLists(
            centroids=_read_npy(directory / CENTROIDS_FILE, (nlist, dim), "float32"),
            offsets=_read_npy(directory / OFFSETS_FILE, (nlist + 1,), "int64"),
            rows=_read_npy(directory / LIST_ROWS_FILE, (count,), "int64"),
            iterations=manifest["kmeans"]["iterations"],
            seed=manifest["kmeans"]["seed"],
        )
    return embeddings, ids, ivf


def _check_replaceable(target: Path) -> None:
    """Raises UserError if `target` exists and is neither an index nor an empty directory."""
    if target.is_dir() and ((target / MANIFEST_FILE).exists() or not any(target.iterdir())):
        return
    if target.exists():
        raise UserError(
            f"refusing to replace {target}: it exists and is not a dense index directory"
        )


def _write_npy(path: Path, array: np.ndarray) -> None:
    """Saves `array` (no pickles) and syncs it to disk."""
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Writes `value` as indented JSON and syncs it to disk."""
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _replace_directory(source: Path, target: Path) -> None:
    """Renames `source` to `target`, moving an existing `target` aside first."""
    if not target.exists():
        os.rename(source, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
    os.rename(target, old)
    os.rename(source, target)
    shutil.rmtree(old)


def _read_npy(path: Path, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Memory-maps one array (no pickles) and checks it against the manifest."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: missing (the index directory is incomplete)") from None
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: unreadable or corrupt ({e})") from None
    if array.shape != tuple(shape) or array.dtype.name != dtype:
        raise UserError(
            f"{path}: shape {array.shape} dtype {array.dtype}, but the manifest says "
            f"{tuple(shape)} {dtype}"
        )
    return array
