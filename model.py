"""
Qwen2.5 in one file: config, model, KV cache, generation, loading the Hub's weights, and LoRA. The Llama family
(SmolLM2, TinyLlama, Llama 2) is the same architecture without the q/k/v biases: config.json's model_type "llama"
loads into the same classes.

It loads the Hugging Face Hub's safetensors weights directly and keeps Hugging Face's
parameter names, so a checkpoint's keys map one to one onto `state_dict()` keys:

    model.embed_tokens.weight                              (vocab, C)
    model.layers.{i}.input_layernorm.weight                (C,)
    model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}  q: (nh*hs, C), k/v: (nkv*hs, C); Llama: no bias
    model.layers.{i}.self_attn.o_proj.weight               (C, nh*hs)
    model.layers.{i}.post_attention_layernorm.weight       (C,)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight        gate/up: (F, C), down: (C, F)
    model.norm.weight                                      (C,)
    lm_head.weight                                         (vocab, C), absent from the file when tied

Shape letters: B batch, T new positions, S key positions (cache included), C hidden size,
nh query heads, nkv key/value heads, hs head size, F MLP size.

Imports nothing of this project. Writing a Hub-format folder, the tokenizer and talking to a model live elsewhere
(checkpoint.save_pretrained, data.Tokenizer, eval.py --prompt).
"""

import json
import math
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# Files: the Hub (the one place this project downloads from it), JSON, and safetensors with each key and shape checked

HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
             "merges.txt", "*.safetensors", "model.safetensors.index.json"]


def first_line(e: Exception) -> str:
    """An exception's message, its first line (huggingface_hub's run to several)."""
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def hub_download(repo: str, what: str, offline: str, **kw) -> str:
    """huggingface_hub.snapshot_download(repo, **kw) (a model's files here, a dataset's for data.py): the local folder
    of the files, fetched or taken from the cache; where they cannot be had, a FileNotFoundError naming `what` and
    what to do offline."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo, **kw)
    except Exception as e:  # offline without a cache, unknown repo or revision, ...
        raise FileNotFoundError(f"could not fetch {what} from the Hugging Face Hub ({first_line(e)}); offline, "
                                f"{offline}") from e


def looks_like_hub_id(name: str) -> bool:
    """'owner/name' as the Hub spells repo ids, and not a local path: no ./, ../, / or ~ in front, nothing of that
    name on disk, and no local folder called `owner` (so runs/typo is a missing folder, not a repo to fetch)."""
    owner = name.partition("/")[0]
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) is not None
            and not os.path.exists(name) and not os.path.isdir(owner))


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> str:
    """A local directory as is; otherwise a Hub repo id, fetched at `revision` (default: the newest) or taken
    from the cache (config, tokenizer, safetensors only)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if not looks_like_hub_id(name_or_path):
        raise FileNotFoundError(f"model directory not found: {name_or_path}")
    at = f" at revision {revision}" if revision else ""
    return hub_download(name_or_path, f"{name_or_path!r}{at}", "give a local model folder (import_gguf.py makes one "
                        "from a GGUF file)", revision=revision, allow_patterns=HUB_FILES)


