"""Retrieval policy: which of a document's nearest neighbours are prepended to it in training.

CM3leon (§2.2, after RA-CM3) retrieves by relevance with three rules on top, all here:

- modality: a retrieved document must hold an image and text (each switchable);
- diversity: candidates scoring above `near_duplicate` (0.9) against the query are
  near-duplicates of it and skipped, and so are candidates whose inner product with an
  already chosen document is above `diversity`;
- query dropout: 20% of the query's tokens are dropped before it is embedded, in training.

A query document is never its own neighbour, and `k` (2) documents are kept at most.

    policy = RetrievalPolicy.from_config(config.retrieval)
    query = drop_query_tokens(tokens, policy.query_dropout, rng)        # then embed it
    scores, ids = index.search(query_embeddings, policy.candidates, exclude_ids=doc_ids)
    ids, scores = select_neighbours(doc_ids, scores, ids, candidate_embeddings,
                                    has_image, has_text, policy)        # [Q, k] each

The greedy choice runs in JAX (`greedy_diverse`: one `lax.fori_loop` over the candidate
columns, fixed shapes, batched over queries). Only masks and column positions go to the
device: document ids stay int64 in numpy, so they survive JAX's default 32-bit integers.
Thresholds compare float32 values with the threshold rounded to float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

from cm3jax.errors import ConfigError
from cm3jax.retrieval.index import BACKENDS, MODES

Array = np.ndarray | jax.Array


def base_retrieval_config() -> ml_collections.ConfigDict:
    """Defaults of `config.retrieval`: CM3leon's policy and an exact JAX index."""
    c = ml_collections.ConfigDict()
    c.enabled = False  # prepend retrieved documents (False: the LM trains on documents alone)
    c.encoder = ""  # workdir of the `task='retriever'` run that embeds memory and queries
    c.neighbours = ""  # workdir of `cm3jax.retrieval.build` (index + neighbours) the LM reads
    c.chunk_docs = 4096  # documents per embedding shard (the unit of resume)
    c.k = 2  # documents retrieved per training document (CM3leon: 2 in training)
    c.candidates = 32  # neighbours fetched from the index before the policy filters them (>= k)
    c.near_duplicate = 0.9  # skip candidates scoring above this against the query (CM3leon: 0.9)
    c.diversity = 0.9  # skip candidates with inner product above this to an already chosen one
    c.require_image = True  # a retrieved document must hold an image (CM3leon: multi-modal only)
    c.require_text = True  # a retrieved document must hold text
    c.query_dropout = 0.2  # query tokens dropped before embedding, in training (CM3leon: 0.2)
    c.index = "exact"  # 'exact' (brute-force MIPS) or 'ivf' (inverted lists)
    c.nlist = -1  # IVF lists; -1 = the power of two nearest 4 sqrt(memory size)
    c.nprobe = 8  # IVF lists probed per query (>= nlist: exact)
    c.backend = "jax"  # 'jax', 'faiss' or 'scann' (the last two only when installed)
    return c


