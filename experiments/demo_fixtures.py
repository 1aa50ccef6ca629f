"""Tiny offline fixtures for `paper.py run --demo`, the README's tiny commands and the tests: a random Qwen2 (or
Llama) checkpoint in the Hub layout with a small trained tokenizer, written by this project's own model.py (only
runtime packages), and tiny dataset files in the Hub's column schemas (MedMCQA, OASST1, WikiText, TriviaQA)."""

import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's files

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Medical exam question: Which vitamin deficiency causes scurvy? Answer: C. Vitamin C",
    "Question: What is the capital of France?\nAnswer: Paris",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "system user assistant 0 1 2 3 4 5 6 7 8 9 A. B. C. D. Explanation: the heart pumps blood.",
    "Memory layers store facts in rows; sparse finetuning updates only a few of them.",
    "Perplexity is the exponential of the mean negative log-likelihood per token.",
]

# -----------------------------------------------------------------------------
# A tiny random model


def write_tokenizer(path: str, vocab_size: int = 384):
    """A small byte-level BPE with Qwen's special tokens (tokenizer.json + tokenizer_config.json), trained on CORPUS
    with the same code the synthetic-world experiment uses."""
    from data import train_bpe_tokenizer
    return train_bpe_tokenizer(CORPUS * 20, path, vocab_size)


def tiny_config(path: str, tie: bool = True, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, vocab: int = 384) -> dict:
    """The tokenizer written into path, and the config of a tiny model for it (Hugging Face's config.json keys)."""
    os.makedirs(path, exist_ok=True)
    n_tok = write_tokenizer(path, vocab)
    return dict(vocab_size=max(vocab, n_tok), hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                eos_token_id=n_tok - 1, bos_token_id=n_tok - 3)


def hf_order(named):
    """transformers' Qwen2 parameter order (within a block: attention, MLP, then the two norms; embeddings first,
    the final norm and an untied lm_head last), so that every builder draws the same weights."""
    name, _ = named
    parts = name.split(".")
    if parts[1:2] == ["layers"]:
        part = next(i for i, p in enumerate(("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"))
                    if parts[3] == p)
        return (1, int(parts[2]), part)
    return ({"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(name, 3), 0, 0)


@torch.no_grad()
def randomize_(model, seed: int):
    """Random weights with non-zero biases and norm weights, drawn in hf_order: the same tensors for this project's
    Qwen2 and transformers' (whatever their own init drew)."""
    torch.manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=hf_order):
        if name.endswith("bias"):
            p.normal_(0, 0.1)
        elif "norm" in name:
            p.copy_(1 + 0.1 * torch.randn_like(p))
        else:
            p.normal_(0, 0.08)
    return model


def write_checkpoint(path: str, seed: int = 0, dtype=torch.float32, family: str = "qwen2", **shape):
    """A random Qwen2 (family "llama": a Llama, no biases) in the Hub layout, built by model.py and written by
    checkpoint.save_pretrained; shape: tiny_config's."""
    from checkpoint import save_pretrained
    from model import Qwen2, Qwen2Config
    model = randomize_(Qwen2(Qwen2Config(**tiny_config(path, **shape), model_type=family)), seed)
    save_pretrained(model.to(dtype), path)
    return path


# -----------------------------------------------------------------------------
# Tiny dataset files in the Hub's column schemas

FRUITS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "grape"]
ORGANS = ["heart", "liver", "lung", "kidney", "brain", "skin", "bone", "blood"]


def medmcqa_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        opts = rng.sample(ORGANS, 4)
        cop = rng.randrange(4)
        rows.append({"id": f"q{i}", "question": f"Which organ does the {FRUITS[i % len(FRUITS)]} help?",
                     "opa": opts[0], "opb": opts[1], "opc": opts[2], "opd": opts[3], "cop": cop,
                     "choice_type": "single" if i % 5 else "multi", "exp": f"The {opts[cop]} is right.",
                     "subject_name": "Anatomy", "topic_name": None})
    return rows


def oasst1_rows(n_trees: int, seed: int = 0):
    """Message trees: a prompter root, an assistant reply, sometimes a follow-up turn; some non-English. Every
    other first reply is long enough (50+ characters) for the paper's reply filter; ranks 0, 1 and 2 occur."""
    rng = random.Random(seed)
    rows = []
    for t in range(n_trees):
        lang = "en" if t % 4 else "de"
        root = f"t{t}-m0"
        rows.append({"message_id": root, "parent_id": None, "message_tree_id": f"t{t}", "role": "prompter",
                     "text": f"Tell me about the {rng.choice(FRUITS)}.", "lang": lang, "deleted": False,
                     "review_result": True, "rank": None, "synthetic": False})
        rows.append({"message_id": f"t{t}-m1", "parent_id": root, "message_tree_id": f"t{t}", "role": "assistant",
                     "text": f"The {rng.choice(FRUITS)} is good for the {rng.choice(ORGANS)}."
                             + (" It keeps well in a cool place for a week." if t % 2 else ""), "lang": lang,
                     "deleted": False, "review_result": True, "rank": t % 3, "synthetic": False})
        if t % 3 == 0:
            rows.append({"message_id": f"t{t}-m2", "parent_id": f"t{t}-m1", "message_tree_id": f"t{t}",
                         "role": "prompter", "text": "Why?", "lang": lang, "deleted": False,
                         "review_result": True, "rank": None, "synthetic": False})
            rows.append({"message_id": f"t{t}-m3", "parent_id": f"t{t}-m2", "message_tree_id": f"t{t}",
                         "role": "assistant", "text": f"Because the {rng.choice(ORGANS)} needs it.",
                         "lang": lang, "deleted": False, "review_result": True, "rank": 0, "synthetic": False})
    return rows


def write_jsonl(path: str, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write_parquet(path: str, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def wikitext_rows(n: int, seed: int = 0):
    """WikiText-style rows ({"text"}), some empty, as the Hub's files have them."""
    rng = random.Random(seed)
    return [{"text": "" if i % 3 == 0 else f" The {rng.choice(FRUITS)} and the {rng.choice(ORGANS)} . \n"}
            for i in range(n)]


def triviaqa_rows(n: int, seed: int = 0):
    """TriviaQA rc.nocontext-style rows: a question and its answer's value and aliases."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        organ = rng.choice(ORGANS)
        rows.append({"question": f"Which organ does the {FRUITS[i % len(FRUITS)]} help?",
                     "answer": {"value": organ, "aliases": [organ, organ.title()]}})
    return rows
