"""Builders for tiny offline test artifacts: a random Qwen2 or Llama checkpoint in the Hub layout, written by
transformers (the reference the tests load) or by this project (experiments/demo_fixtures.py, the demo's)."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import demo_fixtures  # noqa: E402


def write_checkpoint(path: str, tie: bool = True, hidden: int = 64, layers: int = 4, heads: int = 4,
                     kv_heads: int = 2, intermediate: int = 128, vocab: int = 384, seed: int = 0,
                     dtype=torch.float32, reference: bool = True, family: str = "qwen2"):
    """A random Qwen2ForCausalLM (family "llama": a LlamaForCausalLM, no biases) in the Hub layout, with non-zero
    biases and norm weights: built and saved by transformers (reference=True, what the tests load, so that our
    loader meets the reference's files), or by this project's own Qwen2 (reference=False: demo_fixtures'); the same
    weights either way."""
    shape = dict(tie=tie, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                 vocab=vocab)
    if not reference:
        return demo_fixtures.write_checkpoint(path, seed=seed, dtype=dtype, family=family, **shape)
    cfg = demo_fixtures.tiny_config(path, **shape)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(**cfg, pad_token_id=cfg["bos_token_id"], attention_bias=False,
                                             mlp_bias=False))
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM
        model = Qwen2ForCausalLM(Qwen2Config(**cfg, pad_token_id=cfg["bos_token_id"]))
    demo_fixtures.randomize_(model, seed).to(dtype).save_pretrained(path)
    return path
