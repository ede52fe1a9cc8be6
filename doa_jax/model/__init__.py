"""Pure Flax T5: config, layers, encoder-decoder. Imports nothing from training, data or meshes."""
from doa_jax.model.config import SIZES, T5Config, config_for_size
from doa_jax.model.network import Transformer

__all__ = ["SIZES", "T5Config", "Transformer", "config_for_size"]
