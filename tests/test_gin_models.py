"""Model-size gin files build exactly the configs of the size table."""
import jax
import jax.numpy as jnp
import pytest

from doa_jax import gin_utils
from doa_jax.model import SIZES, T5Config, Transformer, config_for_size


@pytest.mark.parametrize("size", sorted(SIZES))
def test_model_gin_file_builds_the_size_table_config(size):
    # the vocab size is left to follow the run's vocabulary (MODEL_VOCAB_SIZE = None)
    gin_utils.parse([f"models/{size}.gin"])
    built = gin_utils.macro("MODEL_CONFIG")
    assert isinstance(built, T5Config)
    assert built == config_for_size(size, vocab_size=None)
    gin_utils.parse([f"models/{size}.gin"], ["MODEL_VOCAB_SIZE = 32128"])
    assert gin_utils.macro("MODEL_CONFIG") == config_for_size(size)


def test_gin_binding_overrides_a_model_field():
    gin_utils.parse(["models/t5_1_1_tiny.gin"], ["ACTIVATION_DTYPE = 'float32'", "DROPOUT_RATE = 0.1"])
    built = gin_utils.macro("MODEL_CONFIG")
    assert (built.dtype, built.dropout_rate) == ("float32", 0.1)


def test_size_names_resolve_in_every_spelling():
    assert config_for_size("small") == config_for_size("t5_1_1_small") == config_for_size("google/t5-v1_1-small")
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        config_for_size("huge")


def test_param_count_matches_published_sizes():
    # Published: 77M / 248M / 783M / 3B / 11B (T5 v1.1).
    counts = {s: config_for_size(s).num_params() / 1e6 for s in ("small", "base", "large", "xl", "xxl")}
    assert round(counts["small"]) == 77 and round(counts["base"]) == 248 and round(counts["large"]) == 783
    assert 2840 < counts["xl"] < 2860 and 11100 < counts["xxl"] < 11200


def test_a_vocab_size_left_unresolved_is_a_clear_error_before_any_model_is_built():
    follow = config_for_size("tiny", vocab_size=None)      # gin's MODEL_VOCAB_SIZE = None, never resolved
    tokens = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="T5Config.vocab_size is None .* was not resolved"):
        Transformer(follow).init(jax.random.PRNGKey(0), tokens, tokens)
    with pytest.raises(ValueError, match="was not resolved"):
        follow.num_params()
