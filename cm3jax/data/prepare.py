"""Prepare: image-text sources -> token documents in ArrayRecord shards, plus a JSON report.

    python -m cm3jax.data.prepare --config=experiments/shapes_data.py --workdir=DIR

Writes into DIR:
  tokenizer.model            SentencePiece BPE (trained on the train split's captions, or reused)
  image_tokenizer.json       the image tokenizer ('palette' quantiser, or a trained VQGAN: 'vqgan:WORKDIR')
  vocab.json                 the unified vocab the shards are written in
  <split>-NNNNN-of-MMMMM.array_record   token documents (see cm3jax.data.records)
  prepare_report.json        records read / written / bad (with the first bad files), token counts, time

Fine-tuning data (`config.sft.mixture` non-empty): every task of the mixture is prepared
from `config.sft.sources[task]` (cm3jax/data/sft_sources.py) into DIR/<task>/<split>-*.array_record,
one example per record (its parts: text ids and image codes by field name; the template is
applied when training reads them); the report has a section per task. With `config.init_from=LM_DIR` (any prepare) the text tokenizer, image tokenizer and
vocab are the ones that model was trained with, copied from LM_DIR, so the data fits it.

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
from cm3jax.data.sft_sources import open_sft_source
from cm3jax.data.sources import open_source
from cm3jax.errors import UserError
from cm3jax.tokenizers.image import VQGANTokenizer, load_image_tokenizer
from cm3jax.tokenizers.palette import PaletteTokenizer
from cm3jax.tokenizers.text import TEXT_TOKENIZER_FILES, TextTokenizer, load_text_tokenizer

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


def open_sft_split(config: ml_collections.ConfigDict, task: str, split: str):
    """The source of fine-tuning task `task`'s `split` (`config.sft.sources[task]`)."""
    p = config.prepare
    if task not in config.sft.sources:
        raise UserError(f"config.sft.sources has no entry for task {task!r} of config.sft.mixture "
                        "('shapes' or 'jsonl:DIR')")
    records = config.sft.shapes_records.get(task, p.shapes_records)[split]
    return open_sft_source(task, config.sft.sources[task], split, p.resolution, records, config.seed)


def _good_captions(source, limit: int) -> Iterator[str]:
    taken = 0
    for index in range(len(source)):
        if taken >= limit:
            return
        record = source[index]
        if "error" not in record:
            taken += 1
            yield record["text"]


def _copy_text_tokenizer(source_dir: str, workdir: str) -> None:
    """Copies the text tokenizer files of the run `source_dir` into `workdir` (refusing to replace others)."""
    found = [name for name in TEXT_TOKENIZER_FILES if os.path.isfile(os.path.join(source_dir, name))]
    if not found:
        raise UserError(f"config.init_from={source_dir}: no text tokenizer there "
                        f"(expected {' or '.join(TEXT_TOKENIZER_FILES[:2])})")
    for name in found:
        with open(os.path.join(source_dir, name), "rb") as f:
            data = f.read()
        target = os.path.join(workdir, name)
        if os.path.exists(target):
            with open(target, "rb") as f:
                if f.read() != data:
                    raise UserError(f"{target} differs from config.init_from's {name}: prepare into a new --workdir")
            continue
        with open(f"{target}.tmp", "wb") as f:
            f.write(data)
        os.replace(f"{target}.tmp", target)


def text_tokenizer(config: ml_collections.ConfigDict, workdir: str, vocab: vocab_lib.Vocab):
    """The text tokenizer of `config.init_from` (copied into DIR), else DIR/tokenizer.model, else
    one trained on the train split's captions and saved there."""
    if config.init_from:
        _copy_text_tokenizer(config.init_from, workdir)
        return load_text_tokenizer(workdir, vocab)
    path = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(path):
        return TextTokenizer.load(path, vocab)
    tokenizer = TextTokenizer.train(
        _good_captions(open_split(config, "train"), config.prepare.tokenizer_records), vocab.text_size
    )
    tokenizer.save(path)
    return tokenizer


def _encode_document(record: dict, text, image) -> tuple[bytes, int, int]:
    """An image-caption record -> (serialised token document, text tokens, image tokens)."""
    text_ids, codes = text.encode(record["text"]), image.encode(record["image"])
    return records.encode_record(record["id"], text_ids, codes), len(text_ids), codes.size


def _encode_example(record: dict, text, image) -> tuple[bytes, int, int]:
    """A fine-tuning record -> (serialised example, text tokens, image tokens)."""
    parts = {name: text.encode(part) if isinstance(part, str) else image.encode(part)
             for name, part in record["parts"].items()}
    text_tokens = sum(parts[name].size for name, part in record["parts"].items() if isinstance(part, str))
    image_tokens = sum(part.size for part in parts.values()) - text_tokens
    return records.encode_sft_record(record["id"], record["task"], parts), text_tokens, image_tokens


