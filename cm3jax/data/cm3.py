"""The CM3 causal-masked objective (CM3leon flavour) on NumPy token arrays.

A document is `text <break> image <break> <eos>` (caption first, for text-to-image)
or `<break> image <break> text <eos>` (image first, for image-to-text); see
`make_document`. `cm3_transform` picks n ~ Clamp(Poisson(mask_rate), 1, max_spans)
spans, moves each out of the document, leaves the sentinel `<mask:i>` in its place and
appends `<mask:i> span_i` after the body. With doc = body + [<eos>]:

    doc     = a b c <break> I1 I2 I3 I4 <break> <eos>                 (len 10)
    spans   = [b]  and  [I2 I3]                                        (n = 2)
    tokens  = a <mask:0> c <break> I1 <mask:1> I4 <break> <mask:0> b <mask:1> I2 I3 <eos>
    weight  = 1    0     1    1     1    0     1    1        1     1    1     1  1    1
              |------ masked body (its <eos> dropped) -----| |-- tail, final <eos> ---|
    (len 14 = 10 + 2 * n)

Rules:
  * Spans live inside *regions* (`span_regions`): maximal runs of content tokens (text or
    image ids) of one modality. A span never contains or crosses `<break>`, `<eos>`,
    `<doc>` or `<pad>`, nor a text/image transition. Spans are non-empty, non-overlapping
    and non-adjacent (at least one kept token between two spans of a region), ordered by
    position; sentinel i is the i-th span from the left. Within a region holding k spans
    the 2k boundaries are drawn uniformly without replacement (so a region of length L
    holds at most (L+1)//2 spans); each span picks its region with probability
    proportional to the region's length among regions with room left.
  * `whole_image=True`: an image region holds at most one span, and that span is the
    whole region (exactly the codes between its two `<break>`s), so an image is either
    masked whole or untouched.
  * n is limited by what fits (total room of the regions) and by `vocab.num_masks`; a
    document without room (e.g. only `<eos>`) is returned unchanged, n = 0.
  * len(tokens) = len(doc) + 2 * n: span tokens are moved, not dropped, and each span adds
    two sentinels (its placeholder in the body and its header in the tail). The body's
    own `<eos>` is not kept: the output ends with exactly one `<eos>`.
  * loss_weight is aligned with tokens: weight[j] weights the prediction of tokens[j]
    from tokens[:j] (so a batch built with targets = tokens[1:] uses weight[1:]). It is 0
    exactly where tokens[j] is a placeholder sentinel in the masked body (the model cannot
    know where spans were cut; CM3 gives these predictions zero weight) and 1 elsewhere,
    including the tail sentinels, which the model must emit to start each infill.

`cm3_invert` undoes the transform exactly; `cm3_code_positions` gives every image code
its place in its image even after the transform moved it. `prepend_retrieved` builds the
retrieval-augmented sequence `r1 <doc> r2 <doc> ... query`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cm3jax.vocab import IMAGE, Vocab


@dataclasses.dataclass(frozen=True)
class CM3Options:
    """Knobs of the causal-masked transform.

    Attributes:
      mask_rate: Poisson mean of the number of spans (clamped to >= 1).
      max_spans: upper clamp on the number of spans (also clamped to vocab.num_masks).
      whole_image: an image region is masked as a whole or not at all.
      mask_probability: probability that a document gets the transform; else it stays causal.
    """

    mask_rate: float = 1.0
    max_spans: int = 16
    whole_image: bool = False
    mask_probability: float = 1.0

    def __post_init__(self):
        if not self.mask_rate >= 0:
            raise ValueError(f"CM3Options.mask_rate must be >= 0, got {self.mask_rate}")
        if self.max_spans < 1:
            raise ValueError(f"CM3Options.max_spans must be >= 1, got {self.max_spans}")
        if not 0.0 <= self.mask_probability <= 1.0:
            raise ValueError(
                f"CM3Options.mask_probability must be in [0, 1], got {self.mask_probability}"
            )


def _as_ids(x, vocab: Vocab, what: str) -> np.ndarray:
    """Validates a 1-D integer array of vocab ids and returns it as int32."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        a = a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must hold integer ids, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= vocab.size):
        raise ValueError(f"{what} has ids outside [0, {vocab.size})")
    return a.astype(np.int32)


def _first_mask(vocab: Vocab) -> int:
    return vocab.mask_id(0)


