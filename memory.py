"""
Sparse Memory Finetuning (SMF), everything specific to it, top to bottom:

1. ProductKeyMemory: a product-key memory layer (Lample et al. 2019) with the "Memory+" output
   (Berges et al. 2024), put beside (additive) or in place of (replacement) the MLP of a few Qwen2 blocks;
   add_memory puts it into a model (the paper code's bf16 rounding included).
2. Read counting: which memory slots (rows of the `values` table) a batch reads, and the background statistics.
3. Ranking: score each slot by how much more this batch reads it than a background corpus does (RANKS:
   `counts`, `tfidf`, `kl`) and pick the top-t slots per layer (select_rows).
4. One step's selection and masked update: the paper code's per-micro-batch selection with its gradient mask
   (select_per_micro_batch, the default recipe), and SparseMemoryOptimizer, which updates only the picked rows of
   the `values` tables (lazy AdamW, plain SGD, or the paper code's dense AdamW with the other rows' gradients zeroed).
5. Same numbers, faster: the sparse gradient of the values read and the optimizer state of the rows updated only.

One training step of stage 2 (only `values` trainable), as train.py's smf_step runs it (its lines "SMF 1. 2. 3."). The
default recipe ("paper") reproduces the paper's code (github.com/prakharg55/SMF-ICML); "clean" is SMF as the method
describes it; each differs from the other at one labelled branch:

    for b in micro_batches:                                   # the step's examples, a few per forward
        loss = model(b["idx"], labels=b["labels"])            # every memory keeps its slot indices
        reads = read_counts(model, b["attention_mask"])       # 1. reads: {layer: (n_slots,)} by real tokens
        # 2. select: the top-t rows per layer, ranked (RANKS) against the background's reads
        #    paper: from this micro-batch's reads, its gradient masked to them (select_per_micro_batch)
        #    clean: once per step, from all its micro-batches' reads (select_rows, at the last one)
        loss.backward()
    optimizer.step(selected, max_grad_norm=1.0)               # 3. masked step (SparseMemoryOptimizer)
    #    paper ("dense_adamw"): AdamW over the whole table with the other rows' gradients zeroed, so rows selected
    #    earlier keep moving on their moments; clean ("adamw"): lazy AdamW, only the selected rows (and state) change
    optimizer.zero_grad()

Shape letters: B batch, T positions, N = B*T tokens, C hidden size, h heads, k topk, n n_keys per half,
dk key dim per head (two halves of dk/2), D value dim, S = n*n slots, R rows updated.
"""

import contextlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config (train.py declares a flag for each field: MEMORY_FLAGS)


@dataclass
class MemoryConfig:
    layers: list[int] | None = None  # the blocks with a memory (None: L/4, L/2, 3L/4: 6, 12, 18 of Qwen2.5-0.5B's 24)
    n_keys: int = 128                 # half-keys per half: n_keys^2 slots per layer
    heads: int = 4                    # memory heads
    topk: int = 16                    # slots read per head and token
    k_dim: int = 256                  # query / key size per head (two halves)
    query_norm: str = "none"          # "layer": each half-query layer-normalised before its keys, without learned
    #                                   parameters (Lample et al. 2019 normalise the query with batch norm, whose
    #                                   running statistics a finetune would move); "none" as the paper's memory
    v_dim: int | None = None          # None -> the model's hidden size (896)
    mode: str = "additive"            # additive: x + mlp(h) + alpha * mem(h); replacement: x + mem(h), no MLP
    alpha_init: float | None | str = "auto"  # the learnable output scale at init, None, or auto: 0.01 additive, None
    #                                          replacement (the paper's replacement memory has no scale)
    precision: str = "fp32"           # the memory's maths: "bf16" as the paper's code runs it (ProductKeyMemory)

    def __post_init__(self):
        if self.mode not in ("additive", "replacement"):
            raise ValueError(f"MemoryConfig: mode {self.mode!r} is unknown (use 'additive' or 'replacement')")
        if self.k_dim % 2:
            raise ValueError(f"MemoryConfig: k_dim {self.k_dim} must be even (two half-keys)")
        if not 1 <= self.topk <= self.n_keys:
            raise ValueError(f"MemoryConfig: topk {self.topk} must be in 1..n_keys ({self.n_keys})")
        if self.heads < 1 or self.n_keys < 1:
            raise ValueError(f"MemoryConfig: heads {self.heads} and n_keys {self.n_keys} must be >= 1")
        if isinstance(self.alpha_init, (int, float)) and not math.isfinite(self.alpha_init):
            raise ValueError(f"MemoryConfig: alpha_init must be a finite number, auto or none, got {self.alpha_init}")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"MemoryConfig: layers {self.layers} name a layer twice")
        if self.query_norm not in ("none", "layer"):
            raise ValueError(f"MemoryConfig: query_norm {self.query_norm!r} is unknown (use 'none' or 'layer')")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"MemoryConfig: precision {self.precision!r} is unknown (use 'fp32' or 'bf16')")

    def resolve(self, n_layers: int, hidden: int) -> "MemoryConfig":
        """A copy with `layers` and `v_dim` filled in for a model of n_layers blocks and this hidden size."""
        layers = self.layers if self.layers is not None else [n_layers // 4, n_layers // 2, 3 * n_layers // 4]
        layers = sorted(set(int(i) for i in layers))
        if not layers or layers[0] < 0 or layers[-1] >= n_layers:
            raise ValueError(f"MemoryConfig: layers {layers} must lie in 0..{n_layers - 1}")
        alpha = self.alpha_init
        if alpha == "auto":
            alpha = 0.01 if self.mode == "additive" else None
        return replace(self, layers=layers, v_dim=self.v_dim or hidden, alpha_init=None if alpha == "none" else alpha)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"MemoryConfig: unknown field {sorted(unknown)[0]!r}")
        return cls(**d)


