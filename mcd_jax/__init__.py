"""mcd-jax: Multilingual Collaborative Defense soft safety prompts in JAX/Flax."""

__version__ = "0.1.0"
