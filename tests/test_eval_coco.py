"""Zero-shot COCO FID (cm3jax/eval/coco.py, suite.evaluate_fid, `cm3jax.eval --task=fid`) on a
tiny fake COCO whose captions are shapes-benchmark captions, and the session's small trained
world (tests/conftest.py: sample_world)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cm3jax.errors import UserError
from cm3jax.eval import coco, shapes_prompts

SIZES = [(40, 24), (24, 40), (33, 33), (64, 20), (21, 50), (48, 36)]  # (width, height), non-square


def _coco(root, annotations=None) -> str:
    """Writes ROOT/captions.json (2 captions per image) and ROOT/images/ (PNG and JPEG); returns the JSON path."""
    captions = shapes_prompts.captions(shapes_prompts.scenes("single", 2 * len(SIZES), seed=5))
    images_dir = root / "images"
    images_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for i, (width, height) in enumerate(SIZES):
        name = f"COCO_val2014_{i:012d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(images_dir / name)
        images.append({"id": 100 + i, "file_name": name, "width": width, "height": height})
    if annotations is None:
        annotations = [{"id": j, "image_id": 100 + j // 2, "caption": c} for j, c in enumerate(captions)]
    path = root / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return str(path)


@pytest.fixture(scope="module")
def fake_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return _coco(root), str(root / "images")


def test_read_captions(fake_coco):
    items = coco.read_captions(fake_coco[0])
    assert len(items) == 12
    assert [item.image_id for item in items[:4]] == [100, 100, 101, 101]
    assert items[3].file_name == "COCO_val2014_000000000001.png"
    assert items[0].caption == shapes_prompts.captions(shapes_prompts.scenes("single", 1, seed=5))[0]


def test_sample_captions_is_seeded_and_without_replacement(fake_coco):
    items = coco.read_captions(fake_coco[0])
    sample = coco.sample_captions(items, 8, seed=1)
    assert sample == coco.sample_captions(items, 8, seed=1) and sample != coco.sample_captions(items, 8, seed=2)
    assert len(set(sample)) == 8 and set(sample) <= set(items)
    assert sorted(coco.sample_captions(items, 12, seed=1)) == sorted(items)
    with pytest.raises(UserError, match="--n=13: .* 12 captions"):
        coco.sample_captions(items, 13, seed=1)


@pytest.mark.parametrize("annotations, field", [
    ([{"image_id": 100, "caption": "a"}, {"image_id": 100}], "annotations[1].caption"),
    ([{"caption": "a"}], "annotations[0].image_id"),
    ([{"image_id": 7, "caption": "a"}], "annotations[0].image_id 7"),
])
def test_read_captions_names_the_bad_field(tmp_path, annotations, field):
    path = _coco(tmp_path, annotations)
    with pytest.raises(UserError, match=re.escape(f"{path}: {field}")):
        coco.read_captions(path)


@pytest.mark.parametrize("content, message", [("{}", "file.images is missing"), ("[", "not JSON")])
def test_read_captions_of_a_malformed_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=re.escape(f"{path}: {message}")):
        coco.read_captions(str(path))
    with pytest.raises(UserError, match="missing.json"):
        coco.read_captions(str(tmp_path / "missing.json"))


def test_load_reference_centre_crops_and_resizes(tmp_path):
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:40] = (0, 255, 0)  # the centre square
    wide[:, 40:] = (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(wide.transpose(1, 0, 2)).save(tmp_path / "tall.png")
    batches = list(coco.load_reference(str(tmp_path), ["wide.png", "tall.png", "wide.png"], 8, batch_size=2))
    assert [b.shape for b in batches] == [(2, 8, 8, 3), (1, 8, 8, 3)] and batches[0].dtype == np.uint8
    for image in batches[0]:  # only the green centre square is left (bicubic may ring at its edges)
        assert (np.abs(image[1:-1, 1:-1].astype(int) - (0, 255, 0)) <= 8).all()
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    for name in ("missing.png", "broken.jpg"):
        with pytest.raises(UserError, match=re.escape(str(tmp_path / name))):
            list(coco.load_reference(str(tmp_path), ["wide.png", name], 8))


def _eval(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cm3jax.eval", *flags], capture_output=True, text=True,
                          timeout=600)


def test_fid_cli_end_to_end(sample_world, fake_coco):
    captions, images = fake_coco
    lm = sample_world["lm"]
    result = _eval(f"--workdir={lm}", "--task=fid", f"--captions={captions}", f"--images={images}", "--n=4",
                   "--retrieve=1", "--seed=3")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.load(open(f"{lm}/eval/fid.json"))
    assert json.loads(result.stdout.strip().splitlines()[-1]) == written
    assert {"fid", "features", "n_generated", "n_reference", "prompts", "n", "guidance", "top_p", "retrieve",
            "seed", "step", "grid"} <= set(written)
    assert written["features"] == "dual_encoder_image" and np.isfinite(written["fid"])
    assert written["n_generated"] == written["n_reference"] == written["n"] == 4
    assert written["prompts"] == captions and written["retrieve"] == 1 and written["seed"] == 3
    assert written["grid"]["prompts"] == [c.caption for c in coco.sample_captions(coco.read_captions(captions), 4, 3)]
    width, height = Image.open(f"{lm}/eval/fid.png").size
    assert width == 2 * height  # 4 reference images over their 4 generations


def test_fid_cli_without_captions_or_images(tmp_path):
    result = _eval(f"--workdir={tmp_path}", "--task=fid", "--captions=captions_val2014.json")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --task=fid needs --captions"), result.stderr
