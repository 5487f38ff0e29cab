"""Logits processors (cm3jax.sampling.processors): HF parity, guidance, CD-K and modality constraints."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3jax.sampling import processors as P
from cm3jax.vocab import Vocab

VOCAB = Vocab(text_size=20, image_codes=12, num_masks=4)
V = VOCAB.size  # 40
BATCH = 4
BRK = VOCAB.break_id
PAD = VOCAB.pad_id
SETTINGS = settings(max_examples=50, deadline=None)


def random_logits(seed: int, shape=(BATCH, V), scale: float = 3.0, neg_inf: float = 0.1) -> np.ndarray:
    """Normal logits with a fraction `neg_inf` of -inf entries (never a whole row)."""
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal(shape)).astype(np.float32)
    drop = rng.random(shape) < neg_inf
    drop[..., 0] = False
    return np.where(drop, -np.inf, logits).astype(np.float32)


def assert_same(ours, theirs, atol: float = 1e-5) -> None:
    """Same -inf pattern exactly, finite values within `atol`."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    assert np.isfinite(ours[finite]).all()
    np.testing.assert_allclose(ours[finite], theirs[finite], atol=atol, rtol=0)


def log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# --- Hugging Face parity ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    """`transformers.generation.logits_process` (skips the HF parity tests when unavailable)."""
    pytest.importorskip("torch", reason="torch is not installed: HF parity of the processors not tested")
    return pytest.importorskip("transformers.generation.logits_process",
                               reason="transformers is not installed: HF parity of the processors not tested")


def run_hf(processor, logits: np.ndarray, input_ids=None) -> np.ndarray:
    import torch

    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if input_ids is None else input_ids
    return processor(ids, torch.from_numpy(np.array(logits))).numpy()


