"""The generation tasks: text-to-image, image-to-text, editing, visual question answering,
grounded (layout-to-image) generation, free interleaved generation.

`Generator` wraps a loaded LM (`sampling.model`), an optional served retrieval index
(`cm3jax.retrieval.Retriever`) and an optional re-ranking dual encoder. Each task builds
its prompts and guidance streams (`sampling.prompts`, whose conditional prompts are the
SFT formats of `cm3jax.data.tasks`), runs the KV-cache decoder and turns tokens back into
captions and pixels. Everything is batched: a list of prompts is one decoder call per
decoding method.

Text-to-image follows CM3leon: classifier-free guidance with `<mask:0>` as the
unconditional caption, candidates split between top-p sampling and contrastive decoding
(CD-K), re-ranked by the dual encoder's text-image similarity, best first.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from cm3jax import runs
from cm3jax.errors import UserError
from cm3jax.retrieval.encoder import RetrievalEncoder
from cm3jax.sampling import prompts as templates
from cm3jax.sampling.decode import SamplingConfig
from cm3jax.sampling.model import LoadedModel, load_model
from cm3jax.vocab import IMAGE, TEXT


@dataclasses.dataclass(frozen=True)
class ImageCandidate:
    """One generated image."""

    codes: np.ndarray  # [grid, grid] image codes
    pixels: np.ndarray  # [R, R, 3] uint8
    method: str  # "top_p" or "cd_k"
    score: float | None  # dual-encoder similarity to the prompt (None: no re-ranker)


@dataclasses.dataclass(frozen=True)
class Text2ImageResult:
    """Candidates for one prompt, best first."""

    prompt: str
    retrieved: list[str]  # captions of the retrieved documents prepended to the prompt
    candidates: list[ImageCandidate]


@dataclasses.dataclass(frozen=True)
class Segment:
    """A piece of freely generated output: text, or one image."""

    text: str | None = None
    image: np.ndarray | None = None  # [R, R, 3] uint8


@dataclasses.dataclass(frozen=True)
class TextToImageOptions:
    """Decoding choices of text-to-image (CM3leon's defaults)."""

    num_samples: int = 2
    guidance: float = 3.0  # classifier-free guidance scale of the top-p candidates
    top_p: float = 0.9
    temperature: float = 1.0
    contrastive_alpha: float = 0.1  # CD-K plausibility threshold
    contrastive_k: int = 5
    retrieve: int = 0  # documents retrieved from the index and prepended


class Generator:
    """Text-to-image, image-to-text, editing, VQA, grounded and free generation from one LM run."""

    def __init__(self, model: LoadedModel, retriever=None, reranker: RetrievalEncoder | None = None):
        self.model = model
        self.retriever = retriever
        self.reranker = reranker

    @classmethod
    def load(cls, workdir: str, index: str | None = None, reranker: str | None = None,
             step: int | None = None, tensor: int = 1) -> "Generator":
        """Loads the LM of `workdir`, the index `index` (default: the run's
        `config.retrieval.neighbours` when it exists) and the re-ranker (default: the index's
        encoder, else the run's `config.retrieval.encoder` when it exists; '' for none).

        Raises:
          UserError: a named index or re-ranker directory is missing or not loadable.
        """
        model = load_model(workdir, step, tensor)
        retrieval = model.config.get("retrieval", {})
        if index is None:  # the run's own index, when it is still there
            configured = retrieval.get("neighbours", "")
            index = configured if configured and os.path.isdir(configured) else ""
        retriever = None
        if index:
            from cm3jax.retrieval import Retriever  # lazy: the index stack is only needed with retrieval

            retriever = Retriever.load(index)
        if reranker is not None:
            encoder = RetrievalEncoder.load(reranker) if reranker else None
        elif retriever is not None:
            encoder = retriever.encoder
        else:  # the run's retrieval encoder, when it is still there
            configured = retrieval.get("encoder", "")
            encoder = RetrievalEncoder.load(configured) if configured and runs.checkpoint_steps(configured) else None
        return cls(model, retriever, encoder)

    # --- tasks ---------------------------------------------------------------------------------

    def text2image(self, texts: Sequence[str], options: TextToImageOptions = TextToImageOptions(),
                   seed: int = 0) -> list[Text2ImageResult]:
        """`options.num_samples` images per caption (half top-p with CFG, half CD-K), best first."""
        if options.num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {options.num_samples}")
        vocab = self.model.vocab
        retrieved = self._retrieve(options.retrieve, text=list(texts))
        streams = [templates.text2image(self._text_ids(t), vocab,
                                        [templates.retrieved_document(r.text_ids, r.image_codes, vocab, False)
                                         for r in docs])
                   for t, docs in zip(texts, retrieved)]
        image_tokens = self.model.image_tokens
        common = dict(max_new_tokens=image_tokens + 1, image_tokens=image_tokens, stop_at_image_end=True,
                      temperature=options.temperature)
        n_top_p = (options.num_samples + 1) // 2
        methods = [("top_p", n_top_p, SamplingConfig(top_p=options.top_p, guidance_scales=(options.guidance,),
                                                      **common)),
                   ("cd_k", options.num_samples - n_top_p,
                    SamplingConfig(contrastive_alpha=options.contrastive_alpha,
                                   contrastive_k=options.contrastive_k, **common))]
        per_prompt: list[list[tuple[np.ndarray, str]]] = [[] for _ in texts]
        for offset, (name, count, config) in enumerate(methods):
            if count == 0:
                continue
            rows = [(i, s) for i in range(len(texts)) for s in range(count)]
            decoded = self.model.decoder([[streams[i][k] for i, _ in rows] for k in range(2)], config,
                                         seed=seed + offset)
            for (i, _), row in zip(rows, decoded.tokens):
                per_prompt[i].append((row[:image_tokens], name))
        results = []
        for text, docs, samples in zip(texts, retrieved, per_prompt):
            codes = np.stack([self._codes(row) for row, _ in samples])
            pixels = self.model.image_tokenizer.decode(codes)
            scores = self._rerank(text, codes, pixels)
            candidates = [ImageCandidate(c, p, method, None if scores is None else float(scores[j]))
                          for j, (c, p, (_, method)) in enumerate(zip(codes, pixels, samples))]
            if scores is not None:
                candidates.sort(key=lambda c: -c.score)
            results.append(Text2ImageResult(text, [r.caption for r in docs], candidates))
        return results

    def image2text(self, images: np.ndarray, retrieve: int = 0, guidance: float = 1.0,
                   max_new_tokens: int = 48, seed: int = 0) -> list[str]:
        """A caption per uint8 image [N, R, R, 3] (greedy; CFG over the image when guidance != 1)."""
        vocab = self.model.vocab
        codes = self.model.image_tokenizer.encode(self._check_images(images))
        retrieved = self._retrieve(retrieve, image=images)
        streams = [templates.image2text(c, vocab, [templates.retrieved_document(r.text_ids, r.image_codes, vocab, True)
                                                  for r in docs])
                   for c, docs in zip(codes, retrieved)]
        return self._greedy_text(streams, _scales(guidance), max_new_tokens, seed)

    def vqa(self, images: np.ndarray, questions: Sequence[str], max_new_tokens: int = 16,
            seed: int = 0) -> list[str]:
        """A greedy answer (stripped text) per uint8 image [N, R, R, 3] and question, prompted
        with the SFT `vqa` template ('Question: q <break> image <break> Answer:')."""
        codes = self._paired_codes(images, questions, "questions")
        fmt = templates.sft_format("vqa", self.model.vocab, self.model.text_tokenizer.encode)
        streams = [templates.vqa(fmt, c, self._text_ids(q)) for c, q in zip(codes, questions)]
        return [answer.strip() for answer in self._greedy_text(streams, (), max_new_tokens, seed)]

    def edit(self, images: np.ndarray, instructions: Sequence[str], text_guidance: float = 3.0,
             image_guidance: float = 1.5, top_p: float = 0.9, seed: int = 0, greedy: bool = False) -> np.ndarray:
        """Edited uint8 images [N, R, R, 3]: text and image guidance (InstructPix2Pix-style; a scale
        of 1 drops its stream), top-p or `greedy` (argmax)."""
        codes = self._paired_codes(images, instructions, "edit instructions")
        streams = [templates.edit(c, self._text_ids(t), self.model.vocab) for c, t in zip(codes, instructions)]
        scales = _scales(text_guidance) if image_guidance == 1.0 else (text_guidance, image_guidance)
        return self._sample_images(streams, scales, top_p, seed, greedy)

    def grounded(self, layouts: Sequence[str], guidance: float = 3.0, top_p: float = 0.9,
                 seed: int = 0, greedy: bool = False) -> np.ndarray:
        """A uint8 image [N, R, R, 3] per grounded layout ('small red circle [2,2,7,7]; ...',
        `shapes.grounded_layout`): top-p or `greedy`, with CFG against `<mask:0>` unless guidance is 1."""
        streams = [templates.grounded(self._text_ids(layout), self.model.vocab) for layout in layouts]
        return self._sample_images(streams, _scales(guidance), top_p, seed, greedy)

    def generate(self, texts: Sequence[str], max_new_tokens: int = 300, top_p: float = 0.9,
                 seed: int = 0) -> list[list[Segment]]:
        """Free continuation of each prompt: text and whole images, until `<eos>`."""
        streams = [[self._text_ids(t) for t in texts]]
        config = SamplingConfig(max_new_tokens=max_new_tokens, top_p=top_p, image_tokens=self.model.image_tokens)
        decoded = self.model.decoder(streams, config, seed)
        return [self._segments(row) for row in decoded.rows()]

    # --- helpers -------------------------------------------------------------------------------

    def _retrieve(self, k: int, text=None, image=None) -> list[list]:
        count = len(text) if text is not None else len(image)
        if k <= 0:
            return [[] for _ in range(count)]
        if self.retriever is None:
            raise UserError("retrieval asked for (--retrieve) but no index is loaded: pass --index=BUILD_DIR "
                            "(a cm3jax.retrieval.build output) or train with config.retrieval.neighbours set")
        return self.retriever.search(text=text, image=image, k=k)

    def _greedy_text(self, streams: list[list[np.ndarray]], scales: tuple[float, ...], max_new_tokens: int,
                     seed: int) -> list[str]:
        """Greedy text after each prompt's guidance streams (`streams[b]`, fully conditioned first)."""
        config = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True, guidance_scales=scales,
                                image_tokens=self.model.image_tokens)
        decoded = self.model.decoder(_stream_major(streams, config.streams), config, seed)
        return [self._text(row) for row in decoded.rows()]

    def _sample_images(self, streams: list[list[np.ndarray]], scales: tuple[float, ...], top_p: float,
                       seed: int, greedy: bool = False) -> np.ndarray:
        """One top-p (or greedy) image (uint8 [N, R, R, 3]) after each prompt's guidance streams."""
        image_tokens = self.model.image_tokens
        config = SamplingConfig(max_new_tokens=image_tokens + 1, top_p=top_p, image_tokens=image_tokens,
                                stop_at_image_end=True, guidance_scales=scales, greedy=greedy)
        decoded = self.model.decoder(_stream_major(streams, config.streams), config, seed)
        return self.model.image_tokenizer.decode(np.stack([self._codes(row[:image_tokens]) for row in decoded.tokens]))

    def _paired_codes(self, images: np.ndarray, texts: Sequence[str], what: str) -> np.ndarray:
        """Image codes of `images`, checked to come one per text."""
        if len(texts) != len(images):
            raise UserError(f"{len(images)} images but {len(texts)} {what}")
        return self.model.image_tokenizer.encode(self._check_images(images))

    def _text_ids(self, text: str) -> np.ndarray:
        ids = self.model.text_tokenizer.encode(text)
        if len(ids) == 0:
            raise UserError("empty prompt: the text has no tokens")
        return ids

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        r = int(self.model.image_tokenizer.resolution)
        if images.ndim != 4 or images.shape[1:] != (r, r, 3) or images.dtype != np.uint8:
            raise UserError(f"images must be uint8 [N, {r}, {r}, 3] for this image tokenizer, "
                            f"got {images.dtype} {images.shape}")
        return images

    def _codes(self, image_ids: np.ndarray) -> np.ndarray:
        grid = int(self.model.image_tokenizer.grid)
        return (np.asarray(image_ids) - self.model.vocab.image_offset).reshape(grid, grid).astype(np.int32)

    def _text(self, ids: np.ndarray) -> str:
        ids = np.asarray(ids)
        return self.model.text_tokenizer.decode(ids[self.model.vocab.token_type(ids) == TEXT])

    def _segments(self, ids: np.ndarray) -> list[Segment]:
        """Splits generated ids into text runs and complete images (an unfinished image is dropped)."""
        vocab, segments, start = self.model.vocab, [], 0
        types = vocab.token_type(ids)
        breaks = list(np.flatnonzero(ids == vocab.break_id))
        while len(breaks) >= 2:
            open_, close = breaks[0], breaks[1]
            text = self._text(ids[start:open_])
            if text:
                segments.append(Segment(text=text))
            codes = ids[open_ + 1:close][types[open_ + 1:close] == IMAGE]
            if len(codes) == self.model.image_tokens:
                segments.append(Segment(image=self.model.image_tokenizer.decode(self._codes(codes)[None])[0]))
            start, breaks = close + 1, breaks[2:]
        tail = self._text(ids[start:breaks[0] if breaks else len(ids)])
        if tail:
            segments.append(Segment(text=tail))
        return segments

    def _rerank(self, text: str, codes: np.ndarray, pixels: np.ndarray) -> np.ndarray | None:
        """Cosine similarity of each candidate image to the caption under the dual encoder."""
        if self.reranker is None:
            return None
        images = codes if self.reranker.cfg.vision_input == "codes" else pixels
        text_embedding = self.reranker.embed_texts([self._text_ids(text)])[0]
        return self.reranker.embed_images(images) @ text_embedding


def _scales(guidance: float) -> tuple[float, ...]:
    """Guidance scales of one condition: none (one stream) when the scale is 1."""
    return () if guidance == 1.0 else (guidance,)


def _stream_major(streams: list[list[np.ndarray]], count: int) -> list[list[np.ndarray]]:
    """Per-prompt stream lists -> the decoder's `streams[s][b]`, keeping the first `count` streams."""
    return [[prompt_streams[k] for prompt_streams in streams] for k in range(count)]
