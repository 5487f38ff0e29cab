"""cm3jax.data.prepare: bad records counted and named, atomic resumable shards, the report."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import PALETTE_FLAGS, PALETTE_OVERRIDES, REPO_ROOT, experiment_config
from cm3jax.data import records
from cm3jax.data.prepare import prepare
from cm3jax.errors import UserError
from cm3jax.tokenizers.palette import PaletteTokenizer
from cm3jax.tokenizers.text import TextTokenizer
from cm3jax.vocab import Vocab

SHAPES_DATA = str(REPO_ROOT / "experiments" / "shapes_data.py")


def _prepare_cli(workdir, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "cm3jax.data.prepare", f"--config={SHAPES_DATA}", f"--workdir={workdir}",
         *PALETTE_FLAGS, *overrides],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """3 good images, a truncated JPEG, a zero-byte file, a text file named .png, a Latin-1 caption."""
    folder = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(folder / f"good{i}.jpg")
        lines.append(json.dumps({"image": f"good{i}.jpg", "caption": f"a good picture number {i}"}).encode())
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(folder / "full.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "full.jpg").read_bytes()[:300])
    (folder / "full.jpg").unlink()
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(folder / "latin.png")
    for name in ("truncated.jpg", "empty.png", "notes.png"):
        lines.append(json.dumps({"image": name, "caption": "a caption"}).encode())
    lines.append(b'{"image": "latin.png", "caption": "caf\xe9 au lait"}')  # Latin-1, not UTF-8
    (folder / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return folder


def test_messy_folder_writes_good_records_and_names_the_bad(messy_folder, tmp_path):
    workdir = tmp_path / "prepared"
    result = _prepare_cli(workdir, f"--config.prepare.sources.train=folder:{messy_folder}",
                          "--config.prepare.sources.validation=", "--config.data.max_bad_fraction=0.9")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((workdir / "prepare_report.json").read_text())["splits"]["train"]
    assert (report["records_read"], report["records_written"], report["bad_records"]) == (7, 3, 4)
    named = " ".join(report["bad_examples"])
    for name in ("truncated.jpg", "empty.png", "notes.png", "latin.png"):
        assert name in named and name in result.stdout
    documents = records.ArrayRecordDocuments(records.split_paths(str(workdir), "train"))
    assert len(documents) == 3
    text = TextTokenizer.load(str(workdir / "tokenizer.model"))
    captions = sorted(text.decode(documents[i]["text"]) for i in range(3))
    assert captions == [f"a good picture number {i}" for i in range(3)]
    assert documents[0]["image"].shape == (16, 16)  # 32x32 images, 2x2 pixels per palette code


def test_too_many_bad_records_stop_with_the_first_bad_files(messy_folder, tmp_path):
    result = _prepare_cli(tmp_path / "prepared", f"--config.prepare.sources.train=folder:{messy_folder}",
                          "--config.prepare.sources.validation=")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: train: 4 of 7 records could not be read") and "max_bad_fraction" in line
    assert "truncated.jpg" in line and "Traceback" not in result.stderr


def _shapes_config(train=300, validation=40, per_shard=100):
    return experiment_config("shapes_data", {
        **PALETTE_OVERRIDES, "prepare.downsample": 1,  # one code per pixel: exact round trip
        "prepare.shapes_records.train": train, "prepare.shapes_records.validation": validation,
        "prepare.records_per_shard": per_shard, "prepare.num_workers": 2})


def test_prepare_refuses_to_mix_image_tokenizers(tmp_path):
    config = _shapes_config(train=8, validation=4, per_shard=8)
    prepare(config, str(tmp_path))
    config.prepare.downsample = 2
    with pytest.raises(UserError, match="tokenized with another image tokenizer"):
        prepare(config, str(tmp_path))


def test_prepare_names_a_missing_vqgan_and_how_to_train_it(tmp_path):
    config = _shapes_config(train=8, validation=4, per_shard=8)
    config.prepare.image_tokenizer = f"vqgan:{tmp_path / 'no_vqgan'}"
    with pytest.raises(UserError, match="config.prepare.image_tokenizer=.*train the VQGAN first"):
        prepare(config, str(tmp_path / "prepared"))


def test_shapes_prepare_is_exact_and_resumes_only_missing_shards(tmp_path):
    from cm3jax.data import shapes

    config = _shapes_config()
    workdir = tmp_path / "shapes"
    report = prepare(config, str(workdir))
    assert report["splits"]["train"]["records_written"] == 300
    assert report["splits"]["train"]["shards"] == 3 and report["splits"]["validation"]["shards"] == 1
    assert report["splits"]["train"]["image_tokens"] == 300 * 1024

    # Palette codes decode back to the exact render; captions round-trip through BPE.
    image = PaletteTokenizer.from_json((workdir / "image_tokenizer.json").read_text())
    text = TextTokenizer.load(str(workdir / "tokenizer.model"))
    documents = records.ArrayRecordDocuments(records.split_paths(str(workdir), "train"))
    source = shapes.ShapesSource(300, split="train", seed=config.seed)
    for i in (0, 150, 299):
        record = source[i]
        np.testing.assert_array_equal(image.decode(documents[i]["image"]), record["image"])
        assert text.decode(documents[i]["text"]) == record["text"]
    assert Vocab.load(str(workdir / "vocab.json")).image_codes >= image.codebook_size

    # Kill -9 during a shard leaves only a .tmp file and no shard report: a re-run redoes
    # exactly that shard and leaves the finished ones alone.
    finished = {p: p.stat().st_mtime_ns for p in workdir.glob("*.array_record")}
    middle = workdir / records.shard_name("train", 1, 3)
    middle.rename(str(middle) + ".tmp")
    (workdir / ".shard_reports" / (middle.name + ".json")).unlink()
    again = prepare(config, str(workdir))
    assert again["splits"] == report["splits"]
    for path, mtime in finished.items():
        assert (path.stat().st_mtime_ns == mtime) == (path != middle), path


def test_train_prepares_missing_data_only_when_asked(tmp_path):
    from cm3jax.train.loop import ensure_prepared

    config = _shapes_config(train=40, validation=8, per_shard=20)
    config.data.source = f"prepared:{tmp_path / 'auto'}"
    ensure_prepared(config)  # prepare_if_missing defaults to False: nothing happens
    assert not (tmp_path / "auto").exists()
    config.data.prepare_if_missing = True
    ensure_prepared(config)
    report = json.loads((tmp_path / "auto" / "prepare_report.json").read_text())
    assert report["splits"]["train"]["records_written"] == 40


def test_prepare_with_a_trained_vqgan_writes_its_codes(tmp_path):
    from test_image_tokenizer import write_workdir

    from cm3jax.data import shapes
    from cm3jax.models.vqgan import VQGANConfig
    from cm3jax.tokenizers.image import VQGANTokenizer

    vqgan_dir = tmp_path / "vqgan"
    write_workdir(vqgan_dir, VQGANConfig(resolution=32, base_channels=8, channel_multipliers=(1, 2),
                                         num_res_blocks=1, attention=False, norm_groups=4, embed_dim=8,
                                         codebook_size=64, disc_channels=8, disc_layers=1))
    config = _shapes_config(train=24, validation=8, per_shard=12)
    config.prepare.image_tokenizer = f"vqgan:{vqgan_dir}"
    config.prepare.num_workers = 1
    config.vocab.image_codes = 64
    report = prepare(config, str(tmp_path / "prepared"))
    assert report["image_codes_per_image"] == 16 * 16
    documents = records.ArrayRecordDocuments(records.split_paths(str(tmp_path / "prepared"), "train"))
    tokenizer = VQGANTokenizer.load(str(vqgan_dir))
    source = shapes.ShapesSource(24, split="train", seed=config.seed)
    for i in (0, 23):
        np.testing.assert_array_equal(documents[i]["image"], tokenizer.encode(source[i]["image"]))

    config.vocab.image_codes = 16  # smaller than the VQGAN's codebook: refused, naming the field
    with pytest.raises(Exception, match="config.vocab.image_codes=16 is smaller"):
        prepare(config, str(tmp_path / "other"))
