"""Prepare: image-text sources -> token documents in ArrayRecord shards, plus a JSON report.

    python -m cm3jax.data.prepare --config=experiments/shapes_data.py --workdir=DIR

Writes into DIR:
  tokenizer.model            SentencePiece BPE (trained on the train split's captions, or reused)
  image_tokenizer.json       the image tokenizer ('palette' quantiser, or a trained VQGAN: 'vqgan:WORKDIR')
  vocab.json                 the unified vocab the shards are written in
  <split>-NNNNN-of-MMMMM.array_record   token documents (see cm3jax.data.records)
  prepare_report.json        records read / written / bad (with the first bad files), token counts, time

Shards are processed in parallel worker processes, each written atomically; re-running
the same command skips shards that are complete, so a killed prepare resumes. Records
that cannot be decoded are skipped and counted; past `config.data.max_bad_fraction` the
job stops and names the first bad files.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from typing import Iterator

import ml_collections

from cm3jax import vocab as vocab_lib
from cm3jax.data import records
from cm3jax.data.sources import open_source
from cm3jax.errors import UserError
from cm3jax.tokenizers.image import VQGANTokenizer, load_image_tokenizer
from cm3jax.tokenizers.palette import PaletteTokenizer
from cm3jax.tokenizers.text import TextTokenizer

BAD_EXAMPLES_KEPT = 10
VQGAN_PREFIX = "vqgan:"
ImageTokenizer = PaletteTokenizer | VQGANTokenizer
REPORT_DIR = ".shard_reports"


def image_tokenizer_from_config(prepare: ml_collections.ConfigDict) -> ImageTokenizer:
    """The image tokenizer `config.prepare.image_tokenizer` names: 'palette' or 'vqgan:WORKDIR'."""
    spec = prepare.image_tokenizer
    if spec.startswith(VQGAN_PREFIX):
        try:
            tokenizer = VQGANTokenizer.load(spec[len(VQGAN_PREFIX):])
        except UserError as e:
            raise UserError(f"config.prepare.image_tokenizer={spec!r}: {e}; train the VQGAN first, e.g. "
                            f"python -m cm3jax.train --config=experiments/shapes_vqgan.py "
                            f"--workdir={spec[len(VQGAN_PREFIX):]}") from e
        if tokenizer.resolution != prepare.resolution:
            raise UserError(f"config.prepare.resolution={prepare.resolution} but the VQGAN in "
                            f"{spec[len(VQGAN_PREFIX):]} takes {tokenizer.resolution}x{tokenizer.resolution} images")
        return tokenizer
    if spec != "palette":
        raise UserError(f"config.prepare.image_tokenizer={spec!r}: expected 'palette' or 'vqgan:WORKDIR'")
    if prepare.palette != "shapes":
        raise UserError(f"config.prepare.palette={prepare.palette!r}: known palettes: 'shapes'")
    from cm3jax.data import shapes

    return PaletteTokenizer([shapes.BACKGROUND, *shapes.COLORS.values()], prepare.resolution,
                            prepare.downsample)


def open_split(config: ml_collections.ConfigDict, split: str):
    p = config.prepare
    return open_source(
        p.sources[split], p.resolution, tfds_data_dir=p.tfds_data_dir or None,
        tfds_image_key=p.tfds_image_key, tfds_text_key=p.tfds_text_key,
        shapes_records=p.shapes_records[split], shapes_split=split, seed=config.seed,
    )


def _good_captions(source, limit: int) -> Iterator[str]:
    taken = 0
    for index in range(len(source)):
        if taken >= limit:
            return
        record = source[index]
        if "error" not in record:
            taken += 1
            yield record["text"]


def text_tokenizer(config: ml_collections.ConfigDict, workdir: str, vocab: vocab_lib.Vocab) -> TextTokenizer:
    """Loads DIR/tokenizer.model, or trains it on the train split's captions and saves it."""
    path = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(path):
        return TextTokenizer.load(path, vocab)
    tokenizer = TextTokenizer.train(
        _good_captions(open_split(config, "train"), config.prepare.tokenizer_records), vocab.text_size
    )
    tokenizer.save(path)
    return tokenizer


def _process_shard(task: dict) -> dict:
    """Worker: tokenizes records [start, stop) of one split into one shard; returns its stats."""
    config = ml_collections.ConfigDict(json.loads(task["config"]))
    source = open_split(config, task["split"])
    text = TextTokenizer(task["text_tokenizer"])
    image = load_image_tokenizer(task["image_tokenizer"])
    serialized, bad, text_tokens, image_tokens = [], [], 0, 0
    for index in range(task["start"], task["stop"]):
        record = source[index]
        if "error" in record:
            bad.append(record["error"])
            continue
        text_ids = text.encode(record["text"])
        codes = image.encode(record["image"])
        serialized.append(records.encode_record(record["id"], text_ids, codes))
        text_tokens += len(text_ids)
        image_tokens += codes.size
    records.write_shard(task["path"], serialized)
    stats = {"records_read": task["stop"] - task["start"], "records_written": len(serialized),
             "bad_records": len(bad), "bad_examples": bad[:BAD_EXAMPLES_KEPT],
             "text_tokens": text_tokens, "image_tokens": image_tokens}
    with open(task["report"], "w") as f:
        json.dump(stats, f)
    return stats


