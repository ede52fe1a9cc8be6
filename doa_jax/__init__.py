"""doa-jax: Distill or Annotate? Cost-efficient fine-tuning of compact T5 models, in JAX."""
__version__ = "0.1.0"

from doa_jax import platforms as _platforms

# Before any JAX import: no probing of accelerators this host lacks (the `aot` extra installs their
# plugins), and none of their start-up notices (see doa_jax/platforms.py).
_platforms.prepare()


def load_model(path_or_size_name, **kwargs):
    """Loads a T5 from a checkpoint path (HF, T5X legacy/Orbax, native) or a size name (random init).

    See `doa_jax.api.load_model`.
    """
    from doa_jax.api import load_model as _load_model

    return _load_model(path_or_size_name, **kwargs)


__all__ = ["load_model", "__version__"]
