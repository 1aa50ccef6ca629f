"""checkpoint.py, what is on disk: atomic writes leave the old file or the new one, never a half-written one or a
stray temporary file; a checkpoint never holds a non-finite tensor; a stage's cost from its log and checkpoint;
rebuilding a model from a run directory of every method."""

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import common
import memory
from data import Tokenizer
from helpers import trained_lora, write_run
from model import LORA_TARGETS, Qwen2, lora_state_dict


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_file(tmp_path):
    """The disk fills after the temporary file was created and partly written: the target keeps its old content,
    the error names the target, and the temporary file is gone."""
    path = tmp_path / "config.json"
    path.write_text("old")

    def fills_the_disk(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match=f"could not write {path}: .*No space left on device"):
        checkpoint.atomic_write(str(path), fills_the_disk)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]
    checkpoint.write_json(str(path), {"new": 1})  # and the next write goes through
    assert checkpoint.read_json(str(path)) == {"new": 1} and os.listdir(tmp_path) == ["config.json"]


def test_temporary_files_of_interrupted_saves_are_recognised():
    assert checkpoint.is_temp_file("model.safetensors.tmp1234")  # ours: NAME.tmpPID
    assert checkpoint.is_temp_file(".tmpA1b2C3")  # safetensors' save_file
    assert not checkpoint.is_temp_file("model.safetensors") and not checkpoint.is_temp_file("eval.json")


def test_a_checkpoint_with_a_non_finite_tensor_is_never_written(tmp_path):
    import torch
    model = torch.nn.Linear(3, 2)
    saver = checkpoint.Checkpoint(str(tmp_path), model, lambda: dict(model.state_dict()), {}, None, None,
                                  common.Ranks())
    saver.save(1)
    good = load_file(tmp_path / "model.safetensors")
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    with pytest.raises(checkpoint.RunError, match="tensor weight is not finite at step 2"):
        saver.save(2)
    assert torch.equal(load_file(tmp_path / "model.safetensors")["weight"], good["weight"])  # left as it was
    assert not list(tmp_path.glob("*.tmp*"))


def test_run_cost_from_the_log_and_the_checkpoint(tmp_path):
    import checkpoint
    from safetensors.torch import save_file
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "seconds": 1.5, "input_tokens": 100, "mfu": 0.2}, {"step": 2, "seconds": 2.5, "input_tokens": 300,
                                                                       "mfu": 0.4}]))
    want = {"device": "cpu", "world_size": 1, "steps": 2, "wall_seconds": 4.0, "step_seconds": 4.0, "gpu_hours": 0.0,
            "input_tokens": 400, "tokens_per_s": 100.0, "mfu": round((0.2 * 1.5 + 0.4 * 2.5) / 4.0, 5)}
    assert checkpoint.run_cost(str(tmp_path), torch.device("cpu"), 1) == want  # no checkpoint: the steps' time
    save_file({"x": torch.zeros(1)}, str(tmp_path / "checkpoint.safetensors"), metadata={"wall_seconds": "7.25"})
    assert checkpoint.run_cost(str(tmp_path), torch.device("cpu"), 1) == {**want, "wall_seconds": 7.25}


def test_wall_time_adds_up_over_a_resumed_run(tmp_path, monkeypatch):
    """The checkpoint carries the loop's wall time so far; a resumed run adds its own to it."""
    import checkpoint
    from checkpoint import Checkpoint
    from common import Ranks

    class Clock:
        now = 100.0

        def time(self):
            return self.now
    clock = Clock()
    monkeypatch.setattr(checkpoint, "time", clock)
    model = torch.nn.Linear(2, 2)
    make = lambda: Checkpoint(str(tmp_path), model, lambda: dict(model.state_dict()), {}, None, None, Ranks())  # noqa
    first = make()
    clock.now = 130.0
    first.save(1)  # 30 s so far
    clock.now = 500.0  # killed; resumed much later
    second = make()
    assert second.load(torch.device("cpu")) == 1
    clock.now = 512.5
    second.save(2)
    assert checkpoint.run_cost(str(tmp_path), torch.device("cpu"), 1)["wall_seconds"] == 42.5


