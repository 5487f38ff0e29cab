"""Property tests of the CM3 causal-masked transform (cm3jax.data.cm3)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3jax.data.cm3 import (
    CM3Options,
    cm3_code_positions,
    cm3_invert,
    cm3_transform,
    image_code_positions,
    make_document,
    prepend_retrieved,
    span_regions,
)
from cm3jax.vocab import Vocab

VOCAB = Vocab(text_size=100, image_codes=64, num_masks=16)
MASK0 = VOCAB.mask_id(0)
SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def documents(draw):
    """A random caption/image document (either order, either part possibly empty)."""
    n_text = draw(st.integers(0, 24))
    n_image = draw(st.integers(0 if n_text else 1, 24))
    text = draw(st.lists(st.integers(0, VOCAB.text_size - 1), min_size=n_text, max_size=n_text))
    code = st.integers(0, VOCAB.image_codes - 1)
    codes = draw(st.lists(code, min_size=n_image, max_size=n_image))
    image_first = draw(st.booleans())
    return make_document(np.array(text, np.int64), VOCAB.image_id(np.array(codes, np.int64)),
                         VOCAB, image_first)


options_st = st.builds(
    CM3Options,
    mask_rate=st.sampled_from([0.0, 0.5, 1.0, 3.0, 20.0]),
    max_spans=st.integers(1, 20),
    whole_image=st.booleans(),
)


def decompose(tokens, doc):
    """Splits an output into (n, body length, original spans [(start, end)] in doc coordinates)."""
    pos = np.flatnonzero(tokens >= MASK0)
    n = len(pos) // 2
    if n == 0:
        return 0, len(tokens), []
    tail = list(pos[n:]) + [len(tokens) - 1]
    lengths = [tail[i + 1] - tail[i] - 1 for i in range(n)]
    starts = [int(pos[i]) + sum(lengths[:i]) - i for i in range(n)]
    return n, int(pos[n]), [(s, s + k) for s, k in zip(starts, lengths)]


@SETTINGS
@given(doc=documents(), options=options_st, seed=st.integers(0, 2**32 - 1))
def test_transform_properties(doc, options, seed):
    tokens, weight = cm3_transform(doc, VOCAB, np.random.default_rng(seed), options)
    assert tokens.dtype == np.int32 and weight.dtype == np.float32
    assert weight.shape == tokens.shape
    # Invertible.
    np.testing.assert_array_equal(cm3_invert(tokens, VOCAB), doc)
    n, body_len, spans = decompose(tokens, doc)
    # Lengths fit: every span adds its placeholder and its tail header.
    regions = span_regions(doc, VOCAB)
    assert len(tokens) == len(doc) + 2 * n
    assert n <= min(options.max_spans, VOCAB.num_masks)
    assert (n >= 1) == bool(regions)  # every doc with content gets at least one span
    # Sentinels: <mask:0..n-1> once in the body, once in the tail, in order; nothing else.
    sentinel_ids = tokens[tokens >= MASK0] - MASK0
    np.testing.assert_array_equal(sentinel_ids, np.concatenate([np.arange(n), np.arange(n)]))
    assert (tokens[:body_len] >= MASK0).sum() == n
    # Exactly one final <eos>, no other special token duplicated or lost.
    assert tokens[-1] == VOCAB.eos_id and (tokens == VOCAB.eos_id).sum() == 1
    assert (tokens == VOCAB.break_id).sum() == (doc == VOCAB.break_id).sum()
    # Spans: non-empty, ordered, non-overlapping, each inside one region (never across <break>).
    for i, (s, e) in enumerate(spans):
        assert s < e
        assert any(rs <= s and e <= re for rs, re in regions)
        if i:
            assert spans[i - 1][1] < s
    # Whole-image: each image region is masked exactly, or untouched.
    if options.whole_image:
        for rs, re in regions:
            if doc[rs] >= VOCAB.image_offset:
                hit = [sp for sp in spans if sp[0] < re and rs < sp[1]]
                assert hit in ([], [(rs, re)])
        br = np.flatnonzero(tokens[:body_len] == VOCAB.break_id)
        if len(br) == 2:
            between = tokens[br[0] + 1 : br[1]]
            n_codes = ((doc >= VOCAB.image_offset) & (doc < VOCAB.special_offset)).sum()
            assert len(between) == n_codes or (len(between) == 1 and between[0] >= MASK0)
    # Loss weight: 0 exactly at the body placeholders.
    expected = np.ones(len(tokens), np.float32)
    expected[np.flatnonzero(tokens >= MASK0)[:n]] = 0.0
    np.testing.assert_array_equal(weight, expected)


@SETTINGS
@given(doc=documents(), options=options_st, seed=st.integers(0, 2**32 - 1))
def test_deterministic_and_causal_when_not_masked(doc, options, seed):
    a = cm3_transform(doc, VOCAB, np.random.default_rng(seed), options)
    b = cm3_transform(doc, VOCAB, np.random.default_rng(seed), options)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    causal = dataclasses.replace(options, mask_probability=0.0)
    tokens, weight = cm3_transform(doc, VOCAB, np.random.default_rng(seed), causal)
    np.testing.assert_array_equal(tokens, doc)
    np.testing.assert_array_equal(weight, np.ones(len(doc), np.float32))
    np.testing.assert_array_equal(cm3_invert(doc, VOCAB), doc)


def test_example_layout():
    doc = make_document([1, 2, 3], VOCAB.image_id(np.arange(4)), VOCAB, image_first=False)
    b, e, m = VOCAB.break_id, VOCAB.eos_id, VOCAB.mask_id
    np.testing.assert_array_equal(doc, [1, 2, 3, b, 100, 101, 102, 103, b, e])
    assert span_regions(doc, VOCAB) == [(0, 3), (4, 8)]
    for seed in range(50):
        tokens, weight = cm3_transform(doc, VOCAB, np.random.default_rng(seed),
                                       CM3Options(whole_image=True))
        n, body_len, spans = decompose(tokens, doc)
        if spans == [(4, 8)]:  # the image was masked whole: text-to-image infilling
            np.testing.assert_array_equal(
                tokens, [1, 2, 3, b, m(0), b, m(0), 100, 101, 102, 103, e])
            np.testing.assert_array_equal(weight, [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1])
            return
    pytest.fail("the image was never masked in 50 seeds")


def test_make_document_layouts_and_validation():
    img = VOCAB.image_id(np.array([5, 6]))
    b, e = VOCAB.break_id, VOCAB.eos_id
    np.testing.assert_array_equal(make_document([7], img, VOCAB, True), [b, 105, 106, b, 7, e])
    np.testing.assert_array_equal(make_document([], img, VOCAB, False), [b, 105, 106, b, e])
    np.testing.assert_array_equal(make_document([7, 8], [], VOCAB, True), [7, 8, e])
    with pytest.raises(ValueError):
        make_document([100], img, VOCAB, False)  # an image id as text
    with pytest.raises(ValueError):
        make_document([1], np.array([5]), VOCAB, False)  # raw codes, not offset
    with pytest.raises(ValueError):
        make_document([], [], VOCAB, False)
    with pytest.raises(ValueError):
        make_document([1.5], img, VOCAB, False)


def test_transform_rejects_bad_input():
    rng = np.random.default_rng(0)
    doc = make_document([1, 2, 3], [], VOCAB, False)
    with pytest.raises(ValueError, match="sentinel"):
        cm3_transform(np.concatenate([[MASK0], doc]), VOCAB, rng)
    with pytest.raises(ValueError, match="<eos>"):
        cm3_transform(doc[:-1], VOCAB, rng)
    with pytest.raises(ValueError):
        cm3_transform(np.array([VOCAB.size, VOCAB.eos_id]), VOCAB, rng)
    with pytest.raises(ValueError):
        CM3Options(mask_probability=1.5)
    with pytest.raises(ValueError):
        CM3Options(max_spans=0)


def test_invert_rejects_unpaired_sentinels():
    m, e = VOCAB.mask_id, VOCAB.eos_id
    for bad in ([1, m(0), 2, e], [1, m(0), m(0), 2, m(1), e], [m(0), 1, m(0), 2]):
        with pytest.raises(ValueError):
            cm3_invert(np.array(bad), VOCAB)


def test_spans_limited_by_what_fits():
    doc = make_document([1], VOCAB.image_id(np.arange(3)), VOCAB, False)
    for seed in range(20):
        tokens, _ = cm3_transform(doc, VOCAB, np.random.default_rng(seed),
                                  CM3Options(mask_rate=50.0, whole_image=True))
        assert (tokens >= MASK0).sum() == 4  # one span in the text, the image whole
        np.testing.assert_array_equal(cm3_invert(tokens, VOCAB), doc)
    only_eos = np.array([VOCAB.eos_id], np.int32)
    tokens, weight = cm3_transform(only_eos, VOCAB, np.random.default_rng(0))
    np.testing.assert_array_equal(tokens, only_eos)


def test_span_count_follows_clamped_poisson():
    doc = make_document(np.arange(60), VOCAB.image_id(np.arange(60)), VOCAB, False)
    rng = np.random.default_rng(0)
    counts = [(cm3_transform(doc, VOCAB, rng)[0] >= MASK0).sum() // 2 for _ in range(3000)]
    # E[clamp(Poisson(1), 1, 16)] = 1 + P(0) = 1 + 1/e.
    assert abs(np.mean(counts) - (1 + np.exp(-1))) < 0.05
    assert min(counts) == 1


def test_mask_probability_mixes_causal_and_masked():
    doc = make_document(np.arange(10), [], VOCAB, False)
    rng = np.random.default_rng(0)
    opts = CM3Options(mask_probability=0.3)
    masked = [len(cm3_transform(doc, VOCAB, rng, opts)[0]) > len(doc) for _ in range(2000)]
    assert abs(np.mean(masked) - 0.3) < 0.05


@settings(max_examples=50, deadline=None)
@given(k=st.integers(0, 3), in_loss=st.booleans(), seed=st.integers(0, 1000))
def test_prepend_retrieved_layout_and_weights(k, in_loss, seed):
    rng = np.random.default_rng(seed)
    retrieved = [make_document(rng.integers(0, 100, 3), VOCAB.image_id(rng.integers(0, 64, 2)),
                               VOCAB, False) for _ in range(k)]
    query, qw = cm3_transform(make_document([1, 2, 3], VOCAB.image_id(np.arange(4)), VOCAB, True),
                              VOCAB, rng)
    tokens, weight = prepend_retrieved(query, qw, retrieved, VOCAB, in_loss)
    expected = np.concatenate([np.concatenate([r, [VOCAB.doc_id]]) for r in retrieved] + [query])
    np.testing.assert_array_equal(tokens, expected)
    n_ret = len(tokens) - len(query)
    assert (tokens[:n_ret] == VOCAB.doc_id).sum() == k
    np.testing.assert_array_equal(weight[:n_ret], np.full(n_ret, float(in_loss)))
    np.testing.assert_array_equal(weight[n_ret:], qw)
    assert tokens.dtype == np.int32 and weight.dtype == np.float32


def test_prepend_retrieved_validation():
    q = np.array([1, VOCAB.eos_id])
    with pytest.raises(ValueError):
        prepend_retrieved(q, np.ones(3), [], VOCAB, True)
    with pytest.raises(ValueError):
        prepend_retrieved(q, np.ones(2), [np.array([1, VOCAB.doc_id])], VOCAB, True)
    with pytest.raises(ValueError):
        prepend_retrieved(q, np.ones(2), [np.array([MASK0, 1])], VOCAB, True)


def test_image_code_positions_count_codes_inside_each_image():
    doc = make_document([5, 6], VOCAB.image_id(np.array([3, 3, 9])), VOCAB, image_first=False)
    np.testing.assert_array_equal(image_code_positions(doc, VOCAB), [0, 0, 0, 1, 2, 3, 0, 0])
    two = np.stack([doc, doc[::-1]])  # any leading shape; each row on its own
    np.testing.assert_array_equal(image_code_positions(two, VOCAB)[1], [0, 0, 1, 2, 3, 0, 0, 0])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), image_first=st.booleans(), n_codes=st.integers(1, 40))
def test_cm3_code_positions_follow_codes_moved_into_the_tail(seed, image_first, n_codes):
    """Codes with distinct ids: after the transform (and retrieved docs in front), every code
    still carries 1 + its index in the original image, everything else 0."""
    doc = make_document([1, 2, 3], VOCAB.image_id(np.arange(n_codes)), VOCAB, image_first)
    tokens, weights = cm3_transform(doc, VOCAB, np.random.default_rng(seed),
                                    CM3Options(mask_rate=3.0, max_spans=8))
    retrieved = make_document([7], VOCAB.image_id(np.arange(5)), VOCAB, image_first=False)[:-1]
    tokens, _ = prepend_retrieved(tokens, weights, [retrieved], VOCAB, retrieved_in_loss=True)
    positions = cm3_code_positions(tokens, VOCAB)
    is_code = (tokens >= VOCAB.image_offset) & (tokens < VOCAB.special_offset)
    np.testing.assert_array_equal(positions[~is_code], 0)
    np.testing.assert_array_equal(positions[:5 + 2][is_code[:7]], np.arange(1, 6))  # the retrieved image
    query_codes = tokens[len(retrieved) + 1:][is_code[len(retrieved) + 1:]]
    np.testing.assert_array_equal(positions[len(retrieved) + 1:][is_code[len(retrieved) + 1:]],
                                  query_codes - VOCAB.image_offset + 1)
