"""The VQGAN task ('vqgan'): the image tokenizer trained in the same loop as the LM.

One jitted step updates both players. Generator (encoder, quantiser, decoder):
L1 (+ L2) reconstruction, LPIPS perceptual loss when weights are configured, the
quantiser's commitment / codebook loss, and — from `vqgan_train.disc_start` on — the
hinge GAN loss scaled by taming's adaptive weight (ratio of the gradient norms of the
reconstruction and GAN losses at the decoder's last layer). Discriminator: hinge loss on
real images vs reconstructions, also from `disc_start`. Codebook statistics (usage EMA,
EMA codebook) live beside the parameters; dead codes are restarted from the batch's
encoder outputs every `restart_every` steps.

State: {'step', 'rng', 'params': {'generator', 'discriminator'}, 'stats',
'opt_state': {'generator', 'discriminator'}, 'frozen': {'lpips'} (only with LPIPS)}.
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from cm3jax.data.prepare import open_split
from cm3jax.errors import ConfigError
from cm3jax.models import perceptual
from cm3jax.models.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from cm3jax.models.quantizer import CodebookStats, code_histogram
from cm3jax.models.vqgan import LAST_DECODER_LAYER, VQGAN, VQGANConfig
from cm3jax.train import partitioning, tasks
from cm3jax.train.optim import learning_rate_schedule
from cm3jax.train.state import StateSpec, schedule_steps


def base_vqgan_train_config() -> ml_collections.ConfigDict:
    """Defaults of `config.vqgan_train` (loss weights and schedule of the VQGAN task)."""
    c = ml_collections.ConfigDict()
    c.l1_weight = 1.0  # L1 reconstruction
    c.l2_weight = 0.0  # L2 reconstruction
    c.perceptual_weight = 0.0  # LPIPS; needs lpips_weights
    c.lpips_weights = ""  # .npz (perceptual.save_npz) or lpips/torchvision .pth state dict
    c.disc_start = 10_000  # steps before the discriminator and GAN loss switch on
    c.disc_weight = 0.8  # GAN loss weight on top of the adaptive weight (taming)
    c.restart_every = 100  # steps between dead-code restarts (with vqgan.dead_code_threshold > 0)
    return c


def _images(batch: dict) -> jax.Array:
    return batch["images"].astype(jnp.float32) / 127.5 - 1.0


def _psnr(reconstruction: jax.Array, images: jax.Array) -> jax.Array:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2), capped at 100 dB."""
    mse = jnp.mean(jnp.square(jnp.clip(reconstruction, -1, 1) - images), axis=(1, 2, 3))
    return jnp.minimum(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)), 100.0)


class DropBadRecords(grain.transforms.Filter):
    """Keeps records a source could decode (bad ones are counted by prepare, not here)."""

    def filter(self, record: dict) -> bool:
        return "error" not in record


class ToImageBatch(grain.transforms.Map):
    def map(self, record: dict) -> dict:
        return {"images": np.asarray(record["image"], np.uint8)}