def _process_shard(task: dict) -> dict:
    """Worker: tokenizes records [start, stop) of one split (of one fine-tuning task) into one shard."""
    config = ml_collections.ConfigDict(json.loads(task["config"]))
    vocab = vocab_lib.from_config(config.vocab)
    text = load_text_tokenizer(task["workdir"], vocab)
    image = load_image_tokenizer(task["image_tokenizer"])
    if task["sft_task"]:
        source, encode = open_sft_split(config, task["sft_task"], task["split"]), _encode_example
    else:
        source, encode = open_split(config, task["split"]), _encode_document
    serialized, bad, text_tokens, image_tokens = [], [], 0, 0
    for index in range(task["start"], task["stop"]):
        record = source[index]
        if "error" in record:
            bad.append(record["error"])
            continue
        data, n_text, n_image = encode(record, text, image)
        serialized.append(data)
        text_tokens += n_text
        image_tokens += n_image
    records.write_shard(task["path"], serialized)
    stats = {"records_read": task["stop"] - task["start"], "records_written": len(serialized),
             "bad_records": len(bad), "bad_examples": bad[:BAD_EXAMPLES_KEPT],
             "text_tokens": text_tokens, "image_tokens": image_tokens}
    with open(task["report"], "w") as f:
        json.dump(stats, f)
    return stats


def _shard_tasks(config, workdir: str, split: str, image: ImageTokenizer, sft_task: str = "") -> list[dict]:
    """One worker task per shard of `split` (of fine-tuning task `sft_task`, into DIR/<sft_task>/)."""
    source = open_sft_split(config, sft_task, split) if sft_task else open_split(config, split)
    per_shard = config.prepare.records_per_shard
    count = max(1, math.ceil(len(source) / per_shard))
    directory, reports = os.path.join(workdir, sft_task), os.path.join(workdir, REPORT_DIR, sft_task)
    os.makedirs(directory, exist_ok=True)
    os.makedirs(reports, exist_ok=True)
    tasks = []
    for index in range(count):
        name = records.shard_name(split, index, count)
        tasks.append({
            "config": config.to_json(), "split": split, "sft_task": sft_task, "start": index * per_shard,
            "stop": min(len(source), (index + 1) * per_shard), "path": os.path.join(directory, name),
            "report": os.path.join(reports, name + ".json"), "workdir": workdir,
            "image_tokenizer": image.to_json(),
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


def _image_tokenizer(config: ml_collections.ConfigDict) -> ImageTokenizer:
    """`config.init_from`'s image tokenizer, else the one `config.prepare` names."""
    if not config.init_from:
        return image_tokenizer_from_config(config.prepare)
    tokenizer = load_image_tokenizer(config.init_from)
    if tokenizer.resolution != config.prepare.resolution:
        raise UserError(f"config.prepare.resolution={config.prepare.resolution} but the image tokenizer of "
                        f"config.init_from={config.init_from} takes {tokenizer.resolution}x{tokenizer.resolution} images")
    return tokenizer


def _units(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(fine-tuning task or '', split) pairs to prepare, in order."""
    if config.sft.mixture:
        return [(task, split) for task in config.sft.mixture for split in ("train", "validation")]
    return [("", split) for split, spec in config.prepare.sources.items() if spec]  # '' spec: split left out


def prepare(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Prepares every split of `config.prepare.sources` (or every task of `config.sft.mixture`) into
    `workdir`; returns the report."""
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    vocab = vocab_lib.from_config(config.vocab)
    if config.init_from:
        tuned = os.path.join(config.init_from, "vocab.json")
        if not os.path.isfile(tuned):
            raise UserError(f"config.init_from={config.init_from}: no vocab.json there; it must be the LM workdir "
                            "whose tokenizers this data is prepared with")
        vocab.check_same(vocab_lib.Vocab.load(tuned), what=f"config.init_from={config.init_from}")
    _check_vocab(workdir, vocab)
    text = text_tokenizer(config, workdir, vocab)
    image = _image_tokenizer(config)
    if image.codebook_size > vocab.image_codes:
        raise UserError(f"config.vocab.image_codes={vocab.image_codes} is smaller than the image "
                        f"tokenizer's {image.codebook_size} codes")
    _check_image_tokenizer(workdir, image)

    report = {"splits": {}, "tasks": {}, "text_tokenizer_pieces": text.size,
              "image_codes_per_image": image.codes_per_image}
    context = multiprocessing.get_context("spawn")
    with context.Pool(config.prepare.num_workers) as pool:
        for sft_task, split in _units(config):
            name = f"{sft_task}/{split}" if sft_task else split
            tasks = _shard_tasks(config, workdir, split, image, sft_task)
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
                _check_bad_fraction(name, totals, config.data.max_bad_fraction)
            _check_bad_fraction(name, totals, config.data.max_bad_fraction)
            if sft_task:
                report["tasks"].setdefault(sft_task, {})[split] = totals
            else:
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
    sections = list(report["splits"].items()) + [(f"{task}/{split}", totals) for task, splits in
                                                  report["tasks"].items() for split, totals in splits.items()]
    for split, totals in sections:
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
