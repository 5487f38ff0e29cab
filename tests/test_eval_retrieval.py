"""Retrieval recall@k (cm3jax/eval/retrieval.py) on hand-made scores."""

from __future__ import annotations

import numpy as np

from cm3jax.eval.retrieval import _same, recall_at


def test_recall_at_k_counts_the_rank_of_the_first_relevant_column():
    scores = np.array([[0.9, 0.1, 0.5],    # relevant column 0 ranked 1st
                       [0.9, 0.1, 0.5],    # relevant column 1 ranked 3rd
                       [0.2, 0.3, 0.1]])   # relevant column 2 ranked 3rd
    relevant = np.eye(3, dtype=bool)
    assert recall_at(scores, relevant, ks=(1, 2, 3)) == {1: 1 / 3, 2: 1 / 3, 3: 1.0}


def test_identical_items_are_all_relevant():
    images = [np.zeros((2, 2)), np.ones((2, 2)), np.zeros((2, 2))]
    same = _same(images)
    assert same.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    scores = np.array([[0.1, 0.2, 0.9], [0.0, 1.0, 0.0], [0.9, 0.0, 0.1]])
    # Query 0 ranks document 2 first: the same picture as its own, so a hit at 1.
    assert recall_at(scores, same, ks=(1,)) == {1: 1.0}


def test_ties_are_broken_by_position_not_in_the_query_s_favour():
    scores = np.zeros((2, 4))
    relevant = np.zeros((2, 4), bool)
    relevant[0, 0] = relevant[1, 3] = True
    assert recall_at(scores, relevant, ks=(1, 4)) == {1: 0.5, 4: 1.0}
