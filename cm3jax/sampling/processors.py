"""Logits processors for sampling: pure, jittable functions on float32 logits [batch, vocab].

Warpers (temperature, top-k, top-p, repetition penalty) follow the semantics of the
Hugging Face `transformers` processors of the same names, so results can be compared token
for token. On top of those:

  * `guidance`: classifier-free guidance over any number of conditioning streams (one
    scale = plain CFG, two scales = InstructPix2Pix-style text + image guidance);
  * `contrastive_topk`: CM3leon's contrastive decoding TopK (CD-K);
  * `modality_state` / `constrain_modality` / `advance_modality`: a per-row state machine that
    keeps image regions (`<break> codes <break>`) exactly `image_tokens` codes long and keeps
    image codes out of text.

Excluded tokens get `NEG_INF`. Arguments documented as static must be Python values (they
are read at trace time); everything else may be traced.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from cm3jax.vocab import Vocab

NEG_INF = -jnp.inf


def temperature(logits: jax.Array, t: float) -> jax.Array:
    """Divides logits by the temperature `t` (static, > 0)."""
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {t}")
    return logits / t


def top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the tokens whose logit is >= the k-th largest (ties at the cutoff all survive).

    `k` is static; k <= 0 disables the filter and k >= vocab keeps every token.
    """
    if k <= 0:
        return logits
    kth = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p(logits: jax.Array, p: float, min_tokens_to_keep: int = 1) -> jax.Array:
    """Nucleus filtering: keeps the smallest top set whose probability exceeds `p` (HF semantics).

    As in HF `TopPLogitsWarper`, tokens are sorted by ascending logit and every token whose
    cumulative probability (from the bottom) is <= 1 - p is removed, except the
    `min_tokens_to_keep` most likely. Ties are ordered by a stable sort (lower id first).
    `p` and `min_tokens_to_keep` are static; p >= 1 disables the filter.
    """
    if p >= 1.0:
        return logits
    vocab_size = logits.shape[-1]
    order = jnp.argsort(logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    removable = jnp.arange(vocab_size) < vocab_size - min_tokens_to_keep
    remove_sorted = (cumulative <= 1 - p) & removable
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, logits)


def repetition_penalty(
    logits: jax.Array, history: jax.Array, history_mask: jax.Array, penalty: float
) -> jax.Array:
    """Penalises every token id seen in the unmasked history (HF `RepetitionPenaltyLogitsProcessor`).

    A seen token's logit is multiplied by `penalty` when negative and divided by it otherwise.
    history: int [batch, n]; history_mask: bool [batch, n] (False entries are ignored);
    `penalty` is static and > 0, and 1 disables the penalty.
    """
    if not penalty > 0:
        raise ValueError(f"repetition penalty must be > 0, got {penalty}")
    if penalty == 1:
        return logits
    rows = jnp.arange(logits.shape[0])[:, None]
    seen = jnp.zeros(logits.shape, bool).at[rows, history].max(history_mask, mode="drop")
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def guidance(stream_logits: jax.Array, scales: Sequence[float]) -> jax.Array:
    """Classifier-free guidance over n + 1 streams, in log-probability space.

    stream_logits: [n + 1, batch, vocab], from fully conditioned (0) to unconditioned (n);
    `scales`: n static floats. With lp = log_softmax(stream_logits) the result is
    lp[n] + sum_i scales[i] * (lp[i] - lp[i + 1]), evaluated as the equivalent weighted sum
    sum_i w_i * lp[i] over the streams with non-zero weight, so all scales 1 gives lp[0]
    exactly. A token that is -inf in any stream with non-zero weight stays -inf.
    """
    num_streams = stream_logits.shape[0]
    if len(scales) != num_streams - 1:
        raise ValueError(f"{num_streams} guidance streams need {num_streams - 1} scales, got {len(scales)}")
    scales = [float(s) for s in scales]
    weights = [a - b for a, b in zip(scales + [1.0], [0.0] + scales)]
    lp = jax.nn.log_softmax(stream_logits, axis=-1)
    used = [(w, lp[i]) for i, w in enumerate(weights) if w != 0]
    excluded = jnp.any(jnp.stack([jnp.isneginf(x) for _, x in used]), axis=0)
    total = sum(w * jnp.where(jnp.isneginf(x), 0.0, x) for w, x in used)
    return jnp.where(excluded, NEG_INF, total)


