"""Text metrics without Java: COCO-caption BLEU and CIDEr-D, a PTB tokenizer stand-in, VQA accuracy.

`bleu` and `cider` reproduce pycocoevalcap 1.2's `BleuScorer` (corpus BLEU, reference
length option "closest") and `CiderScorer` (CIDEr-D) to floating-point rounding; like
those scorers they take already-tokenised strings, {id: [caption]} for candidates (one
each) and {id: [reference, ...]} for references. `tokenize` approximates the Java
PTBTokenizer pass that pycocoevalcap runs before scoring. `vqa_accuracy` is the VQA2 soft
accuracy with the official answer normalisation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np

Captions = Mapping[Hashable, Sequence[str]]

# BleuScorer's guards: a zero n-gram count gives BLEU ~0 instead of a division by zero.
_TINY, _SMALL = 1e-15, 1e-9


def _ngrams(sentence: str, n: int) -> Counter:
    """Counts of the 1..n-grams (word tuples) of a whitespace-tokenised sentence."""
    words = sentence.split()
    return Counter(tuple(words[i: i + k])
                   for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _image_ids(candidates: Captions, references: Captions) -> list[Hashable]:
    """The ids in `references` order, after pycocoevalcap's sanity checks (as ValueErrors)."""
    if set(candidates) != set(references):
        raise ValueError("candidates and references must have the same ids")
    if not references:
        raise ValueError("no captions to score")
    for key in references:
        if len(candidates[key]) != 1 or not references[key]:
            raise ValueError(f"id {key!r}: need exactly one candidate and at least one "
                             f"reference, got {len(candidates[key])} and {len(references[key])}")
    return list(references)


def bleu(candidates: Captions, references: Captions, n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..n ({'bleu_1': ..., 'bleu_n': ...}) as pycocoevalcap's `Bleu().compute_score`.

    Clipped n-gram matches and candidate n-grams are summed over the corpus; each image's
    reference length is the one closest to its candidate's (the shorter on a tie); the
    brevity penalty uses the summed lengths.
    """
    correct, guess, test_len, ref_len = [0] * n, [0] * n, 0, 0
    for key in _image_ids(candidates, references):
        hypothesis = candidates[key][0]
        words = len(hypothesis.split())
        max_ref = Counter()
        for ref in references[key]:
            max_ref |= _ngrams(ref, n)  # union = elementwise max
        for gram, count in _ngrams(hypothesis, n).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(n):
            guess[k] += max(0, words - k)
        test_len += words
        lengths = [len(ref.split()) for ref in references[key]]
        ref_len += min(lengths, key=lambda m: (abs(m - words), m))
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = {}, 1.0
    for k in range(n):
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores[f"bleu_{k + 1}"] = product ** (1 / (k + 1)) * penalty
    return scores


def cider(candidates: Captions, references: Captions, n: int = 4,
          sigma: float = 6.0) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D as pycocoevalcap's `Cider().compute_score`: (corpus mean, {id: score}).

    N-gram weights are tf * (log #images - log df), df counting the images whose references
    contain the n-gram (so with a single image every weight is 0 and every score 0). Per
    n-gram order: clipped cosine similarity times exp(-delta^2 / (2 sigma^2)); averaged over
    orders and references, times 10.
    """
    ids = _image_ids(candidates, references)
    refs = {key: [_ngrams(ref, n) for ref in references[key]] for key in ids}
    doc_freq = Counter(gram for key in ids for gram in set().union(*refs[key]))
    log_images = math.log(len(ids))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        weights = [{} for _ in range(n)]
        for gram, tf in counts.items():
            weights[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
        # CiderScorer's "length" is the number of bigrams, not of words; kept as is (the
        # differences agree unless a sentence is empty, and then the similarity is 0).
        return weights, norms, sum(tf for gram, tf in counts.items() if len(gram) == 2)

    def similarity(hyp: tuple, ref: tuple) -> list[float]:
        (h_weights, h_norms, h_len), (r_weights, r_norms, r_len) = hyp, ref
        penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma ** 2))
        out = []
        for hw, rw, hn, rn in zip(h_weights, r_weights, h_norms, r_norms):
            dot = sum(min(w, rw.get(gram, 0.0)) * rw.get(gram, 0.0) for gram, w in hw.items())
            out.append((dot / (hn * rn) if hn and rn else dot) * penalty)
        return out

    per_image = {}
    for key in ids:
        hyp = vector(_ngrams(candidates[key][0], n))
        total = np.sum([similarity(hyp, vector(ref)) for ref in refs[key]], axis=0)
        per_image[key] = float(np.mean(total) / len(refs[key]) * 10.0)
    return float(np.mean(list(per_image.values()))), per_image


# ----------------------------------------------------------------------------- tokenizer

