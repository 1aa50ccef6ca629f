"""memory.py against references: brute-force top-k, direct counts, hand-computed scores, torch.optim.AdamW/SGD (lazy
AdamW's per-row bias correction included), clipping that never scales up."""

import json
import math
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

import memory
from memory import (BackgroundStats, MemoryConfig, ProductKeyMemory, SparseMemoryOptimizer, add_memory,
                    memory_layers, memory_state_dict, read_counts,
                    row_scores, select_per_micro_batch, select_rows)
from checkpoint import save_pretrained
from model import Qwen2, load_tensors

SMALL = dict(n_keys=16, heads=2, topk=4, k_dim=16)  # 256 slots per layer: fast, still product-key shaped


def make_memory(hidden=24, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MemoryConfig(**{**SMALL, "v_dim": 20, **kw}).resolve(1, hidden)
    return ProductKeyMemory(hidden, cfg)


def memory_model(tiny_model_dir, seed=0, **kw):
    model = Qwen2.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    add_memory(model, MemoryConfig(**{**SMALL, **kw}))
    return model


# --- the lookup ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,topk,n_keys", [(1, 1, 8), (2, 4, 16), (4, 16, 32), (3, 7, 10)])
def test_topk_equals_brute_force_over_all_slots(heads, topk, n_keys):
    mem = make_memory(heads=heads, topk=topk, n_keys=n_keys)
    x = torch.randn(50, 24)
    scores, ids = mem.lookup(x)  # (N, h, k)
    half = mem.cfg.k_dim // 2
    q = mem.query(x).view(50, heads, 2, half)  # (N, h, 2, dk/2)
    s1 = torch.einsum("nhd,hkd->nhk", q[:, :, 0], mem.keys[:, 0])  # (N, h, n)
    s2 = torch.einsum("nhd,hkd->nhk", q[:, :, 1], mem.keys[:, 1])  # (N, h, n)
    every = (s1[..., :, None] + s2[..., None, :]).view(50, heads, n_keys * n_keys)  # slot a*n+b
    ref_scores, ref_ids = every.topk(topk, dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-6)


def test_query_norm_normalises_each_half_query_before_the_keys():
    """--mem-query-norm layer: the top-k of the brute force over every slot, on each half-query centred and scaled
    to unit variance by hand (layer norm's eps 1e-5, no learned parameters); none keeps the raw query."""
    mem = make_memory(heads=2, topk=4, n_keys=16, query_norm="layer")
    x = torch.randn(50, 24) * 3 + 1
    scores, ids = mem.lookup(x)
    q = mem.query(x).view(50, 2, 2, 8)
    q = (q - q.mean(-1, keepdim=True)) / torch.sqrt(q.var(-1, unbiased=False, keepdim=True) + 1e-5)
    s1 = torch.einsum("nhd,hkd->nhk", q[:, :, 0], mem.keys[:, 0])
    s2 = torch.einsum("nhd,hkd->nhk", q[:, :, 1], mem.keys[:, 1])
    ref_scores, ref_ids = (s1[..., :, None] + s2[..., None, :]).view(50, 2, 256).topk(4, dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5)
    mem.cfg = MemoryConfig(**{**mem.cfg.to_dict(), "query_norm": "none"})
    assert not torch.equal(mem.lookup(x)[1], ids)  # the norm changes which slots are read
    with pytest.raises(ValueError, match="query_norm 'batch' is unknown"):
        MemoryConfig(query_norm="batch")


def test_forward_is_memory_plus_over_summed_heads():
    mem = make_memory()
    x = torch.randn(2, 3, 24)
    scores, ids = mem.lookup(x.view(6, 24))
    w = scores.softmax(-1)  # (N, h, k)
    read = (w[..., None] * mem.values.weight[ids]).sum(dim=(1, 2))  # (N, D)
    ref = mem.alpha * mem.w2(read * torch.nn.functional.silu(mem.w1(x.view(6, 24))))
    torch.testing.assert_close(mem(x), ref.view(2, 3, 24), rtol=1e-5, atol=1e-6)


def test_init_matches_the_table():
    mem = make_memory(n_keys=128, heads=4, topk=16, k_dim=256, v_dim=896, hidden=896)
    assert mem.values.weight.shape == (16384, 896)
    assert abs(mem.values.weight.std().item() - 896 ** -0.5) < 1e-3
    # keys uniform(+-1/sqrt(dk)) with dk the FULL key dim per head (256): +-1/16, filling the range
    assert 1 / 16 * 0.99 < mem.keys.abs().max() <= 1 / 16
    assert abs(mem.keys.std().item() - (1 / 16) / math.sqrt(3)) < 1e-3
    for name, fan_in in (("query", 896), ("w1", 896), ("w2", 896)):  # PyTorch's default Linear bias init
        b = getattr(mem, name).bias
        assert b.abs().max() <= fan_in ** -0.5 and b.abs().max() > 0.9 * fan_in ** -0.5, name
    for w in (mem.w1.weight, mem.w2.weight):  # Meta's: normal(0, output_dim**-0.5), the hidden size
        assert abs(w.std().item() - 896 ** -0.5) < 1e-3
    assert abs(mem.query.weight.std().item() - math.sqrt(2 / (896 + 4 * 256)) ) < 1e-3  # Xavier uniform
    assert mem.alpha.item() == pytest.approx(0.01)


def test_gradients_reach_every_parameter():
    mem = make_memory()
    mem(torch.randn(2, 5, 24)).pow(2).sum().backward()
    for name in ["query.weight", "query.bias", "keys", "values.weight", "w1.weight", "w2.weight", "alpha"]:
        g = dict(mem.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_sparse_grad_holds_only_rows_read_and_equals_dense():
    mem = make_memory()
    mem.requires_grad_(False)
    mem.values.weight.requires_grad_(True)
    x = torch.randn(2, 5, 24)
    mem(x).pow(2).sum().backward()
    dense = mem.values.weight.grad
    mem.values.weight.grad = None
    mem.sparse_grad = True
    mem(x).pow(2).sum().backward()
    sparse = mem.values.weight.grad
    assert sparse.is_sparse
    assert torch.equal(sparse.coalesce().indices()[0], mem.last_indices.unique())  # one row per distinct slot read
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=1e-6, atol=1e-7)


def test_bad_input_is_refused_in_one_line():
    with pytest.raises(ValueError, match="mode"):
        MemoryConfig(mode="sideways")
    with pytest.raises(ValueError, match="topk"):
        MemoryConfig(n_keys=4, topk=5)
    with pytest.raises(ValueError, match="unknown field"):
        MemoryConfig.from_dict({"n_keyz": 3})
    with pytest.raises(ValueError, match="last dim"):
        make_memory()(torch.randn(1, 2, 7))


# --- in a model ----------------------------------------------------------------------------------------


def test_alpha_zero_gives_the_base_models_logits_exactly(tiny_model_dir):
    base = Qwen2.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = memory_model(tiny_model_dir)
    assert sorted(memory_layers(model)) == [1, 2, 3]  # L // 4, L // 2, 3L // 4 of 4 layers
    idx = torch.randint(0, 300, (2, 9))
    assert not torch.equal(model(idx), base(idx))  # alpha = 0.01: the memory does something
    for mem in memory_layers(model).values():
        mem.alpha.data.zero_()
    assert torch.equal(model(idx), base(idx))


def test_bf16_model_with_fp32_memory_under_autocast(tiny_model_dir):
    model = Qwen2.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    base = Qwen2.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    add_memory(model, MemoryConfig(**SMALL))
    assert all(p.dtype == torch.float32 for p in memory_state_dict(model).values())
    idx = torch.randint(0, 300, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
    logits.sum().backward()
    assert memory_layers(model)[2].values.weight.grad.dtype == torch.float32
    for mem in memory_layers(model).values():
        mem.alpha.data.zero_()
    assert torch.equal(model(idx), base(idx))


def test_replacement_mode_runs_and_trains(tiny_model_dir):
    model = memory_model(tiny_model_dir, mode="replacement", layers=[2])
    assert model.model.layers[2].mlp is None and memory_layers(model)[2].alpha is None
    model.requires_grad_(False)
    params = [p for m in memory_layers(model).values() for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    idx = torch.randint(0, 300, (2, 12))
    losses = []
    for _ in range(6):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_save_and_load_round_trip_exactly(tiny_model_dir, tmp_path):
    cfg = MemoryConfig(**SMALL, layers=[0, 3])
    model = Qwen2.from_pretrained(tiny_model_dir, dtype=torch.float32)
    add_memory(model, cfg)
    with torch.no_grad():
        for mem in memory_layers(model).values():
            mem.values.weight.add_(torch.randn_like(mem.values.weight))  # as if trained
            mem.alpha.fill_(0.7)
    save_file(memory_state_dict(model), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"memory": cfg.to_dict()}))

    fresh = Qwen2.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(123)  # a different init, overwritten by the load
    add_memory(fresh, MemoryConfig.from_dict(json.loads((tmp_path / "config.json").read_text())["memory"]))
    load_tensors(memory_state_dict(fresh), load_file(tmp_path / "model.safetensors"), "memory")
    idx = torch.randint(0, 300, (2, 7))
    assert torch.equal(fresh(idx), model(idx))
    state = load_file(tmp_path / "model.safetensors")
    state.pop("model.layers.3.memory.w1.weight")
    with pytest.raises(ValueError, match="missing tensor model.layers.3.memory.w1.weight"):
        load_tensors(memory_state_dict(fresh), state, "memory")


# --- read counting -------------------------------------------------------------------------------------


def test_read_counts_equal_a_direct_count_of_real_tokens(tiny_model_dir):
    model = memory_model(tiny_model_dir)
    idx = torch.randint(0, 300, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    model(idx, attention_mask=mask)
    counts = read_counts(model, mask)
    for i, mem in memory_layers(model).items():
        direct = Counter()
        for b in range(3):
            for t in range(8):
                if mask[b, t]:
                    direct.update(mem.last_indices[b, t].tolist())
        ref = torch.zeros(mem.n_slots, dtype=torch.long)
        for slot, n in direct.items():
            ref[slot] = n
        assert torch.equal(counts[i], ref)
        assert counts[i].sum() == mask.sum() * mem.cfg.heads * mem.cfg.topk
    # the padded positions add nothing: change their tokens, the counts stay
    idx2 = torch.where(mask.bool(), idx, (idx + 17) % 300)
    model(idx2, attention_mask=mask)
    for i, c in read_counts(model, mask).items():
        assert torch.equal(c, counts[i])
    with pytest.raises(ValueError, match="attention_mask"):
        read_counts(model, mask[:, :5])


def test_background_stats_accumulate_and_round_trip(tmp_path):
    stats = BackgroundStats()
    stats.update({6: torch.tensor([2, 0, 1, 0]), 12: torch.tensor([0, 0, 5, 1])})
    stats.update({6: torch.tensor([1, 0, 0, 3]), 12: torch.tensor([0, 1, 1, 0])})
    assert stats.n_batches == 2
    assert stats.counts[6].tolist() == [3, 0, 1, 3] and stats.doc_freq[6].tolist() == [2, 0, 1, 1]
    stats.save(str(tmp_path / "background.safetensors"))
    back = BackgroundStats.load(str(tmp_path / "background.safetensors"))
    assert back.n_batches == 2 and sorted(back.counts) == [6, 12]
    for i in (6, 12):
        assert torch.equal(back.counts[i], stats.counts[i]) and torch.equal(back.doc_freq[i], stats.doc_freq[i])
    back.update({6: torch.tensor([0, 1, 0, 0]), 12: torch.tensor([0, 0, 0, 0])})  # reusable: keeps counting
    assert back.n_batches == 3 and back.doc_freq[6].tolist() == [2, 1, 1, 1]


# --- ranking -------------------------------------------------------------------------------------------


def small_example():
    c = torch.tensor([3, 0, 1, 2, 0, 4])
    bg = BackgroundStats({0: torch.tensor([10, 5, 0, 2, 7, 1])}, {0: torch.tensor([4, 2, 0, 1, 3, 1])}, n_batches=5)
    return c, bg


def test_tfidf_and_kl_equal_hand_computed_values():
    c, bg = small_example()
    total = 10
    tfidf = [c_ / total * math.log((5 + 1) / (df + 1)) for c_, df in zip([3, 0, 1, 2, 0, 4], [4, 2, 0, 1, 3, 1])]
    bg1 = [11, 6, 1, 3, 8, 2]  # background counts + 1
    kl = [c_ / total * math.log((c_ / total + 1e-8) / (b / 31 + 1e-8)) for c_, b in zip([3, 0, 1, 2, 0, 4], bg1)]
    assert row_scores(c, bg, 0, "tfidf").tolist() == pytest.approx(tfidf, rel=1e-6)  # fp32, as the paper's code
    assert row_scores(c, bg, 0, "kl").tolist() == pytest.approx(kl, rel=1e-6, abs=1e-12)
    assert row_scores(c, None, 0, "counts").tolist() == [3, 0, 1, 2, 0, 4]
    # by hand, kl: slot 5 0.4 log(0.4 / (2/31)) = 0.730, slot 3 0.2 log(0.2 / (3/31)) = 0.145,
    # slot 2 0.1 log(0.1 / (1/31)) = 0.113, slot 0 0.3 log(0.3 / (11/31)) = -0.050 (still read, so eligible)
    assert select_rows({0: c}, bg, "kl", 4)[0].tolist() == [5, 3, 2, 0]
    # tfidf: slot 5 0.4 log 3 = 0.439, slot 3 0.2 log 3 = 0.220, slot 2 0.1 log 6 = 0.179, slot 0 0.3 log 1.2
    assert select_rows({0: c}, bg, "tfidf", 3)[0].tolist() == [5, 3, 2]


@pytest.mark.parametrize("rank", sorted(memory.RANKS))  # every registered rule, a new one included
@pytest.mark.parametrize("top_t", [1, 3, 4, 10])
def test_zero_read_slots_never_chosen_and_exactly_min_t_read(rank, top_t):
    c, bg = small_example()
    chosen = select_rows({0: c}, bg, rank, top_t)[0]
    assert len(chosen) == min(top_t, 4) and len(chosen.unique()) == len(chosen)
    assert torch.all(c[chosen] > 0)


def test_select_rows_refuses_bad_input():
    c, bg = small_example()
    with pytest.raises(ValueError, match="rank"):
        select_rows({0: c}, bg, "no-such-rank")
    with pytest.raises(ValueError, match="top_t"):
        select_rows({0: c}, bg, "kl", 0)
    with pytest.raises(ValueError, match="background"):
        select_rows({0: c}, None, "kl")


def test_select_per_micro_batch_keeps_each_micro_batchs_own_rows():
    xs = [torch.randn(1, 6, 24), torch.randn(1, 6, 24)]
    ref_mem = make_memory(seed=2)
    ref_grad, sels = torch.zeros_like(ref_mem.values.weight), []
    for x in xs:  # the reference: each micro-batch's own gradient, masked to its own top-3 rows, then summed
        ref_mem.values.weight.grad = None
        ref_mem(x).pow(2).sum().backward()
        sel = select_rows({0: read_counts_of(ref_mem)}, None, "counts", 3)[0]
        ref_grad[sel] += ref_mem.values.weight.grad[sel]
        sels.append(sel)
    for sparse in (False, True):
        mem = make_memory(seed=2)
        mem.sparse_grad = sparse
        step_rows = None
        for x in xs:
            out = mem(x)
            step_rows = select_per_micro_batch({0: mem}, {0: read_counts_of(mem)}, None, "counts", 3, step_rows)
            out.pow(2).sum().backward()
        grad = mem.values.weight.grad
        torch.testing.assert_close(grad.to_dense() if sparse else grad, ref_grad, rtol=1e-6, atol=1e-7)
        assert torch.equal(step_rows[0], torch.cat(sels).unique())
    # called after backward instead of before: the next micro-batch's backward refuses the stale selection
    mem = make_memory(seed=2)
    mem(xs[0]).sum().backward()
    select_per_micro_batch({0: mem}, {0: read_counts_of(mem)}, None, "counts", 3)
    with pytest.raises(RuntimeError, match="a new forward ran before the backward"):
        mem(xs[1]).sum().backward()


def read_counts_of(mem):
    return torch.bincount(mem.last_indices.flatten(), minlength=mem.n_slots)


# --- the masked update ---------------------------------------------------------------------------------


def table_memory(n_keys=8, v_dim=5, seed=0):
    mem = make_memory(n_keys=n_keys, topk=2, v_dim=v_dim, seed=seed)  # 64 rows
    mem.requires_grad_(False)
    mem.values.weight.requires_grad_(True)
    return mem


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_on_a_row_selected_every_step_equals_torch_adamw(weight_decay):
    mem = table_memory()
    ref = torch.nn.Parameter(mem.values.weight.detach()[7:8].clone())
    torch_opt = torch.optim.AdamW([ref], lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    opt = SparseMemoryOptimizer({0: mem}, lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    for s in range(30):
        g = torch.randn(64, 5)
        mem.values.weight.grad, ref.grad = g.clone(), g[7:8].clone()
        for group in opt.param_groups + torch_opt.param_groups:
            group["lr"] = 3e-2 * (1 - s / 40)  # a schedule, set from outside
        opt.step({0: torch.tensor([7, 20 + s % 9])})
        torch_opt.step()
    # bit-identical: the same operations as torch's single-tensor AdamW, in the same order
    assert torch.equal(mem.values.weight.detach()[7:8], ref.detach())
    state = opt.state_dict()  # row 7 was the first to get state
    assert torch.equal(state["0.exp_avg"][0], torch_opt.state[ref]["exp_avg"][0])
    assert torch.equal(state["0.exp_avg_sq"][0], torch_opt.state[ref]["exp_avg_sq"][0])


@pytest.mark.parametrize("mode", ["adamw", "sgd"])
def test_rows_not_selected_and_their_state_stay_bit_identical(mode):
    mem = table_memory()
    opt = SparseMemoryOptimizer({0: mem}, lr=1e-2, weight_decay=0.05, mode=mode)
    gen = torch.Generator().manual_seed(1)
    for s in range(40):
        mem.values.weight.grad = torch.randn(64, 5, generator=gen)
        selected = torch.randperm(64, generator=gen)[: 1 + s % 10]
        before, state = mem.values.weight.detach().clone(), opt.state_dict()
        out = opt.step({0: selected}, max_grad_norm=5.0)
        after, state_after = mem.values.weight.detach(), opt.state_dict()
        others = torch.ones(64, dtype=torch.bool)
        others[selected] = False
        assert torch.equal(after[others], before[others])
        assert out["rows"][0] == len(selected) and not torch.equal(after[~others], before[~others])
        if mode == "adamw":  # a row keeps its moments and step count unless selected
            slots = state_after["0.slots"].tolist()
            old = {slot: j for j, slot in enumerate(state["0.slots"].tolist())}
            for j, slot in enumerate(slots):
                if others[slot]:
                    for key in ("exp_avg", "exp_avg_sq", "step"):
                        assert torch.equal(state_after[f"0.{key}"][j], state[f"0.{key}"][old[slot]])
                else:
                    assert state_after["0.step"][j] == (state["0.step"][old[slot]] + 1 if slot in old else 1)


def test_weight_decay_only_on_updated_rows():
    mem = table_memory()
    w0 = mem.values.weight.detach().clone()
    opt = SparseMemoryOptimizer({0: mem}, lr=0.1, weight_decay=0.5)
    mem.values.weight.grad = torch.zeros(64, 5)  # no gradient: AdamW's step is 0 / (0 + eps) = 0, only decay
    opt.step({0: torch.tensor([2, 9])})
    w = mem.values.weight.detach()
    assert torch.equal(w[[2, 9]], w0[[2, 9]] * (1 - 0.1 * 0.5))
    keep = torch.ones(64, dtype=torch.bool)
    keep[[2, 9]] = False
    assert torch.equal(w[keep], w0[keep])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_is_exact_against_torch_sgd(weight_decay):
    mem = table_memory()
    rows = torch.tensor([1, 4, 33])
    ref = torch.nn.Parameter(mem.values.weight.detach()[rows].clone())
    torch_opt = torch.optim.SGD([ref], lr=2.0, weight_decay=weight_decay)
    opt = SparseMemoryOptimizer({0: mem}, lr=2.0, mode="sgd", weight_decay=weight_decay)
    for _ in range(5):
        g = torch.randn(64, 5)
        mem.values.weight.grad, ref.grad = g.clone(), g[rows].clone()
        opt.step({0: rows})
        torch_opt.step()
    assert torch.equal(mem.values.weight.detach()[rows], ref.detach())


def test_grad_clipping_over_the_selected_rows():
    mem = table_memory()
    w0 = mem.values.weight.detach().clone()
    g = torch.randn(64, 5)
    mem.values.weight.grad = g.clone()
    rows = torch.tensor([3, 5])
    opt = SparseMemoryOptimizer({0: mem}, lr=1.0, mode="sgd")
    out = opt.step({0: rows}, max_grad_norm=0.5)
    norm = g[rows].norm()
    assert out["grad_norm"] == pytest.approx(norm.item(), rel=1e-6)
    torch.testing.assert_close(mem.values.weight.detach()[rows], w0[rows] - g[rows] * 0.5 / (norm + 1e-6))


def test_grad_clipping_spans_every_layer_and_also_as_clip_grad_norm():
    """One clip over the selected rows of every layer and the `also` parameters, as torch's clip_grad_norm_
    over all of them together."""
    mems = {0: table_memory(seed=0), 3: table_memory(seed=1)}
    alpha = torch.nn.Parameter(torch.tensor(0.5))
    rows = {0: torch.tensor([3, 5]), 3: torch.tensor([7, 8, 60])}
    grads = {i: torch.randn(64, 5) for i in mems}
    ref = [torch.nn.Parameter(mems[i].values.weight.detach()[rows[i]].clone()) for i in mems]
    for r, i in zip(ref, mems):
        r.grad = grads[i][rows[i]].clone()
        mems[i].values.weight.grad = grads[i].clone()
    alpha.grad = torch.tensor(2.0)
    ref_alpha = torch.nn.Parameter(alpha.detach().clone())
    ref_alpha.grad = alpha.grad.clone()
    want_norm = torch.nn.utils.clip_grad_norm_(ref + [ref_alpha], 0.5)
    torch.optim.SGD(ref, lr=1.0).step()
    out = SparseMemoryOptimizer(mems, lr=1.0, mode="sgd", also=[alpha]).step(rows, max_grad_norm=0.5)
    assert out["grad_norm"] == pytest.approx(want_norm.item(), rel=1e-6)
    for r, i in zip(ref, mems):
        torch.testing.assert_close(mems[i].values.weight.detach()[rows[i]], r.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(alpha.grad, ref_alpha.grad)  # scaled in place, for its own optimizer


def test_changed_rows_count_rows_with_any_entry_changed():
    """`rows` in step()'s result counts the selected rows whose values changed at all: a row whose gradient
    moves one entry counts, a selected row with zero gradient (SGD: no change) does not."""
    mem = table_memory()
    g = torch.zeros(64, 5)
    g[3, 2] = 1.0  # row 3: one entry moves; row 5: none
    mem.values.weight.grad = g
    out = SparseMemoryOptimizer({0: mem}, lr=0.1, mode="sgd").step({0: torch.tensor([3, 5])})
    assert out["rows"] == {0: 1}


def test_lazy_state_grows_at_most_once_per_8_steps():
    """The lazy state's row count stays on the device; the host learns it (one sync) only when the buffers may
    be full, and then grows them for >= 8 more steps of new rows: with the same number of rows every step (as
    top_t gives), at most one sync per 8 steps, also when half the selected rows had state (so the host's bound
    overestimates the count)."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from bench_train import OpCounter
    mem = table_memory(n_keys=32)  # 1,024 rows
    opt = SparseMemoryOptimizer({0: mem}, lr=1e-3, check=False)
    gen = torch.Generator().manual_seed(0)
    syncs = []
    for s in range(64):
        mem.values.weight.grad = torch.randn(1024, 5, generator=gen)
        seen = 4 * s + 4 * (s > 0)  # rows 0..seen-1 have state
        rows = torch.cat([torch.arange(seen, seen + 4),  # 4 new rows and 4 with state (8 new at first)
                          torch.randperm(seen, generator=gen)[:4] if s else torch.arange(4, 8)])
        counter = OpCounter("cpu")
        with counter:
            opt.step({0: rows})
        syncs.append(counter.syncs["_local_scalar_dense"] - 1)  # less the gradient norm's
    when = [s for s, n in enumerate(syncs) if n]
    assert when[0] == 0 and all(b - a >= 8 for a, b in zip(when, when[1:])), when
    assert opt.state_dict()["0.slots"].tolist() == list(range(4 * 64 + 4))  # every row seen, in first-seen order


def test_dense_adamw_leaks_into_rows_selected_earlier():
    moved = {}
    for mode in ("adamw", "dense_adamw"):
        mem = table_memory()
        opt = SparseMemoryOptimizer({0: mem}, lr=1e-2, mode=mode)
        mem.values.weight.grad = torch.randn(64, 5)
        opt.step({0: torch.tensor([3])})
        w = mem.values.weight.detach().clone()
        mem.values.weight.grad = torch.randn(64, 5)
        out = opt.step({0: torch.tensor([10])})  # row 3 not selected now
        moved[mode] = not torch.equal(mem.values.weight.detach()[3], w[3])
        assert out["rows"][0] == (2 if mode == "dense_adamw" else 1)
    assert moved == {"adamw": False, "dense_adamw": True}


def test_sparse_gradients_accumulated_over_micro_batches_give_the_dense_update():
    tables = {}
    for sparse in (False, True):
        mem = make_memory(seed=3)
        mem.requires_grad_(False)
        mem.values.weight.requires_grad_(True)
        mem.sparse_grad = sparse
        opt = SparseMemoryOptimizer({0: mem}, lr=1e-2)
        torch.manual_seed(5)
        counts = 0
        for _ in range(2):  # two micro-batches
            mem(torch.randn(1, 6, 24)).pow(2).sum().backward()
            counts = counts + torch.bincount(mem.last_indices.flatten(), minlength=mem.n_slots)
        opt.step(select_rows({0: counts}, None, "counts", 10), max_grad_norm=1.0)
        tables[sparse] = mem.values.weight.detach().clone()
    torch.testing.assert_close(tables[True], tables[False], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["adamw", "dense_adamw", "sgd"])
def test_state_dict_round_trip_continues_identically(mode, tmp_path):
    mems = {0: table_memory(seed=0), 1: table_memory(seed=1)}
    opt = SparseMemoryOptimizer(mems, lr=1e-2, weight_decay=0.01, mode=mode)
    gen = torch.Generator().manual_seed(0)

    def run(opt, mems, steps):
        for _ in range(steps):
            for mem in mems.values():
                mem.values.weight.grad = torch.randn(64, 5, generator=gen)
            opt.step({i: torch.randperm(64, generator=gen)[:7] for i in mems})

    run(opt, mems, 5)
    save_file(opt.state_dict(), tmp_path / "opt.safetensors")
    save_file({f"{i}": m.values.weight.detach() for i, m in mems.items()}, tmp_path / "values.safetensors")
    state = gen.get_state()
    run(opt, mems, 5)

    values = load_file(tmp_path / "values.safetensors")
    mems2 = {i: table_memory(seed=9) for i in (0, 1)}
    for i, m in mems2.items():
        m.values.weight.data.copy_(values[f"{i}"])
    opt2 = SparseMemoryOptimizer(mems2, lr=5.0, weight_decay=0.01, mode=mode)
    opt2.load_state_dict(load_file(tmp_path / "opt.safetensors"))
    assert opt2.param_groups[0]["lr"] == 1e-2
    gen.set_state(state)
    run(opt2, mems2, 5)
    for i in (0, 1):
        assert torch.equal(mems2[i].values.weight, mems[i].values.weight)


def test_optimizer_refuses_bad_input():
    mem = table_memory()
    with pytest.raises(ValueError, match="mode"):
        SparseMemoryOptimizer({0: mem}, lr=1e-3, mode="adam")
    opt = SparseMemoryOptimizer({0: mem}, lr=1e-3)
    mem.values.weight.grad = torch.randn(64, 5)
    with pytest.raises(ValueError, match="slot ids"):
        opt.step({0: torch.tensor([64])})
    with pytest.raises(ValueError, match="repeated"):
        opt.step({0: torch.tensor([1, 1])})
    with pytest.raises(ValueError, match="unexpected tensor"):
        opt.load_state_dict({**opt.state_dict(), "7.slots": torch.zeros(0, dtype=torch.long)})


def test_lazy_state_holds_only_rows_ever_updated():
    mem = table_memory()
    opt = SparseMemoryOptimizer({0: mem}, lr=1e-3)
    assert opt.step({0: torch.zeros(0, dtype=torch.long)})["rows"] == {0: 0}  # nothing read: no gradient needed
    for rows in ([4, 9, 2], [9, 30], [2]):
        mem.values.weight.grad = torch.randn(64, 5)
        opt.step({0: torch.tensor(rows)})
    state = opt.state_dict()
    assert state["0.slots"].tolist() == [4, 9, 2, 30] and state["0.exp_avg"].shape == (4, 5)
    assert state["0.step"].tolist() == [1, 2, 2, 1]


def test_save_pretrained_refuses_memory_layers(tiny_model_dir, tmp_path):
    model = Qwen2.from_pretrained(tiny_model_dir)
    add_memory(model, MemoryConfig(layers=[1], n_keys=4, heads=1, topk=2, k_dim=8))
    with pytest.raises(ValueError, match="memory layers"):
        save_pretrained(model, str(tmp_path / "out"))


def test_a_registered_rank_is_reachable_from_the_cli(monkeypatch):
    """A new ranking rule is one function and one RANKS entry in memory.py: train.py --rank offers it."""
    import train
    monkeypatch.setitem(memory.RANKS, "bm25", lambda c, background, layer: c.sqrt())
    args = train.parse_args(["--method", "smf", "--rank", "bm25"])
    assert args.rank == "bm25"
    c = torch.tensor([0, 4, 1, 9])
    assert select_rows({0: c}, None, "bm25", 2)[0].tolist() == [3, 1]


def test_zero_grad_honours_set_to_none():
    mem = table_memory()
    opt = SparseMemoryOptimizer({0: mem}, lr=1e-3)
    mem.values.weight.grad = torch.randn(64, 5)
    g = mem.values.weight.grad
    opt.zero_grad(set_to_none=False)
    assert mem.values.weight.grad is g and not g.any()
    opt.zero_grad()
    assert mem.values.weight.grad is None


def test_an_smf_step_makes_few_host_syncs(tiny_model_dir):
    """On a GPU each host sync waits for every queued kernel. Counted here as bench/bench_train.py counts them: an
    SMF step (the reads of 2 micro-batches, the selection, the masked step) on 3 memory layers makes 1 sync per
    micro-batch and layer in the forward (`unique`, for the sparse gradient), none counting reads, 1 to select (every layer at once) and 2 in the step
    (the gradient norm, the changed-row counts), once the optimizer's state has room."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from bench_train import OpCounter
    model = memory_model(tiny_model_dir, layers=[0, 1, 2])
    model.requires_grad_(False)
    mems = memory_layers(model)
    for mem in mems.values():
        mem.values.weight.requires_grad_(True)
        mem.sparse_grad = True
    opt = SparseMemoryOptimizer(mems, lr=1e-2, check=False)
    idx, mask = torch.randint(0, 300, (2, 8)), torch.ones(2, 8, dtype=torch.long)

    def step(counter=None):
        counts = None
        for _ in range(2):  # micro-batches
            model(idx).sum().backward()
            with counter or torch.no_grad():
                reads = read_counts(model, mask)
            counts = reads if counts is None else {i: counts[i] + reads[i] for i in reads}
        with counter or torch.no_grad():
            selected = select_rows(counts, None, "counts", 4)
            opt.step(selected, max_grad_norm=1.0)
        opt.zero_grad()

    for _ in range(3):  # the state grows (a sync per doubling), then has room for these rows
        step()
    counter = OpCounter("cpu")
    step(counter)
    assert sum(counter.syncs.values()) == 1 + 2, counter.syncs  # select: 1; the step: the norm and the row counts
    counter = OpCounter("cpu")
    with counter:
        model(idx).sum().backward()
    assert dict(counter.syncs) == {"_unique2": 3}  # one per memory layer: the distinct rows read
    opt.zero_grad()


def test_grad_rows_sums_a_row_held_more_than_once():
    """A sparse gradient of several micro-batches holds a row once per micro-batch that read it: grad_rows sums
    them (exactly, in integers here), as the dense gradient does; rows not read get zero."""
    idx = torch.tensor([[3, 1, 3, 3, 0]])
    vals = torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0], [1000.0, 2000.0], [5.0, 6.0]])
    grad = torch.sparse_coo_tensor(idx, vals, (6, 2))  # uncoalesced: row 3 three times
    dense = grad.to_dense()
    rows = torch.tensor([3, 2, 0, 1])
    assert torch.equal(memory.grad_rows(grad, rows), dense[rows])
    assert torch.equal(memory.grad_rows(grad, rows)[0], torch.tensor([1101.0, 2202.0]))
    assert torch.equal(memory.grad_rows(dense, rows), dense[rows])


def test_background_ranking_terms_follow_an_update():
    """BackgroundStats caches its smoothed distribution and idf per layer: an update after a ranking has used
    them gives the terms of the new counts, equal to statistics built from all batches at once."""
    a, b = {0: torch.tensor([3, 0, 1, 0])}, {0: torch.tensor([0, 2, 2, 0])}
    stats = BackgroundStats()
    stats.update(a)
    stale = stats.distribution(0).clone(), stats.idf(0).clone()
    c = torch.tensor([4, 0, 0, 1])
    memory.row_scores(c, stats, 0, "kl"), memory.row_scores(c, stats, 0, "tfidf")  # the ranking caches its terms
    stats.update(b)
    fresh = BackgroundStats()
    fresh.update(a)
    fresh.update(b)
    assert torch.equal(stats.distribution(0), fresh.distribution(0)) and torch.equal(stats.idf(0), fresh.idf(0))
    assert not torch.equal(stats.distribution(0), stale[0]) and not torch.equal(stats.idf(0), stale[1])
    for rank in ("kl", "tfidf"):
        assert torch.equal(memory.row_scores(c, stats, 0, rank), memory.row_scores(c, fresh, 0, rank))


# -----------------------------------------------------------------------------
# The optimizer against torch: lazy AdamW's per-row bias correction, clipping never scales up


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lazy_adamw_bias_correction_uses_each_rows_own_step_count(weight_decay):
    mem = table_memory()
    w0 = mem.values.weight.detach().clone()
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    opt = SparseMemoryOptimizer({0: mem}, mode="adamw", **hp)
    # row 63 every step (so the global step runs ahead); row 5 every 3rd step from step 1; row 40 every 9th from 4
    every = {63: (1, 0), 5: (3, 1), 40: (9, 4)}
    refs = {r: torch.nn.Parameter(w0[r:r + 1].clone()) for r in every}
    torch_opts = {r: torch.optim.AdamW([refs[r]], **hp) for r in every}
    for s in range(27):
        g = torch.randn(64, 5)
        rows = [r for r, (n, first) in every.items() if s % n == first]
        mem.values.weight.grad = g.clone()
        opt.step({0: torch.tensor(rows)})
        for r in rows:  # each reference sees only its row's steps, with the same gradient
            refs[r].grad = g[r:r + 1].clone()
            torch_opts[r].step()

    w, state = mem.values.weight.detach(), opt.state_dict()
    slots = state["0.slots"].tolist()
    for r in every:
        j, ref_state = slots.index(r), torch_opts[r].state[refs[r]]
        assert state["0.step"][j] == ref_state["step"] == len(range(every[r][1], 27, every[r][0]))
        torch.testing.assert_close(w[r:r + 1], refs[r].detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state["0.exp_avg"][j], ref_state["exp_avg"][0], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(state["0.exp_avg_sq"][j], ref_state["exp_avg_sq"][0], rtol=1e-6, atol=1e-12)
    never = torch.ones(64, dtype=torch.bool)
    never[list(every)] = False
    assert torch.equal(w[never], w0[never]) and sorted(slots) == sorted(every)


# --- 2. clipping -----------------------------------------------------------------------------------------


def test_clipping_never_scales_a_small_gradient_up():
    mems = {0: table_memory(seed=0), 1: table_memory(seed=1)}
    w0 = {i: m.values.weight.detach().clone() for i, m in mems.items()}
    rows = {0: torch.tensor([3, 17]), 1: torch.tensor([8])}
    grads = {i: torch.randn(64, 5) for i in mems}
    norm = torch.cat([grads[i][rows[i]].flatten() for i in mems]).norm()  # over the selected rows of both layers
    for i, m in mems.items():
        grads[i] *= 0.1 / norm  # total norm 0.1, well under max_grad_norm
        m.values.weight.grad = grads[i].clone()
    opt = SparseMemoryOptimizer(mems, lr=0.5, mode="sgd")
    out = opt.step(rows, max_grad_norm=1.0)
    assert out["grad_norm"] == pytest.approx(0.1, rel=1e-6)
    for i, m in mems.items():
        want = w0[i].clone()
        want[rows[i]] = w0[i][rows[i]] - 0.5 * grads[i][rows[i]]  # coefficient min(1, 1.0 / 0.1) = 1
        assert torch.equal(m.values.weight.detach(), want)
