"""model.py against transformers' Qwen2ForCausalLM on the same tiny checkpoints (no network), and sampling against
transformers' top-k / top-p / temperature warpers. LoRA: test_lora.py."""

import json
import os
import shutil

import pytest
import torch

from checkpoint import save_pretrained
from model import Qwen2, Qwen2Config, padded_attention, rope_cos_sin, sample_next
from tiny import write_checkpoint
from transformers import Qwen2ForCausalLM
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM  # Qwen2ForCausalLM or LlamaForCausalLM, as config.json says
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def ours(path, dtype=None):
    return Qwen2.from_pretrained(path, dtype=dtype).eval()


def random_ids(n_rows, n_cols, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_rows, n_cols), generator=g)


def hf_positions(mask):
    """The positions transformers' generate gives a padded batch: count real tokens only."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("tiny_bf16")), dtype=torch.bfloat16, seed=2)


# --- logits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_untied_mha_dir", "tiny_llama_dir", "tiny_llama_untied_dir"])
def test_logits_match_transformers_fp32(which, request):
    path = request.getfixturevalue(which)
    ref, model = hf_model(path), ours(path)
    cfg = model.config
    tied = which in ("tiny_model_dir", "tiny_llama_dir")
    assert cfg.tie_word_embeddings == tied and (cfg.num_key_value_heads < cfg.num_attention_heads) == tied
    assert type(ref).__name__ == ("LlamaForCausalLM" if "llama" in which else "Qwen2ForCausalLM")
    assert cfg.model_type == ("llama" if "llama" in which else "qwen2")
    assert (model.model.layers[0].self_attn.q_proj.bias is None) == ("llama" in which)
    idx = random_ids(3, 40, cfg.vocab_size)
    with torch.no_grad():
        got, want = model(idx), ref(idx).logits
    assert got.dtype == torch.float32 and got.shape == (3, 40, cfg.vocab_size)
    assert (got - want).abs().max().item() <= 1e-4
    # the hidden states are what lm_head reads
    with torch.no_grad():
        assert torch.allclose(model.lm_head(model.hidden_states(idx)), got, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_gives_unpadded_logits(side, tiny_model_dir):
    ref, model = hf_model(tiny_model_dir), ours(tiny_model_dir)
    lengths = [12, 7, 3]
    T, pad = max(lengths), 0
    rows = [random_ids(1, n, model.config.vocab_size, seed=i)[0] for i, n in enumerate(lengths)]
    idx = torch.full((len(rows), T), pad)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        idx[i, sl], mask[i, sl] = r, 1
    with torch.no_grad():
        got = model(idx, attention_mask=mask)
        want = ref(idx, attention_mask=mask, position_ids=hf_positions(mask)).logits
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            real = mask[i].bool()
            assert (got[i, real] - alone).abs().max().item() <= 1e-4, f"row {i}"
            assert (got[i, real] - want[i, real]).abs().max().item() <= 1e-4, f"row {i}"


def test_bf16_checkpoint_loads_as_bf16_and_matches_transformers(bf16_dir):
    model = ours(bf16_dir)  # dtype defaults to the checkpoint's
    assert model.config.torch_dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref = hf_model(bf16_dir, dtype=torch.bfloat16)
    idx = random_ids(2, 32, model.config.vocab_size)
    with torch.no_grad():
        got, want = model(idx), ref(idx).logits.float()
        exact = ours(bf16_dir, dtype=torch.float32)(idx)
    assert got.dtype == torch.float32  # logits are always returned in fp32
    # bf16 has 8 bits of mantissa: allow a few bf16 ulps of the logit scale, and check we are as close to the
    # fp32 computation as transformers' bf16 is
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 0.02 * scale
    assert (got - exact).abs().mean().item() <= 1.5 * (want - exact).abs().mean().item() + 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.95


def test_sharded_checkpoint_loads(tiny_model_dir, tmp_path):
    ref = hf_model(tiny_model_dir)
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    idx = random_ids(2, 16, ref.config.vocab_size)
    with torch.no_grad():
        assert (ours(str(tmp_path))(idx) - ref(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("which", ["tiny_untied_mha_dir", "tiny_llama_dir"])
def test_save_pretrained_round_trip_loads_in_transformers(which, request, tmp_path):
    model = ours(request.getfixturevalue(which))
    save_pretrained(model, str(tmp_path))
    ref = hf_model(str(tmp_path))
    assert type(ref).__name__ == ("LlamaForCausalLM" if "llama" in which else "Qwen2ForCausalLM")
    again = ours(str(tmp_path))
    idx = random_ids(2, 20, model.config.vocab_size)
    with torch.no_grad():
        got = model(idx)
        assert (ref(idx).logits - got).abs().max().item() <= 1e-4
        assert torch.equal(again(idx), got)


# --- generation -----------------------------------------------------------------------------------


def hf_generate(ref, idx, mask, n, **kw):
    with torch.no_grad():
        return ref.generate(input_ids=idx, attention_mask=mask, max_new_tokens=n, do_sample=False,
                            temperature=None, top_p=None, top_k=None, **kw)


def left_padded(rows, pad):
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    return idx, mask


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_generation_matches_transformers(penalty, tiny_model_dir):
    ref, model = hf_model(tiny_model_dir), ours(tiny_model_dir)
    V, pad = model.config.vocab_size, 0
    # single sequence, no eos
    idx = random_ids(1, 9, V)
    want = hf_generate(ref, idx, torch.ones_like(idx), 20, eos_token_id=None, pad_token_id=pad,
                       repetition_penalty=penalty)
    got = model.generate(idx, 20, repetition_penalty=penalty)
    assert got.shape == (1, 29) and torch.equal(got, want)
    # left-padded batch, no eos
    rows = [random_ids(1, n, V, seed=s)[0].tolist() for s, n in enumerate([9, 4, 6])]
    idx, mask = left_padded(rows, pad)
    want = hf_generate(ref, idx, mask, 16, eos_token_id=None, pad_token_id=pad, repetition_penalty=penalty)
    got = model.generate(idx, 16, attention_mask=mask, repetition_penalty=penalty)
    assert torch.equal(got, want)
    # with eos: pick a token row 0 produces mid-way, so that row stops early and the others go on
    eos = int(got[0, idx.size(1) + 5])
    want = hf_generate(ref, idx, mask, 16, eos_token_id=eos, pad_token_id=pad, repetition_penalty=penalty)
    got = model.generate(idx, 16, attention_mask=mask, eos_token_id=eos, pad_token_id=pad,
                         repetition_penalty=penalty)
    assert (got[0, idx.size(1):] == eos).any()
    assert torch.equal(got, want)


def test_compiled_decoding_gives_the_eager_tokens(tiny_model_dir):
    """generate(compiled=True): static shapes (the cache rounded up to 64 positions, all attended, the unwritten
    masked out), a compiled step, caches kept per shape: the same tokens as eager decoding, padded or not, with
    a memory layer (SMF evaluation) and a repetition penalty; a second call reuses the compiled step; afterwards
    the model has no cache attached, so a forward is what it was."""
    import memory
    model = ours(tiny_model_dir)
    torch.manual_seed(0)
    memory.add_memory(model, memory.MemoryConfig(n_keys=8, heads=2, topk=4, k_dim=16, layers=[1]))
    V = model.config.vocab_size
    idx = random_ids(1, 7, V)
    before = model(idx)
    for seed in (0, 1):  # two calls of one shape: compiled once
        rows = [random_ids(1, n, V, seed=10 * seed + s)[0].tolist() for s, n in enumerate([9, 4, 6])]
        idx, mask = left_padded(rows, 0)
        want = model.generate(idx, 12, attention_mask=mask, repetition_penalty=1.3)
        got = model.generate(idx, 12, attention_mask=mask, repetition_penalty=1.3, compiled=True)
        assert torch.equal(got, want)
    full = torch.ones_like(idx)  # no padding: eager decoding uses no mask at all
    assert torch.equal(model.generate(idx, 12, attention_mask=full, compiled=True),
                       model.generate(idx, 12, attention_mask=full))
    assert all(b.self_attn.kv_cache is None for b in model.model.layers)
    torch.testing.assert_close(model(random_ids(1, 7, V)), before, rtol=0, atol=0)


def test_generation_stops_when_all_rows_hit_eos(tiny_model_dir):
    model = ours(tiny_model_dir)
    idx = random_ids(1, 5, model.config.vocab_size)
    first = int(model.generate(idx, 1)[0, -1])
    out = model.generate(idx, 10, eos_token_id=[first, 999])
    assert out.shape == (1, 6) and int(out[0, -1]) == first


@pytest.mark.parametrize("lengths", [[6, 3], [5, 5]])
def test_decode_with_cache_equals_full_forward(lengths, tiny_model_dir):
    """Each cached one-token step gives the logits a full forward over the whole sequence gives
    (with padding: the boolean-mask path; without: no mask at all)."""
    model = ours(tiny_model_dir)
    rows = [random_ids(1, n, model.config.vocab_size, seed=s)[0].tolist() for s, n in enumerate(lengths)]
    idx, mask = left_padded(rows, 0)
    padded = not bool(mask.all())
    B, T = idx.shape
    steps = 8
    with torch.no_grad():
        model.setup_cache(B, T + steps)
        try:
            logits = model(idx, mask if padded else None)[:, -1]
            for i in range(steps):
                nxt = logits.argmax(-1, keepdim=True)
                idx, mask = torch.cat([idx, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
                logits = model(nxt, mask if padded else None, start=T + i)[:, -1]
                caches = [b.self_attn.kv_cache for b in model.model.layers]
                model.clear_cache()
                want = model(idx, mask if padded else None)[:, -1]  # a full forward, without the cache
                for b, c in zip(model.model.layers, caches):
                    b.self_attn.kv_cache = c
                assert (logits - want).abs().max().item() <= 1e-4, f"step {i}"
        finally:
            model.clear_cache()


def test_rope_table_is_kept_grown_and_rebuilt(tiny_model_dir):
    """RoPE's cos/sin table is built once and kept on the model (a forward slices or indexes it): its values are
    rope_cos_sin's exactly; one built under inference_mode (by generate) can be saved for backward in training;
    an input longer than the table (1,100 > 1,024 positions) grows it and still gets transformers' logits; a
    dtype change rebuilds it."""
    ref, model = hf_model(tiny_model_dir), ours(tiny_model_dir)
    V, hs, theta = model.config.vocab_size, model.config.head_dim, model.config.rope_theta
    model.generate(random_ids(1, 5, V), 2)  # generate runs under inference_mode: the table is built there
    cos, sin = model.rope(10)
    assert cos.shape == (1024, hs) and model.rope(10)[0] is cos  # kept, not rebuilt
    want_cos, want_sin = rope_cos_sin(torch.arange(1024)[None], hs, theta, torch.float32)  # (1, 1024, hs)
    assert torch.equal(cos, want_cos[0]) and torch.equal(sin, want_sin[0])
    model.train()
    idx = random_ids(2, 12, V)
    model(idx, labels=idx).backward()  # x * cos saves cos for backward: it must not be an inference tensor
    model.eval()
    idx = random_ids(1, 1100, V, seed=1)
    with torch.no_grad():
        got, want = model(idx), ref(idx).logits
    assert model.rope(1)[0].shape[0] >= 1100 and (got - want).abs().max().item() <= 1e-4
    model.to(torch.bfloat16)
    assert model.rope(1)[0].dtype == torch.bfloat16


def test_repetition_penalty_is_transformers():
    """A seen token's logit is divided by the penalty when positive and multiplied when negative, as transformers'
    RepetitionPenaltyLogitsProcessor; greedy picks the same tokens."""
    from transformers import RepetitionPenaltyLogitsProcessor
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 6, generator=g)
    ids = torch.randint(0, 6, (512, 3), generator=g)
    seen = torch.zeros(512, 6, dtype=torch.bool).scatter_(1, ids, True)
    want = RepetitionPenaltyLogitsProcessor(1.5)(ids, logits.clone()).argmax(-1)
    assert torch.equal(sample_next(logits, seen=seen, repetition_penalty=1.5), want)


def test_padded_attention_against_brute_force():
    """Each query attends to the real keys up to itself; a padding query with none (left padding) to itself
    alone, so no row is empty; positions count real tokens (0 before the first)."""
    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1]]).bool()
    for start in (0, 2):
        mask, pos = padded_attention(pad, start)
        assert mask.shape == (4, 1, 5 - start, 5)
        for b in range(4):
            for t in range(start, 5):
                keys = [int(s <= t and bool(pad[b, s])) for s in range(5)]
                if not any(keys):
                    keys[t] = 1
                assert mask[b, 0, t - start].int().tolist() == keys, (b, t)
                assert pos[b, t - start] == max(0, int(pad[b, :t + 1].sum()) - 1)


def test_generate_refuses_right_padding(tiny_model_dir):
    idx, mask = torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="left padding"):
        ours(tiny_model_dir).generate(idx, 2, attention_mask=mask)


# --- config ---------------------------------------------------------------------------------------


def test_config_reads_both_rope_forms():
    base = dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    old = Qwen2Config.from_dict({**base, "rope_theta": 123.0, "torch_dtype": "bfloat16"})
    new = Qwen2Config.from_dict({**base, "rope_parameters": {"rope_theta": 456.0, "rope_type": "default"},
                                 "dtype": "float32"})
    assert (old.rope_theta, old.torch_dtype) == (123.0, "bfloat16")
    assert (new.rope_theta, new.torch_dtype) == (456.0, "float32")
    assert Qwen2Config.from_dict(old.to_dict()) == old


def test_config_of_the_real_model(shared_data):
    cfg = Qwen2Config.from_json(os.path.join(shared_data, "qwen2.5-0.5b-instruct", "config.json"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        (896, 24, 14, 2)
    assert (cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings, cfg.torch_dtype) == \
        (64, 1e6, True, "bfloat16")


@pytest.mark.parametrize("extra, message", [
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"use_sliding_window": True, "sliding_window": 128}, "use_sliding_window"),
    ({"model_type": "gemma"}, "model_type 'gemma'"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias"),
    ({"model_type": "llama", "mlp_bias": True}, "mlp_bias"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"model_type": "llama", "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}},
     "rope_type 'llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_config_refuses_what_we_do_not_implement(extra, message):
    base = dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4)
    with pytest.raises(ValueError, match=message):
        Qwen2Config.from_dict({**base, **extra})


# --- bad input ------------------------------------------------------------------------------------


@pytest.fixture
def tiny_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def rewrite_weights(path, edit):
    from safetensors.torch import load_file, save_file
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found: .*nowhere"):
        Qwen2.from_pretrained(str(tmp_path / "nowhere"))


def test_missing_files_are_clear_errors(tiny_copy):
    os.remove(tiny_copy / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Qwen2.from_pretrained(str(tiny_copy))
    (tiny_copy / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        Qwen2.from_pretrained(str(tiny_copy))
    os.remove(tiny_copy / "config.json")
    with pytest.raises(FileNotFoundError, match="config file not found: .*config.json"):
        Qwen2.from_pretrained(str(tiny_copy))


def test_tied_checkpoint_with_its_own_lm_head(tiny_copy):
    """A tied config whose file also holds lm_head.weight: loaded when it equals the embeddings (as some exports
    write it), refused when it differs (the config and the weights disagree about the model)."""
    emb = Qwen2.from_pretrained(str(tiny_copy)).model.embed_tokens.weight.detach()
    rewrite_weights(tiny_copy, lambda s: s.update({"lm_head.weight": emb.clone()}))
    model = Qwen2.from_pretrained(str(tiny_copy))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rewrite_weights(tiny_copy, lambda s: s.update({"lm_head.weight": emb + 1}))
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight but config ties"):
        Qwen2.from_pretrained(str(tiny_copy))


def test_missing_tensor_is_named(tiny_copy):
    rewrite_weights(tiny_copy, lambda s: s.pop("model.layers.2.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.2\.self_attn\.k_proj\.bias"):
        Qwen2.from_pretrained(str(tiny_copy))


def test_unexpected_tensor_is_named(tiny_copy):
    rewrite_weights(tiny_copy, lambda s: s.update({"model.layers.0.mlp.extra": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.mlp\.extra"):
        Qwen2.from_pretrained(str(tiny_copy))


def test_wrong_shape_is_named(tiny_copy):
    def edit(s):
        s["model.layers.1.mlp.up_proj.weight"] = s["model.layers.1.mlp.up_proj.weight"][:-1].contiguous()
    rewrite_weights(tiny_copy, edit)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \(127, 64\), "
                                         r"expected \(128, 64\)"):
        Qwen2.from_pretrained(str(tiny_copy))


def test_truncated_safetensors_is_a_clear_error(tiny_copy):
    f = tiny_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is unreadable \(truncated or corrupt"):
        Qwen2.from_pretrained(str(tiny_copy))


def test_missing_shard_is_a_clear_error(tiny_model_dir, tmp_path):
    hf_model(tiny_model_dir).save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=f"weights file missing: .*{shard}"):
        Qwen2.from_pretrained(str(tmp_path))


def test_unsupported_config_is_a_clear_error(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: rope_type 'linear' is not supported"):
        Qwen2.from_pretrained(str(tiny_copy))


def test_idx_must_be_long(tiny_model_dir):
    with pytest.raises(TypeError, match="LongTensor"):
        ours(tiny_model_dir)(torch.zeros(1, 3, dtype=torch.int32))


# --- command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_loss_equals_the_plain_loss_and_gradients(tiny_model_dir, chunk):
    """forward(labels=...) never builds the (B, T, vocab) logits: chunk by chunk, recomputed in backward; its loss
    and every gradient equal the plain cross-entropy over the full logits."""
    import torch.nn.functional as F
    model = Qwen2.from_pretrained(tiny_model_dir)
    idx = torch.randint(0, 300, (3, 11))
    mask = torch.tensor([[1] * 11, [1] * 7 + [0] * 4, [1] * 3 + [0] * 8])
    labels = idx.masked_fill(mask == 0, -100)
    labels[0, 4] = -100  # a masked position inside a sequence
    logits = model(idx, mask)
    plain = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    plain.backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    chunked = model(idx, mask, labels=labels, loss_chunk=chunk)
    chunked.backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")  # sum order


def test_batched_generation_never_counts_padding_as_seen(tiny_model_dir):
    """The repetition penalty applies to the tokens a row has seen: its real tokens and its new ones, never the
    left padding of a batch. The pad id here is the very token the short prompt's greedy answer starts with, under
    a penalty strong enough (5) to change it if the padding counted: the batched answer equals the one alone."""
    import data
    model = Qwen2.from_pretrained(tiny_model_dir).eval()
    long = [8, 9, 10, 11, 12, 13, 14, 15]
    for short in ([5, 6, 7], [20, 21, 22], [30, 31, 40]):
        alone = model.generate(torch.tensor([short]), 4, temperature=0.0, repetition_penalty=5.0)[0, 3:].tolist()
        pad = alone[0]
        if pad not in short + long:
            break
    assert pad not in short + long
    with torch.no_grad():  # the penalty bites: with the pad id counted as seen, the first answer would differ
        logits = model(torch.tensor([short]))[0, -1].tolist()
    penalise = lambda v: v / 5 if v > 0 else v * 5  # noqa: E731  (as transformers' RepetitionPenaltyLogitsProcessor)
    scores = [penalise(v) if i in short else v for i, v in enumerate(logits)]
    assert max(range(len(scores)), key=scores.__getitem__) == pad
    scores[pad] = penalise(scores[pad])
    assert max(range(len(scores)), key=scores.__getitem__) != pad
    idx, mask = data.pad([long, short], pad, side="left")
    out = model.generate(idx, 4, temperature=0.0, attention_mask=mask, repetition_penalty=5.0, pad_token_id=pad)
    assert out[1, idx.size(1):].tolist() == alone


def test_hf_padding_without_padding_runs_unmasked(tiny_model_dir, monkeypatch):
    """hf_padding with a mask that has no padding takes the plain causal path, as Hugging Face's Qwen2 (sdpa) does
    when no position is padded (its explicit mask moved the paper-recipe weights by 3e-7 against the paper's code):
    no attention mask is built, and the result is bit-identical to no mask at all."""
    import model as model_module
    model = Qwen2.from_pretrained(tiny_model_dir).eval()
    idx = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(idx)
        monkeypatch.setattr(model_module, "padded_attention", lambda *a: pytest.fail("a mask was built"))
        assert torch.equal(model(idx, torch.ones_like(idx), hf_padding=True), want)


def test_the_readme_fixture_needs_no_test_only_package(tmp_path):
    """tiny.write_checkpoint(reference=False), the README's offline fixture, is written by our own Qwen2 (no
    transformers) in the Hub layout that transformers reads, with the same random weights as the reference one."""
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM
    ours = write_checkpoint(str(tmp_path / "ours"), reference=False)
    ref = write_checkpoint(str(tmp_path / "ref"))
    a, b = load_file(os.path.join(ours, "model.safetensors")), load_file(os.path.join(ref, "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    hf = Qwen2ForCausalLM.from_pretrained(ours).eval()
    idx = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(hf(idx).logits, Qwen2ForCausalLM.from_pretrained(ref).eval()(idx).logits)


# -----------------------------------------------------------------------------
# Sampling against transformers' warpers: top-k, top-p, temperature, generate


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