@dataclasses.dataclass(frozen=True)
class RetrievalPolicy:
    """How neighbours are chosen among the index's candidates (see the module docstring).

    Attributes:
      k: documents kept per query (>= 0).
      candidates: candidates fetched from the index per query (>= max(k, 1)).
      near_duplicate: candidates scoring above this against the query are skipped, in (0, 1].
      diversity: candidates whose inner product with a chosen one is above this are skipped,
        in (0, 1].
      require_image: retrieved documents must hold an image.
      require_text: retrieved documents must hold text.
      query_dropout: fraction of query tokens dropped in training, in [0, 1).

    Raises:
      ConfigError: on construction, naming `retrieval.<field>` of the first bad value.
    """

    k: int
    candidates: int
    near_duplicate: float
    diversity: float
    require_image: bool
    require_text: bool
    query_dropout: float

    def __post_init__(self):
        if self.k < 0:
            raise ConfigError("retrieval.k", f"must be >= 0, got {self.k}")
        if self.candidates < max(self.k, 1):
            raise ConfigError(
                "retrieval.candidates", f"must be >= 1 and >= k={self.k}, got {self.candidates}"
            )
        for name in ("near_duplicate", "diversity"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"retrieval.{name}", f"must be in (0, 1], got {value}")
        if not 0 <= self.query_dropout < 1:
            raise ConfigError(
                "retrieval.query_dropout", f"must be in [0, 1), got {self.query_dropout}"
            )

    @classmethod
    def from_config(cls, cd: ml_collections.ConfigDict) -> RetrievalPolicy:
        """The policy of a `config.retrieval` section, after validating the whole section.

        Raises:
          ConfigError: naming `retrieval.<field>` of the first value that cannot work,
            index fields (`index`, `backend`, `nlist`, `nprobe`) included.
        """
        for name, choices in (("index", MODES), ("backend", BACKENDS)):
            if cd[name] not in choices:
                expected = ", ".join(map(repr, choices))
                raise ConfigError(f"retrieval.{name}", f"{cd[name]!r} is not one of {expected}")
        if cd.nlist != -1 and cd.nlist < 1:
            raise ConfigError(
                "retrieval.nlist", f"must be >= 1 or -1 (about 4 sqrt of the memory size), got {cd.nlist}"
            )
        if cd.nprobe < 1:
            raise ConfigError("retrieval.nprobe", f"must be >= 1, got {cd.nprobe}")
        return cls(
            k=int(cd.k),
            candidates=int(cd.candidates),
            near_duplicate=float(cd.near_duplicate),
            diversity=float(cd.diversity),
            require_image=bool(cd.require_image),
            require_text=bool(cd.require_text),
            query_dropout=float(cd.query_dropout),
        )


