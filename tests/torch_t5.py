"""Test helper: a HuggingFace PyTorch T5 with random weights, and the same weights as our params.

No downloads: the model is built from a `transformers.T5Config` made by our config exporter. All
weights are random, layer-norm scales included (HF initialises them to 1, which would hide a
mis-mapped norm). For T5 v1.1 `lm_head` gets its own fresh weight, because transformers 5 ties it
to `shared` whatever `tie_word_embeddings` says. Params come through our HF mapping, so parity
tests exercise the importer too.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers

from doa_jax.checkpoints import hf
from doa_jax.model import T5Config


def hf_config(cfg: T5Config) -> transformers.T5Config:
    """transformers' T5Config for `cfg` (from the config.json our exporter writes)."""
    return transformers.T5Config.from_dict(hf.config_to_hf(cfg))


def make_hf_t5(cfg: T5Config, seed: int = 0) -> tuple[transformers.T5ForConditionalGeneration, dict]:
    """(HF model in eval mode, float32, random weights; our params holding the same weights)."""
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(hf_config(cfg)).float().eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif "relative_attention_bias" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    if not cfg.logits_via_embedding:
        weight = torch.randn(cfg.vocab_size, cfg.emb_dim, generator=generator) * cfg.emb_dim ** -0.5
        model.lm_head.weight = torch.nn.Parameter(weight)
    assert model.config.scale_decoder_outputs == cfg.logits_via_embedding
    assert (model.lm_head.weight is model.shared.weight) == cfg.logits_via_embedding
    tensors = {name: t.detach().numpy().astype(np.float32) for name, t in model.state_dict().items()}
    params = hf.params_from_hf_tensors(tensors, cfg, "HF PyTorch T5 state_dict")
    return model, params