def test_gpu_hours_count_every_process(tmp_path, monkeypatch):
    """Under torchrun with N processes a stage's GPU-hours are N times its wall hours (on a GPU; 0 on the CPU)."""
    import checkpoint
    import common
    from safetensors.torch import save_file
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "seconds": 1.0, "input_tokens": 10}) + "\n")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "checkpoint.safetensors"), metadata={"wall_seconds": "1800"})
    monkeypatch.setattr(common, "device_name", lambda device: "a GPU")  # common.stage_cost computes the cost
    for world in (1, 2, 4):
        assert checkpoint.run_cost(str(tmp_path), torch.device("cuda"), world)["gpu_hours"] == 0.5 * world
    assert checkpoint.run_cost(str(tmp_path), torch.device("cpu"), 4)["gpu_hours"] == 0.0


# -----------------------------------------------------------------------------
# Rebuilding a model: load_model of a Hub-format folder and of run directories of every method


def logits_of(model, tok):
    idx = torch.tensor([tok.encode("Question: What is the capital of France?\nAnswer: Paris")])
    with torch.no_grad():
        return model(idx)


def test_lora_run_dir_rebuilds_the_trained_model(tiny_model_dir, tmp_path):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": list(LORA_TARGETS)}
    trained = trained_lora(tiny_model_dir, lora)  # the adapters change the output
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    base_logits = logits_of(Qwen2.from_pretrained(tiny_model_dir, dtype="float32"), tok)
    want = logits_of(trained, tok)
    assert (want - base_logits).abs().max() > 1e-2
    cfg = {"method": "lora", "base_model": tiny_model_dir, "base_revision": None, "memory": None, "lora": lora,
           "finished": True}
    run = write_run(tmp_path / "lora_run", cfg, lora_state_dict(trained))
    model, tok2, info = checkpoint.load_model(run)
    assert info["method"] == "lora" and info["base_model"] == tiny_model_dir and not model.training
    assert torch.allclose(logits_of(model, tok2), want, atol=1e-6)

    # the key set and every shape are checked; the message names the tensor
    state = lora_state_dict(trained)
    missing = {k: v for k, v in state.items() if k != "model.layers.0.self_attn.q_proj.lora_A"}
    with pytest.raises(ValueError, match=r"missing tensor model.layers.0.self_attn.q_proj.lora_A"):
        checkpoint.load_model(write_run(tmp_path / "missing", cfg, missing))
    with pytest.raises(ValueError, match=r"unexpected tensor model.layers.0.extra"):
        checkpoint.load_model(write_run(tmp_path / "extra", cfg, {**state, "model.layers.0.extra": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.self_attn.q_proj.lora_A has shape \(4, 64\), "
                                         r"expected \(8, 64\)"):
        checkpoint.load_model(write_run(tmp_path / "rank", {**cfg, "lora": {**lora, "r": 8}}, state))
    with pytest.raises(ValueError, match="has not finished"):
        checkpoint.load_model(write_run(tmp_path / "unfinished", {**cfg, "finished": False}, state))
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        checkpoint.load_model(write_run(tmp_path / "dora", {**cfg, "method": "dora"}, state))
    os.remove(os.path.join(tmp_path / "dora", "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="run directory without weights"):
        checkpoint.load_model(str(tmp_path / "dora"))


@pytest.mark.parametrize("mode", ["additive", "replacement"])
def test_memory_run_dir_rebuilds_the_trained_model(tiny_model_dir, tmp_path, mode):
    torch.manual_seed(0)
    mcfg = memory.MemoryConfig(layers=[1, 2], n_keys=8, heads=2, topk=4, k_dim=16, mode=mode)
    trained = Qwen2.from_pretrained(tiny_model_dir, dtype="float32")
    memory.add_memory(trained, mcfg)
    with torch.no_grad():
        for mem in memory.memory_layers(trained).values():
            mem.values.weight.normal_(0, 1.0)  # as if trained
            if mem.alpha is not None:
                mem.alpha.fill_(0.5)
    trained.eval()
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    want = logits_of(trained, tok)
    base = logits_of(Qwen2.from_pretrained(tiny_model_dir, dtype="float32"), tok)
    assert (want - base).abs().max() > 1e-2
    cfg = {"method": "smf", "base_model": tiny_model_dir, "memory": mcfg.to_dict(), "lora": None}
    run = write_run(tmp_path / "smf", cfg, memory.memory_state_dict(trained))
    model, _, info = checkpoint.load_model(run)
    assert info["method"] == "smf"
    assert sorted(memory.memory_layers(model)) == [1, 2]
    assert all(p.dtype == torch.float32 for p in memory.memory_layers(model)[1].parameters())
    assert torch.allclose(logits_of(model, tok), want, atol=1e-6)
    # the paper recipe's memory (precision bf16) is evaluated in bf16, as its code evaluates the whole model
    paper = write_run(tmp_path / "smf-paper", {**cfg, "memory": {**mcfg.to_dict(), "precision": "bf16"}},
                      memory.memory_state_dict(trained))
    model, _, _ = checkpoint.load_model(paper)
    assert all(p.dtype == torch.bfloat16 for mem in memory.memory_layers(model).values() for p in mem.parameters())
    assert model.lm_head.weight.dtype == torch.float32  # the base keeps the requested dtype
    with pytest.raises(ValueError, match=r"tensor model.layers.1.memory.keys has shape \(2, 2, 8, 8\), "
                                         r"expected \(2, 2, 12, 8\)"):
        checkpoint.load_model(write_run(tmp_path / "bigger", {**cfg, "memory": {**mcfg.to_dict(), "n_keys": 12}},
                                memory.memory_state_dict(trained)))


def test_full_run_dir_loads_every_tensor(tiny_model_dir, tmp_path):
    trained = Qwen2.from_pretrained(tiny_model_dir, dtype="float32")
    with torch.no_grad():
        trained.model.norm.weight.mul_(1.5)
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    state = {k: v for k, v in trained.state_dict().items() if k in trained.hub_state_shapes()}
    run = write_run(tmp_path / "full", {"method": "full", "base_model": tiny_model_dir}, state)
    model, _, _ = checkpoint.load_model(run)
    assert torch.allclose(logits_of(model, tok), logits_of(trained, tok), atol=1e-6)
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match="missing tensor model.norm.weight"):
        checkpoint.load_model(write_run(tmp_path / "full_bad", {"method": "full", "base_model": tiny_model_dir}, state))


def test_load_model_reads_the_generation_configs_repetition_penalty(tiny_model_dir, rp_model_dir):
    assert checkpoint.load_model(rp_model_dir)[2]["repetition_penalty"] == 1.5
    assert checkpoint.load_model(tiny_model_dir)[2]["repetition_penalty"] == 1.0  # no repetition_penalty in its file
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        checkpoint.load_model("/nonexistent/model")


def test_load_model_takes_dtype_and_device_as_names_or_torch_objects(tiny_model_dir):
    """As tests and experiments call it (strings, None) and as train.py does (torch.device, torch.dtype)."""
    for dtype, device, want in [(None, None, torch.float32), ("bf16", "cpu", torch.bfloat16),
                                (torch.float16, torch.device("cpu"), torch.float16)]:
        model, _, info = checkpoint.load_model(tiny_model_dir, dtype=dtype, device=device)
        assert model.lm_head.weight.dtype == want and model.lm_head.weight.device.type == "cpu"
        assert info["dtype"] == str(want).removeprefix("torch.") and info["device"] == "cpu"
    with pytest.raises(ValueError, match="dtype 'int8'"):
        checkpoint.load_model(tiny_model_dir, dtype="int8")


def test_the_weights_fingerprint_ignores_sharding_and_tensor_order(tiny_model_dir, tmp_path):
    """The same tensors in one file, in shards, or written in another order: one fingerprint; one value changed:
    another."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    want = checkpoint.weights_fingerprint(tiny_model_dir)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(set(json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))["weight_map"].values())) > 1
    assert checkpoint.weights_fingerprint(str(tmp_path / "sharded")) == want
    state = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    names = sorted(state)  # two shards, the first file holding the names that sort last: file order != name order
    late, early = names[len(names) // 2:], names[:len(names) // 2]
    (tmp_path / "split").mkdir()
    save_file({k: state[k] for k in late}, str(tmp_path / "split" / "a.safetensors"))
    save_file({k: state[k] for k in early}, str(tmp_path / "split" / "b.safetensors"))
    json.dump({"weight_map": {**{k: "a.safetensors" for k in late}, **{k: "b.safetensors" for k in early}}},
              open(tmp_path / "split" / "model.safetensors.index.json", "w"))
    assert checkpoint.weights_fingerprint(str(tmp_path / "split")) == want
    (tmp_path / "reversed").mkdir()
    save_file(dict(reversed(list(state.items()))), str(tmp_path / "reversed" / "model.safetensors"))
    assert checkpoint.weights_fingerprint(str(tmp_path / "reversed")) == want
    first = sorted(state)[0]
    state[first] = state[first].clone()
    state[first].view(-1)[0] += 1
    (tmp_path / "edited").mkdir()
    save_file(state, str(tmp_path / "edited" / "model.safetensors"))
    assert checkpoint.weights_fingerprint(str(tmp_path / "edited")) != want