def make_document(text_ids, image_ids, vocab: Vocab, image_first: bool) -> np.ndarray:
    """Lays out one text/image pair as a document ending in `<eos>`.

    Caption first: `text <break> image <break> <eos>`; image first:
    `<break> image <break> text <eos>`. An empty part is left out (with its `<break>`s
    for the image). `image_ids` are vocab ids (`vocab.image_id(codes)`), not raw codes.
    Raises ValueError on ids of the wrong modality or when both parts are empty.
    """
    text = _as_ids(text_ids, vocab, "text_ids")
    image = _as_ids(image_ids, vocab, "image_ids")
    if text.size and text.max() >= vocab.image_offset:
        raise ValueError(f"text_ids must be < image_offset={vocab.image_offset}")
    if image.size and (image.min() < vocab.image_offset or image.max() >= vocab.special_offset):
        raise ValueError(
            f"image_ids must be in [{vocab.image_offset}, {vocab.special_offset}) "
            "(pass vocab.image_id(codes))"
        )
    if not text.size and not image.size:
        raise ValueError("a document needs text or an image; both are empty")
    brk = np.array([vocab.break_id], np.int32)
    img = np.concatenate([brk, image, brk]) if image.size else image
    parts = [img, text] if image_first else [text, img]
    return np.concatenate(parts + [np.array([vocab.eos_id], np.int32)]).astype(np.int32)


def span_regions(doc, vocab: Vocab) -> list[tuple[int, int]]:
    """Half-open (start, end) regions eligible for masking.

    A region is a maximal run of content tokens (text or image ids) of one modality, so no
    region contains a special token (`<break>`, `<eos>`, `<doc>`, `<pad>`, sentinels).
    """
    doc = _as_ids(doc, vocab, "doc")
    if doc.size == 0:
        return []
    kind = np.where(doc < vocab.image_offset, 0, np.where(doc < vocab.special_offset, 1, 2))
    starts = np.flatnonzero(np.diff(kind, prepend=-1))
    ends = np.append(starts[1:], len(doc))
    return [(int(s), int(e)) for s, e in zip(starts, ends) if kind[s] != 2]


def _is_image(doc: np.ndarray, region: tuple[int, int], vocab: Vocab) -> bool:
    return bool(doc[region[0]] >= vocab.image_offset)