class TestAgainstHF:
    """Each processor against its Hugging Face counterpart on the same logits."""

    @pytest.mark.parametrize("t", [0.5, 1.0, 1.7])
    def test_temperature(self, hf, t):
        logits = random_logits(0)
        assert_same(P.temperature(jnp.asarray(logits), t), run_hf(hf.TemperatureLogitsWarper(t), logits))

    @pytest.mark.parametrize("k", [1, 2, 5, 17, V - 1, V, 100])
    @pytest.mark.parametrize("ties", [False, True])
    def test_top_k(self, hf, k, ties):
        logits = random_logits(1)
        if ties:  # many equal logits, some of them at the k-th value
            logits = np.round(logits)
        assert_same(P.top_k(jnp.asarray(logits), k), run_hf(hf.TopKLogitsWarper(k), logits))

    @pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
    @pytest.mark.parametrize("min_keep", [1, 3, 10])
    def test_top_p(self, hf, p, min_keep):
        logits = random_logits(2, scale=1.0)
        ours = P.top_p(jnp.asarray(logits), p, min_keep)
        assert_same(ours, run_hf(hf.TopPLogitsWarper(p, min_tokens_to_keep=min_keep), logits))
        kept = np.isfinite(np.asarray(ours)).sum(-1)
        assert (kept >= min_keep).all()
        if 0.3 <= p <= 0.95:  # these cut mid-distribution
            assert ((kept > 1) & (kept < np.isfinite(logits).sum(-1))).all()

    def test_top_p_boundary_and_ties(self, hf):
        # Uniform rows: the cumulative probabilities hit 1 - p exactly (a token at exactly 1 - p is
        # removed) and every token is tied. Ties are ordered by a stable sort, lower ids first,
        # which is what torch's CPU sort gives as well.
        logits = np.zeros((2, 8), np.float32)
        logits[1, :4] = -np.inf
        ours = P.top_p(jnp.asarray(logits), 0.5)
        assert_same(ours, run_hf(hf.TopPLogitsWarper(0.5), logits))
        np.testing.assert_array_equal(np.isfinite(np.asarray(ours)).sum(-1), [4, 2])

    @pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
    def test_repetition_penalty(self, hf, penalty):
        import torch

        logits = random_logits(3)
        logits[:, 5] = 0.0  # a zero logit (divided, as HF does)
        history = np.random.default_rng(3).integers(0, V, (BATCH, 12))
        history[:, :3] = 5  # repeated ids
        mask = np.ones(history.shape, bool)
        ours = P.repetition_penalty(jnp.asarray(logits), jnp.asarray(history), jnp.asarray(mask), penalty)
        theirs = run_hf(hf.RepetitionPenaltyLogitsProcessor(penalty), logits, torch.from_numpy(history))
        assert_same(ours, theirs)

    def test_repetition_penalty_masked_history(self, hf):
        import torch

        logits = random_logits(4)
        rng = np.random.default_rng(4)
        history = rng.integers(0, V, (BATCH, 10))
        mask = rng.random(history.shape) < 0.6
        mask[0] = False  # an empty history leaves the row alone
        ours = np.asarray(P.repetition_penalty(jnp.asarray(logits), jnp.asarray(history), jnp.asarray(mask), 1.5))
        processor = hf.RepetitionPenaltyLogitsProcessor(1.5)
        for b in range(BATCH):
            ids = torch.from_numpy(history[b][mask[b]][None])
            expected = run_hf(processor, logits[b:b + 1], ids) if mask[b].any() else logits[b:b + 1]
            assert_same(ours[b:b + 1], expected)

    @pytest.mark.parametrize("scale", [1.5, 3.0, 7.5])
    def test_classifier_free_guidance(self, hf, scale):
        import torch

        cond, uncond = random_logits(5, neg_inf=0.0), random_logits(6, neg_inf=0.0)
        ours = P.guidance(jnp.stack([cond, uncond]), [scale])
        processor = hf.ClassifierFreeGuidanceLogitsProcessor(scale)
        # HF mixes raw logits, we mix log-probabilities: the two differ by a per-row constant...
        cond_ids = torch.zeros((BATCH, 1), dtype=torch.long)  # HF takes the ids of the conditioned half only
        theirs_raw = run_hf(processor, np.concatenate([cond, uncond]), cond_ids)
        assert_same(jax.nn.log_softmax(ours), log_softmax64(theirs_raw), atol=1e-4)
        # ...and agree exactly when HF is given the log-probabilities.
        lp = np.asarray(jax.nn.log_softmax(jnp.asarray(np.concatenate([cond, uncond]))))
        assert_same(ours, run_hf(processor, lp, cond_ids), atol=1e-4)


# --- warpers without HF -----------------------------------------------------------------------


def test_argument_checks_and_disabled_filters():
    logits = jnp.asarray(random_logits(7))
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            P.temperature(logits, t)
    with pytest.raises(ValueError, match="penalty"):
        P.repetition_penalty(logits, jnp.zeros((BATCH, 1), jnp.int32), jnp.ones((BATCH, 1), bool), 0.0)
    assert P.top_k(logits, 0) is logits
    assert P.top_p(logits, 1.0) is logits
    assert P.repetition_penalty(logits, jnp.zeros((BATCH, 1), jnp.int32), jnp.ones((BATCH, 1), bool), 1.0) is logits


def test_warpers_jit():
    logits = jnp.asarray(random_logits(8))
    history, mask = jnp.zeros((BATCH, 3), jnp.int32), jnp.ones((BATCH, 3), bool)

    @functools.partial(jax.jit, static_argnums=1)
    def chain(x, params):
        t, k, p, penalty = params
        x = P.repetition_penalty(x, history, mask, penalty)
        return P.top_p(P.top_k(P.temperature(x, t), k), p)

    params = (0.8, 10, 0.9, 1.2)
    eager = P.top_p(P.top_k(P.temperature(P.repetition_penalty(logits, history, mask, 1.2), 0.8), 10), 0.9)
    assert_same(chain(logits, params), eager)


