"""
Behaviours pinned here and nowhere else, each against a reference:

1. Lazy AdamW: a row selected only now and then follows its own torch.optim.AdamW stepped only on those steps,
   so its bias correction uses the row's own step count, not the optimizer's global one.
2. Gradient clipping only ever scales down: a gradient already under max_grad_norm is applied as it is.
3. sample_next's top-k and top-p keep what transformers' TopKLogitsWarper and TopPLogitsWarper keep.
4. generate(top_k, top_p) samples only the tokens those warpers allow, and every one of them.
"""

import pytest
import torch
from transformers import Qwen2ForCausalLM
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from memory import SparseMemoryOptimizer
from model import Qwen2, sample_next
from test_memory import table_memory  # 64 rows of 5 values, only the values trainable


# --- 1. lazy AdamW ---------------------------------------------------------------------------------------


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


# --- 3. top-k and top-p against transformers' warpers ----------------------------------------------------


def logit_rows(V=50):
    """Rows with distinct values, with many ties, all tied, partly -inf already, and one dominant token."""
    g = torch.Generator().manual_seed(0)
    return torch.cat([2 * torch.randn(6, V, generator=g),
                      torch.randint(-3, 3, (6, V), generator=g).float(),
                      torch.zeros(1, V),
                      torch.randn(1, V, generator=g).index_fill(1, torch.arange(0, V, 3), float("-inf")),
                      torch.randn(1, V, generator=g).index_fill(1, torch.tensor([7]), 30.0)])


def drawn_from(logits, **kw):
    """The distribution (B, V) sample_next draws from: what it hands torch.multinomial."""
    seen = []
    draw = torch.multinomial
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "multinomial", lambda p, num_samples: seen.append(p) or draw(p, num_samples))
        sample_next(logits, **kw)
    return seen[0]


def warped(logits, temperature=1.0, top_k=None, top_p=None):
    """transformers' sampling warpers in generate's order: temperature, then top-k, then top-p (as sample_next)."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, logits.clone())


def assert_same_distribution(ours, ref):
    # Among tied logits, which ones are kept at the boundary is arbitrary (each sorts differently), so compare
    # each row's probabilities sorted: same count kept, same values. With distinct logits that is the same set.
    assert torch.equal((ours > 0).sum(-1), (ref > 0).sum(-1))
    torch.testing.assert_close(ours.sort(-1).values, ref.sort(-1).values, rtol=1e-6, atol=0)


@pytest.mark.parametrize("top_k", [1, 2, 5, 49, 50, 80])
def test_top_k_keeps_what_transformers_keeps(top_k):
    logits = logit_rows()
    ref = warped(logits, top_k=top_k).softmax(-1)
    assert_same_distribution(drawn_from(logits, temperature=1.0, top_k=top_k), ref)


@pytest.mark.parametrize("top_p", [1e-6, 0.33, 0.91, 0.999, 1.0])
def test_top_p_keeps_what_transformers_keeps(top_p):
    logits = logit_rows()
    ref = warped(logits, top_p=top_p).softmax(-1)
    assert_same_distribution(drawn_from(logits, temperature=1.0, top_p=top_p), ref)


def test_top_p_keeps_the_smallest_prefix_that_reaches_p_exactly():
    logits = torch.zeros(1, 4)  # 0.25 each: two tokens reach 0.5 exactly, so two are kept
    ours, ref = drawn_from(logits, temperature=1.0, top_p=0.5), warped(logits, top_p=0.5).softmax(-1)
    assert (ref > 0).sum() == 2
    assert_same_distribution(ours, ref)


def test_top_p_one_keeps_every_token():
    logits = 4 * torch.randn(20, 384, generator=torch.Generator().manual_seed(0))  # a long tail of tiny probabilities
    probs = drawn_from(logits, temperature=1.0, top_p=1.0)
    assert (probs > 0).all(), f"top_p=1.0 dropped {int((probs == 0).sum())} of {probs.numel()} tokens"
    assert torch.equal(probs, logits.softmax(-1))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 10, 0.61), (2.0, 3, 0.93), (0.7, 50, 0.23)])
def test_temperature_then_top_k_then_top_p_as_transformers(temperature, top_k, top_p):
    logits = logit_rows()
    ref = warped(logits, temperature, top_k, top_p).softmax(-1)
    assert_same_distribution(drawn_from(logits, temperature=temperature, top_k=top_k, top_p=top_p), ref)


# --- 4. generate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, None), (0.25, None, 0.6), (0.7, 8, 0.7)])
def test_generate_samples_only_and_all_allowed_tokens(temperature, top_k, top_p, tiny_model_dir):
    model = Qwen2.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ref = Qwen2ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    T, n = 6, 3
    idx = torch.randint(0, 300, (1, T)).expand(300, T)  # one prompt drawn 300 times
    out = model.generate(idx, n, temperature=temperature, top_k=top_k, top_p=top_p)
    for j in range(n):
        with torch.no_grad():
            logits = ref(out[:, :T + j]).logits[:, -1]  # (B, vocab)
        allowed = warped(logits, temperature, top_k, top_p).isfinite()  # (B, vocab)
        assert allowed.gather(1, out[:, T + j, None]).all(), f"step {j} sampled a token the warpers drop"
        if j == 0:  # the same prompt in every row: 300 draws reach every allowed token
            assert sorted(out[:, T].unique().tolist()) == allowed[0].nonzero().flatten().tolist()
