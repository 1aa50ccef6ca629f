"""common.py, the machine: one device and dtype policy, ranks that must select the same rows, the micro-batch
that fits (largest divisor first, out of memory meaning "does not fit", no trace left), tokens/s and MFU against a
hand count, the step guard."""

import pytest
import torch

import common
import train
from common import fits_in_memory, largest_that_fits


def test_dead_model_warning():
    guard = common.StepGuard("run")
    assert [guard.dead(5.9 + s * 1e-5, 0.0, s) for s in range(1, 5)] == [None] * 4
    assert "may be dead" in guard.dead(5.9, 0.0, 5)  # 5 steps with no gradient and a flat loss
    assert guard.dead(5.9, 0.0, 6) is None  # once
    assert common.StepGuard("run").dead(5.9, 0.0, 1) is None
    live = common.StepGuard("run")
    assert all(live.dead(5.9 - s / 10, 0.3, s) is None for s in range(20))
    flat = common.StepGuard("run")  # a flat loss alone is no sign: the gradient still flows
    assert all(flat.dead(5.9, 0.3, s) is None for s in range(20))
    still = common.StepGuard("run")  # no gradient but a moving loss (e.g. evaluation noise) is no sign either
    assert all(still.dead(5.9 - s / 10, 0.0, s) is None for s in range(20))
    with pytest.raises(common.RunError, match="gradient norm is nan"):
        live.check(3, 1.0, float("nan"))
    with pytest.raises(common.RunError, match="loss is inf at step 4"):
        live.check(4, float("inf"), 1.0)


def test_same_rows_stops_when_ranks_disagree(monkeypatch):
    """Ranks.same_rows all-gathers a fingerprint of every layer's selection (faked here: rank 1 sends the
    fingerprint of its own selection): the same rows in any order pass, one different row stops the run."""
    import torch
    mine = {1: torch.tensor([9, 3, 5]), 2: torch.tensor([1, 4])}
    for theirs, same in (({1: torch.tensor([3, 5, 9]), 2: torch.tensor([4, 1])}, True),
                         ({1: torch.tensor([3, 5, 9]), 2: torch.tensor([2, 3])}, False),  # same count and id sum
                         ({1: torch.tensor([3, 5, 8]), 2: torch.tensor([1, 4])}, False),
                         ({1: torch.tensor([3, 5, 9]), 2: torch.tensor([4])}, False)):
        def all_gather(seen, fp, theirs=theirs):
            seen[0].copy_(fp)
            seen[1].copy_(common.selection_fingerprint(theirs))
        monkeypatch.setattr(common.dist, "all_gather", all_gather)
        if same:
            common.Ranks(rank=0, world=2).same_rows(mine)
        else:
            with pytest.raises(common.RunError, match="selected different memory rows"):
                common.Ranks(rank=0, world=2).same_rows(mine)


def test_one_device_and_dtype_policy(monkeypatch):
    from common import default_dtype, parse_dtype, resolve_device
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") and resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'gpu0': not a device name"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="^device cuda:1: CUDA is not available on this machine$"):
        resolve_device("cuda:1")
    assert default_dtype(torch.device("cpu")) == default_dtype("cpu") == torch.float32
    assert default_dtype(torch.device("cuda", 1)) == default_dtype("cuda") == torch.bfloat16
    assert parse_dtype("bf16") == parse_dtype("bfloat16") == parse_dtype(torch.bfloat16) == torch.bfloat16
    assert parse_dtype("fp32") == torch.float32 and parse_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="dtype 'int8': expected one of float32, bfloat16"):
        parse_dtype("int8")


def test_throughput_and_mfu_equal_a_hand_count(tiny_model_dir, monkeypatch):
    import common
    import memory
    from checkpoint import load_model
    model, _, _ = load_model(tiny_model_dir, device="cpu")
    memory.add_memory(model, memory.MemoryConfig(n_keys=8, heads=2, topk=4, k_dim=16, layers=[1]).resolve(4, 64))
    cfg = model.config  # hidden 64, 4 layers, 4 heads of 16, 2 kv heads, MLP 128, vocab 384 (tests/tiny.py)
    h, kv, inter, layers, vocab = 64, 2 * 16, 128, 4, cfg.vocab_size
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    mem = model.model.layers[1].memory
    mem_matmuls = sum(p.numel() for n, p in mem.named_parameters()) - 8 * 8 * h  # all but the 64-row value table
    n = layers * per_layer + vocab * h + h + mem_matmuls  # tied embeddings: once, as the output layer
    stream = type("S", (), {"lengths": lambda self, s: [3, 5]})()
    monkeypatch.setattr(common, "peak_flops", lambda device: 1e12)
    meter = common.Throughput(model, torch.device("cpu"), 2, stream)
    assert meter.matmul_weights == n
    record = {"seconds": 0.5}
    shown = meter(record, 0)
    flops = 6 * n * 8 + 12 * layers * h * (9 + 25)
    assert record["input_tokens"] == 8 and record["tok_s"] == 16.0
    assert record["mfu"] == round(flops / 0.5 / 2e12, 5) and set(shown) == {"tok_s", "mfu"}


def test_largest_micro_batch_that_fits_backs_off():
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 5

    assert largest_that_fits(16, fits) == 4 and tried == [16, 8, 4]  # divisors of 16, largest first
    with pytest.raises(common.RunError, match="micro-batch of 1"):
        largest_that_fits(6, lambda n: False)


def test_memory_probe_leaves_no_trace(tiny_model_dir, files, tmp_path, monkeypatch):
    """fits_in_memory runs a forward+backward of the longest example; it leaves no gradient and no changed weight,
    and an out-of-memory error in it means "does not fit"."""
    import data
    from data import Tokenizer
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    run = train.Run(out=str(tmp_path / "r"), base_model=tiny_model_dir, base_revision=None, base_fingerprint=None,
                    recipe={}, seed=0, max_len=96, batch_size=2, resume=False, data={})
    examples = train.task_examples("medmcqa", files["medmcqa"], tok, run, None)
    lora = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": list(train.LORA_TARGETS), "merge_for_eval": False}
    stage = train.lora_or_full_stage(run, "lora", "medmcqa", examples, 1e-3, 1, None, torch.device("cpu"),
                                     train.setup_ranks("cpu")[0], lora=lora)
    before = {k: v.clone() for k, v in stage.model.state_dict().items()}
    loss = lambda model, b: train.summed_loss(model, b, pad_reads=False)  # noqa: E731
    longest = max(stage.examples, key=lambda e: len(e[0]))
    batch = data.collate([longest] * 3, tok.pad_id)
    trained = list(stage.adamw_params.values())
    assert fits_in_memory(stage.model, batch, trained, loss, torch.device("cpu"))
    assert all(p.grad is None for p in stage.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in stage.model.state_dict().items())

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(stage.model, "forward", oom)
    assert not fits_in_memory(stage.model, batch, trained, loss, torch.device("cpu"))
