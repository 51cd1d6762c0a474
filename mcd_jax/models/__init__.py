"""The frozen chat model: config, Flax transformer and checkpoint loading."""

from mcd_jax.models.checkpoint_files import CheckpointError
from mcd_jax.models.config import ModelConfig, RopeScaling
from mcd_jax.models.loading import LoadedModel, load_model
from mcd_jax.models.transformer import KVCache, Transformer, TransformerOutput

__all__ = [
    "CheckpointError",
    "KVCache",
    "LoadedModel",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "TransformerOutput",
    "load_model",
]
