"""DIR/report.md of a demo directory: the eval table (with the demo's targets) and the picture
grids each section wrote, linked relative to DIR."""

from __future__ import annotations

import os

# (section, key, label, target) rows of the table; target None: reported, no threshold.
ROWS = (
    ("vqgan", "psnr", "VQGAN reconstruction PSNR (dB)", ">= 28"),
    ("vqgan", "codebook_usage", "VQGAN codebook usage", None),
    ("vqgan", "oracle_agreement", "VQGAN: oracle reads the same scene back", None),
    ("retrieval", "recall_at_1", "retriever text->image recall@1", ">= 0.9"),
    ("text2image", "oracle_accuracy", "text->image oracle accuracy, single object (CFG, retrieval)", ">= 0.8"),
    ("text2image", "oracle_accuracy_no_cfg", "  the same without CFG", "< with CFG"),
    ("text2image", "oracle_accuracy_no_retrieval", "  the same without retrieval", None),
    ("text2image", "oracle_accuracy_multi", "text->image oracle accuracy, 2-3 objects", None),
    ("text2image", "heldout_oracle_accuracy", "text->image, colour/shape pairs never seen in training", None),
    ("image2text", "oracle_accuracy", "image->text oracle accuracy (caption parsed back)", ">= 0.9"),
    ("image2text", "cider", "image->text CIDEr-D", None),
    ("image2text", "heldout_oracle_accuracy", "image->text, held-out colour/shape pairs", None),
)


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(result: dict) -> list[str]:
    lines = ["| metric | value | demo target |", "|---|---|---|"]
    for section, key, label, target in ROWS:
        if key in result.get(section, {}):
            lines.append(f"| {label} (`{section}.{key}`) | {_value(result[section][key])} | {target or ''} |")
    fid = result.get("text2image", {}).get("fid")
    if fid:
        lines.append(f"| text->image FID over {fid['n_generated']} images, features `{fid['features']}` "
                     f"(`text2image.fid`) | {_value(fid['fid'])} | |")
    return lines


# (key, label, target) rows of the SFT table: each task before and after fine-tuning.
SFT_ROWS = (
    ("vqa_accuracy", "VQA accuracy (exact answer)", ">= 0.9"),
    ("edit_success", "edit success (oracle: the edited scene, nothing else changed)", ">= 0.8"),
    ("edit_ceiling", "  the image tokenizer's ceiling on those edits", None),
    ("edit_success_single", "  edits of single-object scenes", None),
    ("grounded_accuracy", "grounded generation (oracle: every object as the layout says)", ">= 0.8"),
    ("grounded_ceiling", "  the image tokenizer's ceiling on those layouts", None),
    ("grounded_accuracy_single", "  single-object layouts", None),
    ("caption_oracle_accuracy", "captioning oracle accuracy", ">= 0.9"),
    ("cider", "captioning CIDEr-D", None),
    ("heldout_vqa_accuracy", "VQA, held-out colour/shape pairs", None),
    ("heldout_edit_success", "edits, held-out colour/shape pairs", None),
    ("heldout_grounded_accuracy", "grounded, held-out colour/shape pairs", None),
    ("heldout_caption_oracle_accuracy", "captioning, held-out colour/shape pairs", None),
)


def _sft_table(sft: dict) -> list[str]:
    before, after = sft["before"], sft["after"]
    lines = ["## Supervised fine-tuning (`launch/demo.sh --sft`)", "",
             f"The LM (lm/, step {before['step']}) and its fine-tune (sft/, step {after['step']}) on "
             f"{after['n']} shapes scenes per set (`sft.before` / `sft.after` in eval.json; sft/eval/sft.png "
             "shows edits and grounded images).", "",
             "| task | before SFT | after SFT | target |", "|---|---|---|---|"]
    lines += [f"| {label} (`{key}`) | {_value(before[key])} | {_value(after[key])} | {target or ''} |"
              for key, label, target in SFT_ROWS if key in after]
    return lines + ["", "![SFT examples](sft/eval/sft.png)", ""]


def _grids(result: dict) -> list[str]:
    lines = []
    if "vqgan" in result:
        lines += ["## VQGAN reconstructions", "", "Validation scenes (top) over their reconstructions.", "",
                  "![reconstructions](vqgan/eval/reconstruction.png)", ""]
    t2i = result.get("text2image")
    if t2i:
        rows = "; ".join(f"row {i + 1}: {r}" for i, r in enumerate(t2i["grid"]["rows"]))
        prompts = "; ".join(f"{i + 1}. {p}" for i, p in enumerate(t2i["grid"]["prompts"]))
        lines += ["## Text -> image", "", f"Rows: {rows}.", "", f"Single-object prompts, left to right: {prompts}.",
                  "", "![text to image](lm/eval/text2image.png)", ""]
    i2t = result.get("image2text")
    if i2t:
        lines += ["## Image -> text", "", "![image to text](lm/eval/image2text.png)", "",
                  "| image | true caption | generated caption |", "|---|---|---|"]
        lines += [f"| {i + 1} | {e['truth']} | {e['generated']} |" for i, e in enumerate(i2t["examples"])]
        lines.append("")
    return lines


def write_report(root: str, result: dict) -> str:
    """Writes ROOT/report.md from the eval.json dict `result`; returns its path."""
    times = result.get("wall_time_seconds", {})
    lines = ["# cm3jax demo report", "", "Written by `python -m cm3jax.eval --workdir=" + root + " --task=all`; "
             "every figure is also in `eval.json`.", "", *_table(result), ""]
    if times:
        lines += ["## Wall time (seconds)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in times.items()] + [""]
    lines += _grids(result)
    if "sft" in result:
        lines += _sft_table(result["sft"])
    path = os.path.join(root, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