def read_json(path: str):
    """The JSON in path (config.json here; every JSON file of a run elsewhere); a ValueError naming the file if it
    is not valid JSON (e.g. truncated)."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}): restore or remove it") from e


def atomic_write(path: str, write):
    """Call write(tmp_path), then rename onto path, so a crash never leaves a half-written file. A failure (a full
    disk, a read-only folder, a writer's own error) is an OSError naming `path`; the temporary file is removed
    (one that a kill -9 leaves behind is removed by the next checkpoint.remove_temp_files of its folder)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:  # e.g. safetensors' SafetensorError, which names no file
        raise OSError(f"could not write {path}: {str(e).strip() or type(e).__name__}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj):
    """Write obj as indented JSON, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def unreadable(file: str, e: Exception) -> ValueError:
    """The error for a weights file safetensors cannot read (its own error names no file)."""
    return ValueError(f"weights file {file} is unreadable (truncated or corrupt?): {e}")


def safetensors_files(path: str) -> list[str]:
    """The weights files of a model folder: model.safetensors, or the shards model.safetensors.index.json names."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    for file in (files := [os.path.join(path, name) for name in files]):
        if not os.path.exists(file):
            raise FileNotFoundError(f"weights file missing: {file}")
    return files


def load_safetensors_dir(path: str) -> dict:
    """All tensors of a model folder's weights files (safetensors_files)."""
    from safetensors.torch import load_file
    state = {}
    for file in safetensors_files(path):
        try:
            state.update(load_file(file))
        except Exception as e:
            raise unreadable(file, e) from e
    return state


def check_tensors(expected: dict, state: dict, where: str, allow_missing: bool = False, ignore=()):
    """The one check every loader makes: the key set of `state` equals that of `expected` ({name: shape or
    tensor}; with allow_missing, a subset) and every shape matches; a mismatch is a ValueError naming `where`
    and the tensor. Names in `ignore` may appear in state."""
    missing = [] if allow_missing else sorted(set(expected) - set(state))
    for kind, names in (("missing", missing), ("unexpected", sorted(set(state) - set(expected) - set(ignore)))):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise ValueError(f"{where}: {kind} tensor {names[0]}{more}")
    for k, want in expected.items():
        want = tuple(getattr(want, "shape", want))
        if k in state and tuple(state[k].shape) != want:
            raise ValueError(f"{where}: tensor {k} has shape {tuple(state[k].shape)}, expected {want}")


def load_tensors(expected: dict, state: dict, where: str):
    """Copy `state` into the tensors of `expected` ({name: tensor} sharing storage with a model's parameters, e.g.
    lora_state_dict(model) or memory.memory_state_dict(model)) once check_tensors passes."""
    check_tensors(expected, state, where)
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(state[k])


# -----------------------------------------------------------------------------
# Config

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}  # model_type -> Hub class name


@dataclass
class Qwen2Config:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = 151643
    eos_token_id: int | list | None = 151645
    model_type: str = "qwen2"  # or "llama": the same blocks without q/k/v biases

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen2Config":
        """Read a Hub config.json (Hugging Face field names), refusing what we do not implement."""
        d = dict(d, model_type=d.get("model_type", "qwen2"))
        if d["model_type"] not in ARCHITECTURES:
            raise ValueError(f"config.json: model_type {d['model_type']!r} is not supported (only "
                             + " or ".join(map(repr, ARCHITECTURES)) + ")")
        if d["model_type"] == "llama" and (d.get("attention_bias") or d.get("mlp_bias")):
            raise ValueError("config.json: a Llama with attention_bias or mlp_bias is not supported (no biases)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        if d.get("use_sliding_window", False):
            raise ValueError("config.json: use_sliding_window=true is not supported (only full attention)")
        if any(t != "full_attention" for t in d.get("layer_types") or []):
            raise ValueError(f"config.json: layer_types {d['layer_types']!r} is not supported (only full_attention)")
        # transformers 5 writes rope_parameters {rope_theta, rope_type}; older files rope_theta (+ rope_scaling)
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"config.json: rope_type {rope['rope_type']!r} is not supported (only 'default')")
        if d.get("rope_scaling"):
            raise ValueError(f"config.json: rope_scaling {d['rope_scaling']!r} is not supported")
        if "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if "dtype" in d and "torch_dtype" not in d:  # transformers 5 renamed torch_dtype to dtype
            d["torch_dtype"] = d["dtype"]
        if d.get("head_dim") not in (None, d.get("hidden_size", 0) // d.get("num_attention_heads", 1)):
            raise ValueError(f"config.json: head_dim {d['head_dim']} != hidden_size / num_attention_heads")
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError("config.json: hidden_size must divide by num_attention_heads, "
                             "and num_attention_heads by num_key_value_heads")
        return cfg

    @classmethod
    def from_json(cls, path: str) -> "Qwen2Config":
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file not found: {path}")
        return cls.from_dict(read_json(path))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(architectures=[ARCHITECTURES[self.model_type]], hidden_act="silu", head_dim=self.head_dim)
        if self.model_type == "qwen2":
            d.update(use_sliding_window=False)
        else:
            d.update(attention_bias=False, mlp_bias=False)
        return d


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)  # cast back first, then scale (as Hugging Face does)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos, sin of shape (..., hs) for integer positions (...,); frequencies in fp32. The first half of sin is
    negated, so that apply_rope needs no negation (rotate_half(x) * sin = x.roll(hs / 2) * signed sin, exactly)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
    half = head_dim // 2
    sign = torch.cat((torch.full((half,), -1.0), torch.ones(half))).to(position_ids.device)  # (-1, .., -1, 1, .., 1)
    return emb.cos().to(dtype), (emb.sin() * sign).to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i + hs/2}) pair, as Hugging Face's x * cos + rotate_half(x) * sin with
    rotate_half(x) = cat(-x2, x1): the roll swaps the halves, the signed sin negates the first."""
    # x (B, nh, T, hs); cos, sin (B or 1, T, hs) -> (B or 1, 1, T, hs) to broadcast over heads
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class KVCache(nn.Module):
    """Keys and values of every position seen so far, written in place (gpt-fast style)."""

    def __init__(self, batch_size: int, max_len: int, n_kv_head: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start, k, v):
        """Write k, v (B, nkv, T, hs) at positions start..start+T; return all keys and values so far. With start a
        tensor (one token, static shapes for a compiled decode step): write there and return the whole cache,
        whose positions not yet written the caller masks out."""
        if isinstance(start, torch.Tensor):
            self.k.index_copy_(2, start.view(1), k)
            self.v.index_copy_(2, start.view(1), v)
            return self.k, self.v
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, start: int):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start, k, v)  # (B, nkv, S, hs)
        rep = self.n_head // self.n_kv_head  # GQA: each key/value head serves `rep` query heads
        if mask is None:  # no padding: causal attention (T > 1 only happens without a cache offset)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=rep > 1)
        elif T == 1:  # one new token with padding: the rep query heads of a kv head become rep query rows
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv_head, rep, self.head_dim), k, v,
                                               attn_mask=mask)  # mask (B, 1, 1, S) -> y (B, nkv, rep, hs)
            y = y.view(B, self.n_head, 1, self.head_dim)  # (B, nh, 1, hs)
        else:  # padded prefill: a mask with GQA is fastest as plain multi-head attention on most backends
            k = k.repeat_interleave(rep, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(rep, dim=1)  # (B, nh, S, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (B, 1, T, S) bool
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hs)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module | None = MLP(cfg)
        # An optional extra branch beside the MLP, fed the same normed input. memory.py puts its
        # product-key memory here (additive: mlp + memory; replacement: mlp set to None).
        self.memory: nn.Module | None = None

    def forward(self, x, cos, sin, mask, start: int):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start)
        h = self.post_attention_layernorm(x)
        if self.memory is None:
            return x + self.mlp(h)
        if self.mlp is None:
            return x + self.memory(h)
        return x + (self.mlp(h) + self.memory(h))


def chunk_loss(lm_head, h, targets):
    """Summed cross-entropy of the next-token logits of h (N, C) against targets (N,), in fp32."""
    return F.cross_entropy(lm_head(h).float(), targets, reduction="sum")


def padded_attention(attention_mask, start: int):
    """
    From a padding mask (B, S) over all key positions, make the boolean attention mask (B, 1, T, S) for the
    T newest positions (keys must be real and not in the future) and their RoPE positions (B, T), which count
    real tokens only. A padding query with no real key before it (left padding) attends to itself alone, so
    no row is empty (its output is never used); after a real token (right padding) it attends to the real
    tokens only, as in Hugging Face.
    """
    S = attention_mask.shape[1]  # T = S - start new positions
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
    q_pos = torch.arange(start, S, device=attention_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos) & attention_mask[:, None, :]  # (B, T, S)
    mask = mask | ((k_pos == q_pos) & ~mask.any(-1, keepdim=True))  # never an empty row
    return mask[:, None], position_ids  # (B, 1, T, S)


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, seen=None, repetition_penalty=1.0):
    """Pick the next token (B,) from logits (B, vocab)."""
    if seen is not None and repetition_penalty != 1.0:
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:  # keep the smallest set of most likely tokens whose mass reaches top_p (as transformers)
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending: the tail's mass is summed first, exactly
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), num_samples=1).squeeze(1)


# -----------------------------------------------------------------------------
# The model


class Qwen2(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # Hugging Face nests the transformer under `model.`
        # nn.Embedding's own init (normal(0, 1)), skipped on the meta device, where from_pretrained builds the model
        # to load it: torch's meta normal_ imports some 800 modules, 1.5-2 s of every train.py and eval.py start
        table = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=table if table.is_meta else
                                               nn.init.normal_(table))
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # caches, not weights (in no state_dict, not moved by .to()): RoPE's cos, sin table (rope), the KV caches kept
        # per (batch, length) for a compiled decode step (setup_cache), that compiled step (compiled_decode_step)
        self.rope_table = None
        self.kept_caches = {}
        self.compiled_decode = None

    def init_weights(self, std: float = 0.02):
        """Random init as Hugging Face does (normal(0, 0.02), zero biases, unit norms); for models trained from
        scratch."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        return self

    def forward(self, idx, attention_mask=None, start: int = 0, hf_padding: bool = False, labels=None,
                loss_chunk: int = 4096):
        """
        idx (B, T) token ids -> logits (B, T, vocab) in fp32; or, given labels (B, T) (-100: no loss), the summed
        next-token loss (logits[:, t] predicts labels[:, t + 1]), computed loss_chunk positions at a time so that
        the (B, T, vocab) fp32 logits never exist (each chunk's logits are recomputed in backward).
        attention_mask (B, start+T): 1 for real tokens, 0 for padding, over every position the model has seen
        (the cache's and the new ones); positions count real tokens only, so left or right padding gives each
        sequence, at its real positions, the logits it would get alone.
        start: how many positions the KV cache already holds.
        hf_padding: compute the padding positions of a right-padded batch as Hugging Face's Qwen2 does in
        training (they attend to the real tokens only, at positions 0..T-1), for when what they compute is
        used (the paper code's memory read counts include them). Real positions are the same either way.
        """
        h = self.hidden_states(idx, attention_mask, start, hf_padding)
        if labels is None:
            return self.lm_head(h).float()
        targets = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()  # (B*T,): labels[:, t + 1], none at T - 1
        keep = (targets != -100).nonzero().squeeze(1)  # the positions with a loss (one host sync; no boolean mask)
        h, targets = h.flatten(0, 1)[keep], targets[keep]  # (N, C), (N,)
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, len(targets), loss_chunk):
            total = total + torch.utils.checkpoint.checkpoint(
                chunk_loss, self.lm_head, h[i:i + loss_chunk], targets[i:i + loss_chunk], use_reentrant=False)
        return total

    def hidden_states(self, idx, attention_mask=None, start: int = 0, hf_padding: bool = False):
        """The final normed hidden states (B, T, C), before lm_head."""
        B, T = idx.shape
        if idx.dtype != torch.long:
            raise TypeError(f"idx must be a LongTensor, got {idx.dtype}")
        if attention_mask is not None and attention_mask.shape != (B, start + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, start + T)}")
        # Right padding (training batches) needs no mask: under causal attention no real token sees the padding
        # after it, so the plain causal path (flash attention on GPU) gives real tokens the same result. The
        # outputs at padded positions then differ from the masked path's; only hf_padding asks for them, and a
        # batch without padding runs unmasked then too, as Hugging Face's Qwen2 (sdpa) runs it.
        right_padded = unpadded = False
        if attention_mask is not None and start == 0:  # one host sync for both
            right_padded, unpadded = torch.stack([(attention_mask[:, 1:] <= attention_mask[:, :-1]).all(),
                                                  attention_mask.bool().all()]).tolist()
        position_ids = None  # (B, T), or None: start..start+T-1 in every row
        if right_padded and hf_padding and not unpadded:  # causal over the real keys; positions 0..T-1 for all
            mask = padded_attention(attention_mask.bool(), 0)[0]
        elif (attention_mask is None and (start == 0 or T == 1)) or right_padded:  # causal, or one token sees all
            mask = None
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, start + T, dtype=torch.long, device=idx.device)
            mask, position_ids = padded_attention(attention_mask.bool(), start)
        cos, sin = self.rope(start + T)  # (S, hs) each
        if position_ids is None:  # positions start..start+T-1 in every row: a view, no kernel
            cos, sin = cos[None, start:start + T], sin[None, start:start + T]  # (1, T, hs)
        else:
            cos, sin = cos[position_ids], sin[position_ids]  # (B, T, hs)
        return self.blocks(idx, cos, sin, mask, start)

    def rope(self, n: int):
        """RoPE's cos, sin (n', hs) of positions 0..n'-1 (n' >= n) in the model's dtype: rope_cos_sin's table,
        computed once and kept on the model (regrown for a longer n, another device or dtype), so that a forward
        slices it instead of recomputing it (about 15 small kernels per forward)."""
        w = self.model.embed_tokens.weight
        table = self.rope_table
        if table is None or table[0].shape[0] < n or table[0].device != w.device or table[0].dtype != w.dtype:
            n = 1 << (max(n, 1024) - 1).bit_length()  # a power of two: a growing input rebuilds it a few times
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor even if built while generating
                table = rope_cos_sin(torch.arange(n, device=w.device), self.config.head_dim, self.config.rope_theta,
                                     w.dtype)
            self.rope_table = table
        return table

    def blocks(self, idx, cos, sin, mask, start: int):
        """Embeddings, every block, the final norm: (B, T) ids -> (B, T, C), given each position's RoPE cos and
        sin (B or 1, T, hs), the attention mask (None: causal) and the KV cache offset."""
        x = self.model.embed_tokens(idx)  # (B, T, C)
        for block in self.model.layers:
            x = block(x, cos, sin, mask, start)
        return self.model.norm(x)

    # --- KV cache and generation -------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_len: int, keep: bool = False):
        """A KV cache in every attention layer; keep: the same cache objects on every call with this shape (a
        compiled decode step is specialized to them; what they held before is overwritten or masked out)."""
        p = self.lm_head.weight
        caches = self.kept_caches.get((batch_size, max_len)) if keep else None
        if caches is None:
            caches = [KVCache(batch_size, max_len, b.self_attn.n_kv_head, b.self_attn.head_dim, p.dtype, p.device)
                      for b in self.model.layers]
            if keep:
                self.kept_caches[batch_size, max_len] = caches
        for block, cache in zip(self.model.layers, caches):
            block.self_attn.kv_cache = cache

    def clear_cache(self):
        for block in self.model.layers:
            block.self_attn.kv_cache = None

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens: int, temperature: float = 0.0, top_k=None, top_p=None,
                 eos_token_id=None, attention_mask=None, repetition_penalty: float = 1.0, pad_token_id=None,
                 stream=None, compiled: bool = False):
        """
        Append up to max_new_tokens to idx (B, T) and return (B, T + n). Greedy at temperature 0, else sampled
        (after top_k, then top_p). A batch must be left-padded, with attention_mask marking the real tokens.
        Each sequence stops at its first eos (an id or a list of ids) and is padded with pad_token_id (default:
        the first eos) after it; generation ends early when every sequence has stopped.
        repetition_penalty follows Hugging Face (divide positive logits, multiply negative ones, of every token id
        already in the sequence), counting real tokens only, never padding.
        stream: optional callable receiving each step's new tokens (B,) as they are made.
        compiled: decode through torch.compile of decode_step (CUDA graphs on a GPU), with static shapes as
        gpt-fast does: the cache's length rounded up to 64, every position attended with the unwritten ones masked
        out, the position a tensor. The same tokens as eager decoding; the first call of each
        batch size and length compiles.
        """
        B, T = idx.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        elif (attention_mask[:, -1] == 0).any():
            raise ValueError("generate needs left padding: the last position of every row must be a real token")
        eos = torch.tensor([] if eos_token_id is None else
                           [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                           dtype=torch.long, device=idx.device)
        if pad_token_id is None:
            pad_token_id = int(eos[0]) if len(eos) else 0
        seen = None
        if repetition_penalty != 1.0:  # (B, vocab) bool: token ids present among the real tokens
            counts = torch.zeros(B, self.config.vocab_size, dtype=torch.long, device=idx.device)
            seen = counts.scatter_add_(1, idx, attention_mask.long()) > 0
        # without padding no mask is needed at all: causal prefill, then each new token sees the whole cache
        mask = attention_mask.long() if not bool(attention_mask.all()) else None
        # built once for the whole call: RoPE of every position, each row's next position, the decode mask
        S = -(-(T + max_new_tokens) // 64) * 64 if compiled else T + max_new_tokens  # compiled: few lengths
        positions = torch.arange(S, device=idx.device)  # (S,)
        cos_all, sin_all = (t[None, :S] for t in self.rope(S))  # (1, S, hs)
        pos = attention_mask.sum(1)  # (B,): each row's real tokens = the position of its first new token
        keys = None if mask is None and not compiled else torch.cat(  # (B, 1, 1, S): every real token and new ones
            [attention_mask.bool(), attention_mask.new_ones(B, S - T, dtype=torch.bool)], 1)[:, None, None]
        self.setup_cache(B, S, keep=compiled)
        decode = self.compiled_decode_step() if compiled else self.decode_step
        try:
            logits = self.lm_head(self.hidden_states(idx, mask)[:, -1]).float()  # prefill: (B, vocab)
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            out = [idx]
            for i in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, top_p, seen, repetition_penalty)  # (B,)
                nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
                out.append(nxt[:, None])
                if stream is not None:
                    stream(nxt)
                if seen is not None:
                    seen[torch.arange(B, device=idx.device), nxt] = True
                done |= torch.isin(nxt, eos)
                if done.all() or i == max_new_tokens - 1:
                    break
                # one token per row, at its RoPE position pos + i, written to the cache at T + i
                logits = decode(nxt, pos + i, positions[T + i] if compiled else T + i, keys, cos_all, sin_all)
        finally:
            self.clear_cache()
        return torch.cat(out, dim=1)

    def decode_step(self, nxt, p, start, keys, cos_all, sin_all):
        """Logits (B, vocab) of one new token per row (B,) at RoPE positions p (B,), written to the KV cache at
        position `start`, attending every cached position up to it that keys (B, 1, 1, S) allow (None: all).
        start: an int (eager), or a 0-dim tensor (compiled: static shapes, the whole cache attended with the
        positions after start masked out)."""
        if isinstance(start, torch.Tensor):
            mask = keys & (torch.arange(keys.shape[-1], device=keys.device) <= start)  # (B, 1, 1, S)
        else:
            mask = None if keys is None else keys[..., :start + 1]  # (B, 1, 1, start + 1)
        h = self.blocks(nxt[:, None], cos_all[0, p][:, None], sin_all[0, p][:, None], mask, start)
        return self.lm_head(h[:, -1]).float()

    def compiled_decode_step(self):
        if self.compiled_decode is None:
            mode = "reduce-overhead" if self.lm_head.weight.is_cuda else None  # CUDA graphs: one launch per token
            self.compiled_decode = torch.compile(self.decode_step, mode=mode, dynamic=False)
        return self.compiled_decode

    # --- loading and saving -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype=None, device=None) -> "Qwen2":
        """Load a local Hub-format directory or a Hub repo id (downloaded with huggingface_hub)."""
        path = resolve_model_dir(name_or_path)
        cfg = Qwen2Config.from_json(os.path.join(path, "config.json"))
        if dtype is None:
            dtype = getattr(torch, cfg.torch_dtype) if isinstance(cfg.torch_dtype, str) else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        state = load_safetensors_dir(path)
        with torch.device("meta"):
            model = cls(cfg)
        model.load_hub_state_dict(state, dtype=dtype, device=device)
        return model

    def load_hub_state_dict(self, state: dict, dtype=None, device=None):
        """Load Hugging Face-named tensors, checking the key set and every shape; a mismatch names the tensor."""
        expected = self.hub_state_shapes()
        check_tensors(expected, state, "weights", ignore={"lm_head.weight"})
        if self.config.tie_word_embeddings and "lm_head.weight" in state:
            if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
                raise ValueError("weights: lm_head.weight differs from model.embed_tokens.weight but config ties them")
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items() if k in expected}
        self.load_state_dict(state, strict=False, assign=True)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # the tensors with no checkpoint counterpart: none in a plain Qwen2; buffers are made lazily
        return self

    def hub_state_shapes(self) -> dict:
        """{name: shape} of the tensors a Hub checkpoint holds for this config (lm_head only when untied)."""
        shapes = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)
        return shapes


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021), as in loralib / peft: W x + (B A dropout(x)) * alpha / r