# --- guidance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("streams", [2, 3])
def test_guidance_unit_scales_is_conditioned(streams):
    logits = jnp.asarray(random_logits(9, (streams, BATCH, V)))
    out = P.guidance(logits, [1.0] * (streams - 1))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.nn.log_softmax(logits[0])))


def test_guidance_three_streams_formula():
    full, image_only, none = (random_logits(s, neg_inf=0.0) for s in (10, 11, 12))
    s_text, s_image = 3.0, 1.5
    lp_full, lp_image, lp_none = (log_softmax64(x) for x in (full, image_only, none))
    expected = lp_none + s_image * (lp_image - lp_none) + s_text * (lp_full - lp_image)
    out = P.guidance(jnp.stack([full, image_only, none]), (s_text, s_image))
    assert_same(out, expected, atol=1e-4)


def test_guidance_excluded_tokens_and_errors():
    cond, uncond = random_logits(13), random_logits(14)
    out = np.asarray(P.guidance(jnp.stack([cond, uncond]), [2.0]))
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(cond) | np.isneginf(uncond))
    assert not np.isnan(out).any()
    with pytest.raises(ValueError, match="scales"):
        P.guidance(jnp.stack([cond, uncond]), [2.0, 1.0])


# --- contrastive decoding TopK ----------------------------------------------------------------


cdk = jax.jit(P.contrastive_topk, static_argnames="k")


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), alpha=st.floats(0.001, 1.0), k=st.sampled_from([1, 3, 8, 100]),
       scale=st.sampled_from([0.5, 3.0, 10.0]), neg_inf=st.sampled_from([0.0, 0.3, 0.9]))
def test_contrastive_topk_head(seed, alpha, k, scale, neg_inf):
    cond = random_logits(seed, scale=scale, neg_inf=neg_inf)
    # the unconditioned stream excludes the same tokens (e.g. both under the modality constraint)
    uncond = np.where(np.isneginf(cond), -np.inf, random_logits(seed + 1, scale=scale, neg_inf=0.0))
    score = np.asarray(cdk(jnp.asarray(cond), jnp.asarray(uncond), jnp.float32(alpha), k=k))
    assert not np.isnan(score).any() and not np.isposinf(score).any()
    lp = log_softmax64(cond)
    kth = np.sort(lp, -1)[:, ::-1][:, min(k, V) - 1, None]
    threshold = np.broadcast_to(kth + np.log(alpha), lp.shape)
    margin = 1e-4  # float32 vs float64 log-probabilities
    finite = np.isfinite(score)
    assert not finite[np.isneginf(lp)].any()  # impossible tokens are never in the head
    assert (lp[finite] >= threshold[finite] - margin).all()  # nothing outside the head scores
    assert finite[np.isfinite(lp) & (lp >= threshold + margin)].all()  # the head scores
    assert finite[np.arange(BATCH), lp.argmax(-1)].all()  # never empty
    np.testing.assert_allclose(score[finite], lp[finite] - log_softmax64(uncond)[finite], atol=1e-4)


def test_contrastive_topk_checks_arguments():
    logits = jnp.zeros((1, V))
    with pytest.raises(ValueError, match="k >= 1"):
        P.contrastive_topk(logits, logits, 0.1, 0)
    with pytest.raises(ValueError, match="alpha"):
        P.contrastive_topk(logits, logits, 1.5, 1)


# --- modality constraints ---------------------------------------------------------------------


def parse_state(tokens) -> tuple[bool, int]:
    """Reference: (in_image, codes since the opening <break>) after reading `tokens`."""
    in_image, count = False, 0
    for tok in tokens:
        if tok == BRK:
            in_image, count = not in_image, 0
        elif VOCAB.image_offset <= tok < VOCAB.special_offset:
            count += 1
    return in_image, count if in_image else 0


def left_pad(rows, length: int, filler: int):
    """[batch, length] ids and mask, each row right-aligned, masked positions set to `filler`."""
    ids = np.full((len(rows), length), filler, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = True
    return ids, mask


def test_modality_state_left_padded():
    text, code = 3, VOCAB.image_id(2)
    rows = [
        [text, text, BRK],  # just opened an image
        [text, BRK, code, code],  # two codes into an image
        [BRK, code, code, BRK, text],  # image then caption
        [],  # all padding
        [text] * 6,
        [BRK, code, BRK, text, BRK, code, code, code],
    ]
    for filler in (PAD, BRK, code):  # padding content must not matter
        ids, mask = left_pad(rows, 8, filler)
        state = P.modality_state(jnp.asarray(ids), jnp.asarray(mask), VOCAB)
        expected = [parse_state(r) for r in rows]
        assert state.in_image.dtype == jnp.bool_ and state.count.dtype == jnp.int32
        assert list(zip(state.in_image.tolist(), state.count.tolist())) == [(True, 0), (True, 2), (False, 0),
                                                                           (False, 0), (False, 0), (True, 3)]
        assert list(zip(state.in_image.tolist(), state.count.tolist())) == expected


@functools.partial(jax.jit, static_argnames="image_tokens")
def greedy_decode(prompt, prompt_mask, logits, image_tokens):
    """Argmax decoding of `logits` [T, batch, V] under the modality constraint."""
    def step(state, step_logits):
        token = jnp.argmax(P.constrain_modality(step_logits, state, VOCAB, image_tokens), -1)
        return P.advance_modality(state, token, VOCAB), token

    state, tokens = jax.lax.scan(step, P.modality_state(prompt, prompt_mask, VOCAB), logits)
    return state, tokens.T


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), image_tokens=st.sampled_from([1, 2, 5]),
       break_bias=st.floats(0.0, 3.0))
def test_modality_constraint_decoding(seed, image_tokens, break_bias):
    text, code = 7, VOCAB.image_id(5)
    rows = [
        [text, text, BRK],  # ends with an opening <break>
        [text, text, text],  # text prompt
        [BRK] + [code] * image_tokens + [BRK, text],  # image, then caption
        [text, BRK] + [code] * (image_tokens - 1),  # one code short of a full image
    ]
    ids, mask = left_pad(rows, 10, PAD)
    steps = 30
    logits = random_logits(seed, (steps, len(rows), V + 8), scale=1.0, neg_inf=0.0)  # a padded embedding
    logits[..., BRK] += break_bias
    logits[..., V:] += 2.0  # the padding rows and <pad> are likely, yet never allowed
    logits[..., PAD] += 2.0
    state, generated = greedy_decode(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(logits), image_tokens)
    generated = np.asarray(generated)
    # modality_state over prompt + generation agrees with the step-by-step state
    full = P.modality_state(jnp.concatenate([ids, generated], 1),
                            jnp.concatenate([mask, np.ones(generated.shape, bool)], 1), VOCAB)
    np.testing.assert_array_equal(full.in_image, state.in_image)
    np.testing.assert_array_equal(full.count, state.count)
    for b, row in enumerate(rows):
        in_image, count = parse_state(row)
        for tok in generated[b]:
            if in_image and count == image_tokens:
                assert tok == BRK  # a full image is closed at once
            if tok == BRK:
                assert not in_image or count == image_tokens  # every image region is complete
                in_image, count = not in_image, 0
            elif VOCAB.image_offset <= tok < VOCAB.special_offset:
                assert in_image  # no image code in text
                count += 1
            else:
                assert not in_image  # only codes inside an image
                assert tok < VOCAB.size and tok != PAD  # never <pad> or an id the vocab does not have
        assert (bool(state.in_image[b]), int(state.count[b])) == (in_image, count)
    # the row that opened an image always fills and closes it within the horizon
    assert parse_state(rows[0] + generated[0][:image_tokens + 1].tolist()) == (False, 0)
