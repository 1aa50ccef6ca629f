"""Comparing training runs where the maths is exact: the gradients each optimizer step receives."""

import torch

import memory


def record_optimizer_steps(monkeypatch):
    """What train.py hands its optimizers, recorded at every call before any update: a list with one entry per
    optimizer step, {"grads": [gradient of each parameter, dense], "selected": {layer: sorted rows} (SMF only)}.
    Comparing two runs here compares their gradients where the maths says they are equal, before Adam turns
    float noise in near-zero gradients into differences of the update itself."""
    calls = []
    adamw_step, smf_step = torch.optim.AdamW.step, memory.SparseMemoryOptimizer.step

    def adamw(self, *a, **k):
        calls.append({"grads": [p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                                if p.grad is not None]})
        return adamw_step(self, *a, **k)

    def smf(self, selected, *a, **k):
        calls.append({"grads": [m.values.weight.grad.detach().coalesce().to_dense()
                                if m.values.weight.grad.is_sparse else m.values.weight.grad.detach().clone()
                                for m in self.memories.values()],
                      "selected": {i: sorted(r.tolist()) for i, r in selected.items()}})
        return smf_step(self, selected, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", adamw)
    monkeypatch.setattr(memory.SparseMemoryOptimizer, "step", smf)
    return calls


def assert_same_gradients(a: list, b: list):
    """Two runs' optimizer_steps: the same steps, the same SMF rows, and gradients equal up to fp32 summation
    order (different batch shapes round differently: seen up to 8e-7 of a tensor's largest entry; allowed 1e-4 of
    it, so no CPU's rounding can fail this while a wrong loss normalization, 2x or 4x, always does)."""
    assert len(a) == len(b) and len(a) > 0
    for step, (x, y) in enumerate(zip(a, b)):
        assert x.get("selected") == y.get("selected"), f"step {step}: other rows selected"
        assert len(x["grads"]) == len(y["grads"])
        for gx, gy in zip(x["grads"], y["grads"]):
            torch.testing.assert_close(gx, gy, rtol=0, atol=1e-4 * float(gx.abs().max()),
                                       msg=lambda m: f"step {step}: {m}")
        assert any(g.abs().max() > 0 for g in x["grads"]), f"step {step}: no gradient at all"
