"""The language-model task ('lm'): token loss split by modality, train and eval steps, LMTask.

The objective of a step is the mean next-token loss over every unmasked target token
of the global batch. Fine-tuning runs (`config.sft.mixture`) also report `loss/<task>`: the
mean loss over the targets of each task's examples (the batch's `task_ids`). With gradient accumulation the batch is split into microbatches
(interleaved rows, so every device keeps an equal share of each), loss *sums* and
gradients of sums are accumulated, and both are divided by the global token count at
the end: accumulated and single-shot steps optimise exactly the same objective.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cm3jax.data.pipeline import make_dataset, prepared_bad_records, sft_tasks
from cm3jax.data.schema import FIELDS
from cm3jax.models import accounting
from cm3jax.train import partitioning, tasks
from cm3jax.train.metrics import to_host
from cm3jax.train.optim import learning_rate_schedule
from cm3jax.train.state import StateSpec, TrainState, build_state_spec, schedule_steps
from cm3jax.vocab import IMAGE

Batch = dict[str, jax.Array]
SUM_KEYS = ("loss", "text_loss", "image_loss", "tokens", "text_tokens", "image_tokens")


def sum_keys(tasks: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Keys of `loss_sums`' sums for the fine-tuning tasks `tasks`."""
    return SUM_KEYS + tuple(f"{kind}/{task}" for task in tasks for kind in ("loss", "tokens"))


def loss_sums(params: dict, graphdef: nnx.GraphDef, batch: Batch,
              tasks: tuple[str, ...] = ()) -> tuple[jax.Array, dict]:
    """Summed token losses (total, text, image, per fine-tuning task) and token counts over a batch."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"], batch["code_positions"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    image = mask * (batch["token_type"] == IMAGE)
    text = mask - image
    sums = {
        "loss": jnp.sum(losses * mask),
        "text_loss": jnp.sum(losses * text),
        "image_loss": jnp.sum(losses * image),
        "tokens": jnp.sum(mask),
        "text_tokens": jnp.sum(text),
        "image_tokens": jnp.sum(image),
    }
    for task_id, task in enumerate(tasks, start=1):
        in_task = mask * (batch["task_ids"] == task_id)
        sums[f"loss/{task}"], sums[f"tokens/{task}"] = jnp.sum(losses * in_task), jnp.sum(in_task)
    return sums["loss"], sums


def means(sums: dict) -> dict:
    """Per-token means from summed losses (a split or task with no tokens reports 0)."""
    tasks = [key.split("/", 1)[1] for key in sums if key.startswith("tokens/")]
    return {
        "loss": sums["loss"] / jnp.maximum(sums["tokens"], 1.0),
        "text_loss": sums["text_loss"] / jnp.maximum(sums["text_tokens"], 1.0),
        "image_loss": sums["image_loss"] / jnp.maximum(sums["image_tokens"], 1.0),
        "tokens": sums["tokens"],
    } | {f"loss/{task}": sums[f"loss/{task}"] / jnp.maximum(sums[f"tokens/{task}"], 1.0) for task in tasks}


def _microbatches(batch: Batch, accum_steps: int, mesh) -> Batch:
    """[B, L] -> [accum, B/accum, L], microbatch k = rows k, k+accum, ... (device-balanced)."""

    def split(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        spec = jax.sharding.PartitionSpec(None, partitioning.BATCH_AXES)
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

    return jax.tree.map(split, batch)


def make_train_step(spec: StateSpec, accum_steps: int, mesh, schedule: optax.Schedule,
                    tasks: tuple[str, ...] = ()):
    """Returns `train_step(state, batch) -> (state, metrics)` (not yet jitted); `tasks`: the
    fine-tuning tasks whose losses are reported."""
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def gradients(params, batch):
        if accum_steps == 1:
            (_, sums), grads = grad_fn(params, spec.graphdef, batch, tasks)
            return grads, sums

        def accumulate(carry, microbatch):
            (_, sums), grads = grad_fn(params, spec.graphdef, microbatch, tasks)
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        # Zero gradients laid out like the parameters, so the accumulator stays sharded.
        zero_grads = jax.tree.map(
            lambda p, s: jax.lax.with_sharding_constraint(jnp.zeros_like(p), s),
            params, spec.param_shardings,
        )
        zeros = (zero_grads, {k: jnp.zeros((), jnp.float32) for k in sum_keys(tasks)})
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, _microbatches(batch, accum_steps, mesh))
        return grads, sums

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
        grads, sums = gradients(state["params"], batch)
        grads = jax.tree.map(lambda g: g / jnp.maximum(sums["tokens"], 1.0), grads)
        updates, opt_state = spec.optimizer.update(grads, state["opt_state"], state["params"])
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "rng": state["rng"],
        }
        metrics = means(sums) | {"grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        return new_state, metrics

    return train_step


def make_eval_step(spec: StateSpec, tasks: tuple[str, ...] = ()):
    """Returns `eval_step(state, batch) -> loss sums` (not yet jitted)."""

    def eval_step(state: TrainState, batch: Batch) -> dict:
        return loss_sums(state["params"], spec.graphdef, batch, tasks)[1]

    return eval_step


# Resolved architecture fields that fix parameter shapes (checked on restore).
SHAPE_FIELDS = ("vocab_size", "max_len", "num_layers", "d_model", "num_heads", "head_dim", "mlp_dim",
                "activation", "position", "norm", "norm_params", "qk_norm", "tie_embeddings")


@tasks.register("lm")
class LMTask(tasks.Task):
    """Next-token (CM3) training of the mixed-modal transformer on packed token rows."""

    unit = "tokens"

    def state_spec(self) -> StateSpec:
        return build_state_spec(self.config, self.mesh)

    def train_step(self):
        schedule = learning_rate_schedule(self.config.optim, schedule_steps(self.config))
        return make_train_step(self.spec, self.config.optim.grad_accum_steps, self.mesh, schedule,
                               tuple(sft_tasks(self.config)))

    def eval_step(self):
        return make_eval_step(self.spec, tuple(sft_tasks(self.config)))

    def eval_metrics(self, sums: dict) -> dict:
        return {k: v for k, v in to_host(means(sums)).items() if k != "tokens"}

    def dataset(self, split: str, process_index: int, process_count: int):
        return make_dataset(self.config, split, process_index, process_count)

    def batch_shapes(self) -> dict:
        shape = (self.config.data.global_batch_size, self.config.data.seq_len)
        return {k: (shape, jnp.int32) for k in FIELDS}

    def units_per_step(self) -> int:
        return self.config.data.global_batch_size * self.config.data.seq_len

    def flops_per_unit(self) -> float:
        return accounting.flops_per_token(self.spec.model_config, self.config.data.seq_len)

    def shapes(self) -> dict:
        return {f"model.{k}": getattr(self.spec.model_config, k) for k in SHAPE_FIELDS}

    def progress(self, row: dict) -> str:
        return f"loss {row['loss']:.4f} (text {row['text_loss']:.4f}, image {row['image_loss']:.4f})"

    def bad_records(self) -> int:
        return prepared_bad_records(self.config)
