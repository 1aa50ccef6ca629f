"""LoRA: a no-op at step 0, merge equals unmerged, base untouched by adapter training, peft's file format."""

import json
import math
import os

import pytest
import torch
import torch.nn as nn

from checkpoint import PEFT_PREFIX, save_peft_adapter, save_pretrained
from model import LORA_TARGETS, LoRALinear, Qwen2, add_lora, load_tensors, lora_state_dict, merge_lora, read_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def base_model(path):
    return Qwen2.from_pretrained(path, dtype=torch.float32).eval()


def load_peft_adapter(model: Qwen2, adapter_dir: str) -> Qwen2:
    """peft's adapter format read into our LoRA (the reverse of checkpoint.save_peft_adapter, for these tests):
    add_lora with the adapter's settings, then its tensors (key set and shapes checked)."""
    from safetensors.torch import load_file
    cfg = read_json(os.path.join(adapter_dir, "adapter_config.json"))
    for key, plain in [("peft_type", "LORA"), ("bias", "none"), ("use_rslora", False), ("use_dora", False),
                       ("fan_in_fan_out", False), ("layers_to_transform", None), ("modules_to_save", None),
                       ("rank_pattern", {}), ("alpha_pattern", {})]:
        assert cfg.get(key, plain) in (plain, None, {}), f"adapter_config.json: {key}={cfg[key]!r} is not supported"
    add_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), cfg["target_modules"])
    state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    ours = lora_state_dict(model)  # {'model.layers.0.self_attn.q_proj.lora_A': ...}, sharing the adapters' storage
    load_tensors({f"{PEFT_PREFIX}{k}.weight": t for k, t in ours.items()}, state, "adapter")
    return model


def ids(vocab, shape=(2, 24), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def perturb_lora_B(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))


def test_adapters_are_a_no_op_at_step_0(tiny_model_dir):
    base, model = base_model(tiny_model_dir), add_lora(base_model(tiny_model_dir), r=4, alpha=8, dropout=0.1)
    idx = ids(base.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))
        model.train()  # dropout only touches the adapter's input, and lora_B is zero
        assert torch.equal(model(idx), base(idx))


def test_keys_and_init_conventions(tiny_model_dir):
    torch.manual_seed(0)
    model = add_lora(base_model(tiny_model_dir), r=4, alpha=8, dropout=0.1)
    base_keys = set(base_model(tiny_model_dir).state_dict())
    adapters = lora_state_dict(model)
    assert set(model.state_dict()) == base_keys | set(adapters)  # base keys keep their Hub names
    n_layers = model.config.num_hidden_layers
    assert len(adapters) == 2 * len(LORA_TARGETS) * n_layers
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.scaling == 8 / 4 and q.lora_dropout.p == 0.1
    C = model.config.hidden_size
    assert adapters["model.layers.0.self_attn.q_proj.lora_A"].shape == (4, C)  # (r, in)
    assert adapters["model.layers.0.self_attn.k_proj.lora_B"].shape == (q.out_features // 2, 4)  # (out, r), GQA
    assert adapters["model.layers.0.mlp.down_proj.lora_A"].shape == (4, model.config.intermediate_size)
    for name, t in adapters.items():
        assert t.dtype == torch.float32
        if name.endswith("lora_B"):
            assert torch.count_nonzero(t) == 0
    # lora_A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear's default init
    A = adapters["model.layers.0.mlp.down_proj.lora_A"]
    bound = 1 / math.sqrt(A.shape[1])
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.15 * bound
    # the base Linear is shared, not copied
    assert q.weight is model.state_dict(keep_vars=True)["model.layers.0.self_attn.q_proj.weight"]


def test_dropout_is_on_the_adapter_input_only(tiny_model_dir):
    model = add_lora(base_model(tiny_model_dir), r=4, alpha=8, dropout=0.5)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, q.in_features)
    with torch.no_grad():
        q.lora_B.fill_(0.1)
        base = nn.functional.linear(x, q.weight, q.bias)
        q.train()
        torch.manual_seed(1)
        got = q(x)
        torch.manual_seed(1)
        dropped = nn.functional.dropout(x, 0.5, training=True)
        assert torch.allclose(got, base + dropped @ q.lora_A.T @ q.lora_B.T * q.scaling, atol=1e-5)
        q.eval()
        assert torch.allclose(q(x), base + x @ q.lora_A.T @ q.lora_B.T * q.scaling, atol=1e-5)


