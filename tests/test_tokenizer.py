"""Our Tokenizer against transformers' on the real Qwen2.5 files (no tokenizer.json) and on the tiny fixture."""

import os
import unicodedata

import pytest

from data import DEFAULT_SYSTEM, Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "Hello world",
    "What is 2+2?",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\n\n\nthree newlines\r\nand CRLF\n",
    "tabs\tand\t\tmixed \t whitespace\n \n",
    "numbers 1234567890 3.14159 -42 1e-6 1,000,000",
    "contractions: I'm, you're, he's, it'd, we'll, they've, DON'T, I'M",
    "unicode: naïve café, Größe, Ελληνικά, русский, 日本語のテキスト, 中文分词, 한국어",
    "emoji 🙂🚀👍🏽 and symbols ©®™ ≤≥ ∑∫ →",
    "NFC-sensitive: cafe\u0301 vs caf\u00e9, A\u030a vs \u00c5, \u1e9b\u0323",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|>",
    "Question: Which vitamin deficiency causes scurvy?\nA. Vitamin A\nB. Vitamin B12\nC. Vitamin C\nD. Vitamin D\n",
    "http://example.com/path?query=1&b=2 user@example.org",
    "!!!??? ... --- ___ '''\"\"\"",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke.\nA short one."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
    [{"role": "user", "content": "日本語で答えて: 2+2?"}],
]


@pytest.fixture(scope="module")
def qwen_dir():
    from conftest import SHARED
    path = os.path.join(SHARED, "qwen2.5-0.5b-instruct")
    if not os.path.isfile(os.path.join(path, "vocab.json")):
        pytest.skip("../shared/data/qwen2.5-0.5b-instruct is not present")
    return path


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    assert not os.path.exists(os.path.join(qwen_dir, "tokenizer.json"))  # so this tests the BPE we build
    return Tokenizer.from_pretrained(qwen_dir)


@pytest.fixture(scope="module")
def hf_qwen(qwen_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(qwen_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_real_tokenizer_matches_transformers(text, qwen, hf_qwen):
    ids = qwen.encode(text)
    assert ids == hf_qwen.encode(text, add_special_tokens=False)
    assert qwen.decode(ids) == hf_qwen.decode(ids)
    assert qwen.decode(ids) == unicodedata.normalize("NFC", text)  # round trip, up to NFC normalization


def test_real_tokenizer_batch_and_nfc(qwen):
    assert qwen.encode_batch(TEXTS) == [qwen.encode(t) for t in TEXTS]
    decomposed = "cafe\u0301"
    assert qwen.encode(decomposed) == qwen.encode(unicodedata.normalize("NFC", decomposed))
    assert qwen.decode(qwen.encode(decomposed)) == "caf\u00e9"
    assert qwen.encode("2024") == [qwen.token_to_id(d) for d in "2024"]  # one digit per token


def test_real_tokenizer_special_ids(qwen):
    assert qwen.token_to_id("<|endoftext|>") == 151643
    assert qwen.token_to_id("<|im_start|>") == 151644
    assert qwen.token_to_id("<|im_end|>") == 151645
    assert (qwen.eos_id, qwen.pad_id, qwen.stop_ids) == (151645, 151643, [151645, 151643])
    assert qwen.vocab_size == 151665
    assert qwen.encode("<|im_start|>user<|im_end|>") == [151644, 872, 151645]
    ids = qwen.encode("a<|im_end|>b")
    assert qwen.decode(ids, skip_special_tokens=True) == "ab"


def test_default_chat_prompt_ids(qwen):
    text = qwen.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    ids = qwen.encode(text)
    assert len(ids) == 36
    assert ids[:8] == [151644, 8948, 198, 2610, 525, 1207, 16948, 11]
    assert ids[-3:] == [151644, 77091, 198]  # <|im_start|> assistant \n


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(i, generation_prompt, qwen, hf_qwen):
    messages = CONVERSATIONS[i]
    got = qwen.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    want = hf_qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert got == want
    assert qwen.encode(got) == hf_qwen.encode(want, add_special_tokens=False)


# --- the tiny fixture's tokenizer.json ------------------------------------------------------------


def test_tiny_tokenizer_matches_transformers(tiny_model_dir):
    """tokenizer.json read as written. (transformers 5's Qwen2Tokenizer class would swap in Qwen2's NFC and
    split regex whatever the file says; the real Qwen2.5 tokenizer.json has exactly those, the tiny one not.)"""
    from transformers import PreTrainedTokenizerFast
    ours = Tokenizer.from_pretrained(tiny_model_dir)
    ref = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tiny_model_dir, "tokenizer.json"),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids) == text
    assert ours.eos_id == ours.token_to_id("<|im_end|>") == ref.eos_token_id
    assert ours.pad_id == ours.token_to_id("<|endoftext|>") == ref.pad_token_id
    assert ours.stop_ids == [ours.eos_id, ours.pad_id]
    ids = ours.encode("<|im_start|>system\nhi<|im_end|>\n")
    assert ids[0] == ours.token_to_id("<|im_start|>") and ours.token_to_id("<|im_end|>") in ids
    assert ours.decode(ids, skip_special_tokens=True) == "system\nhi\n"


def test_missing_tokenizer_files_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))