# pycocoevalcap/tokenizer/ptbtokenizer.py PUNCTUATIONS: PTB tokens dropped after tokenising.
PTB_PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_BRACKETS_AND_QUOTES = frozenset('()[]{}"')  # PTB: -LRB- .. -RCB-, `` and ''
_PTB_RULES = [  # (pattern, replacement), applied in order to lowercased text
    (re.compile(r"""(\.\.\.|--|[?!;"`()\[\]{}])"""), r" \1 "),  # always their own token
    (re.compile(r"(?<!\d)([,:])|([,:])(?!\d)"), r" \1\2 "),  # kept inside numbers: 1,000 3:30
    (re.compile(r"(^|\s)'|'(?=\s|$)"), r"\1 ' "),  # quote marks at word edges
    (re.compile(r"\bcannot\b"), "can not"),
    (re.compile(r"n't\b"), " n't"),
    (re.compile(r"'(s|re|ve|ll|d|m)\b"), r" '\1"),
    (re.compile(r"(\w)\.(?=\s|$)"), r"\1 ."),  # a word's final period ('...' stays whole)
]


def tokenize(text: str) -> str:
    """Approximates pycocoevalcap's `PTBTokenizer` (Stanford PTBTokenizer -lowerCase, then
    PTB_PUNCTUATIONS dropped) for plain ASCII captions: lowercases, splits off punctuation
    (kept inside numbers and hyphenated words), splits clitics ("don't" -> "do n't",
    "man's" -> "man 's", "cannot" -> "can not") and drops punctuation tokens, brackets and
    quotes. Not the full PTB lexer: abbreviations keep no final period ("mr." -> "mr"),
    square brackets are dropped (PTB's -LSB-/-RSB- are not in the list) and non-ASCII
    text is not normalised.
    """
    text = text.replace("\n", " ").lower()
    for pattern, replacement in _PTB_RULES:
        text = pattern.sub(replacement, text)
    return " ".join(t for t in text.split()
                    if t not in PTB_PUNCTUATIONS and t not in _BRACKETS_AND_QUOTES)


# ----------------------------------------------------------------------------- VQA

# The official VQA eval (GT-Vision-Lab/VQA vqaEval.py) normalisation tables.
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
              "@", "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # the official "(?!<=\d)(\.)(?!\d)": its first group is a no-op
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# The official table's single contractions written without the apostrophe (its double
# ones like "couldnt've" and its capitalised "Im"/"Ive", which never match lowercased
# text, are left out).
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't", "aren't", "can't", "could've", "couldn't", "didn't", "doesn't", "don't", "hadn't",
    "hasn't", "haven't", "he'd", "he's", "how'd", "how'll", "how's", "isn't", "it'd", "it'll",
    "ma'am", "mightn't", "might've", "mustn't", "must've", "needn't", "o'clock", "oughtn't",
    "shan't", "shouldn't", "should've", "that's", "there's", "they'd", "they'll", "they're",
    "they've", "wasn't", "weren't", "what's", "where's", "who's", "won't", "wouldn't",
    "would've", "y'all", "you'd", "you'll", "you're", "you've")}


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation: whitespace, punctuation (removed, or replaced
    by a space when it is not next to a space and the text has no 1,000-style number),
    periods not followed by a digit removed, lowercased, number words -> digits, articles
    dropped, contractions given their apostrophe ("dont" -> "don't")."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        drop = p + " " in text or " " + p in text or _COMMA_IN_NUMBER.search(text)
        out = out.replace(p, "" if drop else " ")
    words = (_NUMBERS.get(w, w) for w in _PERIOD.sub("", out).lower().split())
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """VQA2 soft accuracy: the mean over human answers h of min(1, #other humans (all but h)
    that gave `answer` / 3), all answers normalised (`normalize_vqa_answer`). With the usual
    10 answers this is the official 10-choose-9 average; fewer answers use the same
    leave-one-out mean (so a single human answer always scores 0).

    Unlike the official script, which normalises only when the humans disagree, both
    sides are always normalised (so "Yes" matches ten "yes").
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    answer = normalize_vqa_answer(answer)
    same = [normalize_vqa_answer(h) == answer for h in human_answers]
    matches = sum(same)
    # sum of min(1, m / 3) as an integer sum of min(3, m), divided once: 0.6, not 0.6000000000000001
    return sum(min(3, matches - s) for s in same) / (3 * len(same))


def mean_vqa_accuracy(pairs: Iterable[tuple[str, Sequence[str]]]) -> float:
    """Mean `vqa_accuracy` over (answer, human_answers) pairs (ValueError if there are none)."""
    scores = [vqa_accuracy(answer, humans) for answer, humans in pairs]
    if not scores:
        raise ValueError("mean_vqa_accuracy needs at least one pair")
    return float(np.mean(scores))
