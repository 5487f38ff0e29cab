"""The retriever task ('retriever'): the CLIP-style dual encoder, trained contrastively.

Pairs come from prepared data (`config.data.source=prepared:DIR`), so the text tower sees
exactly the token ids the LM sees: each document's caption ids and either its image codes
(`retriever.vision_input='codes'`, read from the shards) or its image
(`'pixels'`, read from `config.prepare.sources` and captioned with DIR's tokenizer).
The loss is CLIP's symmetric InfoNCE over the whole global batch with a learned
temperature; gradient accumulation is refused because it would shrink the negatives.
Eval reports the loss and in-batch recall@1 both ways.
"""

from __future__ import annotations

import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from cm3jax.data.pipeline import check_prepared_vocab, prepared_bad_records, prepared_dir
from cm3jax.data.prepare import open_split
from cm3jax.data.records import split_documents
from cm3jax.errors import ConfigError
from cm3jax.models import dual_encoder as de
from cm3jax.tokenizers.text import TextTokenizer
from cm3jax.train import tasks
from cm3jax.train.metrics import to_host
from cm3jax.train.optim import learning_rate_schedule, make_optimizer
from cm3jax.train.state import StateSpec, schedule_steps, sharded_state_spec

# config.retriever fields that do not change parameter shapes (left out of the restore check).
NON_SHAPE_FIELDS = ("dtype", "param_dtype", "remat_policy", "init_logit_scale", "text_pooling",
                    "eos_token_id", "activation", "norm_eps")


class KeepPairs(grain.transforms.Filter):
    """Keeps records that decoded and have a caption."""

    def filter(self, record: dict) -> bool:
        return "error" not in record and len(record["text"]) > 0


class ToPair(grain.transforms.Map):
    """A record -> {'text_ids', 'text_mask'} (right-padded to `max_len`) + 'codes' or 'images'."""

    def __init__(self, max_len: int, vision_key: str, tokenizer: TextTokenizer | None = None):
        self.max_len, self.vision_key, self.tokenizer = max_len, vision_key, tokenizer

    def map(self, record: dict) -> dict:
        text = record["text"] if self.tokenizer is None else self.tokenizer.encode(record["text"])
        n = min(len(text), self.max_len)
        ids = np.zeros(self.max_len, np.int32)
        ids[:n] = np.asarray(text[:n], np.int32)
        return {"text_ids": ids, "text_mask": (np.arange(self.max_len) < n).astype(np.int32),
                self.vision_key: np.asarray(record["image"])}


