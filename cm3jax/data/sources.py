"""Image-caption sources: Grain random-access data sources over user data.

Every source has `__len__`, `__getitem__` and `__repr__` (Grain's
`RandomAccessDataSource` protocol), reads lazily (only captions / annotations are
indexed up front) and yields

    {'image': uint8 [resolution, resolution, 3], 'text': str, 'id': str}

or, for a record that cannot be decoded (truncated / empty / non-image file,
non-UTF-8 or empty caption, malformed line), an error record that never raises:

    {'id': str, 'error': 'one-line reason naming the file'}

so the caller can skip it and count it. `open_source` maps the spec strings of the
config onto the sources:

    folder:DIR                        DIR/captions.jsonl, one {"image": "rel/path.jpg",
                                      "caption": "..."} a line; id = the image's path
    coco:ANNOTATIONS_JSON:IMAGES_DIR  MS-COCO captions JSON, one record per annotation;
                                      id = f'{file_name}#{annotation id}'
    tfds:NAME[:SPLIT]                 a TFDS dataset prepared locally as ArrayRecord, read
                                      without TensorFlow; id = f'{name}/{split}/{index}'
    arrayrecord:GLOB                  prepared token shards (`cm3jax.data.records`)
    shapes                            the synthetic shapes dataset (`cm3jax.data.shapes`)
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Any, Callable, SupportsIndex

import numpy as np
from PIL import Image

from cm3jax.data.images import BadRecordError, decode_caption, decode_image, read_image_file, to_rgb_square
from cm3jax.errors import UserError

CAPTIONS_FILE = "captions.jsonl"
SPEC_FORMS = ("folder:DIR", "coco:ANNOTATIONS_JSON:IMAGES_DIR", "tfds:NAME[:SPLIT]",
              "arrayrecord:GLOB", "shapes")

Record = dict[str, Any]


# ----------------------------------------------------------------------------- helpers


def _index(index: SupportsIndex, length: int) -> int:
    """A valid non-negative record index (negative indices count from the end)."""
    i = index.__index__()
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"record index {index} out of range for {length} records")
    return i


def _check_resolution(resolution: int) -> int:
    """The resolution as a positive int."""
    if int(resolution) < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    return int(resolution)


def _error_record(record_id: str, reason: str) -> Record:
    """The record returned in place of one that cannot be decoded."""
    return {"id": record_id, "error": " ".join(reason.split())}


def _example(image: np.ndarray, text: str, record_id: str) -> Record:
    """A decoded image-caption record."""
    return {"image": image, "text": text, "id": record_id}


def _decode_pair(record_id: str, decode: Callable[[], tuple[np.ndarray, str]]) -> Record:
    """Runs `decode` -> (image, text); a BadRecordError becomes an error record."""
    try:
        image, text = decode()
    except BadRecordError as e:
        return _error_record(record_id, str(e))
    return _example(image, text, record_id)


# ----------------------------------------------------------------------------- folder


@dataclasses.dataclass(frozen=True)
class _Line:
    """One non-blank line of captions.jsonl: either (image, caption) or the reason it is bad."""

    number: int
    image: str | None
    caption: str | None = None
    error: str | None = None


def _parse_caption_line(raw: bytes, number: int) -> _Line:
    """Parses one captions.jsonl line (bytes); never raises."""
    where = f"{CAPTIONS_FILE} line {number}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        image = _image_name_of_undecodable(raw)
        byte = raw[e.start : e.start + 1].hex()
        return _Line(number, image, error=f"{image or where}: caption is not valid UTF-8 "
                                            f"({where}, byte 0x{byte} at offset {e.start})")
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        return _Line(number, None, error=f"{where}: invalid JSON ({e.msg} at column {e.colno})")
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
        expected = '{"image": "rel/path", "caption": "..."}'
        return _Line(number, None, error=f"{where}: expected {expected}")
    if "caption" not in entry:
        return _Line(number, entry["image"], error=f"{entry['image']}: no caption ({where})")
    return _Line(number, entry["image"], caption=entry["caption"])


def _image_name_of_undecodable(raw: bytes) -> str | None:
    """Best-effort image path of a line that is not UTF-8 (for the error message only)."""
    try:
        entry = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return None
    image = entry.get("image") if isinstance(entry, dict) else None
    return image if isinstance(image, str) and image else None


def _read_caption_lines(path: str) -> list[_Line]:
    """Every non-blank line of captions.jsonl, parsed (bad lines kept as error lines)."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    return [_parse_caption_line(raw.strip(), number)
            for number, raw in enumerate(lines, start=1) if raw.strip()]


