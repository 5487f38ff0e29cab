"""cm3jax: train, resume and serve CM3leon-style mixed-modal models in JAX/Flax."""

__version__ = "0.1.0"