@tasks.register("retriever")
class RetrieverTask(tasks.Task):
    """Contrastive training of the dual encoder on the caption/image pairs of prepared data."""

    unit = "pairs"

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        self.model_config = de.DualEncoderConfig.from_config(config.retriever)
        self.directory = prepared_dir(config)
        if self.directory is None:
            raise ConfigError("data.source", "the retriever trains on caption/image pairs of prepared "
                              "data: set it to prepared:DIR (written by cm3jax.data.prepare)")
        if config.optim.grad_accum_steps != 1:
            raise ConfigError("optim.grad_accum_steps", "must be 1 for the retriever: contrastive "
                              "negatives come from the whole batch")
        if self.model_config.text_vocab_size < config.vocab.text_size:
            raise ConfigError("retriever.text_vocab_size", f"{self.model_config.text_vocab_size} is "
                              f"smaller than vocab.text_size={config.vocab.text_size}")
        self.vision_key = "codes" if self.model_config.vision_input == "codes" else "images"
        self._check_mesh(mesh)
        super().__init__(config, mesh)
        check_prepared_vocab(self.directory, self.vocab)
        if self.vision_key == "codes":
            self._check_codes()

    def _check_mesh(self, mesh) -> None:
        """Every sharded parameter dimension divides its mesh axis (partitioning.LOGICAL_RULES)."""
        cfg, sizes = self.model_config, dict(mesh.shape)
        dims = [("text_vocab_size", cfg.text_vocab_size, "tensor"), ("text_heads", cfg.text_heads, "tensor"),
                ("text_mlp_dim", cfg.text_mlp_dim, "tensor"), ("text_width", cfg.text_width, "fsdp"),
                ("vision_heads", cfg.vision_heads, "tensor"), ("vision_mlp_dim", cfg.vision_mlp_dim, "tensor"),
                ("vision_width", cfg.vision_width, "fsdp")]
        if cfg.vision_input == "codes":  # the code table's width: vision_width / code_patch**2
            dims.append(("code_patch", cfg.vision_width // cfg.code_patch**2, "fsdp"))
        for field, size, axis in dims:
            if size % sizes[axis]:
                what = "vision_width / code_patch**2 = " if field == "code_patch" else ""
                raise ConfigError(f"retriever.{field}", f"{what}{size} is not divisible by "
                                  f"mesh.{axis}={sizes[axis]}")

    def _check_codes(self) -> None:
        """The prepared codes fit the code tower: grid and codebook size."""
        cfg = self.model_config
        if cfg.codebook_size < self.vocab.image_codes:
            raise ConfigError("retriever.codebook_size", f"{cfg.codebook_size} is smaller than "
                              f"vocab.image_codes={self.vocab.image_codes}")
        grid = split_documents(self.directory, "train")[0]["image"].shape
        if grid != (cfg.code_grid, cfg.code_grid):
            raise ConfigError("retriever.code_grid", f"{cfg.code_grid} but the prepared images in "
                              f"{self.directory} are {grid[0]}x{grid[1]} codes")

    # --- state and steps ------------------------------------------------------------------

    def state_spec(self) -> StateSpec:
        cfg = self.model_config
        graphdef, abstract_params = nnx.split(de.abstract_dual_encoder(cfg), nnx.Param)

        def make_params(key):
            with nnx.use_eager_sharding(False):  # the trainer alone decides placement
                return nnx.to_pure_dict(nnx.state(de.DualEncoder(cfg, rngs=nnx.Rngs(params=key)), nnx.Param))

        optimizer = make_optimizer(self.config.optim, schedule_steps(self.config), mask=de.weight_decay_mask)
        return sharded_state_spec(cfg, graphdef, abstract_params, make_params, optimizer, self.mesh,
                                  self.config.seed)

    def _vision_input(self, batch: dict) -> jax.Array:
        if self.vision_key == "codes":
            return batch["codes"]
        return de.clip_pixels(batch["images"], self.model_config.image_size)

    def _loss(self, params: dict, batch: dict) -> tuple[jax.Array, dict]:
        model = nnx.merge(self.spec.graphdef, params)
        text, image = model(batch["text_ids"], batch["text_mask"], self._vision_input(batch))
        return de.contrastive_loss(text, image, model.logit_scale[...])

    def train_step(self):
        spec = self.spec
        schedule = learning_rate_schedule(self.config.optim, schedule_steps(self.config))

        def step_fn(state, batch):
            (_, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(state["params"], batch)
            updates, opt_state = spec.optimizer.update(grads, state["opt_state"], state["params"])
            new_state = dict(state, step=state["step"] + 1, opt_state=opt_state,
                             params=optax.apply_updates(state["params"], updates))
            return new_state, metrics | {"grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}

        return step_fn

    def eval_step(self):
        def step_fn(state, batch):
            _, metrics = self._loss(state["params"], batch)
            n = jnp.float32(batch["text_ids"].shape[0])
            return {"loss": metrics["loss"] * n, "pairs": n,
                    "text_to_image_recall_at_1": metrics["text_to_image_accuracy"] * n,
                    "image_to_text_recall_at_1": metrics["image_to_text_accuracy"] * n}

        return step_fn

    def eval_metrics(self, sums: dict) -> dict:
        sums = to_host(sums)
        return {k: v / max(sums["pairs"], 1.0) for k, v in sums.items() if k != "pairs"}

    # --- data and accounting --------------------------------------------------------------

    def dataset(self, split: str, process_index: int, process_count: int) -> grain.IterDataset:
        max_len = self.model_config.text_max_len
        if self.vision_key == "codes":
            source = split_documents(self.directory, split)
            to_pair = ToPair(max_len, "codes")
        else:
            source = open_split(self.config, split)
            tokenizer = TextTokenizer.load(os.path.join(self.directory, "tokenizer.model"), self.vocab)
            to_pair = ToPair(max_len, "images", tokenizer)
        return self.example_batches(source, KeepPairs(), to_pair, split, process_index, process_count)

    def batch_shapes(self) -> dict:
        cfg, b = self.model_config, self.config.data.global_batch_size
        shapes = {"text_ids": ((b, cfg.text_max_len), jnp.int32), "text_mask": ((b, cfg.text_max_len), jnp.int32)}
        if self.vision_key == "codes":
            return shapes | {"codes": ((b, cfg.code_grid, cfg.code_grid), jnp.int32)}
        r = self.config.prepare.resolution
        return shapes | {"images": ((b, r, r, 3), jnp.uint8)}

    def units_per_step(self) -> int:
        return self.config.data.global_batch_size

    def flops_per_unit(self) -> float:
        """Forward FLOPs of one pair through both towers (XLA's count) x 3 for training."""
        one = {k: jax.ShapeDtypeStruct((1, *shape[1:]), dtype) for k, (shape, dtype) in self.batch_shapes().items()}

        def forward(params, batch):
            model = nnx.merge(self.spec.graphdef, params)
            return model(batch["text_ids"], batch["text_mask"], self._vision_input(batch))

        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), self.spec.abstract["params"])
        cost = jax.jit(forward).lower(abstract, one).cost_analysis()
        return 3.0 * float((cost or {}).get("flops", 0.0))

    def shapes(self) -> dict:
        return {f"retriever.{k}": v for k, v in self.config.retriever.to_dict().items()
                if k not in NON_SHAPE_FIELDS}

    def progress(self, row: dict) -> str:
        return (f"loss {row['loss']:.4f} | recall@1 text->image {100 * row['text_to_image_accuracy']:.0f}%"
                f" image->text {100 * row['image_to_text_accuracy']:.0f}% | temperature "
                f"{1 / row['logit_scale']:.3f}")

    def bad_records(self) -> int:
        return prepared_bad_records(self.config)
