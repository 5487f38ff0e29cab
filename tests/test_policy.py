"""Retrieval policy: JAX greedy choice vs a pure-Python loop, each rule by hand, dropout, config."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cm3jax.errors import ConfigError
from cm3jax.retrieval.policy import (
    RetrievalPolicy,
    base_retrieval_config,
    candidate_mask,
    drop_query_tokens,
    greedy_diverse,
    select_neighbours,
)

DEFAULT = RetrievalPolicy.from_config(base_retrieval_config())


def policy(**changes) -> RetrievalPolicy:
    return dataclasses.replace(DEFAULT, **changes)


def reference(query_ids, scores, ids, embeddings, has_image, has_text, policy):
    """The policy as a plain loop: greedy in column (score) order, stop at k."""
    out_ids = np.full((len(ids), policy.k), -1, np.int64)
    out_scores = np.full((len(ids), policy.k), -np.inf, np.float32)
    for q in range(len(ids)):
        chosen = []
        for c in range(ids.shape[1]):
            if len(chosen) == policy.k:
                break
            if ids[q, c] < 0 or scores[q, c] == -np.inf or ids[q, c] == query_ids[q]:
                continue
            if (policy.require_image and not has_image[q, c]) or (
                policy.require_text and not has_text[q, c]
            ):
                continue
            if scores[q, c] > policy.near_duplicate:
                continue
            if any(embeddings[q, c] @ embeddings[q, j] > policy.diversity for j in chosen):
                continue
            chosen.append(c)
        out_ids[q, : len(chosen)] = ids[q, chosen]
        out_scores[q, : len(chosen)] = scores[q, chosen]
    return out_ids, out_scores


def random_rows(rng: np.random.Generator, rows: int, width: int, dim: int = 4):
    """Candidate rows on a dyadic grid, so scores, inner products and thresholds tie exactly.

    Embedding entries are multiples of 1/4 in [-1/2, 1/2] (inner products: multiples of 1/16
    in [-1, 1]); scores are multiples of 1/16. Ids come from a small range, so the query's
    own id and repeated ids are common; a random tail of each row is padding, and some rows
    are all padding or all the query itself.
    """
    scores = -np.sort(-rng.integers(-16, 17, (rows, width)) / 16, axis=1).astype(np.float32)
    ids = rng.integers(0, 12, (rows, width)).astype(np.int64)
    query_ids = rng.integers(0, 12, rows).astype(np.int64)
    valid = np.arange(width) < rng.integers(0, width + 1, (rows, 1))
    ids[~valid], scores[~valid] = -1, -np.inf
    ids[::17] = np.where(valid[::17], query_ids[::17, None], -1)
    embeddings = (rng.integers(-2, 3, (rows, width, dim)) / 4).astype(np.float32)
    has_image, has_text = rng.random((2, rows, width)) < 0.8
    return query_ids, scores, ids, embeddings, has_image, has_text


@pytest.mark.parametrize(
    "changes",
    [
        dict(k=2),
        dict(k=1, near_duplicate=0.5, diversity=0.25),
        dict(k=3, near_duplicate=0.75, diversity=0.5, require_image=False),
        dict(k=5, candidates=32, near_duplicate=1.0, diversity=0.125, require_text=False),
        dict(k=2, near_duplicate=1.0, diversity=1.0, require_image=False, require_text=False),
        dict(k=14, candidates=32, diversity=0.5),  # k > C: the tail is always padding
    ],
)
def test_matches_reference_on_random_rows(changes):
    rng = np.random.default_rng(len(str(changes)))
    inputs = random_rows(rng, rows=600, width=12)
    p = policy(**changes)
    ids, scores = select_neighbours(*inputs, p)
    want_ids, want_scores = reference(*inputs, p)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    assert ids.shape == scores.shape == (600, p.k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores)
    assert (ids[:, 0] == -1).any() and (ids[:, 0] >= 0).any()  # some rows empty, some not


def test_matches_reference_on_unit_embeddings():
    """Real-valued unit vectors around a few centres, scores from a query near them."""
    rng = np.random.default_rng(0)
    rows, width, dim = 256, 16, 32

    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    centres = rng.standard_normal((rows, 1, dim))
    embeddings = unit(centres + 0.35 * rng.standard_normal((rows, width, dim)))
    queries = unit(centres[:, 0] + 0.35 * rng.standard_normal((rows, dim)))  # scores ~0.83-0.93
    scores = np.einsum("qd,qcd->qc", queries, embeddings)
    order = np.argsort(-scores, axis=1, kind="stable")
    scores = np.take_along_axis(scores, order, 1)
    embeddings = np.take_along_axis(embeddings, order[..., None], 1)
    ids = rng.permutation(rows * width).reshape(rows, width).astype(np.int64)
    ones = np.ones((rows, width), bool)
    inputs = (np.full(rows, -1, np.int64), scores, ids, embeddings, ones, ones)
    p = policy(k=3, diversity=0.92)
    got, want = select_neighbours(*inputs, p), reference(*inputs, p)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # Both thresholds bite here: some top candidates are near-duplicates, some are skipped
    # as too close to a chosen one.
    assert (scores[:, 0] > 0.9).any() and (got[0][:, 2] >= 0).any()
    plain = select_neighbours(*inputs, policy(k=3, diversity=1.0))[0]
    assert (plain != got[0]).any()


def test_runs_batched_on_a_mesh():
    """The same choice with the query axis sharded over the 8 fake devices."""
    inputs = random_rows(np.random.default_rng(1), 64, 12)
    query_ids, scores, ids, embeddings, has_image, has_text = inputs
    p = policy(k=3, diversity=0.5)
    eligible = candidate_mask(query_ids, scores, ids, has_image, has_text, p)
    mesh = Mesh(np.array(jax.devices()), ("q",))
    rows = NamedSharding(mesh, PartitionSpec("q"))
    columns = greedy_diverse(
        jax.device_put(eligible, rows), jax.device_put(embeddings, rows), p.diversity, k=p.k
    )
    assert columns.sharding.is_equivalent_to(rows, 2)
    columns = np.asarray(columns)
    got_ids = np.where(columns >= 0, np.take_along_axis(ids, np.maximum(columns, 0), 1), -1)
    want_ids, _ = reference(*inputs, p)
    np.testing.assert_array_equal(got_ids, want_ids)


def test_candidate_mask_takes_jax_arrays():
    inputs = random_rows(np.random.default_rng(2), 32, 8)
    want = candidate_mask(*inputs[:3], *inputs[4:], DEFAULT)
    got = candidate_mask(*map(jnp.asarray, inputs[:3]), *map(jnp.asarray, inputs[4:]), DEFAULT)
    np.testing.assert_array_equal(np.asarray(got), want)


def orthogonal(scores, ids, query_id=100, has_image=None, has_text=None):
    """One query whose candidates are mutually orthogonal (diversity never applies)."""
    width = len(scores)
    image = np.ones(width, bool) if has_image is None else np.array(has_image)
    text = np.ones(width, bool) if has_text is None else np.array(has_text)
    return (
        np.array([query_id]),
        np.array([scores], np.float32),
        np.array([ids], np.int64),
        np.eye(width, dtype=np.float32)[None],
        image[None],
        text[None],
    )


def test_near_duplicates_of_the_query_are_skipped():
    inputs = orthogonal([0.95, 0.9, 0.85, 0.5], [1, 2, 3, 4])
    ids, scores = select_neighbours(*inputs, DEFAULT)
    np.testing.assert_array_equal(ids, [[2, 3]])  # 0.95 > 0.9 skipped; 0.9 itself is kept
    np.testing.assert_array_equal(scores, np.array([[0.9, 0.85]], np.float32))
    ids, _ = select_neighbours(*inputs, policy(near_duplicate=1.0))
    np.testing.assert_array_equal(ids, [[1, 2]])


def test_candidates_close_to_a_chosen_one_are_skipped():
    a, b, c = [1.0, 0.0, 0.0], [0.96, 0.28, 0.0], [0.0, 0.0, 1.0]  # a.b = 0.96, c orthogonal
    inputs = list(orthogonal([0.8, 0.7, 0.6], [1, 2, 3]))
    inputs[3] = np.array([[a, b, c]], np.float32)
    np.testing.assert_array_equal(select_neighbours(*inputs, policy(diversity=0.95))[0], [[1, 3]])
    np.testing.assert_array_equal(select_neighbours(*inputs, policy(diversity=0.97))[0], [[1, 2]])
    # A skipped candidate does not block later ones: only chosen documents count.
    inputs[3] = np.array([[a, b, b]], np.float32)
    inputs[4] = np.array([[False, True, True]])  # a has no image: b is chosen first
    np.testing.assert_array_equal(select_neighbours(*inputs, policy(diversity=0.95))[0], [[2, -1]])


def test_modality_requirement_can_be_switched_off():
    inputs = orthogonal(
        [0.8, 0.7, 0.6, 0.5], [1, 2, 3, 4], has_image=[True, False, True, False],
        has_text=[False, True, True, False],
    )
    def chosen(**changes):
        return select_neighbours(*inputs, policy(k=4, **changes))[0].tolist()

    assert chosen() == [[3, -1, -1, -1]]
    assert chosen(require_image=False) == [[2, 3, -1, -1]]
    assert chosen(require_text=False) == [[1, 3, -1, -1]]
    assert chosen(require_image=False, require_text=False) == [[1, 2, 3, 4]]


def test_never_the_query_itself_and_all_filtered_rows_are_padding():
    ids, scores = select_neighbours(*orthogonal([0.8, 0.7, 0.6], [7, 8, 7], query_id=7), DEFAULT)
    assert ids.tolist() == [[8, -1]] and scores[0, 1] == -np.inf
    inputs = orthogonal([0.95, 0.7, -np.inf], [1, 7, -1], query_id=7)
    ids, scores = select_neighbours(*inputs, DEFAULT)
    assert ids.tolist() == [[-1, -1]] and scores.tolist() == [[-np.inf, -np.inf]]


def test_k_zero_returns_empty_rows():
    inputs = random_rows(np.random.default_rng(3), 5, 6)
    ids, scores = select_neighbours(*inputs, policy(k=0))
    assert ids.shape == scores.shape == (5, 0)
    assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_rejects_unsorted_scores_and_bad_shapes():
    with pytest.raises(ValueError, match="descending"):
        select_neighbours(*orthogonal([0.5, 0.6], [1, 2]), DEFAULT)
    inputs = list(orthogonal([0.6, 0.5], [1, 2]))
    inputs[4] = inputs[4][:, :1]
    with pytest.raises(ValueError, match="has_image"):
        select_neighbours(*inputs, DEFAULT)


def test_query_dropout_rate_zero_keeps_everything():
    tokens = np.arange(50, dtype=np.int32)
    np.testing.assert_array_equal(drop_query_tokens(tokens, 0.0, np.random.default_rng(0)), tokens)


def test_query_dropout_drops_the_configured_fraction():
    rng = np.random.default_rng(0)
    tokens = np.arange(100)
    kept = sum(len(drop_query_tokens(tokens, DEFAULT.query_dropout, rng)) for _ in range(5000))
    dropped = 1 - kept / (5000 * len(tokens))
    assert abs(dropped - 0.2) < 0.02 * 0.2, dropped  # within 2% of 0.2 (std here: 0.0008)


def test_query_dropout_keeps_order_never_empties_and_respects_keep():
    rng = np.random.default_rng(0)
    tokens = np.arange(20) * 3
    for _ in range(200):
        out = drop_query_tokens(tokens, 0.5, rng)
        assert len(out) >= 1 and np.all(np.diff(out) > 0) and np.isin(out, tokens).all()
    lengths = {len(drop_query_tokens(np.array([5, 6]), 0.99, rng)) for _ in range(200)}
    assert 0 not in lengths
    keep = np.zeros(20, bool)
    keep[[0, 7, 19]] = True
    for _ in range(200):
        assert np.isin(tokens[keep], drop_query_tokens(tokens, 0.9, rng, keep=keep)).all()
    assert drop_query_tokens(np.array([], np.int32), 0.5, rng).shape == (0,)


def test_query_dropout_is_deterministic_per_seed():
    tokens = np.arange(1000)
    runs = [drop_query_tokens(tokens, 0.2, np.random.default_rng(seed)) for seed in (4, 4, 5)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_default_config_is_the_paper_policy():
    assert DEFAULT == RetrievalPolicy(
        k=2, candidates=32, near_duplicate=0.9, diversity=0.9, require_image=True,
        require_text=True, query_dropout=0.2,
    )
    assert base_retrieval_config().enabled is False


@pytest.mark.parametrize(
    "field, value",
    [
        ("k", -1),
        ("candidates", 1),  # < k = 2
        ("near_duplicate", 0.0),
        ("near_duplicate", 1.5),
        ("diversity", -0.5),
        ("query_dropout", 1.0),
        ("query_dropout", -0.1),
        ("index", "hnsw"),
        ("backend", "torch"),
        ("nlist", 0),
        ("nprobe", 0),
    ],
)
def test_from_config_errors_name_the_field(field, value):
    cd = base_retrieval_config()
    cd[field] = value
    with pytest.raises(ConfigError) as info:
        RetrievalPolicy.from_config(cd)
    assert info.value.field == f"retrieval.{field}"
    assert str(info.value).startswith(f"config.retrieval.{field}:"), str(info.value)