class FolderSource:
    """Images in a directory captioned by `DIR/captions.jsonl`; the id is the image's relative path.

    Each non-blank line `{"image": "rel/path.jpg", "caption": "..."}` is one record. The
    file is read as bytes line by line: a line that is not UTF-8 or not valid JSON is an
    error record of its own and does not affect the other lines.
    """

    def __init__(self, directory: str, resolution: int):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self.resolution = _check_resolution(resolution)
        if not os.path.isdir(self.directory):
            raise UserError(f"image folder {directory!r} does not exist or is not a directory")
        captions = os.path.join(self.directory, CAPTIONS_FILE)
        if not os.path.isfile(captions):
            raise UserError(f"image folder {directory!r} has no {CAPTIONS_FILE} "
                            '(one {"image": "rel/path.jpg", "caption": "..."} per line)')
        self._lines = _read_caption_lines(captions)

    def __len__(self) -> int:
        return len(self._lines)

    def __repr__(self) -> str:
        return (f"FolderSource(directory={self.directory!r}, records={len(self)}, "
                f"resolution={self.resolution})")

    def __getitem__(self, index: SupportsIndex) -> Record:
        line = self._lines[_index(index, len(self))]
        record_id = line.image or f"{CAPTIONS_FILE}:{line.number}"
        if line.error is not None:
            return _error_record(record_id, line.error)
        return _decode_pair(record_id, lambda: self._decode(line))

    def _decode(self, line: _Line) -> tuple[np.ndarray, str]:
        text = decode_caption(line.caption, line.image)
        path = os.path.join(self.directory, line.image)
        return read_image_file(path, line.image, self.resolution), text


# ----------------------------------------------------------------------------- coco


def _load_json(path: str, what: str) -> Any:
    """Parses a JSON file; a missing or invalid file is a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path!r} is not valid JSON ({e})") from e


def _coco_index(data: Any, path: str) -> list[tuple[str | None, Any, str, Any]]:
    """(image file name or None, caption, annotation id, image id) per annotation, in order."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise UserError(f"COCO annotations {path!r} lack an 'images' or 'annotations' list "
                        "(expected the captions_*.json format)")
    files = {image.get("id"): image.get("file_name")
             for image in data["images"] if isinstance(image, dict)}
    entries = []
    for position, ann in enumerate(data["annotations"]):
        ann = ann if isinstance(ann, dict) else {}
        file_name = files.get(ann.get("image_id"))
        ann_id = str(ann.get("id", f"annotation{position}"))
        entries.append((file_name if isinstance(file_name, str) else None,
                        ann.get("caption"), ann_id, ann.get("image_id")))
    return entries


class CocoSource:
    """MS-COCO captions (`captions_train2017.json` + image dir): one record per annotation.

    The id is `f'{file_name}#{annotation id}'`; an annotation whose image id is not in
    'images' is an error record.
    """

    def __init__(self, annotations_json: str, images_dir: str, resolution: int):
        self.annotations_json = os.path.abspath(os.path.expanduser(annotations_json))
        self.images_dir = os.path.abspath(os.path.expanduser(images_dir))
        self.resolution = _check_resolution(resolution)
        if not os.path.isdir(self.images_dir):
            raise UserError(f"COCO image directory {images_dir!r} does not exist")
        data = _load_json(self.annotations_json, "COCO annotations")
        self._entries = _coco_index(data, annotations_json)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"CocoSource(annotations_json={self.annotations_json!r}, "
                f"images_dir={self.images_dir!r}, records={len(self)}, "
                f"resolution={self.resolution})")

    def __getitem__(self, index: SupportsIndex) -> Record:
        file_name, caption, ann_id, image_id = self._entries[_index(index, len(self))]
        if file_name is None:
            return _error_record(f"#{ann_id}", f"{os.path.basename(self.annotations_json)}: "
                                 f"annotation {ann_id} refers to unknown image id {image_id!r}")
        record_id = f"{file_name}#{ann_id}"
        return _decode_pair(record_id, lambda: self._decode(file_name, caption, record_id))

    def _decode(self, file_name: str, caption: Any, record_id: str) -> tuple[np.ndarray, str]:
        text = decode_caption(caption if caption is not None else "", record_id)
        path = os.path.join(self.images_dir, file_name)
        return read_image_file(path, file_name, self.resolution), text


# ----------------------------------------------------------------------------- tfds