# -----------------------------------------------------------------------------
# The memory layer


class ProductKeyMemory(nn.Module):
    """
    out = W2((sum over heads and their top-k slots of s_i * values[i]) * silu(W1 x)), times alpha if it has one.

    Parameters (fp32 when built) and their init, as Meta's memory code (the paper's) does it:

    | name            | shape           | init                                                   |
    |-----------------|-----------------|--------------------------------------------------------|
    | query.weight    | (h*dk, C)       | Xavier uniform                                         |
    | query.bias      | (h*dk,)         | PyTorch's Linear default, uniform(+-1/sqrt(C))         |
    | keys            | (h, 2, n, dk/2) | uniform(+-1/sqrt(dk)), dk the full key dim per head    |
    | values.weight   | (n*n, D)        | normal(0, std D**-0.5)                                 |
    | w1.weight       | (D, C)          | normal(0, std C**-0.5)  (Meta's `swilu_projection`)    |
    | w1.bias         | (D,)            | PyTorch's Linear default, uniform(+-1/sqrt(C))         |
    | w2.weight       | (C, D)          | normal(0, std C**-0.5)  (Meta's `value_proj`)          |
    | w2.bias         | (C,)            | PyTorch's Linear default, uniform(+-1/sqrt(D))         |
    | alpha           | ()              | alpha_init (0.01 in additive mode, as the paper)       |

    w2's bias adds a constant alpha * b2 to the residual stream, so even at alpha = 0.01 the model is not
    exactly the base model at the start (as in the paper's code).

    Precision (cfg.precision): "fp32" computes everything in fp32 whatever the model's dtype. "bf16" reproduces
    the paper's code, which runs the memory under bf16 autocast: every weight except `values` is used in bf16,
    the softmax weights are rounded to bf16, the values are read in their own dtype (fp32 while training, bf16
    when the whole model is cast to bf16 for evaluation), and the output is bf16.
    """

    def __init__(self, hidden: int, cfg: MemoryConfig):
        super().__init__()
        if cfg.v_dim is None:
            raise ValueError("ProductKeyMemory: cfg.v_dim is None; call cfg.resolve(n_layers, hidden) first")
        self.cfg, self.hidden = cfg, hidden
        self.n_slots = cfg.n_keys ** 2
        self.query = nn.Linear(hidden, cfg.heads * cfg.k_dim, bias=True)
        self.keys = nn.Parameter(torch.empty(cfg.heads, 2, cfg.n_keys, cfg.k_dim // 2))
        self.values = nn.Embedding(self.n_slots, cfg.v_dim)
        self.w1 = nn.Linear(hidden, cfg.v_dim, bias=True)
        self.w2 = nn.Linear(cfg.v_dim, hidden, bias=True)
        if cfg.alpha_init is not None and not isinstance(cfg.alpha_init, float | int):
            raise ValueError(f"ProductKeyMemory: alpha_init {cfg.alpha_init!r}; "
                             "call cfg.resolve(n_layers, hidden) first")
        self.alpha = None if cfg.alpha_init is None else nn.Parameter(torch.tensor(float(cfg.alpha_init)))
        self.sparse_grad = False  # True: the values gradient holds only the rows read (stage 2)
        self.last_indices = None  # (B, T, h*k) slot ids read by the last forward, detached
        self.grad_hook = None  # a pending one-shot mask of the values gradient (select_per_micro_batch)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for linear in (self.query, self.w1, self.w2):
            linear.reset_parameters()  # PyTorch's default: the biases keep it, the weights are redrawn below
        nn.init.xavier_uniform_(self.query.weight)
        bound = 1 / math.sqrt(self.cfg.k_dim)
        nn.init.uniform_(self.keys, -bound, bound)
        nn.init.normal_(self.values.weight, std=self.cfg.v_dim ** -0.5)
        nn.init.normal_(self.w1.weight, std=self.hidden ** -0.5)
        nn.init.normal_(self.w2.weight, std=self.hidden ** -0.5)
        if self.alpha is not None:
            self.alpha.fill_(self.cfg.alpha_init)

    def lookup(self, x):
        """x (N, C) -> scores, indices (N, h, k): each head's top-k slots and their scores, best first.
        The maths run in x's dtype (fp32, or bf16 under cfg.precision "bf16")."""
        N = x.shape[0]
        h, n, k, half = self.cfg.heads, self.cfg.n_keys, self.cfg.topk, self.cfg.k_dim // 2
        q = F.linear(x, self.query.weight.to(x.dtype), self.query.bias.to(x.dtype))  # (N, h*dk)
        q = q.view(N, h, 2, half)  # (N, h, 2, dk/2): each head's query as two halves
        if self.cfg.query_norm == "layer":
            q = F.layer_norm(q, (half,))  # each half: zero mean, unit variance
        keys = self.keys.to(x.dtype)  # (h, 2, n, dk/2)
        s1 = torch.einsum("nhd,hkd->nhk", q[:, :, 0], keys[:, 0])  # (N, h, n): first halves vs first half-keys
        s2 = torch.einsum("nhd,hkd->nhk", q[:, :, 1], keys[:, 1])  # (N, h, n): second halves
        s1, i1 = s1.topk(k, dim=-1)  # (N, h, k) best first halves
        s2, i2 = s2.topk(k, dim=-1)  # (N, h, k) best second halves
        # the k*k candidate slots (a, b) score s1[a] + s2[b]; slot id a * n + b
        cand_scores = (s1[..., :, None] + s2[..., None, :]).view(N, h, k * k)  # (N, h, k*k)
        cand_ids = (i1[..., :, None] * n + i2[..., None, :]).view(N, h, k * k)  # (N, h, k*k)
        scores, best = cand_scores.topk(k, dim=-1)  # (N, h, k)
        return scores, cand_ids.gather(-1, best)  # (N, h, k), (N, h, k)

    def forward(self, x):
        """x (B, T, C) in any dtype -> (B, T, C) in x's dtype; maths in cfg.precision (autocast off)."""
        B, T, C = x.shape
        if C != self.hidden:
            raise ValueError(f"ProductKeyMemory: input has size {C} in its last dim, expected {self.hidden}")
        h, k = self.cfg.heads, self.cfg.topk
        dt = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            xf = x.to(dt).reshape(B * T, C)  # (N, C)
            scores, indices = self.lookup(xf)  # (N, h, k) each
            # softmax per head in fp32 (rounded back to dt, as the paper's code does); heads are summed below
            weights = scores.float().softmax(dim=-1).to(dt).view(B * T, h * k)  # (N, h*k)
            indices = indices.view(B * T, h * k)  # (N, h*k)
            self.last_indices = indices.detach().view(B, T, h * k)  # a reference, no copy: counted on demand
            read = self.read_values(indices, weights.to(self.values.weight.dtype))  # (N, D) = sum_i s_i v_i
            gate = F.silu(F.linear(xf, self.w1.weight.to(dt), self.w1.bias.to(dt)))  # (N, D)
            out = F.linear((read * gate).to(dt), self.w2.weight.to(dt), self.w2.bias.to(dt)).view(B, T, C)
            if self.alpha is None:
                return out.to(x.dtype)
            if self.cfg.precision == "bf16":  # the paper's code scales in the residual stream's dtype
                return self.alpha.to(x.dtype) * out.to(x.dtype)
            return (self.alpha * out).to(x.dtype)

    def read_values(self, indices, weights):
        """A weighted embedding bag: row i of the result is sum_j weights[i, j] * values[indices[i, j]]."""
        table = self.values.weight
        if self.sparse_grad and torch.is_grad_enabled() and table.requires_grad:  # stage 2: see the final section
            return read_values_sparse_grad(table, indices, weights)
        return F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")


# -----------------------------------------------------------------------------
# Putting memory into a model, saving and loading it


def add_memory(model, cfg: MemoryConfig, load=None) -> dict:
    """Give each of cfg.layers its own ProductKeyMemory (fp32, on the model's device), in place; every stage of
    train.py and every rebuilt run adds its memory here. Replacement mode removes those blocks' MLPs. load(tensors):
    fills memory_state_dict(model) from a trained run (checkpoint.load_trained). Precision "bf16" then rounds every
    weight to bf16 (round_to_bf16_), as the paper's code builds or loads its memory inside its bf16 model.
    Returns {layer: memory}."""
    blocks = model.model.layers
    cfg = cfg.resolve(len(blocks), model.config.hidden_size)
    device = model.model.embed_tokens.weight.device
    memories = {}
    for i in cfg.layers:
        if blocks[i].memory is not None:
            raise ValueError(f"add_memory: layer {i} already has a memory")
        memories[i] = ProductKeyMemory(model.config.hidden_size, cfg).to(device)
        blocks[i].memory = memories[i]
        if cfg.mode == "replacement":
            blocks[i].mlp = None
    if load is not None:
        load(memory_state_dict(model))
    round_to_bf16_(memories)
    return memories


@torch.no_grad()
def round_to_bf16_(memories: dict):
    """Round every weight of the memories of precision "bf16" (the paper's) to bf16 precision, in place, keeping
    their dtype (the paper's code then trains fp32 copies). Memories of precision "fp32" are left as they are."""
    for mem in memories.values():
        for p in mem.parameters() if mem.cfg.precision == "bf16" else ():
            p.copy_(p.to(torch.bfloat16))


def memory_layers(model) -> dict:
    """{layer: ProductKeyMemory} of every block that has one."""
    return {i: b.memory for i, b in enumerate(model.model.layers) if b.memory is not None}


def memory_state_dict(model) -> dict:
    """Every memory tensor under its state_dict name: {'model.layers.6.memory.values.weight': (S, D), ...}; they
    share storage with the parameters, so model.py's load_tensors(memory_state_dict(model), state, where) loads them."""
    return {k: v for k, v in model.state_dict().items() if ".memory." in k}


# -----------------------------------------------------------------------------
# Read counting and background statistics


def read_counts(model, attention_mask=None) -> dict:
    """
    {layer: LongTensor (S,)}: how many times the last forward read each slot, over real tokens only
    (attention_mask (B, T), 1 = real; None = all real), counting every head's top-k reads. Counted with
    index_add_ (padding reads add 0), so no value has to come back to the host.
    """
    counts, real = {}, None
    for i, mem in memory_layers(model).items():
        if mem.last_indices is None:
            raise RuntimeError(f"read_counts: the memory of layer {i} has not been run yet")
        ids = mem.last_indices  # (B, T, h*k)
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(ids.shape[:2]):
            raise ValueError(f"read_counts: attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"expected {tuple(ids.shape[:2])}")
        if real is None:  # (B, T, 1): 1 = a real token (the same for every layer)
            real = ids.new_ones(()) if attention_mask is None else (attention_mask != 0).long()[..., None]
        counts[i] = ids.new_zeros(mem.n_slots).index_add_(0, ids.flatten(), real.expand(ids.shape).flatten())
    return counts


class BackgroundStats:
    """Per layer: read counts (S,) and document frequency (S,) = in how many batches each slot was read."""

    def __init__(self, counts: dict | None = None, doc_freq: dict | None = None, n_batches: int = 0):
        self.counts = counts or {}
        self.doc_freq = doc_freq or {}
        self.n_batches = n_batches
        self.derived = {}  # what the ranking rules derive from them, computed once (dropped by update)

    def distribution(self, layer: int):
        """The layer's add-one smoothed read distribution (S,), fp32: (counts + 1) / sum(counts + 1)."""
        if ("distribution", layer) not in self.derived:
            bg = self.counts[layer].float() + 1
            self.derived["distribution", layer] = bg / bg.sum()
        return self.derived["distribution", layer]

    def idf(self, layer: int):
        """The layer's inverse document frequency (S,), fp32: log((batches + 1) / (doc_freq + 1))."""
        if ("idf", layer) not in self.derived:
            self.derived["idf", layer] = torch.log((self.n_batches + 1) / (self.doc_freq[layer].float() + 1))
        return self.derived["idf", layer]

    def update(self, counts: dict):
        """Add one batch's read_counts() (summed where they are: on the GPU, no copy to the host per batch)."""
        self.derived = {}
        for i, c in counts.items():
            c = c.detach().long()
            if i not in self.counts:
                self.counts[i], self.doc_freq[i] = torch.zeros_like(c), torch.zeros_like(c)
            if c.shape != self.counts[i].shape:
                raise ValueError(f"BackgroundStats: layer {i} counts have shape {tuple(c.shape)}, "
                                 f"expected {tuple(self.counts[i].shape)}")
            self.counts[i] += c
            self.doc_freq[i] += (c > 0).long()
        self.n_batches += 1

    def summed(self, sum_, device) -> "BackgroundStats":
        """Every rank's statistics summed (sum_: an in-place all-reduce), for batches split across ranks."""
        counts = {i: sum_(c.to(device)).cpu() for i, c in self.counts.items()}
        doc_freq = {i: sum_(c.to(device)).cpu() for i, c in self.doc_freq.items()}
        return BackgroundStats(counts, doc_freq, int(sum_(torch.tensor(self.n_batches, device=device))))

    def to(self, device) -> "BackgroundStats":
        """The same statistics with their tensors on `device` (stage 2 ranks against them on every step: kept on
        the GPU, they cost no host-to-device copy per step)."""
        return BackgroundStats({i: c.to(device) for i, c in self.counts.items()},
                               {i: d.to(device) for i, d in self.doc_freq.items()}, self.n_batches)

    def save(self, path: str):
        from safetensors.torch import save_file
        tensors = {f"counts.{i}": c.cpu().contiguous() for i, c in self.counts.items()}
        tensors.update({f"doc_freq.{i}": d.cpu().contiguous() for i, d in self.doc_freq.items()})
        save_file(tensors, path, metadata={"n_batches": str(self.n_batches), "layers": json.dumps(sorted(self.counts))})

    @classmethod
    def load(cls, path: str) -> "BackgroundStats":
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if "n_batches" not in meta:
                raise ValueError(f"{path}: not a BackgroundStats file (no n_batches in its metadata)")
            layers = json.loads(meta["layers"])
            counts = {i: f.get_tensor(f"counts.{i}") for i in layers}
            doc_freq = {i: f.get_tensor(f"doc_freq.{i}") for i in layers}
        return cls(counts, doc_freq, int(meta["n_batches"]))


@torch.inference_mode()
def background_stats(model, batches, autocast=contextlib.nullcontext()) -> BackgroundStats:
    """Read counts and document frequency of every memory slot over `batches` (token ids (1, T) each, one
    document per batch as the paper's code reads them), the model in eval mode."""
    stats = BackgroundStats()
    was_training = model.training
    model.eval()
    for idx in batches:
        with autocast:
            model(idx)
        stats.update(read_counts(model))
    model.train(was_training)
    return stats


# -----------------------------------------------------------------------------
# Ranking: which rows to train


def rank_counts(c, background, layer):
    """How often this batch read each slot."""
    return c


def rank_tfidf(c, background, layer):
    """Term frequency times inverse document frequency over the background batches."""
    return c / c.sum() * background_of(background, layer, "tfidf").idf(layer).to(c.device)


def rank_kl(c, background, layer):
    """This slot's term of KL(p_b || p_bg): the batch's read distribution against the background's (add-one
    smoothed)."""
    p_b, p_bg = c / c.sum(), background_of(background, layer, "kl").distribution(layer).to(c.device)
    return p_b * torch.log((p_b + 1e-8) / (p_bg + 1e-8))


# The ranking rules by name (train.py --rank offers them all). A new rule is one function above and one entry here.
RANKS = {"kl": rank_kl, "tfidf": rank_tfidf, "counts": rank_counts}


def background_of(background, layer, rank):
    if background is None or layer not in background.counts:
        raise ValueError(f"select_rows: rank {rank!r} needs background statistics for layer {layer}")
    return background


def row_scores(c, background: "BackgroundStats | None", layer: int, rank: str):
    """Score (S,) of every slot of one layer from this batch's reads c (S,) by RANKS[rank], in fp32 as the
    paper's code; higher = more specific to this batch."""
    return RANKS[rank](c.float(), background, layer)


def select_rows(counts: dict, background: "BackgroundStats | None" = None, rank: str = "kl",
                top_t: int = 512) -> dict:
    """
    {layer: LongTensor of slot ids, best first}: per layer the top_t slots by `rank` among the slots read
    at least once; exactly min(top_t, slots read) of them. Unread slots are never chosen.

    The clean recipe selects once per optimizer step, from the reads of all its micro-batches summed (so at most
    top_t rows change per step). The paper's code re-selects on every micro-batch, so with gradient accumulation
    up to (micro-batches * top_t) rows change per step; select_per_micro_batch() (below) reproduces that.
    """
    if rank not in RANKS:
        raise ValueError(f"select_rows: rank {rank!r} is unknown (use one of {', '.join(sorted(RANKS))})")
    if not isinstance(top_t, int) or top_t < 1:
        raise ValueError(f"select_rows: top_t must be an integer >= 1, got {top_t!r}")
    selected = {}
    n_read = torch.stack([(c > 0).sum() for c in counts.values()]).tolist() if counts else []  # one host sync
    for (i, c), n in zip(counts.items(), n_read):
        scores = torch.where(c > 0, row_scores(c, background, i, rank), -math.inf) if n else c[:0].float()  # (S,)
        selected[i] = scores.topk(min(top_t, n)).indices
    return selected


# -----------------------------------------------------------------------------
# One step's selection and masked update


WHEN_TO_CALL = "; call it between a micro-batch's forward and its loss.backward()"


def select_per_micro_batch(memories: dict, counts: dict, background: "BackgroundStats | None" = None,
                           rank: str = "kl", top_t: int = 512, selected: dict | None = None) -> dict:
    """
    The paper code's selection (the default recipe): rows are chosen on every micro-batch from its own reads
    (select_rows), and that micro-batch's gradient is kept only on its own rows. Call it after the micro-batch's
    forward and BEFORE its loss.backward(): it hooks each value table so that the next backward keeps only these
    rows, once. Returns the union with `selected` (the rows chosen so far in this optimizer step), for
    SparseMemoryOptimizer.step; with k micro-batches up to k * top_t rows per layer change per step.
    """
    mine = select_rows(counts, background, rank, top_t)
    for i, mem in memories.items():
        if mem.grad_hook is not None:
            raise RuntimeError("select_per_micro_batch: the previous micro-batch's backward never ran" + WHEN_TO_CALL)
        keep = torch.zeros(mem.n_slots, dtype=torch.bool, device=mem.values.weight.device)
        keep[mine[i]] = True

        def mask(grad, mem=mem, keep=keep, forward_ids=mem.last_indices):  # the forward this selection belongs to
            mem.grad_hook.remove()
            mem.grad_hook = None
            if mem.last_indices is not forward_ids:
                raise RuntimeError("select_per_micro_batch: a new forward ran before the backward it selected for" +
                                   WHEN_TO_CALL)
            return mask_sparse_grad(grad, keep) if grad.is_sparse else grad * keep[:, None]
        mem.grad_hook = mem.values.weight.register_hook(mask)
    if selected is None:
        return mine
    return {i: torch.cat([s[i] for s in (selected, mine) if i in s]).unique() for i in sorted(selected.keys() | mine)}


def grad_rows(grad, rows):
    """The gradient (R, D) of the given rows of a table, from a dense (S, D) or sparse COO gradient (or None)."""
    if grad is None:
        raise RuntimeError("SparseMemoryOptimizer: a value table has no gradient (no backward before step?)")
    return sparse_grad_rows(grad, rows) if grad.is_sparse else grad[rows]


def adamw_rows_(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """
    One AdamW step (Loshchilov & Hutter) on rows p (R, D), in place on p, m, v, with each row's own step
    count step (R,) (already incremented) for the bias correction; the same operations as
    torch.optim.AdamW's single-tensor code, so a row updated at every step follows it exactly.
    """
    if weight_decay:
        p.mul_(1 - lr * weight_decay)  # decoupled weight decay
    m.lerp_(g, 1 - beta1)  # first moment
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # second moment
    step = step.double()[:, None]  # (R, 1)
    step_size = (lr / (1 - beta1 ** step)).float()  # (R, 1)
    bias_correction2_sqrt = (1 - beta2 ** step).sqrt().float()  # (R, 1)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.add_(-step_size * m / denom)


class SparseMemoryOptimizer:
    """
    Updates only the selected rows of each memory's `values` table. Modes:

    "adamw" (default): lazy AdamW. A selected row gets an AdamW step with its own step count; a row not
        selected keeps its value, moments and step count bit-identical. Weight decay only on updated rows.
    "sgd": plain SGD on the selected rows (Lin et al.'s choice), p -= lr * g (weight decay added to g).
    "dense_adamw": the paper code's optimizer: torch's AdamW over the whole table after zeroing the gradients
        of the rows not selected. Rows selected earlier keep moving on their momentum (a row selected once at
        step 500 moves 20 times further in all than under "adamw" at the same lr, at step 5000 32 times; the
        paper's lr 5e-4 was tuned with that), so "only the selected rows change" does not hold.

    Gradient clipping (max_grad_norm) is over the selected rows' gradients of all layers together, and over
    the gradients of `also` (e.g. alpha, trained by another optimizer), as one clip_grad_norm_ over every
    trained parameter.

    State is kept only for rows ever updated ("adamw"): per layer `exp_avg`, `exp_avg_sq` (R, D) fp32 and
    `step` (R,) int64, in the order the rows first appeared (`where` maps a slot to its entry), grown ahead of
    need as new rows appear (see state_rows). Dense moments would be 2 x 16,384 x 896 x 4 B = 117 MB per
    layer from step one; a short run touching a few thousand rows holds a fraction of that, and a long run that
    touches every row ends at the dense size. "dense_adamw" holds the dense state (all rows), as torch's AdamW
    does. Only the values tables are handled here: train other parameters (alpha, ...) with their own optimizer.
    """

    MODES = ("adamw", "sgd", "dense_adamw")

    def __init__(self, memories: dict, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, mode: str = "adamw", reduce=None, also=(), check_norm=None,
                 check: bool = True):
        """reduce: optional in-place function applied to each layer's selected-rows gradient (R, D) and to the
        gradients of `also` before clipping; data-parallel training passes an all-reduce (sum over ranks), so only
        the t chosen rows per layer cross the network, never the whole table. also: other parameters clipped
        together with the values (e.g. alpha: their .grad is scaled in place; their own optimizer steps them).
        check_norm: called with the gradient norm before any row changes (train.py stops there on a non-finite
        norm). check: refuse slot ids out of range or repeated (a device sync per layer; train.py skips it, as
        select_rows makes valid selections)."""
        if mode not in self.MODES:
            raise ValueError(f"SparseMemoryOptimizer: mode {mode!r} is unknown (use one of {', '.join(self.MODES)})")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError("SparseMemoryOptimizer: need lr, eps, weight_decay >= 0 and betas in [0, 1)")
        self.memories, self.mode = dict(memories), mode
        self.reduce, self.also, self.check_norm, self.check = reduce, list(also), check_norm, check
        self.param_groups = [{"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}]
        self.state = {i: empty_state(mem) for i, mem in self.memories.items()} if mode != "sgd" else {}

    @torch.no_grad()
    def step(self, selected: dict, max_grad_norm: float | None = None) -> dict:
        """Update the rows selected[layer] of each table; returns the gradient norm (before clipping) and how many
        rows of each layer changed."""
        lr, (beta1, beta2), eps, wd = (self.param_groups[0][k] for k in ("lr", "betas", "eps", "weight_decay"))
        rows = {i: torch.as_tensor(selected.get(i, []), dtype=torch.long).to(mem.values.weight.device)
                for i, mem in self.memories.items()}  # (R,) slot ids per layer
        if self.check:
            self.check_rows(rows)
        grads = {i: grad_rows(mem.values.weight.grad, rows[i]) if len(rows[i]) else  # (R, D)
                 mem.values.weight.new_zeros(0, mem.values.weight.shape[1]) for i, mem in self.memories.items()}
        also = [p.grad for p in self.also if p.grad is not None]
        clipped = [*grads.values(), *also]
        for g in clipped if self.reduce is not None else ():
            self.reduce(g)  # data parallel: every rank's gradients of these rows, summed
        total = torch.stack([g.float().pow(2).sum() for g in clipped]).sum().sqrt() if clipped else torch.zeros(())
        norm = float(total)  # the one host sync of a step (plus one for `rows`, below)
        if self.check_norm is not None:
            self.check_norm(norm)
        if max_grad_norm is not None:  # as torch.nn.utils.clip_grad_norm_
            coef = (max_grad_norm / (total + 1e-6)).clamp(max=1.0)
            for g in clipped:
                g.mul_(coef.to(g.device))
        changed = {}
        for i, mem in self.memories.items():
            table, r, g = mem.values.weight, rows[i], grads[i]
            if self.mode == "dense_adamw":  # every row, with zero gradient outside the selection
                g = torch.zeros_like(table).index_copy_(0, r, g)
                r = torch.arange(mem.n_slots, device=table.device)
            old = table[r]  # (R, D)
            p = old.clone()
            if self.mode == "sgd":
                p.add_(g if wd == 0 else g.add(p, alpha=wd), alpha=-lr)
            else:
                st = self.state[i]
                pos = state_rows(st, r)  # (R,): where each row keeps its moments and step count
                m, v, step = st["exp_avg"][pos], st["exp_avg_sq"][pos], st["step"][pos] + 1
                adamw_rows_(p, g, m, v, step, lr, beta1, beta2, eps, wd)
                st["exp_avg"][pos], st["exp_avg_sq"][pos], st["step"][pos] = m, v, step
            table.index_copy_(0, r, p)
            changed[i] = (p != old).any(dim=1).sum()
        n_changed = torch.stack(list(changed.values())).tolist() if changed else []
        return {"grad_norm": norm, "rows": dict(zip(changed, n_changed))}

    def check_rows(self, rows: dict):
        """check: every layer's slot ids lie in its table and none repeats (a device sync per layer)."""
        for i, r in rows.items():
            n = self.memories[i].n_slots
            if r.numel() and (r.min() < 0 or r.max() >= n):
                raise ValueError(f"SparseMemoryOptimizer: layer {i} slot ids must lie in 0..{n - 1}")
            if len(r.unique()) != len(r):
                raise ValueError(f"SparseMemoryOptimizer: layer {i} selection has repeated slot ids")

    def zero_grad(self, set_to_none: bool = True):
        """Drop the value tables' gradients, or zero them in place when set_to_none is False (a sparse gradient,
        which holds only the rows read, is always dropped: zeroing it in place would keep its rows)."""
        for w in (mem.values.weight for mem in self.memories.values()):
            w.grad = None if set_to_none or w.grad is None or w.grad.is_sparse else w.grad.zero_()

    def state_dict(self) -> dict:
        """Tensors only (safetensors-friendly): per layer `{i}.slots`, `{i}.exp_avg`, `{i}.exp_avg_sq`, `{i}.step`
        for the rows that have state (`slots`: their slot ids), and `lr`."""
        out = {"lr": torch.tensor(float(self.param_groups[0]["lr"]), dtype=torch.float64)}
        for i, st in self.state.items():
            n = int(st["n"])
            has = (st["where"] >= 0).nonzero().squeeze(1)  # slot ids with state
            out[f"{i}.slots"] = torch.empty_like(has).index_copy_(0, st["where"][has], has)  # entry -> slot id
            for key in ("exp_avg", "exp_avg_sq", "step"):
                out[f"{i}.{key}"] = st[key][:n].clone()
        return out

    def load_state_dict(self, d: dict):
        expected = {"lr"} | {f"{i}.{key}" for i in self.state for key in ("slots", "exp_avg", "exp_avg_sq", "step")}
        for name in sorted(expected ^ set(d)):
            raise ValueError(f"SparseMemoryOptimizer.load_state_dict: {'missing' if name in expected else 'unexpected'}"
                             f" tensor {name} (mode {self.mode!r})")
        self.param_groups[0]["lr"] = float(d["lr"])
        for i, mem in self.memories.items():
            if i not in self.state:
                continue
            st = empty_state(mem)
            slots = d[f"{i}.slots"].to(st["where"].device, torch.long)
            shape = (len(slots), mem.values.weight.shape[1])
            for key in ("exp_avg", "exp_avg_sq"):
                if tuple(d[f"{i}.{key}"].shape) != shape:
                    raise ValueError(f"SparseMemoryOptimizer.load_state_dict: tensor {i}.{key} has shape "
                                     f"{tuple(d[f'{i}.{key}'].shape)}, expected {shape}")
            for key in ("exp_avg", "exp_avg_sq", "step"):
                st[key] = d[f"{i}.{key}"].to(st[key].device, st[key].dtype).clone()
            st["where"][slots] = torch.arange(len(slots), device=slots.device)
            st["n"], st["n_max"] = torch.tensor(len(slots), device=slots.device), len(slots)
            self.state[i] = st




# -----------------------------------------------------------------------------
# Same numbers, faster: what stage 2 uses to touch only the rows it reads and updates (the tests check each against
# the plain version above: a dense gradient, dense optimizer state)


def read_values_sparse_grad(table, indices, weights):
    """ProductKeyMemory.read_values with a sparse gradient over the distinct rows read. F.embedding_bag(sparse=True)
    would make a sparse gradient with one (D,) row per read, duplicates included (N*h*k rows: larger than the dense
    table for a 512-token batch), so instead read through the distinct rows, whose gradient is (U, D)."""
    rows, local = indices.unique(return_inverse=True)  # (U,), (N, h*k) positions into rows
    return F.embedding_bag(local, _GatherRows.apply(table, rows), per_sample_weights=weights, mode="sum")


class _GatherRows(torch.autograd.Function):
    """table[rows] whose backward is a sparse (S, D) gradient holding only those rows."""

    @staticmethod
    def forward(ctx, table, rows):
        ctx.save_for_backward(rows)
        ctx.table_shape = table.shape
        return table[rows]  # (U, D)

    @staticmethod
    def backward(ctx, grad):  # grad (U, D)
        (rows,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(rows[None], grad, ctx.table_shape, is_coalesced=True,
                                       check_invariants=False), None


def mask_sparse_grad(grad, keep):
    """A sparse gradient with the entries of the rows not kept (keep (S,) bool) zeroed; no boolean indexing, so no
    host sync."""
    on = keep[grad._indices()[0]]  # (nnz,)
    return torch.sparse_coo_tensor(grad._indices(), grad._values() * on[:, None], grad.shape, check_invariants=False)


def sparse_grad_rows(grad, rows):
    """grad_rows of a sparse COO gradient, which may hold a row several times (one entry per micro-batch): summed."""
    R = len(rows)
    where = torch.full((grad.shape[0],), R, dtype=torch.long, device=grad.device)  # slot id -> position in rows,
    where[rows] = torch.arange(R, device=grad.device)  # or R (a spare row) if not wanted
    out = grad._values().new_zeros(R + 1, grad.shape[1])  # rows not read have zero gradient
    out.index_add_(0, where[grad._indices()[0]], grad._values())  # no host sync (a boolean mask would need one)
    return out[:R]


def empty_state(mem):
    """SparseMemoryOptimizer's state of one table before any step: no row has moments yet."""
    w = mem.values.weight
    return {"where": torch.full((mem.n_slots,), -1, dtype=torch.long, device=w.device),  # slot -> state row
            "exp_avg": w.new_zeros(0, w.shape[1]), "exp_avg_sq": w.new_zeros(0, w.shape[1]),
            "step": w.new_zeros(0, dtype=torch.long),
            "n": w.new_zeros((), dtype=torch.long),  # rows with state: the first n entries of exp_avg, ...
            "n_max": 0}  # an upper bound of n known on the host (n stays on the device: no sync per step)


def state_rows(st, rows):
    """Where each of rows (R,) keeps its state in st (empty_state); rows seen for the first time get the next free
    (zeroed) entries. The count of rows with state stays on the device; the host keeps an upper bound and learns the
    true count (one sync) only when the buffers may be full, growing them then to room for at least 8 more steps of
    new rows: with as many rows every step (top_t), at most one sync per 8 steps."""
    cap, R = st["exp_avg"].shape[0], len(rows)
    if cap < len(st["where"]) and st["n_max"] + R > cap:
        st["n_max"] = n = int(st["n"])  # the true count: a host sync
        if cap - n < 8 * R:  # grow: at least double, at most to every slot
            cap = min(len(st["where"]), max(2 * cap, n + 8 * R))
            for key in ("exp_avg", "exp_avg_sq", "step"):
                t = st[key]
                st[key] = torch.cat([t, t.new_zeros(cap - t.shape[0], *t.shape[1:])])
    pos = st["where"][rows]  # (R,): -1 for rows without state
    new = pos < 0
    pos = torch.where(new, st["n"] + new.cumsum(0) - 1, pos)  # new rows: n, n + 1, ...
    st["where"][rows] = pos
    st["n"] = st["n"] + new.sum()
    st["n_max"] = min(st["n_max"] + R, len(st["where"]))
    return pos