def _shard_tasks(config, workdir: str, split: str, text: TextTokenizer, image: ImageTokenizer) -> list[dict]:
    size = len(open_split(config, split))
    per_shard = config.prepare.records_per_shard
    count = max(1, math.ceil(size / per_shard))
    os.makedirs(os.path.join(workdir, REPORT_DIR), exist_ok=True)
    tasks = []
    for index in range(count):
        name = records.shard_name(split, index, count)
        tasks.append({
            "config": config.to_json(), "split": split, "start": index * per_shard,
            "stop": min(size, (index + 1) * per_shard), "path": os.path.join(workdir, name),
            "report": os.path.join(workdir, REPORT_DIR, name + ".json"),
            "text_tokenizer": text.model_proto, "image_tokenizer": image.to_json(),
        })
    return tasks


def _add(total: dict, stats: dict) -> None:
    for key, value in stats.items():
        if key == "bad_examples":
            total[key] = (total.get(key, []) + value)[:BAD_EXAMPLES_KEPT]
        else:
            total[key] = total.get(key, 0) + value


def _check_bad_fraction(split: str, totals: dict, max_fraction: float) -> None:
    read, bad = totals.get("records_read", 0), totals.get("bad_records", 0)
    if read and bad / read > max_fraction:
        raise UserError(
            f"{split}: {bad} of {read} records could not be read ({bad / read:.1%} > "
            f"config.data.max_bad_fraction={max_fraction}); first: " + "; ".join(totals["bad_examples"])
        )


def _check_vocab(workdir: str, vocab: vocab_lib.Vocab) -> None:
    path = os.path.join(workdir, "vocab.json")
    if os.path.exists(path):
        vocab.check_same(vocab_lib.Vocab.load(path), what=f"prepared data in {workdir}")
    else:
        vocab.save(path)


def _check_image_tokenizer(workdir: str, image: ImageTokenizer) -> None:
    """Writes image_tokenizer.json, or refuses to add shards made by another image tokenizer."""
    path = os.path.join(workdir, "image_tokenizer.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.loads(f.read()) != json.loads(image.to_json()):
                raise UserError(f"prepared data in {workdir} was tokenized with another image tokenizer "
                                f"(see {path}); prepare into a new --workdir or delete that one")
        return
    with open(path, "w") as f:
        f.write(image.to_json())


def prepare(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Prepares every split of `config.prepare.sources` into `workdir`; returns the report."""
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    vocab = vocab_lib.from_config(config.vocab)
    _check_vocab(workdir, vocab)
    text = text_tokenizer(config, workdir, vocab)
    image = image_tokenizer_from_config(config.prepare)
    if image.codebook_size > vocab.image_codes:
        raise UserError(f"config.vocab.image_codes={vocab.image_codes} is smaller than the image "
                        f"tokenizer's {image.codebook_size} codes")
    _check_image_tokenizer(workdir, image)

    report = {"splits": {}, "text_tokenizer_pieces": text.size,
              "image_codes_per_image": image.codes_per_image}
    context = multiprocessing.get_context("spawn")
    with context.Pool(config.prepare.num_workers) as pool:
        for split, spec in config.prepare.sources.items():
            if not spec:
                continue  # an empty spec leaves the split out
            tasks = _shard_tasks(config, workdir, split, text, image)
            totals: dict = {"shards": len(tasks)}
            todo = []
            for task in tasks:
                if os.path.exists(task["path"]) and os.path.exists(task["report"]):
                    with open(task["report"]) as f:
                        _add(totals, json.load(f))  # complete from an earlier run
                else:
                    todo.append(task)
            for stats in pool.imap_unordered(_process_shard, todo):
                _add(totals, stats)
                _check_bad_fraction(split, totals, config.data.max_bad_fraction)
            _check_bad_fraction(split, totals, config.data.max_bad_fraction)
            report["splits"][split] = totals
    report["wall_time_sec"] = time.perf_counter() - start
    tmp = os.path.join(workdir, "prepare_report.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "prepare_report.json"))
    return report


def prepare_and_report(config: ml_collections.ConfigDict, workdir: str) -> None:
    """`prepare`, then one summary line per split (and the first bad files) on stdout."""
    report = prepare(config, workdir)
    for split, totals in report["splits"].items():
        print(f"{split}: {totals['records_written']} of {totals['records_read']} records written, "
              f"{totals['bad_records']} bad, {totals['text_tokens']} text + {totals['image_tokens']} "
              f"image tokens, {totals['shards']} shards")
        for example in totals.get("bad_examples", []):
            print(f"  bad: {example}")
    print(f"prepared in {report['wall_time_sec']:.1f}s -> {workdir}")


if __name__ == "__main__":
    from cm3jax.cli import run_job

    run_job(prepare_and_report, "Experiment file naming the sources.",
            "the directory for the tokenizers, shards and report")
