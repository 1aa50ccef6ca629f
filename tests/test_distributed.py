"""torchrun with 2 CPU processes (gloo): per-rank batch b must equal one process with batch 2b."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from helpers import MEM, read_log
from tiny_data import medmcqa_rows, oasst1_rows, write_jsonl, write_parquet

pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(nproc, *args):
    """The README's command: torchrun --standalone --nproc_per_node=N train.py ...; 1 process: train.main in this
    one (one thread, as conftest sets), the reference the ranks must equal."""
    if nproc == 1:
        return train.main([str(a) for a in args])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*launcher, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    med = write_parquet(str(d / "medmcqa.parquet"), medmcqa_rows(40))  # 32 single-answer rows
    oa = write_jsonl(str(d / "oasst1.jsonl"), oasst1_rows(32))
    base = ["--model", tiny_model_dir, "--data", f"medmcqa={med}", "--data", f"oasst1={oa}", "--device", "cpu",
            "--max-len", "128", "--warmup", "1", "--batch-size", "8"]
    return d, base


def compare_runs(a, b, atol=2e-5):
    """The two runs' weights after a few AdamW steps at lr 1e-4: float noise in near-zero gradients moves an entry
    by up to ~3e-3 lr a step (seen on one process against another split), 40x under atol; a wrong gradient, a
    wrong row or a skipped step moves it by about lr. Their logged losses and gradient norms (before each update)
    also agree."""
    la, lb = read_log(a), read_log(b)
    assert [r["tokens"] for r in la] == [r["tokens"] for r in lb]
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5) and ra["grad_norm"] == pytest.approx(
            rb["grad_norm"], rel=1e-4)
    ta, tb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_ranks_equal_one_process_with_double_batch(method, setup):
    d, base = setup
    extra = ["--method", method, "--recipe", "clean", "--max-steps", "3", "--lr", "1e-4",
             *(["--lora-dropout", "0"] if method == "lora" else [])]
    run(2, *base, *extra, "--micro-batch", "2", "--out", str(d / f"{method}2"))
    run(1, *base, *extra, "--micro-batch", "4", "--out", str(d / f"{method}1"))
    compare_runs(d / f"{method}2", d / f"{method}1")


def test_smf_ranks_select_the_same_rows(setup):
    d, base = setup
    # (--recipe clean: the paper recipe counts padding reads, which depend on how each rank pads its share)
    run(1, *base, "--method", "retrofit", "--recipe", "clean", "--max-steps", "2", "--micro-batch", "2", *MEM,
        "--out", str(d / "retrofit2"))  # the memory both stage-2 runs start from (one process: this test is stage 2)
    # stage 2: 2 ranks x batch 2 against 1 process x batch 4, same memory
    extra = ["--method", "smf", "--recipe", "clean", "--memory-from", str(d / "retrofit2"), "--max-steps", "3",
             "--top-t", "5", "--lr", "1e-4", "--log-rows", "--background-batches", "10"]
    run(2, *base, *extra, "--micro-batch", "2", "--out", str(d / "smf2"))
    run(1, *base, *extra, "--micro-batch", "4", "--out", str(d / "smf1"))
    # the background reads of stage 2 are split across the 2 ranks and summed
    bg = load_file(str(d / "smf2" / "background.safetensors"))
    from safetensors import safe_open
    with safe_open(str(d / "smf2" / "background.safetensors"), "pt") as f:
        assert int(f.metadata()["n_batches"]) == 10
    # every token of every batch read heads * topk slots, each counted once across the ranks
    from data import Tokenizer
    import data
    tok = Tokenizer.from_pretrained(base[1])
    chats = data.oasst1_conversations(data.load_rows("oasst1", path=base[5].split("=", 1)[1]))
    n_tokens_all = [len(data.encode_chat(tok, c, 128)[0]) for c in chats]
    order = data.epoch_order(len(n_tokens_all), 0, epoch=10**6)[:10]
    assert int(bg["counts.1"].sum()) == sum(n_tokens_all[j] for j in order) * 2 * 4
    assert torch.equal(bg["counts.1"], load_file(str(d / "smf1" / "background.safetensors"))["counts.1"])
    r0, r1 = read_log(d / "smf2", "selected.rank0.jsonl"), read_log(d / "smf2", "selected.rank1.jsonl")
    assert r0 == r1 and len(r0) == 3
    one = read_log(d / "smf1")
    assert [{k: sorted(v) for k, v in r["selected"].items()} for r in one] == \
        [{k: sorted(v) for k, v in r.items() if k != "step"} for r in r0]
    compare_runs(d / "smf2", d / "smf1")


def test_fsdp_full_equals_one_process_and_resumes_exactly(setup):
    """--fsdp shards weights, gradients and AdamW state (fully_shard); the result equals one process with the
    double batch, and an interrupted sharded run resumes bit-identically (full state gathered in the checkpoint)."""
    d, base = setup
    extra = ["--method", "full", "--recipe", "clean", "--max-steps", "3", "--lr", "1e-4"]
    run(2, *base, *extra, "--fsdp", "--micro-batch", "2", "--out", str(d / "fsdp2"))
    run(1, *base, *extra, "--micro-batch", "4", "--out", str(d / "fsdp1"))
    compare_runs(d / "fsdp2", d / "fsdp1")
    run(2, *base, *extra, "--fsdp", "--micro-batch", "2", "--out", str(d / "fsdp-r"), "--stop-at-step", "2")
    run(2, *base, *extra, "--fsdp", "--micro-batch", "2", "--out", str(d / "fsdp-r"), "--resume")
    for name in ("model.safetensors", "checkpoint.safetensors"):
        a, b = load_file(str(d / "fsdp2" / name)), load_file(str(d / "fsdp-r" / name))
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resume"
    from transformers import Qwen2ForCausalLM  # the exported Hub directory loads in transformers
    Qwen2ForCausalLM.from_pretrained(str(d / "fsdp2" / "hf"))


def test_fsdp_needs_torchrun(setup):
    d, base = setup
    r = subprocess.run([sys.executable, "train.py", *base, "--method", "full", "--fsdp", "--out", str(d / "x")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "--fsdp needs torchrun" in r.stderr

