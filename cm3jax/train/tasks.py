"""What the training loop needs from a task (`config.task`), and the registry of tasks.

The loop (cm3jax/train/loop.py) owns everything common: validation, the mesh,
checkpoints, resume, pre-emption, metrics, NaN guard. A task owns its state, its
jitted steps, its data and what its metrics mean. Each task lives in its own module
(`lm.py`, later `vqgan.py`, `retriever.py`) and registers here.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from cm3jax import vocab as vocab_lib
from cm3jax.models import logical
from cm3jax.train import partitioning
from cm3jax.train.checkpoint import make_meta
from cm3jax.train.state import StateSpec

Batch = dict[str, jax.Array]


class Task(abc.ABC):
    """A trainable task on a mesh."""

    unit = "tokens"  # what throughput counts: metrics get `<unit>_per_sec`

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        self.config, self.mesh = config, mesh
        self.vocab = vocab_lib.from_config(config.vocab)
        self.batch_sharding = partitioning.batch_sharding(mesh)
        self.spec = self.state_spec()

    # --- what each task defines -------------------------------------------------------

    @abc.abstractmethod
    def state_spec(self) -> StateSpec:
        """Shapes, shardings and the sharded initialiser of the train state."""

    @abc.abstractmethod
    def train_step(self) -> Callable[[Any, Batch], tuple[Any, dict]]:
        """`step(state, batch) -> (state, metrics)`, not yet jitted."""

    @abc.abstractmethod
    def eval_step(self) -> Callable[[Any, Batch], dict]:
        """`step(state, batch) -> sums`, not yet jitted; `eval_metrics` turns summed sums into metrics."""

    @abc.abstractmethod
    def eval_metrics(self, sums: dict) -> dict:
        """Host-side eval metrics (without the `eval_` prefix) from the summed eval-step outputs."""

    @abc.abstractmethod
    def dataset(self, split: str, process_index: int, process_count: int) -> grain.IterDataset:
        """Per-host batches of numpy arrays for `split`."""

    @abc.abstractmethod
    def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Global batch field -> (shape, dtype)."""

    @abc.abstractmethod
    def units_per_step(self) -> int:
        """Throughput units (tokens, images) in one global batch."""

    @abc.abstractmethod
    def flops_per_unit(self) -> float:
        """Training FLOPs per throughput unit (for MFU)."""

    @abc.abstractmethod
    def shapes(self) -> dict:
        """Config values that fix parameter shapes (checked when a checkpoint is restored)."""

    @abc.abstractmethod
    def progress(self, row: dict) -> str:
        """The task's part of the progress line, from a metrics row."""

    def bad_records(self) -> int:
        """Records of the training data that could not be read (shown in metrics)."""
        return 0

    # --- shared machinery ----------------------------------------------------------------

    def meta(self) -> dict:
        """The JSON item saved with each checkpoint."""
        return make_meta(self.config, self.vocab, self.shapes())

    def example_batches(self, source, keep: grain.transforms.Filter, to_example: grain.transforms.Map,
                        split: str, process_index: int, process_count: int) -> grain.IterDataset:
        """Per-host batches of one example per record: shuffled (train), repeated, split by host,
        filtered by `keep`, mapped by `to_example`, read with the config's Grain threads."""
        records = grain.MapDataset.source(source)
        if split == "train":
            records = records.shuffle(seed=self.config.seed)
        records = records.repeat(None)[process_index::process_count]
        options = grain.ReadOptions(num_threads=self.config.data.num_threads,
                                    prefetch_buffer_size=self.config.data.prefetch)
        per_host = self.config.data.global_batch_size // process_count
        return records.filter(keep).map(to_example).to_iter_dataset(options).batch(per_host, drop_remainder=True)

    def abstract_batch(self) -> dict:
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
                for k, (shape, dtype) in self.batch_shapes().items()}

    def global_batch(self, local_batch: dict) -> Batch:
        """This host's numpy slice -> global arrays sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local_batch[k]))
                for k in self.batch_shapes()}

    def compile(self):
        """The train step (compiled ahead of time, state donated) and the eval step."""
        replicated = partitioning.replicated(self.mesh)
        shardings, abstract = self.spec.shardings, self.spec.abstract
        with logical.activate(self.mesh, partitioning.LOGICAL_RULES):
            train_step = jax.jit(
                self.train_step(), in_shardings=(shardings, self.batch_sharding),
                out_shardings=(shardings, replicated), donate_argnums=0,
            ).lower(abstract, self.abstract_batch()).compile()
            eval_step = jax.jit(
                self.eval_step(), in_shardings=(shardings, self.batch_sharding), out_shardings=replicated,
            ).lower(abstract, self.abstract_batch()).compile()
        return train_step, eval_step

    def evaluate(self, eval_step, state) -> dict:
        """`eval_*` metrics over `config.eval_steps` batches of the validation split (same each time)."""
        dataset = self.dataset("validation", jax.process_index(), jax.process_count())
        totals = None
        for _, local_batch in zip(range(self.config.eval_steps), dataset):
            sums = eval_step(state, self.global_batch(local_batch))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        return {f"eval_{k}": v for k, v in self.eval_metrics(totals).items()}


TASKS: dict[str, type[Task]] = {}


def register(name: str):
    """Class decorator adding a Task under `config.task = name`."""

    def add(cls: type[Task]) -> type[Task]:
        TASKS[name] = cls
        return cls

    return add


def create(config: ml_collections.ConfigDict, mesh: Mesh) -> Task:
    """The task `config.task` names (validated beforehand by cm3jax.config.validate)."""
    from cm3jax.train import lm, retriever, vqgan  # noqa: F401  (each module registers its task)

    return TASKS[config.task](config, mesh)