def _nested(mapping: Any, key: str) -> Any:
    """`mapping['a']['b']` for key 'a/b' (TFDS nested feature paths)."""
    for part in key.split("/"):
        mapping = mapping[part]
    return mapping


def _skip_image_decoding(features: Any, tfds: Any) -> dict | None:
    """Decoders keeping every `Image` feature (nested dicts too) as its encoded bytes.

    The image we use is decoded by `decode_image`; the others are never decoded at all.
    """
    decoders = {}
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Image):
            decoders[key] = tfds.decode.SkipDecoding()
        elif isinstance(feature, tfds.features.FeaturesDict):
            nested = _skip_image_decoding(feature, tfds)
            if nested:
                decoders[key] = nested
    return decoders or None


def _tfds_builder(name: str, data_dir: str | None):
    """The TFDS builder of a locally prepared dataset (never downloads or generates)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - DatasetNotFoundError and friends
        raise UserError(f"TFDS dataset {name!r} not found in data_dir {data_dir!r} "
                        f"({type(e).__name__}); prepare it first with "
                        "file_format='array_record'") from e
    if not builder.is_prepared():
        raise UserError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}; "
                        "prepare it first with file_format='array_record'")
    return builder


def _tfds_feature(features: Any, key: str, name: str, what: str) -> Any:
    """The feature connector at `key`; a missing feature is a UserError listing the others."""
    try:
        return _nested(features, key)
    except (KeyError, TypeError) as e:
        available = sorted(features.keys()) if hasattr(features, "keys") else []
        raise UserError(f"TFDS dataset {name!r} has no {what} feature {key!r}; "
                        f"features: {available}") from e


class TfdsSource:
    """A locally prepared TFDS dataset read through `tfds.data_source` (ArrayRecord, no TensorFlow).

    `image_key` / `text_key` name the features ('a/b' for nested ones). An `Image`
    feature is read as its encoded bytes and decoded here (so EXIF orientation, modes
    and broken files are handled like the other sources); a uint8 `Tensor` feature
    (HxW, HxWx1, HxWx3 or HxWx4) and an encoded-bytes feature work too. A text feature
    holding several captions (a sequence) yields its first one. The id is
    `f'{name}/{split}/{index}'`.
    """

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str,
                 text_key: str, resolution: int):
        import tensorflow_datasets as tfds  # lazy: importing TFDS costs ~0.5 s

        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.text_key = image_key, text_key
        self.resolution = _check_resolution(resolution)
        builder = _tfds_builder(name, data_dir)
        features = builder.info.features
        _tfds_feature(features, image_key, name, "image")
        _tfds_feature(features, text_key, name, "text")
        try:
            self._source = builder.as_data_source(split=split,
                                                  decoders=_skip_image_decoding(features, tfds))
        except NotImplementedError as e:
            raise UserError(f"TFDS dataset {name!r} is prepared as {builder.info.file_format}, "
                            "which has no random access; re-prepare it with "
                            "file_format='array_record'") from e
        except (KeyError, ValueError) as e:
            raise UserError(f"TFDS dataset {name!r} has no split {split!r}; splits: "
                            f"{sorted(builder.info.splits.keys())}") from e

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return (f"TfdsSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, "
                f"records={len(self)}, resolution={self.resolution})")

    def __getitem__(self, index: SupportsIndex) -> Record:
        i = _index(index, len(self))
        record_id = f"{self.name}/{self.split}/{i}"
        try:
            example = self._source[i]
        except Exception as e:  # noqa: BLE001 - a corrupt record must not stop the run
            return _error_record(record_id, f"{record_id}: cannot read the record "
                                 f"({type(e).__name__}: {e})")
        return _decode_pair(record_id, lambda: self._decode(example, record_id))

    def _decode(self, example: Any, record_id: str) -> tuple[np.ndarray, str]:
        image = _tfds_image(_nested(example, self.image_key), record_id, self.resolution)
        return image, decode_caption(_first_text(_nested(example, self.text_key)), record_id)


def _tfds_image(value: Any, name: str, resolution: int) -> np.ndarray:
    """Encoded bytes or a uint8 array -> the square RGB array."""
    if isinstance(value, np.ndarray) and value.dtype == np.object_ and value.size == 1:
        value = value.item()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_image(bytes(value), resolution, name)
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or \
            (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise BadRecordError(f"{name}: image feature is neither encoded bytes nor a uint8 "
                             f"HxW[x1|3|4] array (dtype {array.dtype}, shape {array.shape})")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    try:
        return to_rgb_square(Image.fromarray(array), resolution)
    except Exception as e:  # noqa: BLE001
        raise BadRecordError(f"{name}: cannot convert image array ({e})") from e


def _first_text(value: Any) -> Any:
    """A caption value as bytes/str: the first of a sequence of captions."""
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return ""
        value = value.reshape(-1)[0]
    elif isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return value.item() if isinstance(value, np.generic) else value


# ----------------------------------------------------------------------------- open_source

# NAME of tfds:NAME[:SPLIT] may carry a version ('mnist:3.0.1', 'ds/config:1.*.*').
_TFDS_SPEC = re.compile(r"^(?P<name>[^:]+(?::\d+\.(?:\d+|\*)\.(?:\d+|\*))?)(?::(?P<split>.+))?$")


def open_source(spec: str, resolution: int, *, tfds_data_dir: str | None = None,
                tfds_image_key: str = "image", tfds_text_key: str = "caption",
                shapes_records: int = 10000, shapes_split: str = "train", seed: int = 0):
    """Opens the source a spec string names (see the module docstring for the forms).

    Raises:
      UserError: one line naming the spec, for an unknown scheme, a malformed spec, a
        missing directory / file / captions.jsonl, a COCO JSON without 'images' /
        'annotations', a TFDS dataset that is not prepared, or a glob matching nothing.
    """
    scheme, _, rest = spec.partition(":")
    opener = _OPENERS.get(scheme)
    if opener is None:
        raise UserError(f"data source {spec!r}: unknown scheme {scheme!r}; expected one of "
                        + ", ".join(SPEC_FORMS))
    options = dict(tfds_data_dir=tfds_data_dir, tfds_image_key=tfds_image_key,
                   tfds_text_key=tfds_text_key, shapes_records=shapes_records,
                   shapes_split=shapes_split, seed=seed)
    try:
        return opener(rest, resolution, spec, **options)
    except UserError as e:
        if spec in str(e):
            raise
        raise UserError(f"data source {spec!r}: {e}") from e


def _require(value: str, spec: str, form: str) -> str:
    """A non-empty spec part, else a UserError showing the expected form."""
    if not value:
        raise UserError(f"data source {spec!r}: expected {form}")
    return value


def _open_folder(rest: str, resolution: int, spec: str, **_) -> FolderSource:
    return FolderSource(_require(rest, spec, "folder:DIR"), resolution)


def _open_coco(rest: str, resolution: int, spec: str, **_) -> CocoSource:
    form = "coco:ANNOTATIONS_JSON:IMAGES_DIR (paths without ':')"
    parts = rest.split(":")
    if len(parts) != 2:
        raise UserError(f"data source {spec!r}: expected {form}")
    annotations, images = (_require(p, spec, form) for p in parts)
    return CocoSource(annotations, images, resolution)


def _open_tfds(rest: str, resolution: int, spec: str, *, tfds_data_dir: str | None,
               tfds_image_key: str, tfds_text_key: str, **_) -> TfdsSource:
    match = _TFDS_SPEC.match(_require(rest, spec, "tfds:NAME[:SPLIT]"))
    if match is None:
        raise UserError(f"data source {spec!r}: expected tfds:NAME[:SPLIT]")
    return TfdsSource(match["name"], match["split"] or "train", tfds_data_dir, tfds_image_key,
                      tfds_text_key, resolution)


def _open_arrayrecord(rest: str, resolution: int, spec: str, **_):
    pattern = os.path.expanduser(_require(rest, spec, "arrayrecord:GLOB"))
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise UserError(f"data source {spec!r}: no files match {pattern!r}")
    from cm3jax.data.records import ArrayRecordDocuments

    return ArrayRecordDocuments(paths)


def _open_shapes(rest: str, resolution: int, spec: str, *, shapes_records: int,
                 shapes_split: str, seed: int, **_):
    if rest:
        raise UserError(f"data source {spec!r}: 'shapes' takes no arguments "
                        "(set the number of records in the config)")
    from cm3jax.data.shapes import ShapesSource

    try:
        return ShapesSource(num_records=shapes_records, resolution=resolution,
                            split=shapes_split, seed=seed)
    except ValueError as e:
        raise UserError(f"data source {spec!r}: {e}") from e


_OPENERS: dict[str, Callable[..., Any]] = {
    "folder": _open_folder,
    "coco": _open_coco,
    "tfds": _open_tfds,
    "arrayrecord": _open_arrayrecord,
    "shapes": _open_shapes,
}