def drop_query_tokens(
    tokens: np.ndarray, rate: float, rng: np.random.Generator, keep: np.ndarray | None = None
) -> np.ndarray:
    """Drops each token independently with probability `rate`; returns the shorter 1-D array.

    Positions where the boolean `keep` is True are never dropped. A non-empty sequence never
    comes back empty: if every token drew "drop", one drawn at random is kept. The result
    depends only on the inputs and the state of `rng` (the rng advances).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    drop = rng.random(tokens.shape[0]) < rate
    if keep is not None:
        keep = np.asarray(keep)
        if keep.dtype != np.bool_ or keep.shape != tokens.shape:
            raise ValueError(
                f"keep must be a bool mask of shape {tokens.shape}, got {keep.dtype} {keep.shape}"
            )
        drop &= ~keep
    if tokens.size and drop.all():
        drop[rng.integers(tokens.size)] = False
    return tokens[~drop]


def candidate_mask(
    query_ids: Array,
    candidate_scores: Array,
    candidate_ids: Array,
    has_image: Array,
    has_text: Array,
    policy: RetrievalPolicy,
) -> Array:
    """Candidates each query may take, before diversity: bool [Q, C] (numpy or JAX arrays).

    False for padding (id < 0 or score -inf), the query's own document, a missing required
    modality, and near-duplicates (score > policy.near_duplicate).
    """
    mask = (candidate_ids >= 0) & (candidate_ids != query_ids[:, None])
    mask = mask & (candidate_scores > -np.inf) & (candidate_scores <= policy.near_duplicate)
    if policy.require_image:
        mask = mask & has_image
    if policy.require_text:
        mask = mask & has_text
    return mask


@functools.partial(jax.jit, static_argnames=("k",))
def greedy_diverse(
    eligible: jax.Array, embeddings: jax.Array, diversity: float, *, k: int
) -> jax.Array:
    """Greedy choice in column order: the first k eligible columns not too close to a chosen one.

    Args:
      eligible: bool [Q, C], columns in descending score order (see `candidate_mask`).
      embeddings: [Q, C, D] candidate embeddings (the space the index scores in).
      diversity: a column whose inner product with an already chosen column of its row is
        above this is skipped.
      k: columns kept per row.

    Returns:
      int32 [Q, k]: chosen column positions in the order chosen, padded with -1.
    """
    num_queries, num_candidates = eligible.shape
    embeddings = jnp.asarray(embeddings, jnp.float32)
    # float32 products even where the default matmul precision is lower (TPU bf16, GPU TF32).
    gram = jnp.einsum("qcd,qed->qce", embeddings, embeddings, precision=lax.Precision.HIGHEST)
    threshold = jnp.asarray(diversity, jnp.float32)

    def step(column, chosen):
        # Columns taken past the k-th never affect earlier ones, so no stop is needed.
        too_close = jnp.any(chosen & (gram[:, column, :] > threshold), axis=-1)
        return chosen.at[:, column].set(eligible[:, column] & ~too_close)

    chosen = lax.fori_loop(0, num_candidates, step, jnp.zeros((num_queries, num_candidates), bool))
    kept = min(k, num_candidates)
    order = jnp.argsort(~chosen, axis=-1, stable=True)[:, :kept]  # chosen columns first, in order
    columns = jnp.where(jnp.take_along_axis(chosen, order, axis=-1), order, -1).astype(jnp.int32)
    return jnp.pad(columns, ((0, 0), (0, k - kept)), constant_values=-1)


def select_neighbours(
    query_ids: np.ndarray,
    candidate_scores: np.ndarray,
    candidate_ids: np.ndarray,
    candidate_embeddings: np.ndarray,
    has_image: np.ndarray,
    has_text: np.ndarray,
    policy: RetrievalPolicy,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's neighbours under the policy, from its index candidates (numpy in and out).

    Args:
      query_ids: int [Q], each query's own document id.
      candidate_scores: float [Q, C] descending per row, padded with -inf (`DenseIndex.search`).
      candidate_ids: int [Q, C], padded with -1.
      candidate_embeddings: float [Q, C, D], the candidates' embeddings.
      has_image: bool [Q, C], the candidate holds an image.
      has_text: bool [Q, C], the candidate holds text.
      policy: the rules; see `candidate_mask` and `greedy_diverse`.

    Returns:
      neighbour ids int64 [Q, k] padded with -1, and their scores float32 [Q, k] padded
      with -inf, best first.

    Raises:
      ValueError: arrays of inconsistent shapes, or scores not in descending order.
    """
    query_ids = np.asarray(query_ids, np.int64)
    scores = np.asarray(candidate_scores, np.float32)
    ids = np.asarray(candidate_ids, np.int64)
    embeddings = np.asarray(candidate_embeddings)
    has_image, has_text = np.asarray(has_image, bool), np.asarray(has_text, bool)
    if scores.ndim != 2 or query_ids.shape != scores.shape[:1]:
        raise ValueError(f"candidate_scores {scores.shape} must be [Q, C], Q = {query_ids.shape}")
    for name, array in (("candidate_ids", ids), ("has_image", has_image), ("has_text", has_text)):
        if array.shape != scores.shape:
            raise ValueError(f"{name} has shape {array.shape}, candidate_scores {scores.shape}")
    if embeddings.ndim != 3 or embeddings.shape[:2] != scores.shape:
        raise ValueError(
            f"candidate_embeddings {embeddings.shape} must be [Q, C, D], [Q, C] = {scores.shape}"
        )
    if not np.all(scores[:, 1:] <= scores[:, :-1]):
        raise ValueError("candidate_scores must be descending along each row (and not NaN)")

    eligible = candidate_mask(query_ids, scores, ids, has_image, has_text, policy)
    columns = np.asarray(greedy_diverse(eligible, embeddings, policy.diversity, k=policy.k))
    num_candidates = scores.shape[1]
    columns = np.where(columns < 0, num_candidates, columns)  # -1 -> an appended padding column
    ids = np.pad(ids, ((0, 0), (0, 1)), constant_values=-1)
    scores = np.pad(scores, ((0, 0), (0, 1)), constant_values=-np.inf)
    return np.take_along_axis(ids, columns, axis=1), np.take_along_axis(scores, columns, axis=1)