@tasks.register("vqgan")
class VQGANTask(tasks.Task):
    """Trains the VQGAN image tokenizer on the images of `config.prepare.sources`."""

    unit = "images"

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        self.model_config = VQGANConfig.from_config(config.vqgan)
        if config.prepare.resolution != self.model_config.resolution:
            raise ConfigError("prepare.resolution", f"{config.prepare.resolution} differs from "
                              f"vqgan.resolution={self.model_config.resolution}")
        self.train_config = config.vqgan_train
        if self.train_config.perceptual_weight > 0 and not self.train_config.lpips_weights:
            raise ConfigError("vqgan_train.lpips_weights", "perceptual_weight > 0 needs LPIPS weights "
                              "(a .npz from perceptual.save_npz or an lpips .pth file)")
        super().__init__(config, mesh)

    # --- state ------------------------------------------------------------------------

    def _optimizer(self) -> optax.GradientTransformation:
        optim = self.config.optim
        return optax.chain(
            optax.clip_by_global_norm(optim.clip_norm),
            optax.adamw(learning_rate_schedule(optim, schedule_steps(self.config)), b1=optim.b1,
                        b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay),
        )

    def state_spec(self) -> StateSpec:
        cfg, seed = self.model_config, self.config.seed
        optimizer = self.optimizer = self._optimizer()
        with nnx.use_eager_sharding(False):
            abstract_vqgan = nnx.eval_shape(lambda: VQGAN(cfg, rngs=nnx.Rngs(params=0)))
            abstract_disc = nnx.eval_shape(lambda: PatchDiscriminator(cfg, rngs=nnx.Rngs(params=0)))
        self.graphdef, abstract_params, abstract_stats = nnx.split(abstract_vqgan, nnx.Param, CodebookStats)
        self.disc_graphdef, abstract_disc_params = nnx.split(abstract_disc, nnx.Param)
        weights = self.train_config.lpips_weights
        lpips = perceptual.load(weights) if weights else None
        if lpips is not None:
            self.lpips_graphdef, lpips_params = nnx.split(lpips)
            lpips_params = nnx.to_pure_dict(lpips_params)

        def init():
            key = jax.random.key(seed)
            gen_key, disc_key, state_key = jax.random.split(key, 3)
            with nnx.use_eager_sharding(False):
                _, params, stats = nnx.split(VQGAN(cfg, rngs=nnx.Rngs(params=gen_key)), nnx.Param, CodebookStats)
                disc = nnx.state(PatchDiscriminator(cfg, rngs=nnx.Rngs(params=disc_key)), nnx.Param)
            params = {"generator": nnx.to_pure_dict(params), "discriminator": nnx.to_pure_dict(disc)}
            state = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(state_key),
                     "params": params, "stats": nnx.to_pure_dict(stats),
                     "opt_state": {k: optimizer.init(v) for k, v in params.items()}}
            if lpips is not None:
                state["frozen"] = {"lpips": lpips_params}
            return state

        mesh, replicated = self.mesh, partitioning.replicated(self.mesh)
        param_sh = {"generator": partitioning.param_shardings(abstract_params, mesh),
                    "discriminator": partitioning.param_shardings(abstract_disc_params, mesh)}
        shapes = jax.eval_shape(init)
        shardings = {
            "step": replicated, "rng": replicated, "params": param_sh,
            "stats": partitioning.param_shardings(abstract_stats, mesh),
            "opt_state": {k: optax.tree_map_params(optimizer, lambda _, s: s, shapes["opt_state"][k], param_sh[k],
                                                   transform_non_params=lambda _: replicated)
                          for k in param_sh},
        }
        if lpips is not None:
            shardings["frozen"] = jax.tree.map(lambda _: replicated, shapes["frozen"])
        abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes, shardings)
        return StateSpec(cfg, self.graphdef, optimizer, abstract, shardings,
                         jax.jit(init, out_shardings=shardings))

    # --- steps -------------------------------------------------------------------------

    def _generator_loss(self, gen_params, stats, frozen, images):
        """Reconstruction + perceptual + quantiser loss, and what the step reports about it."""
        t = self.train_config
        model = nnx.merge(self.graphdef, gen_params, stats, copy=True)
        reconstruction, out = model(images, train=True)
        l1 = jnp.mean(jnp.abs(reconstruction - images))
        l2 = jnp.mean(jnp.square(reconstruction - images))
        perceptual_loss = jnp.zeros(())
        if frozen is not None:
            lpips = nnx.merge(self.lpips_graphdef, frozen["lpips"])
            perceptual_loss = jnp.mean(lpips(reconstruction, images))
        nll = t.l1_weight * l1 + t.l2_weight * l2 + t.perceptual_weight * perceptual_loss
        parts = {"l1": l1, "l2": l2, "perceptual": perceptual_loss, "commitment": out.commitment_loss,
                 "codebook_loss": out.codebook_loss, "perplexity": out.perplexity, "batch_usage": out.usage,
                 "reconstruction_loss": nll}
        new_stats = nnx.to_pure_dict(nnx.state(model, CodebookStats))
        return nll + out.loss, (reconstruction, out.latents, new_stats, parts)

    def _gan_loss(self, gen_params, disc_params, stats, images):
        """Hinge generator loss of the reconstructions under the current discriminator."""
        reconstruction, _ = nnx.merge(self.graphdef, gen_params, stats, copy=True)(images)
        return hinge_g_loss(nnx.merge(self.disc_graphdef, disc_params)(reconstruction))

    def _disc_loss(self, disc_params, images, reconstruction):
        disc = nnx.merge(self.disc_graphdef, disc_params)
        return hinge_d_loss(disc(images), disc(jax.lax.stop_gradient(reconstruction)))

    def _restart(self, gen_params, stats, latents, rng, step):
        """Every `restart_every` steps, restarts dead codes from this batch's encoder outputs."""

        def restart(operands):
            gen_params, stats = operands
            model = nnx.merge(self.graphdef, gen_params, stats, copy=True)
            model.quantizer.restart_dead_codes(latents.reshape(-1, latents.shape[-1]),
                                               jax.random.fold_in(jax.random.wrap_key_data(rng), step))
            _, new_params, new_stats = nnx.split(model, nnx.Param, CodebookStats)
            return nnx.to_pure_dict(new_params), nnx.to_pure_dict(new_stats)

        due = (step + 1) % self.train_config.restart_every == 0
        return jax.lax.cond(due, restart, lambda operands: operands, (gen_params, stats))

    def train_step(self):
        t, optimizer = self.train_config, self.optimizer
        schedule = learning_rate_schedule(self.config.optim, schedule_steps(self.config))

        def step_fn(state, batch):
            images = _images(batch)
            params, step = state["params"], state["step"]
            (loss, (reconstruction, latents, stats, parts)), grads = jax.value_and_grad(
                self._generator_loss, has_aux=True)(params["generator"], state["stats"], state.get("frozen"),
                                                    images)

            def with_gan(grads):
                g_loss, g_grads = jax.value_and_grad(self._gan_loss)(
                    params["generator"], params["discriminator"], state["stats"], images)
                weight = t.disc_weight * adaptive_weight(_at(grads, LAST_DECODER_LAYER),
                                                         _at(g_grads, LAST_DECODER_LAYER))
                d_loss, d_grads = jax.value_and_grad(self._disc_loss)(params["discriminator"], images,
                                                                      reconstruction)
                return jax.tree.map(lambda a, b: a + weight * b, grads, g_grads), d_grads, g_loss, d_loss, weight

            def without_gan(grads):
                zeros = jax.tree.map(jnp.zeros_like, params["discriminator"])
                return grads, zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(())

            gan_on = step >= t.disc_start
            grads, d_grads, g_loss, d_loss, weight = jax.lax.cond(gan_on, with_gan, without_gan, grads)
            updates, gen_opt = optimizer.update(grads, state["opt_state"]["generator"], params["generator"])
            generator = optax.apply_updates(params["generator"], updates)
            d_updates, d_opt = optimizer.update(d_grads, state["opt_state"]["discriminator"],
                                                params["discriminator"])
            # Before disc_start the discriminator (and its optimiser state) stays as it was.
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(gan_on, n, o), new, old)  # noqa: E731
            discriminator = keep(optax.apply_updates(params["discriminator"], d_updates), params["discriminator"])
            d_opt = keep(d_opt, state["opt_state"]["discriminator"])
            if self.model_config.dead_code_threshold > 0:
                generator, stats = self._restart(generator, stats, latents, state["rng"], step)
            new_state = dict(state, step=step + 1, stats=stats,
                             params={"generator": generator, "discriminator": discriminator},
                             opt_state={"generator": gen_opt, "discriminator": d_opt})
            usage = stats["quantizer"]["usage"]
            metrics = parts | {
                "loss": loss + weight * g_loss, "g_loss": g_loss, "d_loss": d_loss, "gan_weight": weight,
                "psnr": jnp.mean(_psnr(reconstruction, images)), "grad_norm": optax.tree.norm(grads),
                "lr": schedule(step),
                # Codes used recently: usage EMA above 1% of a uniform share of the batch's codes.
                "codebook_usage": jnp.mean((usage > 0.01 * jnp.sum(usage) / usage.shape[0]).astype(jnp.float32)),
            }
            return new_state, metrics

        return step_fn

    def eval_step(self):
        def step_fn(state, batch):
            images = _images(batch)
            model = nnx.merge(self.graphdef, state["params"]["generator"], state["stats"], copy=True)
            reconstruction, out = model(images)
            counts, _, _ = code_histogram(out.codes, self.model_config.codebook_size)
            return {"psnr": jnp.sum(_psnr(reconstruction, images)),
                    "l1": jnp.sum(jnp.mean(jnp.abs(reconstruction - images), axis=(1, 2, 3))),
                    "images": jnp.float32(images.shape[0]), "code_counts": counts}

        return step_fn

    def eval_metrics(self, sums: dict) -> dict:
        sums = jax.device_get(sums)
        counts = np.asarray(sums["code_counts"])
        probs = counts / max(counts.sum(), 1.0)
        n = float(sums["images"])
        return {"psnr": float(sums["psnr"]) / n, "l1": float(sums["l1"]) / n,
                "codebook_usage": float(np.mean(counts > 0)),
                "codebook_perplexity": float(np.exp(-np.sum(probs * np.log(probs + 1e-10))))}

    # --- data and accounting --------------------------------------------------------------

    def dataset(self, split: str, process_index: int, process_count: int) -> grain.IterDataset:
        return self.example_batches(open_split(self.config, split), DropBadRecords(), ToImageBatch(), split,
                                    process_index, process_count)

    def batch_shapes(self) -> dict:
        r, c = self.model_config.resolution, self.model_config.in_channels
        return {"images": ((self.config.data.global_batch_size, r, r, c), jnp.uint8)}

    def units_per_step(self) -> int:
        return self.config.data.global_batch_size

    def flops_per_unit(self) -> float:
        """Forward FLOPs of one image through the VQGAN (XLA's count) x 3 for training."""
        r, c = self.model_config.resolution, self.model_config.in_channels
        abstract = self.spec.abstract

        def forward(params, stats, images):
            return nnx.merge(self.graphdef, params, stats, copy=True)(images)[0]

        cost = jax.jit(forward).lower(abstract["params"]["generator"], abstract["stats"],
                                      jax.ShapeDtypeStruct((1, r, r, c), jnp.float32)).cost_analysis()
        return 3.0 * float((cost or {}).get("flops", 0.0))

    def shapes(self) -> dict:
        return {f"vqgan.{k}": v for k, v in self.config.vqgan.to_dict().items()
                if k not in ("dtype", "ema_decay", "ema_epsilon", "commitment_beta", "codebook_loss_weight",
                             "dead_code_threshold", "usage_decay")}

    def progress(self, row: dict) -> str:
        return (f"loss {row['loss']:.4f} (l1 {row['l1']:.4f}, d {row['d_loss']:.3f}) | psnr {row['psnr']:.2f} dB"
                f" | codes used {100 * row['codebook_usage']:.0f}%")


def _at(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree
