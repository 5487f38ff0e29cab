"""Text metrics: BLEU / CIDEr-D vs pycocoevalcap, tokenizer, VQA accuracy, shapes oracle metrics.

pycocoevalcap 1.2 ships no example data (example/coco_eval_example.py needs COCO
annotation files), so parity is checked on a seeded random corpus and edge cases.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from cm3jax.data import shapes as S
from cm3jax.eval.captioning import bleu, cider, mean_vqa_accuracy, tokenize, vqa_accuracy
from cm3jax.eval.shapes_metrics import image2text_oracle, text2image_oracle

WORDS = "a the man dog red ball on grass sits runs with big small two near".split()


def random_corpus(seed: int, n_images: int = 50, n_refs: int = 5):
    """(candidates, references) of random sentences; candidates are often edited references."""
    rng = random.Random(seed)
    sentence = lambda: " ".join(rng.choices(WORDS, k=rng.randint(1, 10)))  # noqa: E731
    references = {i: [sentence() for _ in range(n_refs)] for i in range(n_images)}
    candidates = {}
    for i, refs in references.items():
        words = rng.choice(refs).split() if rng.random() < 0.7 else sentence().split()
        for _ in range(rng.randint(0, 3)):
            words[rng.randrange(len(words))] = rng.choice(WORDS)
        candidates[i] = [" ".join(words)]
    return candidates, references


EDGE_CASES = {
    "identical": ({0: ["a man on grass"], 1: ["the dog runs"]},
                  {0: ["a man on grass"] * 3, 1: ["the dog runs", "the dog runs"]}),
    "no_overlap": ({0: ["red ball"], 1: ["big small"]},
                   {0: ["a man sits", "the man"], 1: ["dog on grass"]}),
    "single_image": ({"x": ["a dog runs on grass"]},
                     {"x": ["a dog runs on the grass", "dog runs"]}),
    "empty_candidate": ({0: [""], 1: ["a dog"], 2: ["dog"]},
                        {0: ["a dog runs"], 1: ["a dog runs", "dog"], 2: ["a dog", "dog dog"]}),
    "closest_length_tie": ({0: ["a b c d"]}, {0: ["a b c", "a b c d e"]}),
}
CORPORA = {**EDGE_CASES, "random": random_corpus(0)}


@pytest.fixture(scope="module")
def coco():
    reason = "pycocoevalcap is not installed: BLEU/CIDEr parity not tested"
    bleu_ref = pytest.importorskip("pycocoevalcap.bleu.bleu", reason=reason)
    cider_ref = pytest.importorskip("pycocoevalcap.cider.cider", reason=reason)
    return bleu_ref.Bleu(4), cider_ref.Cider()


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_bleu_and_cider_match_pycocoevalcap(coco, name):
    candidates, references = CORPORA[name]
    ref_bleu, ref_cider = coco
    expected_bleu, _ = ref_bleu.compute_score(references, candidates, verbose=0)
    got = bleu(candidates, references)
    np.testing.assert_allclose([got[f"bleu_{k}"] for k in range(1, 5)], expected_bleu,
                               rtol=1e-9, atol=0)
    expected_cider, expected_per_image = ref_cider.compute_score(references, candidates)
    score, per_image = cider(candidates, references)
    np.testing.assert_allclose(score, expected_cider, rtol=1e-9, atol=0)
    np.testing.assert_allclose(list(per_image.values()), expected_per_image, rtol=1e-9, atol=0)
    assert list(per_image) == list(references)


def test_edge_case_values():
    assert bleu(*EDGE_CASES["identical"])["bleu_4"] == pytest.approx(1.0, rel=1e-8)
    assert bleu(*EDGE_CASES["no_overlap"])["bleu_1"] < 1e-10
    assert cider(*EDGE_CASES["no_overlap"])[0] == 0.0
    assert cider(*EDGE_CASES["single_image"]) == (0.0, {"x": 0.0})  # log(1 image) - log(df 1) = 0
    assert cider(*EDGE_CASES["identical"])[0] > 0


def test_bleu_hand_checked():
    # Matches: unigrams 5/6, bigrams 3/5 (the cat, on the, the mat), trigrams 1/4 (on the
    # mat), 4-grams 0/3; equal lengths, so no brevity penalty.
    got = bleu({0: ["the cat sat on the mat"]}, {0: ["the cat is on the mat"]})
    assert got["bleu_1"] == pytest.approx(5 / 6, rel=1e-8)
    assert got["bleu_2"] == pytest.approx((5 / 6 * 3 / 5) ** (1 / 2), rel=1e-8)
    assert got["bleu_3"] == pytest.approx(0.5, rel=1e-8)
    # 0 matching 4-grams: (0 + tiny) / (3 + small) keeps BLEU-4 small but not 0.
    assert got["bleu_4"] == pytest.approx((1 / 8 * 1e-15 / 3) ** (1 / 4), rel=1e-6)
    # Brevity penalty exp(1 - 3/2); the closest reference length breaks ties to the shorter.
    short = bleu({0: ["the cat"]}, {0: ["the cat sat"]})
    assert short["bleu_2"] == pytest.approx(np.exp(-0.5), rel=1e-8)
    assert bleu(*EDGE_CASES["closest_length_tie"])["bleu_1"] == pytest.approx(1.0, rel=1e-8)
    with pytest.raises(ValueError, match="same ids"):
        bleu({0: ["a"]}, {1: ["a"]})
    with pytest.raises(ValueError, match="exactly one candidate"):
        cider({0: ["a", "b"]}, {0: ["a"]})


def test_tokenize():
    assert tokenize("A man's dog, running (fast)!") == "a man 's dog running fast"
    assert tokenize("Don't stop... 'now' -- the dogs' toys.") == "do n't stop now the dogs toys"
    assert tokenize('It costs 1,000 at 3:30; "a black-and-white" cat:\nyes?') == \
        "it costs 1,000 at 3:30 a black-and-white cat yes"


def test_vqa_accuracy_official_formula():
    def humans(k):
        return ["dog"] * k + ["cat"] * (10 - k)
    # Leave-one-out over 10 humans: a matching human leaves k - 1 matches, the others k.
    for k, expected in [(0, 0.0), (1, 9 * (1 / 3) / 10), (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),
                        (3, (3 * (2 / 3) + 7 * 1) / 10), (4, 1.0), (10, 1.0)]:
        assert vqa_accuracy("dog", humans(k)) == pytest.approx(expected, rel=1e-12)
    assert vqa_accuracy("dog", humans(2)) == 0.6
    assert vqa_accuracy("dog", ["dog", "dog", "cat"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    assert mean_vqa_accuracy([("dog", humans(10)), ("dog", humans(0))]) == 0.5
    with pytest.raises(ValueError):
        vqa_accuracy("dog", [])


def test_vqa_normalisation():
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("the dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("dont know", ["don't know"] * 10) == 1.0
    assert vqa_accuracy("red, white", ["red white"] * 10) == 1.0
    assert vqa_accuracy("3.5", ["35"] * 10) == 0.0  # periods before a digit stay


# ----------------------------------------------------------------------------- shapes


def shapes_scenes(split: str, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [S.sample_scene(rng, split) for _ in range(n)]


def test_text2image_oracle_on_ground_truth():
    scenes = shapes_scenes("train", 12) + shapes_scenes("validation", 6)
    prompts = [S.caption(s) for s in scenes]
    result = text2image_oracle(prompts, np.stack([S.render(s) for s in scenes]))
    assert result["n"] == 18 and result["oracle_accuracy"] == 1.0
    assert set(result["attribute_accuracy"].values()) == {1.0}
    assert set(result["by_object_count"]) == {str(len(s)) for s in scenes}
    assert set(result["by_object_count"].values()) == {1.0}
    assert result["heldout_oracle_accuracy"] == 1.0
    # Images shifted by one: every scene differs from its prompt's.
    shifted = text2image_oracle(prompts, np.stack([S.render(s) for s in scenes[1:] + scenes[:1]]))
    assert shifted["oracle_accuracy"] < 0.5
    train = text2image_oracle(prompts[:12], np.stack([S.render(s) for s in scenes[:12]]))
    assert train["heldout_oracle_accuracy"] is None
    with pytest.raises(ValueError, match="prompt 1 "):
        text2image_oracle([prompts[0], "a dog"], np.stack([S.render(s) for s in scenes[:2]]))


def test_image2text_oracle():
    scenes = shapes_scenes("train", 20, seed=1)
    captions = [S.caption(s) for s in scenes]
    exact = image2text_oracle(captions, scenes)
    assert exact["oracle_accuracy"] == 1.0 and exact["unparseable"] == 0
    assert set(exact["attribute_accuracy"].values()) == {1.0}
    assert exact["heldout_oracle_accuracy"] is None

    first = scenes[0][0]
    other = next(c for c in S.COLORS if c != first.color)
    perturbed = [dataclasses.replace(first, color=other), *scenes[0][1:]]
    result = image2text_oracle([S.caption(perturbed), "not a caption", *captions[2:]], scenes)
    assert result["oracle_accuracy"] == pytest.approx(18 / 20)
    assert result["unparseable"] == 1
    assert result["attribute_accuracy"]["color"] < 1.0
    assert result["attribute_accuracy"]["scene"] == pytest.approx(18 / 20)
    assert set(result["by_object_count"]) == {str(len(s)) for s in scenes}
