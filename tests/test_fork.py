"""Forking in one place: a memory option is a MemoryConfig field and its line in train.MEMORY_FLAGS, a ranking rule an
entry of memory.RANKS (tests/test_memory.py), a probe an entry of eval.PROBES; each is reachable from the CLI."""

import functools
import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file

import memory
import train
from tiny_data import write_jsonl
from helpers import MEM, train_argv


common = functools.partial(train_argv, batch_size=2, max_len=96, recipe="clean")  # train.py flags, tiny fixtures


def test_every_memory_option_has_a_flag_that_reaches_the_config():
    options = set(train.MEMORY_FLAGS)
    assert options == {f.name for f in dataclasses.fields(memory.MemoryConfig)} - {"v_dim"}  # v_dim: the model's
    argv = ["--method", "retrofit", "--memory-layers", "0,3", "--n-keys", "9", "--mem-heads", "3", "--mem-topk", "5",
            "--mem-k-dim", "12", "--memory-mode", "replacement", "--alpha-init", "0.25", "--memory-precision", "bf16"]
    cfg = train.memory_config(vars(train.parse_args(argv)))
    assert cfg == memory.MemoryConfig(layers=[0, 3], n_keys=9, heads=3, topk=5, k_dim=12, mode="replacement",
                                      alpha_init=0.25, precision="bf16")
    assert train.memory_config(vars(train.parse_args(["--method", "retrofit", "--recipe", "clean"]))) == \
        memory.MemoryConfig()  # unset flags: MemoryConfig's own defaults
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "retrofit", "--mem-topk", "200"])  # MemoryConfig's own check, as a usage error


def test_replacement_memory_can_train_its_alpha(tiny_model_dir, files, tmp_path):
    """alpha is independent of the mode: a replacement memory built with --alpha-init trains it with --train-alpha;
    by default (auto) a replacement memory has none, as the paper's."""
    retro = tmp_path / "retro"
    train.main(common(tiny_model_dir, files, retro, "--method", "retrofit", "--max-steps", "1", *MEM,
                      "--memory-mode", "replacement", "--alpha-init", "0.5"))
    assert json.load(open(retro / "config.json"))["memory"]["alpha_init"] == 0.5
    out = tmp_path / "smf"
    train.main(common(tiny_model_dir, files, out, "--method", "smf", "--memory-from", str(retro), "--max-steps", "3",
                      "--train-alpha", "--lr", "1e-2", "--background-batches", "4"))
    before, after = load_file(retro / "model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.equal(before["model.layers.1.memory.alpha"], after["model.layers.1.memory.alpha"])
    cfg = memory.MemoryConfig(mode="replacement").resolve(4, 64)
    assert cfg.alpha_init is None and memory.ProductKeyMemory(64, cfg).alpha is None


def test_memory_flags_that_contradict_memory_from_are_errors(tiny_model_dir, files, tmp_path, capsys):
    """Refused before any work (train.py --check-flags too), with the same words sparse_stage would use."""
    retro = tmp_path / "retro"
    train.main(common(tiny_model_dir, files, retro, "--method", "retrofit", "--max-steps", "1", *MEM))
    for flag, value in (("--mem-topk", "3"), ("--memory-mode", "replacement"), ("--memory-layers", "0")):
        for check in ([], ["--check-flags"]):
            with pytest.raises(SystemExit):
                train.main(common(tiny_model_dir, files, tmp_path / f"x{flag}", "--method", "smf", "--memory-from",
                                  str(retro), "--max-steps", "1", flag, value, *check))
            assert re.search(f"{flag} .* contradicts the memory of --memory-from", capsys.readouterr().err)
            assert not (tmp_path / f"x{flag}").exists()
    # the same values as the memory's, and the per-run precision, are fine
    train.main(common(tiny_model_dir, files, tmp_path / "ok", "--method", "smf", "--memory-from", str(retro),
                      "--max-steps", "1", "--mem-topk", "4", "--memory-precision", "bf16", "--background-batches", "2"))
    assert json.load(open(tmp_path / "ok" / "config.json"))["memory"]["precision"] == "bf16"
    none = tmp_path / "none"
    train.main(common(tiny_model_dir, files, none, "--method", "retrofit", "--max-steps", "1", *MEM,
                      "--alpha-init", "none"))
    with pytest.raises(SystemExit):
        train.main(common(tiny_model_dir, files, tmp_path / "y", "--method", "smf", "--memory-from", str(none),
                          "--max-steps", "1", "--train-alpha"))
    assert "has no alpha" in capsys.readouterr().err
    loaded = memory.MemoryConfig.from_dict(json.load(open(none / "config.json"))["memory"])  # sparse_stage's check
    assert "has no alpha" in train.memory_conflict({}, loaded, 4, 64, True, str(none))
    assert "--mem-topk 3 contradicts" in train.memory_conflict({"topk": 3}, loaded, 4, 64, False, str(none))


def test_a_registered_probe_is_reachable_from_both_clis(tiny_model_dir, files, tmp_path, monkeypatch, capsys):
    """A new probe is a function and one eval.PROBES entry: eval.py --tasks and --data take it (its rows from the
    local file, a dataset data.py does not know), the table prints its metric, plain runs do not run it when it is
    not a default, and train.py --eval-tasks accepts it."""
    import eval as ev
    seen = {}

    def eval_echo(model, tok, rows, batch_size, samples, show):
        seen["rows"] = rows
        return {"echo": float(len(rows)), "n": len(rows)}

    monkeypatch.setitem(ev.PROBES, "echo", ev.Probe(eval_echo, "echo", default=False))
    path = write_jsonl(str(tmp_path / "echo.jsonl"), [{"x": 1}, {"x": 2}, {"x": 3}])
    out = tmp_path / "r.json"
    ev.main(["--model", tiny_model_dir, "--tasks", "echo", "--data", f"echo={path}", "--limit", "2", "--out",
             str(out), "--quiet"])
    assert seen["rows"] == [{"x": 1}, {"x": 2}] and json.load(open(out))["echo"]["echo"] == 2.0
    assert "echo    " in capsys.readouterr().out
    assert "echo" not in ev.default_tasks()
    args = train.parse_args(["--method", "lora", "--eval-every", "1", "--eval-tasks", "medmcqa,echo"])
    assert args.eval_tasks == "medmcqa,echo"
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "lora", "--eval-tasks", "no-such-probe"])


def test_a_new_memory_option_is_a_field_and_one_flag_line(monkeypatch):
    """A MemoryConfig field with its line in train.MEMORY_FLAGS becomes a train.py flag that reaches the config."""
    @dataclasses.dataclass
    class WithDropout(memory.MemoryConfig):
        value_dropout: float = 0.0

    monkeypatch.setattr(memory, "MemoryConfig", WithDropout)
    monkeypatch.setitem(train.MEMORY_FLAGS, "value_dropout", ("--mem-value-dropout", "dropout on the values read", {}))
    args = train.parse_args(["--method", "retrofit", "--mem-value-dropout", "0.25"])
    cfg = train.memory_config(vars(args))
    assert isinstance(cfg, WithDropout) and cfg.value_dropout == 0.25 and cfg.n_keys == 128
    assert cfg.resolve(24, 896).value_dropout == 0.25  # resolve keeps the fork's fields
    assert "--mem-value-dropout" in train.parser().format_help()
