"""Image-caption sources: folder, COCO and TFDS decoding, bad records, open_source errors.

All data is generated under tmp_path with Pillow / numpy; the TFDS dataset is a tiny
`GeneratorBasedBuilder` prepared as ArrayRecord without TensorFlow.
"""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from cm3jax.data import sources
from cm3jax.data.images import BadRecordError, decode_caption, decode_image, to_rgb_square
from cm3jax.data.sources import CocoSource, FolderSource, TfdsSource, open_source
from cm3jax.errors import UserError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
JPEG_TOLERANCE = 8


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _solid(color, size=(24, 16), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def _halves(width: int, height: int, left, right) -> Image.Image:
    """An RGB image whose left half is `left` and right half is `right`."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = left
    array[:, width // 2 :] = right
    return Image.fromarray(array)


def _thirds(width: int, height: int, colors, vertical: bool = False) -> Image.Image:
    """Three equal stripes (left->right, or top->bottom when vertical)."""
    array = np.zeros((height, width, 3), np.uint8)
    n = height if vertical else width
    for k, color in enumerate(colors):
        stripe = slice(k * n // 3, (k + 1) * n // 3)
        if vertical:
            array[stripe] = color
        else:
            array[:, stripe] = color
    return Image.fromarray(array)


def _exif_jpeg(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(img, "JPEG", quality=95, exif=exif.tobytes())


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([*GREEN, *RED] + [0] * (3 * 254))
    img.paste(1, (0, 0, 20, 10))  # top half red, bottom half palette index 0 (transparent)
    return _encode(img, "PNG", transparency=0)


def _rgba_png() -> bytes:
    array = np.zeros((20, 20, 4), np.uint8)
    array[:, :10] = (*BLUE, 255)  # opaque blue left half
    array[:, 10:] = (*RED, 0)  # fully transparent right half -> white
    return _encode(Image.fromarray(array, "RGBA"), "PNG")


def _assert_close(pixel, color, tolerance=JPEG_TOLERANCE):
    difference = np.abs(np.asarray(pixel, int) - np.asarray(color, int)).max()
    assert difference <= tolerance, (pixel, color)


GOOD_FILES = {
    "photos/rgb.jpg": lambda: _encode(_solid(RED), "JPEG", quality=95),
    "rgba.png": _rgba_png,
    "palette.png": _palette_with_transparency,
    "gray.png": lambda: _encode(_solid(100, mode="L"), "PNG"),
    "gray16.png": lambda: _encode(Image.fromarray(np.full((16, 24), 32896, np.uint16)), "PNG"),
    "rotated.jpg": lambda: _exif_jpeg(_halves(40, 20, RED, BLUE), orientation=6),
    "latin.jpg": lambda: _encode(_solid(GREEN), "JPEG"),
}


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG", quality=90)
    return data[: len(data) // 2]


BAD_FILES = {"truncated.jpg": _truncated_jpeg, "empty.png": lambda: b"",
             "notes.png": lambda: b"this is a text file, not a PNG\n"}


@pytest.fixture
def image_folder(tmp_path):
    """A folder with good images of many modes, bad files and bad caption lines."""
    for name, make in {**GOOD_FILES, **BAD_FILES}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make())
    lines = [json.dumps({"image": name, "caption": f"  a picture\tof {name}\n"}).encode()
             for name in [*GOOD_FILES, *BAD_FILES] if name != "latin.jpg"]
    lines += [
        b'{"image": "latin.jpg", "caption": "caf\xe9 au lait"}',  # Latin-1, not UTF-8
        b'{"image": "broken.jpg", "caption": ',  # invalid JSON
        json.dumps({"image": "missing.jpg", "caption": "gone"}).encode(),
        json.dumps({"image": "photos/rgb.jpg", "caption": " \t "}).encode(),  # empty caption
        b"",  # blank lines are not records
    ]
    (tmp_path / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\r\n")
    return tmp_path


def _by_id(source) -> tuple[dict, list[dict]]:
    good, bad = {}, []
    for i in range(len(source)):
        record = source[i]
        if "error" in record:
            bad.append(record)
        else:
            good[record["id"]] = record
    return good, bad


# ----------------------------------------------------------------------------- folder


def test_folder_decodes_exactly_the_good_records(image_folder):
    source = FolderSource(str(image_folder), 16)
    assert len(source) == len(GOOD_FILES) + len(BAD_FILES) - 1 + 4
    good, bad = _by_id(source)

    assert set(good) == set(GOOD_FILES) - {"latin.jpg"}
    for record in good.values():
        assert record["image"].shape == (16, 16, 3) and record["image"].dtype == np.uint8
        assert record["text"] == f"a picture of {record['id']}"

    errors = {record["id"]: record["error"] for record in bad}
    assert len(errors) == len(bad) == 7
    for name in [*BAD_FILES, "latin.jpg", "missing.jpg"]:
        assert errors[name].startswith(f"{name}: "), errors[name]
    assert "truncated" in errors["truncated.jpg"]
    assert "empty" in errors["empty.png"]
    assert "not a recognised image" in errors["notes.png"]
    assert "UTF-8" in errors["latin.jpg"] and "captions.jsonl line" in errors["latin.jpg"]
    assert "not found" in errors["missing.jpg"]
    assert "invalid JSON" in errors["captions.jsonl:" + str(len(GOOD_FILES) + len(BAD_FILES) + 1)]
    assert all("\n" not in error for error in errors.values())
    assert sum("empty caption" in error for error in errors.values()) == 1


def test_folder_converts_modes_to_rgb_on_white(image_folder):
    good, _ = _by_id(FolderSource(str(image_folder), 16))
    _assert_close(good["photos/rgb.jpg"]["image"][8, 8], RED)
    rgba = good["rgba.png"]["image"]
    _assert_close(rgba[8, 2], BLUE, 0)
    _assert_close(rgba[8, 13], WHITE, 0)
    palette = good["palette.png"]["image"]
    _assert_close(palette[2, 8], RED, 0)
    _assert_close(palette[13, 8], WHITE, 0)  # transparent palette entry composited on white
    _assert_close(good["gray.png"]["image"][8, 8], (100, 100, 100), 0)
    _assert_close(good["gray16.png"]["image"][8, 8], (128, 128, 128), 0)  # scaled, not clipped


def test_exif_orientation_is_applied(image_folder):
    """Stored 40x20 left red / right blue, orientation 6 (rotate 90 CW): red on top."""
    image = _by_id(FolderSource(str(image_folder), 16))[0]["rotated.jpg"]["image"]
    top, bottom = image[:6].reshape(-1, 3).mean(0), image[-6:].reshape(-1, 3).mean(0)
    _assert_close(top, RED, 12)
    _assert_close(bottom, BLUE, 12)
    upright = decode_image(_exif_jpeg(_halves(40, 20, RED, BLUE), orientation=1), 16, "x")
    _assert_close(upright[:, :6].reshape(-1, 3).mean(0), RED, 12)


def test_folder_reads_lazily_and_works_in_grain(image_folder, monkeypatch):
    import grain

    def fail(*args, **kwargs):
        raise AssertionError("decoded an image in __init__")

    monkeypatch.setattr(sources, "decode_image", fail)
    source = FolderSource(str(image_folder), 32)
    monkeypatch.undo()
    assert "FolderSource" in repr(source) and str(len(source)) in repr(source)
    dataset = grain.MapDataset.source(pickle.loads(pickle.dumps(source)))
    assert dataset[0]["image"].shape == (32, 32, 3)


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("resolution", [16, 32])
@pytest.mark.parametrize("vertical", [False, True])
def test_resize_keeps_the_centre_square(resolution, vertical):
    size = (20, 60) if vertical else (60, 20)
    img = _thirds(*size, [BLUE, RED, GREEN], vertical=vertical)
    out = decode_image(_encode(img, "PNG"), resolution, "thirds.png")
    assert out.shape == (resolution, resolution, 3) and out.dtype == np.uint8
    _assert_close(out[resolution // 2, resolution // 2], RED, 0)
    _assert_close(out.reshape(-1, 3).mean(0), RED, 12)


@pytest.mark.parametrize("resolution", [16, 32])
def test_large_image_downsamples_to_the_resolution(resolution):
    array = np.zeros((300, 500, 3), np.uint8)
    array[100:200, 200:300] = GREEN  # the centre third of the centre square
    out = to_rgb_square(Image.fromarray(array), resolution)
    assert out.shape == (resolution, resolution, 3)
    c = resolution // 2
    _assert_close(out[c, c], GREEN, 0)
    _assert_close(out[1, 1], (0, 0, 0), 0)


def test_decompression_bomb_is_a_bad_record_without_touching_pil_globals():
    max_pixels, load_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    png = _encode(Image.new("RGB", (4, 4)), "PNG")
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    ihdr = struct.pack(">I", 13) + b"IHDR" + header + crc
    bomb = png[:8] + ihdr + png[33:]
    with pytest.raises(BadRecordError, match=r"^bomb\.png: image too large"):
        decode_image(bomb, 16, "bomb.png")
    with pytest.raises(BadRecordError, match=r"^t\.jpg: .*truncated"):
        decode_image(_truncated_jpeg(), 16, "t.jpg")
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == (max_pixels, load_truncated)


def test_decode_caption():
    assert decode_caption(b"  two\n words\t", "c") == "two words"
    assert decode_caption("caf\u00e9", "c") == "caf\u00e9"
    for raw, reason in [(b"caf\xe9", "not valid UTF-8"), ("a\udce9", "not valid Unicode"),
                        (" \n", "empty caption"), (b"", "empty caption"), (3, "not text")]:
        with pytest.raises(BadRecordError, match=f"^name.txt: .*{reason}"):
            decode_caption(raw, "name.txt")


# ----------------------------------------------------------------------------- coco


def _coco(tmp_path):
    images_dir = tmp_path / "train2017"
    images_dir.mkdir()
    (images_dir / "000000000001.jpg").write_bytes(_encode(_solid(RED), "JPEG"))
    (images_dir / "000000000002.png").write_bytes(_encode(_solid(BLUE, (10, 30)), "PNG"))
    (images_dir / "000000000003.jpg").write_bytes(_truncated_jpeg())
    data = {
        "info": {}, "licenses": [],
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": 16, "width": 24},
                   {"id": 2, "file_name": "000000000002.png", "height": 30, "width": 10},
                   {"id": 3, "file_name": "000000000003.jpg", "height": 64, "width": 64}],
        "annotations": [{"image_id": 1, "id": 11, "caption": "A red square."},
                        {"image_id": 2, "id": 21, "caption": "A tall blue\nrectangle. "},
                        {"image_id": 1, "id": 12, "caption": "Red."},
                        {"image_id": 9, "id": 91, "caption": "No such image."},
                        {"image_id": 2, "id": 22, "caption": ""},
                        {"image_id": 3, "id": 31, "caption": "Truncated."}],
    }
    annotations = tmp_path / "captions_train2017.json"
    annotations.write_text(json.dumps(data))
    return annotations, images_dir


def test_coco_one_record_per_annotation(tmp_path):
    annotations, images_dir = _coco(tmp_path)
    source = open_source(f"coco:{annotations}:{images_dir}", 16)
    assert isinstance(source, CocoSource) and len(source) == 6
    good, bad = _by_id(source)
    assert list(good) == ["000000000001.jpg#11", "000000000002.png#21", "000000000001.jpg#12"]
    assert good["000000000002.png#21"]["text"] == "A tall blue rectangle."
    _assert_close(good["000000000002.png#21"]["image"][8, 8], BLUE, 0)
    errors = {record["id"]: record["error"] for record in bad}
    assert "unknown image id 9" in errors["#91"]
    assert errors["000000000002.png#22"] == "000000000002.png#22: empty caption"
    assert errors["000000000003.jpg#31"].startswith("000000000003.jpg: ")


def test_coco_json_without_annotations_is_a_user_error(tmp_path):
    bad_json = tmp_path / "instances.json"
    bad_json.write_text(json.dumps({"images": []}))
    spec = f"coco:{bad_json}:{tmp_path}"
    with pytest.raises(UserError, match="'annotations'") as info:
        open_source(spec, 16)
    assert spec in str(info.value)


# ----------------------------------------------------------------------------- tfds


def _prepare_tfds(data_dir) -> str:
    """A tiny TFDS dataset written as ArrayRecord (no TensorFlow); returns its name."""
    import tensorflow_datasets as tfds

    rows = [
        {"image": _encode(_solid(RED), "PNG"), "caption": "red"},
        {"image": _encode(_solid(128, (8, 8), "L"), "PNG"), "caption": " grey  square "},
        {"image": b"definitely not an image", "caption": "garbage"},
        {"image": _encode(_solid(GREEN), "PNG"), "caption": b"caf\xe9"},
    ]
    with tfds.core.registered.skip_registration():

        class Cm3jaxTinyCaptions(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "pixels": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                                                   encoding="zlib"),
                    "caption": tfds.features.Text(),
                }))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(rows),
                        "test": self._generate_examples(rows[:1])}

            def _generate_examples(self, examples):
                for i, row in enumerate(examples):
                    pixels = np.full((6, 10, 3), 40 * (i + 1), np.uint8)
                    yield i, {**row, "pixels": pixels}

    Cm3jaxTinyCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "cm3jax_tiny_captions"


def test_tfds_source_reads_array_record_without_tensorflow(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    name = _prepare_tfds(tmp_path)
    source = open_source(f"tfds:{name}", 16, tfds_data_dir=str(tmp_path))
    assert isinstance(source, TfdsSource) and len(source) == 4
    good, bad = _by_id(source)  # TFDS shuffles the rows when it prepares the dataset
    assert set(good) | {r["id"] for r in bad} == {f"{name}/train/{i}" for i in range(4)}
    by_text = {record["text"]: record["image"] for record in good.values()}
    assert sorted(by_text) == ["grey square", "red"]
    _assert_close(by_text["red"][8, 8], RED, 0)
    _assert_close(by_text["grey square"][0, 0], (128, 128, 128), 0)
    assert sorted(record["error"].split(": ", 1)[1] for record in bad) == [
        "caption is not valid UTF-8 (byte 0xe9 at offset 3)", "not a recognised image format"]
    assert all(record["error"].startswith(record["id"] + ": ") for record in bad)

    pixels = open_source(f"tfds:{name}:test", 8, tfds_data_dir=str(tmp_path),
                         tfds_image_key="pixels")
    assert len(pixels) == 1
    record = pickle.loads(pickle.dumps(pixels))[0]
    assert record["id"] == f"{name}/test/0" and record["image"].shape == (8, 8, 3)
    _assert_close(record["image"][4, 4], (40, 40, 40), 0)
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow" not in sys.modules


def test_tfds_errors_are_user_errors(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    name = _prepare_tfds(tmp_path)
    for spec, kwargs, message in [
        ("tfds:no_such_dataset_xyz", {}, "not found"),
        (f"tfds:{name}:validation", {}, "no split 'validation'"),
        (f"tfds:{name}", {"tfds_text_key": "text"}, "no text feature 'text'"),
    ]:
        with pytest.raises(UserError, match=message) as info:
            open_source(spec, 16, tfds_data_dir=str(tmp_path), **kwargs)
        assert spec in str(info.value)


# ----------------------------------------------------------------------------- open_source


@pytest.mark.parametrize("make_spec, message", [
    (lambda p: "webdataset:/data/shards", "unknown scheme 'webdataset'"),
    (lambda p: "/data/images", "unknown scheme"),
    (lambda p: f"folder:{p}/does_not_exist", "does not exist"),
    (lambda p: "folder:", "expected folder:DIR"),
    (lambda p: f"folder:{p}", "captions.jsonl"),
    (lambda p: f"coco:{p}/missing.json:{p}", "does not exist"),
    (lambda p: f"coco:{p}/only_one_part.json", "expected coco:ANNOTATIONS_JSON:IMAGES_DIR"),
    (lambda p: f"arrayrecord:{p}/*.array_record", "no files match"),
    (lambda p: "shapes:100", "takes no arguments"),
])
def test_open_source_errors_name_the_spec(tmp_path, make_spec, message):
    spec = make_spec(tmp_path)
    with pytest.raises(UserError, match=message) as info:
        open_source(spec, 16)
    assert spec in str(info.value)
    assert "\n" not in str(info.value)


def test_open_source_folder_and_shapes(image_folder):
    source = open_source(f"folder:{image_folder}", 16)
    assert isinstance(source, FolderSource) and source.resolution == 16
    shapes = open_source("shapes", 32, shapes_records=3, shapes_split="train", seed=0)
    assert len(shapes) == 3
    record = shapes[0]
    assert record["image"].shape == (32, 32, 3) and isinstance(record["text"], str)
    with pytest.raises(UserError, match="'shapes'"):
        open_source("shapes", 4, shapes_records=3)
