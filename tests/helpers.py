"""What the tests share: the tiny memory's flags, train.py command lines on the tiny fixtures, running a script as a
user does and checking its one-line error, and reading a run's log."""

import contextlib
import io
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a tiny memory for the tiny models (conftest's tiny_model_dir: 4 layers, hidden 64): 64 slots a layer in layers 1, 2
MEM = ["--n-keys", "8", "--mem-heads", "2", "--mem-topk", "4", "--mem-k-dim", "16", "--memory-layers", "1,2"]


def train_argv(model_dir, data, out, *extra, batch_size=4, micro_batch=None, max_len=128, warmup=1, recipe=None):
    """train.py's flags for a run on the tiny fixtures: data is conftest's `files` ({"medmcqa", "oasst1"}) or one
    MedMCQA file; None leaves a flag at train.py's default. Each test file fixes its own sizes with
    functools.partial."""
    files = data if isinstance(data, dict) else {"medmcqa": data}
    argv = ["--model", str(model_dir), *[a for name, path in files.items() for a in ("--data", f"{name}={path}")],
            "--out", str(out), "--device", "cpu"]
    for flag, value in (("--batch-size", batch_size), ("--micro-batch", micro_batch), ("--max-len", max_len),
                        ("--warmup", warmup), ("--recipe", recipe)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + [str(a) for a in extra]


def run_script(script, *args, env=None, wait=True, timeout=300):
    """`python SCRIPT ARGS` in the repository root, offline (HF_HUB_OFFLINE=1), as a user runs it: the completed
    process (stdout, stderr captured), or with wait=False the running one (stderr piped)."""
    cmd = [sys.executable, script, *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)


def call(cli, argv):
    """A script's cli(argv) (train.cli, eval.cli) in this process, ending as `python SCRIPT` would: a
    CompletedProcess with its exit status and what it wrote to stderr, the message it exits with last. For the
    tests of what a command says, which need no interpreter of their own (one costs seconds to start)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = cli([str(a) for a in argv])
        except SystemExit as e:
            status = e.code
    if isinstance(status, str):
        print(status, file=err)
    code = 1 if isinstance(status, str) else status or 0
    return subprocess.CompletedProcess(argv, code, "", err.getvalue())


def without_matplotlib(main, argv):
    """main(argv) (an experiment script's) with `import matplotlib` raising ImportError, as where it is not
    installed, and its printing captured -> (what main returned, what it printed)."""
    import pytest
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setitem(sys.modules, "matplotlib", None)
        returned = main(argv)
    return returned, printed.getvalue()


def one_line_error(r, *needles):
    """A non-zero exit whose stderr ends in one "error: " line naming the problem (every needle in it), with no
    traceback; returns that line."""
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr
    for n in needles:
        assert n in last, (n, last)
    return last


def read_log(run, name="log.jsonl") -> list[dict]:
    """The records of a run's log (one per optimizer step; eval.jsonl: one per --eval-every evaluation)."""
    with open(os.path.join(run, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def steps(run) -> list[int]:
    """The steps a run's log.jsonl holds, in order."""
    return [r["step"] for r in read_log(run)]


def write_run(run_dir, config, state):
    """A run directory as train.py leaves it, by hand: config.json and the trained tensors in model.safetensors."""
    from safetensors.torch import save_file
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(run_dir, "model.safetensors"))
    return str(run_dir)


def trained_lora(model_dir, lora: dict):
    """The base at model_dir with LoRA adapters (lora: r, alpha, dropout, targets) whose lora_B is drawn, as if
    trained, so that they change the output (seed 0)."""
    import torch
    from model import Qwen2, add_lora
    torch.manual_seed(0)
    trained = add_lora(Qwen2.from_pretrained(model_dir, dtype="float32"), **lora).eval()
    with torch.no_grad():
        for k, p in trained.named_parameters():
            if k.endswith("lora_B"):
                p.normal_(0, 0.1)
    return trained