def _sample_spans(doc: np.ndarray, vocab: Vocab, rng: np.random.Generator,
                  options: CM3Options) -> list[tuple[int, int]]:
    """Draws the sorted, non-overlapping spans described in the module docstring."""
    regions = span_regions(doc, vocab)
    whole = [options.whole_image and _is_image(doc, r, vocab) for r in regions]
    lengths = np.array([e - s for s, e in regions], np.float64)
    room = np.array([1 if w else (e - s + 1) // 2 for (s, e), w in zip(regions, whole)], np.int64)
    limit = min(options.max_spans, vocab.num_masks)
    n = min(max(int(rng.poisson(options.mask_rate)), 1), limit, int(room.sum()))
    counts = np.zeros(len(regions), np.int64)
    for _ in range(n):
        p = lengths * (counts < room)
        r = int(rng.choice(len(regions), p=p / p.sum()))
        counts[r] += 1
    spans = []
    for (start, end), w, k in zip(regions, whole, counts):
        if k == 0:
            continue
        if w:
            spans.append((start, end))
            continue
        cuts = np.sort(rng.choice(end - start + 1, size=2 * int(k), replace=False)) + start
        spans += [(int(cuts[2 * i]), int(cuts[2 * i + 1])) for i in range(int(k))]
    return sorted(spans)


def cm3_transform(doc, vocab: Vocab, rng: np.random.Generator,
                  options: CM3Options = CM3Options()) -> tuple[np.ndarray, np.ndarray]:
    """Applies the CM3 causal-masked transform to one document ending in `<eos>`.

    Returns (tokens int32, loss_weight float32), same length, laid out and weighted as in
    the module docstring. With probability 1 - mask_probability (one `rng.random()` draw,
    always made) or when nothing can be masked, returns the document unchanged with
    weight 1. Raises ValueError if the doc is malformed or already holds a sentinel.
    """
    doc = _as_ids(doc, vocab, "doc")
    if doc.size == 0 or doc[-1] != vocab.eos_id:
        raise ValueError("doc must be non-empty and end with <eos>")
    if (doc >= _first_mask(vocab)).any():
        raise ValueError("doc already contains <mask:i> sentinels; transform it only once")
    unchanged = (doc.copy(), np.ones(len(doc), np.float32))
    if rng.random() >= options.mask_probability:
        return unchanged
    spans = _sample_spans(doc, vocab, rng, options)
    if not spans:
        return unchanged
    body, tail, cursor = [], [], 0
    for i, (s, e) in enumerate(spans):
        sentinel = np.array([vocab.mask_id(i)], np.int32)
        body += [doc[cursor:s], sentinel]
        tail += [sentinel, doc[s:e]]
        cursor = e
    body.append(doc[cursor:-1])
    body_len = sum(len(b) for b in body)
    tokens = np.concatenate(body + tail + [doc[-1:]]).astype(np.int32)
    weight = np.ones(len(tokens), np.float32)
    weight[:body_len][tokens[:body_len] >= _first_mask(vocab)] = 0.0
    return tokens, weight


def _original_order(tokens: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Indices into `tokens` (a `cm3_transform` output) listing the original document in order.

    Raises ValueError if the sentinels are not `<mask:0..n-1>` twice in order (body then
    tail) or the sequence does not end with `<eos>`.
    """
    pos = np.flatnonzero(tokens >= _first_mask(vocab))
    if pos.size == 0:
        return np.arange(len(tokens))
    n = pos.size // 2
    idx = tokens[pos] - _first_mask(vocab)
    expected = np.concatenate([np.arange(n), np.arange(n)])
    if pos.size % 2 or not np.array_equal(idx, expected):
        raise ValueError(f"sentinels are not <mask:0..n-1> twice in order: {idx.tolist()}")
    if tokens[-1] != vocab.eos_id:
        raise ValueError("a transformed sequence must end with <eos>")
    bounds = list(pos[n:]) + [len(tokens) - 1]
    spans = [np.arange(bounds[i] + 1, bounds[i + 1]) for i in range(n)]
    if any(len(s) == 0 for s in spans):
        raise ValueError("a tail span is empty")
    out, cursor = [], 0
    for i in range(n):
        out += [np.arange(cursor, pos[i]), spans[i]]
        cursor = pos[i] + 1
    out += [np.arange(cursor, pos[n]), np.array([len(tokens) - 1])]
    return np.concatenate(out)


def cm3_invert(tokens, vocab: Vocab) -> np.ndarray:
    """Recovers the original document from `cm3_transform` output (identity if untransformed).

    Raises ValueError if the sentinels are not `<mask:0..n-1>` twice in order (body then
    tail) or the sequence does not end with `<eos>`.
    """
    tokens = _as_ids(tokens, vocab, "tokens")
    return tokens[_original_order(tokens, vocab)].astype(np.int32)


def image_code_positions(tokens, vocab: Vocab) -> np.ndarray:
    """1 + the index of each image code inside its image, 0 for every other token.

    For sequences in reading order (documents, prompts; any leading shape): an image is a
    run of consecutive codes, so the k-th code of a run gets k.
    """
    is_code = vocab.token_type(np.asarray(tokens)) == IMAGE
    count = np.cumsum(is_code, axis=-1)
    run_start = np.maximum.accumulate(np.where(is_code, 0, count), axis=-1)
    return np.where(is_code, count - run_start, 0).astype(np.int32)


def cm3_code_positions(tokens, vocab: Vocab) -> np.ndarray:
    """`image_code_positions` of the original document, laid out like `tokens`.

    `tokens` is a `cm3_transform` output (possibly after `prepend_retrieved`): a code moved
    into the tail keeps the position it had in its image; sentinels get 0.
    """
    tokens = _as_ids(tokens, vocab, "tokens")
    order = _original_order(tokens, vocab)
    positions = np.zeros(len(tokens), np.int32)
    positions[order] = image_code_positions(tokens[order], vocab)
    return positions


def prepend_retrieved(query_tokens, query_weight, retrieved: list[np.ndarray], vocab: Vocab,
                      retrieved_in_loss: bool) -> tuple[np.ndarray, np.ndarray]:
    """Builds `r1 <doc> r2 <doc> ... rk <doc> query` and its loss weight.

    Retrieved tokens and their `<doc>` separators get weight 1 if `retrieved_in_loss`
    (CM3leon) else 0; the query keeps `query_weight`. Retrieved docs must be non-empty and
    hold no `<doc>` or sentinel (they are not CM3-transformed). No retrieved docs returns a
    copy of the query.
    """
    query = _as_ids(query_tokens, vocab, "query_tokens")
    qw = np.asarray(query_weight, np.float32)
    if qw.shape != query.shape:
        raise ValueError(f"query_weight shape {qw.shape} != query_tokens shape {query.shape}")
    w_ret = 1.0 if retrieved_in_loss else 0.0
    toks, weights = [], []
    for k, r in enumerate(retrieved):
        r = _as_ids(r, vocab, f"retrieved[{k}]")
        if r.size == 0 or (r == vocab.doc_id).any() or (r >= _first_mask(vocab)).any():
            raise ValueError(f"retrieved[{k}] is empty or holds <doc> / <mask:i> tokens")
        toks += [r, np.array([vocab.doc_id], np.int32)]
        weights.append(np.full(len(r) + 1, w_ret, np.float32))
    tokens = np.concatenate(toks + [query]).astype(np.int32)
    return tokens, np.concatenate(weights + [qw]).astype(np.float32)
