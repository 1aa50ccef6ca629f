"""Builders for tiny offline test artifacts: a random Qwen2 checkpoint in the Hub layout and a trained tokenizer."""

import os

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Medical exam question: Which vitamin deficiency causes scurvy? Answer: C. Vitamin C",
    "Question: What is the capital of France?\nAnswer: Paris",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "system user assistant 0 1 2 3 4 5 6 7 8 9 A. B. C. D. Explanation: the heart pumps blood.",
    "Memory layers store facts in rows; sparse finetuning updates only a few of them.",
    "Perplexity is the exponential of the mean negative log-likelihood per token.",
]


def write_tokenizer(path: str, vocab_size: int = 384):
    """A small byte-level BPE with Qwen's special tokens (tokenizer.json + tokenizer_config.json), trained on CORPUS
    with the same code the synthetic-world experiment uses."""
    from data import train_bpe_tokenizer
    return train_bpe_tokenizer(CORPUS * 20, path, vocab_size)


def hf_order(named):
    """transformers' Qwen2 parameter order (within a block: attention, MLP, then the two norms; embeddings first,
    the final norm and an untied lm_head last), so that both builders draw the same weights."""
    name, _ = named
    parts = name.split(".")
    if parts[1:2] == ["layers"]:
        part = next(i for i, p in enumerate(("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"))
                    if parts[3] == p)
        return (1, int(parts[2]), part)
    return ({"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(name, 3), 0, 0)


def write_checkpoint(path: str, tie: bool = True, hidden: int = 64, layers: int = 4, heads: int = 4,
                     kv_heads: int = 2, intermediate: int = 128, vocab: int = 384, seed: int = 0,
                     dtype=torch.float32, reference: bool = True, family: str = "qwen2"):
    """A random Qwen2ForCausalLM (family "llama": a LlamaForCausalLM, no biases) in the Hub layout, with non-zero
    biases and norm weights: built and saved by
    transformers (reference=True, what the tests load, so that our loader meets the reference's files), or by this
    repo's own Qwen2 and checkpoint.save_pretrained (reference=False: no test-only package needed, for the README's
    commands)."""
    os.makedirs(path, exist_ok=True)
    n_tok = write_tokenizer(path, vocab)
    cfg = dict(vocab_size=max(vocab, n_tok), hidden_size=hidden, intermediate_size=intermediate,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
               max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
               eos_token_id=n_tok - 1, bos_token_id=n_tok - 3)
    if reference and family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(**cfg, pad_token_id=n_tok - 3, attention_bias=False, mlp_bias=False))
    elif reference:
        from transformers import Qwen2Config, Qwen2ForCausalLM
        model = Qwen2ForCausalLM(Qwen2Config(**cfg, pad_token_id=n_tok - 3))
    else:
        from model import Qwen2, Qwen2Config
        model = Qwen2(Qwen2Config(**cfg, model_type=family))
    torch.manual_seed(seed)  # after construction, whose own random init differs between the two
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=hf_order):  # the same draws for the same tensors
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    if reference:
        model.to(dtype).save_pretrained(path)
    else:
        from checkpoint import save_pretrained
        save_pretrained(model.to(dtype), path)
    return path