def contrastive_topk(
    cond_logits: jax.Array, uncond_logits: jax.Array, alpha: float | jax.Array, k: int
) -> jax.Array:
    """CM3leon contrastive decoding TopK (CD-K).

    The head V = {x : p_cond(x) >= alpha * (k-th largest p_cond), p_cond(x) > 0} always holds
    the argmax of p_cond; tokens in V score log p_cond(x) - log p_uncond(x), all others -inf.
    `alpha` in (0, 1] may be traced; `k` >= 1 is static (clamped to the vocab size).
    """
    if k < 1:
        raise ValueError(f"CD-K needs k >= 1, got {k}")
    if isinstance(alpha, (int, float)) and not 0 < alpha <= 1:
        raise ValueError(f"CD-K needs alpha in (0, 1], got {alpha}")
    cond_lp = jax.nn.log_softmax(cond_logits, axis=-1)
    uncond_lp = jax.nn.log_softmax(uncond_logits, axis=-1)
    kth = jax.lax.top_k(cond_lp, min(k, cond_lp.shape[-1]))[0][..., -1:]
    head = (cond_lp >= kth + jnp.log(alpha)) & (cond_lp > NEG_INF)
    return jnp.where(head, cond_lp - uncond_lp, NEG_INF)


class ModalityState(NamedTuple):
    """Per-row decoding state of the text / image state machine."""

    in_image: jax.Array  # bool [batch]: inside an image region (after an opening <break>)
    count: jax.Array  # int32 [batch]: image codes emitted since that <break>


def is_image_code(ids: jax.Array, vocab: Vocab) -> jax.Array:
    """True where `ids` are image codes."""
    return (ids >= vocab.image_offset) & (ids < vocab.special_offset)


def modality_state(prompt: jax.Array, prompt_mask: jax.Array, vocab: Vocab) -> ModalityState:
    """State after reading `prompt` (int [batch, p]); False entries of `prompt_mask` are ignored.

    A row is in an image region when its prompt holds an odd number of <break> tokens; its
    count is then the number of image codes after the last <break> (0 in a text region).
    """
    breaks = (prompt == vocab.break_id) & prompt_mask
    total = jnp.sum(breaks, axis=-1, dtype=jnp.int32)
    after_last_break = jnp.cumsum(breaks, axis=-1, dtype=jnp.int32) == total[:, None]
    codes = jnp.sum(is_image_code(prompt, vocab) & prompt_mask & after_last_break, axis=-1, dtype=jnp.int32)
    in_image = total % 2 == 1
    return ModalityState(in_image, jnp.where(in_image, codes, 0))


def constrain_modality(
    logits: jax.Array, state: ModalityState, vocab: Vocab, image_tokens: int
) -> jax.Array:
    """Masks the logits so each row continues its current modality correctly.

    In an image region with fewer than `image_tokens` (static) codes only image codes are
    allowed; once it has `image_tokens` codes only the closing <break> is. In a text region
    every id of the vocab but image codes and `<pad>` is allowed (text, an opening <break>,
    <eos>, sentinels); the rows that pad the model's embedding past `vocab.size` never are.
    """
    ids = jnp.arange(logits.shape[-1])
    image = is_image_code(ids, vocab)
    in_image = state.in_image[:, None]
    full = (state.count >= image_tokens)[:, None]
    text = ~image & (ids < vocab.size) & (ids != vocab.pad_id)
    allowed = jnp.where(in_image, jnp.where(full, ids == vocab.break_id, image), text)
    return jnp.where(allowed, logits, NEG_INF)


def advance_modality(state: ModalityState, tokens: jax.Array, vocab: Vocab) -> ModalityState:
    """State after emitting `tokens` [batch]: <break> toggles the region, an image code counts."""
    is_break = tokens == vocab.break_id
    count = jnp.where(is_break, 0, state.count + is_image_code(tokens, vocab).astype(jnp.int32))
    return ModalityState(state.in_image ^ is_break, count)