def test_merged_equals_unmerged(tiny_model_dir):
    model = add_lora(base_model(tiny_model_dir), r=4, alpha=8, dropout=0.1).eval()
    perturb_lora_B(model)
    idx = ids(model.config.vocab_size)
    with torch.no_grad():
        unmerged = model(idx)
        assert (unmerged - base_model(tiny_model_dir)(idx)).abs().max() > 1e-2  # the adapters do something
        merged = merge_lora(model)(idx)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(base_model(tiny_model_dir).state_dict())
    assert (merged - unmerged).abs().max().item() <= 1e-5


def test_base_untouched_by_adapter_training(tiny_model_dir):
    model = add_lora(base_model(tiny_model_dir), r=4, alpha=8, dropout=0.1).train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_A", "lora_B")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    idx = ids(model.config.vocab_size, (2, 16))
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k in before:
        if k.endswith(("lora_A", "lora_B")):
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), k


def test_peft_adapter_loads_in_peft_with_equal_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM
    model = add_lora(base_model(tiny_model_dir), r=4, alpha=16, dropout=0.0,
                     targets=("q_proj", "v_proj", "down_proj")).eval()
    perturb_lora_B(model)
    save_peft_adapter(model, str(tmp_path), base_model_name_or_path=tiny_model_dir)
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 3 * model.config.num_hidden_layers
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (4, 16, ["down_proj", "q_proj", "v_proj"])

    ref = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                    str(tmp_path)).eval()
    idx = ids(model.config.vocab_size)
    with torch.no_grad():
        got = model(idx)
        assert (ref(input_ids=idx).logits - got).abs().max().item() <= 1e-4
        # and back: our loader rebuilds the same adapters on a fresh base model
        again = load_peft_adapter(base_model(tiny_model_dir), str(tmp_path)).eval()
        assert torch.equal(again(idx), got)


def test_peft_saved_adapter_loads_here(tiny_model_dir, tmp_path):
    """An adapter that peft itself wrote (random lora_B) gives the same logits in our model."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM
    hf = Qwen2ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                               target_modules=["k_proj", "o_proj", "gate_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(tmp_path))
    ours = load_peft_adapter(base_model(tiny_model_dir), str(tmp_path)).eval()
    idx = ids(ours.config.vocab_size)
    with torch.no_grad():
        assert (peft_model.eval()(input_ids=idx).logits - ours(idx)).abs().max().item() <= 1e-4


def test_add_lora_refuses_bad_targets(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown target modules.*'qproj'"):
        add_lora(base_model(tiny_model_dir), targets=("qproj",))
    model = add_lora(base_model(tiny_model_dir), targets=("q_proj",))
    with pytest.raises(ValueError, match="already has an adapter"):
        add_lora(model, targets=("q_proj",))


def test_save_pretrained_refuses_unmerged_adapters(tiny_model_dir, tmp_path):
    model = add_lora(base_model(tiny_model_dir), r=2, alpha=4, dropout=0.0)
    with pytest.raises(ValueError, match="merge_lora"):
        save_pretrained(model, str(tmp_path))
    perturb_lora_B(model)
    idx = ids(model.config.vocab_size)
    with torch.no_grad():
        want = model.eval()(idx)
        save_pretrained(merge_lora(model), str(tmp_path))
        assert (base_model(str(tmp_path))(idx) - want).abs().max().item() <= 1e-5