class LoRALinear(nn.Linear):
    """
    An nn.Linear (same `weight`, `bias`, so base keys keep their Hub names) plus a low-rank update:
    lora_A (r, in) kaiming-uniform, lora_B (out, r) zeros, so at step 0 it equals the base layer.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # share, do not copy
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))  # (r, in), fp32
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))  # (out, r), fp32
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        x2 = x.reshape(-1, self.in_features)  # (N, in): 2-D, so that one addmm adds the scaled update
        out = x2 @ self.weight.t() if self.bias is None else torch.addmm(self.bias, x2, self.weight.t())  # (N, out)
        u = self.lora_dropout(x2) @ a.t()  # (N, r)
        return torch.addmm(out, u, b.t(), alpha=self.scaling).view(*x.shape[:-1], self.out_features)  # + s B A x

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + B A * scaling folded in (explicit; never done behind the user's back)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        delta = self.lora_B @ self.lora_A * self.scaling  # fp32, added then rounded once, as peft's merge
        out.weight = nn.Parameter((self.weight + delta).to(self.weight.dtype), requires_grad=self.weight.requires_grad)
        out.bias = self.bias
        return out


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: Qwen2, r: int = 16, alpha: float = 32, dropout: float = 0.05, targets=LORA_TARGETS):
    """Replace every targeted nn.Linear of every block by a LoRALinear sharing its weights. The base keys keep
    their names; the adapters add e.g. `model.layers.0.self_attn.q_proj.lora_A` (r, in) and `.lora_B` (out, r)."""
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"add_lora: unknown target modules {sorted(unknown)} (choose from {list(LORA_TARGETS)})")
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            if parent is None:
                continue
            for name in targets:
                layer = getattr(parent, name, None)
                if isinstance(layer, LoRALinear):
                    raise ValueError(f"add_lora: {name} already has an adapter")
                if isinstance(layer, nn.Linear):
                    setattr(parent, name, LoRALinear(layer, r, alpha, dropout))
    return model


def lora_state_dict(model: nn.Module) -> dict:
    """Only the adapters: {'model.layers.0.self_attn.q_proj.lora_A': (r, in), ...}."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, leaving a plain Qwen2 (in place; also returned)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model
