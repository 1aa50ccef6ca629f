"""Run directories a user can trust (train.py through its CLI, on the tiny fixtures): what --out may be, the lock,
start-up that writes nothing until it has loaded, --resume with resolved paths, one clean log after kill -9,
no non-finite tensor ever saved, a warning for a dead model."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import common
from tiny_data import medmcqa_rows, write_parquet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def medmcqa(tmp_path_factory):
    return write_parquet(str(tmp_path_factory.mktemp("safety") / "medmcqa.parquet"), medmcqa_rows(40))


def cli(model_dir, medmcqa, out, *extra, wait=True):
    cmd = [sys.executable, "train.py", "--method", "lora", "--recipe", "clean", "--model", model_dir, "--data",
           f"medmcqa={medmcqa}", "--out", str(out), "--device", "cpu", "--batch-size", "2",
           "--max-len", "96", "--warmup", "1", *map(str, extra)]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def one_line_error(r, *needles):
    assert r.returncode != 0, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") or "usage:" in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def log_steps(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]


def test_out_must_be_new_empty_or_ours(tiny_model_dir, medmcqa, tmp_path):
    # a model folder: refused, nothing in it touched
    before = {n: os.path.getmtime(os.path.join(tiny_model_dir, n)) for n in os.listdir(tiny_model_dir)}
    one_line_error(cli(tiny_model_dir, medmcqa, tiny_model_dir, "--max-steps", "1"), "did not write",
                   "config.json" if "config.json" in before else "")
    assert {n: os.path.getmtime(os.path.join(tiny_model_dir, n)) for n in os.listdir(tiny_model_dir)} == before
    # a folder with a foreign log.jsonl and no args.json
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "log.jsonl").write_text('{"epoch": 1}\n')
    one_line_error(cli(tiny_model_dir, medmcqa, foreign, "--max-steps", "1"), "no args.json", "not a train.py run")
    assert not (foreign / "args.json").exists()
    # a file
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(cli(tiny_model_dir, medmcqa, f, "--max-steps", "1"), "is a file")
    # --resume without a run
    one_line_error(cli(tiny_model_dir, medmcqa, tmp_path / "new", "--max-steps", "1", "--resume"),
                   "no run to resume", "without --resume")


def test_failed_start_writes_nothing_and_the_fixed_command_runs(tiny_model_dir, medmcqa, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "caf\xe9"}\n')  # not UTF-8
    out = tmp_path / "run"
    r = cli(tiny_model_dir, bad, out, "--max-steps", "1")
    one_line_error(r, "bad.jsonl")
    assert not (out / "args.json").exists() and not (out / "log.jsonl").exists()
    r = cli(tiny_model_dir, medmcqa, out, "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    assert "starting" in r.stderr and "resuming" not in r.stderr
    assert log_steps(out) == [1, 2]


def test_resume_compares_resolved_paths(tiny_model_dir, medmcqa, tmp_path):
    out = tmp_path / "runs" / "x"
    r = cli(tiny_model_dir, medmcqa, out, "--max-steps", "3", "--stop-at-step", "1")
    assert r.returncode == 0, r.stderr
    spelled = os.path.relpath(out, ROOT) + "/"  # another spelling of the same directory
    r = cli(tiny_model_dir, medmcqa, spelled, "--max-steps", "3", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and log_steps(out) == [1, 2, 3]


def test_resume_refuses_other_flags_and_allows_the_free_ones(tiny_model_dir, medmcqa, tmp_path):
    """--resume continues the run it finds with that run's flags: another --lr is a one-line error naming both
    values; the flags that do not change what is trained (checkpoint.RESUME_FREE: --save-every, ...) may differ."""
    out = tmp_path / "x"
    r = cli(tiny_model_dir, medmcqa, out, "--max-steps", "3", "--stop-at-step", "1")
    assert r.returncode == 0, r.stderr
    one_line_error(cli(tiny_model_dir, medmcqa, out, "--max-steps", "3", "--lr", "0.1", "--resume"),
                   "--resume: --lr is 0.1 but the run was started with 0.0002")
    r = cli(tiny_model_dir, medmcqa, out, "--max-steps", "3", "--save-every", "7", "--resume")
    assert r.returncode == 0, r.stderr
    assert log_steps(out) == [1, 2, 3]


def test_kill_9_then_resume_gives_one_clean_log(tiny_model_dir, medmcqa, tmp_path):
    """Killed past its last checkpoint, the run resumes there: log.jsonl holds steps 1..N once each, and the
    temporary file of an interrupted save is removed."""
    out = tmp_path / "killed"
    long = ("--max-steps", "100000", "--save-every", "3")  # it cannot finish before the kill, however slow the poll
    p = cli(tiny_model_dir, medmcqa, out, *long, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the log is past the first checkpoint and not on a save step
        steps = log_steps(out) if (out / "log.jsonl").exists() else []
        if len(steps) >= 5 and len(steps) % 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed = log_steps(out)  # the steps it got to (more than the poll saw, if it was slow)
    assert killed == list(range(1, len(killed) + 1)) and len(killed) > 3
    (out / "model.safetensors.tmp1234").write_text("half a save")
    stop = len(killed) + 3  # past where it was killed: the steps since the last checkpoint are run again
    r = cli(tiny_model_dir, medmcqa, out, *long, "--resume", "--stop-at-step", str(stop))
    assert r.returncode == 0, r.stderr
    assert log_steps(out) == list(range(1, stop + 1))
    assert not list(out.glob("*.tmp*"))


def test_a_second_writer_is_refused_and_a_stale_lock_is_no_obstacle(tiny_model_dir, medmcqa, tmp_path):
    out = tmp_path / "locked"
    lock = checkpoint.Lock(str(out))  # a live run holds the directory
    try:
        one_line_error(cli(tiny_model_dir, medmcqa, out, "--max-steps", "1"), "in use by another train.py process",
                       f"pid {os.getpid()}")
    finally:
        lock.release()
    out.mkdir(exist_ok=True)  # (the lock's release removed the folder it made, which held nothing else)
    (out / ".lock").write_text("12345")  # a lock file left behind, as after kill -9: no obstacle
    r = cli(tiny_model_dir, medmcqa, out, "--max-steps", "1")
    assert r.returncode == 0, r.stderr


def test_non_finite_values_stop_before_the_update_and_are_never_saved(tiny_model_dir, medmcqa, tmp_path):
    out = tmp_path / "nan"
    r = cli(tiny_model_dir, medmcqa, out, "--method", "full", "--max-steps", "6", "--lr", "1e30", "--grad-clip", "0",
            "--save-every", "1")
    one_line_error(r, "is nan" if "is nan" in r.stderr else "is inf", "start a new run with a lower --lr")
    if (out / "checkpoint.safetensors").exists():
        import torch
        assert all(torch.isfinite(v).all() for v in load_file(out / "checkpoint.safetensors").values())
    one_line_error(cli(tiny_model_dir, medmcqa, tmp_path / "x", "--lr", "inf"), "--lr must be a finite number >= 0")


def test_dead_model_is_warned_in_stderr_and_log(tiny_model_dir, medmcqa, tmp_path):
    out = tmp_path / "dead"
    r = cli(tiny_model_dir, medmcqa, out, "--method", "full", "--max-steps", "12", "--lr", "1e6")
    assert r.returncode == 0 and "the model may be dead" in r.stderr
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert sum("warning" in rec for rec in log) == 1


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
    with pytest.raises(checkpoint.RunError, match="gradient norm is nan"):
        live.check(3, 1.0, float("nan"))
    with pytest.raises(checkpoint.RunError, match="loss is inf at step 4"):
        live.check(4, float("inf"), 1.0)


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
            with pytest.raises(checkpoint.RunError, match="selected different memory rows"):
                common.Ranks(rank=0, world=2).same_rows(mine)


# -----------------------------------------------------------------------------
# A run's base is identified by its weights (checkpoint.weights_fingerprint), not by where it lies


def lora_argv(base, medmcqa, out, *extra):
    return ["--method", "lora", "--recipe", "clean", "--model", str(base), "--data", f"medmcqa={medmcqa}", "--out",
            str(out), "--device", "cpu", "--batch-size", "2", "--max-len", "96", "--warmup", "1", "--lora-r", "2",
            *map(str, extra)]


def test_a_swapped_base_is_refused_and_a_moved_one_accepted(tiny_model_dir, medmcqa, tmp_path):
    """Another model of the same shape put where a run's base was is refused, by eval.py too (it scored it before);
    the same weights elsewhere are accepted with --base, and give the same model."""
    import shutil
    import train
    from checkpoint import load_model, weights_fingerprint
    from tiny import write_checkpoint
    base, run = tmp_path / "base", tmp_path / "runs" / "lora"
    shutil.copytree(tiny_model_dir, base)
    train.main(lora_argv(base, medmcqa, run, "--max-steps", "2", "--lr", "1e-2"))
    assert json.load(open(run / "config.json"))["base_fingerprint"] == weights_fingerprint(str(base))
    want = load_model(str(run))[0](torch.tensor([[1, 2, 3]]))
    shutil.move(base, tmp_path / "moved")
    write_checkpoint(str(base), seed=7)  # another model of the same shape where the base was
    with pytest.raises(ValueError, match="is not the one it was trained on .*give the run's base with --base"):
        load_model(str(run))
    r = subprocess.run([sys.executable, "eval.py", "--model", str(run), "--tasks", "medmcqa", "--data",
                        f"medmcqa={medmcqa}", "--limit", "2", "--device", "cpu"], cwd=ROOT, capture_output=True,
                       text=True)
    one_line_error(r, "is not the one it was trained on")
    moved = load_model(str(run), base=str(tmp_path / "moved"))[0]
    assert torch.equal(moved(torch.tensor([[1, 2, 3]])), want)
    with pytest.raises(ValueError, match="is not the one it was trained on"):
        load_model(str(run), base=str(base))


def test_resume_follows_a_moved_base_and_refuses_other_weights(tiny_model_dir, medmcqa, tmp_path):
    import shutil
    import train
    from tiny import write_checkpoint
    base, out = tmp_path / "base", tmp_path / "run"
    shutil.copytree(tiny_model_dir, base)
    with pytest.raises(train.StopRun):
        train.main(lora_argv(base, medmcqa, out, "--max-steps", "3", "--stop-at-step", "1"))
    moved = tmp_path / "elsewhere" / "base"
    shutil.move(base, moved)
    write_checkpoint(str(tmp_path / "other"), seed=7)
    with pytest.raises(train.RunError, match="--resume: --model .*other holds other weights than the run started "
                                             "from"):
        train.main(lora_argv(tmp_path / "other", medmcqa, out, "--max-steps", "3", "--resume"))
    train.main(lora_argv(moved, medmcqa, out, "--max-steps", "3", "--resume"))
    assert log_steps(out) == [1, 2, 3] and json.load(open(out / "config.json"))["base_model"] == str(moved)


def test_a_moved_chain_resumes(tiny_model_dir, medmcqa, tmp_path):
    """A runs folder moved with an interrupted link in it: the link resumes from the previous link's new place
    (the same weights), and another run there is refused."""
    import shutil
    import train
    runs = tmp_path / "runs"
    train.main(lora_argv(tiny_model_dir, medmcqa, runs / "one", "--max-steps", "2", "--lr", "1e-2"))
    train.main(lora_argv(tiny_model_dir, medmcqa, runs / "other", "--max-steps", "3", "--lr", "1e-2"))
    with pytest.raises(train.StopRun):
        train.main(lora_argv(tiny_model_dir, medmcqa, runs / "two", "--max-steps", "3", "--stop-at-step", "1",
                             "--lora-from", runs / "one"))
    moved = tmp_path / "moved"
    shutil.move(runs, moved)
    with pytest.raises(train.RunError, match="--resume: --lora-from .*other holds other weights"):
        train.main(lora_argv(tiny_model_dir, medmcqa, moved / "two", "--max-steps", "3", "--resume",
                             "--lora-from", moved / "other"))
    train.main(lora_argv(tiny_model_dir, medmcqa, moved / "two", "--max-steps", "3", "--resume",
                         "--lora-from", moved / "one"))
    assert log_steps(moved / "two") == [1, 2, 3]


# -----------------------------------------------------------------------------
# The user's path: one-line errors before any work, as a user meets them


def test_a_failed_start_leaves_no_run_directory(medmcqa, tmp_path):
    """A start that fails (here: no such base model) removes the run directory it made, so the README's next
    command (eval.py --model RUN) says there is no run there, not a Hub error."""
    out = tmp_path / "runs" / "x"
    one_line_error(cli(str(tmp_path / "no-model"), medmcqa, out, "--max-steps", "1"), "model directory not found")
    assert not out.exists()
    out.mkdir(parents=True)  # a directory the user made is kept, empty
    one_line_error(cli(str(tmp_path / "no-model"), medmcqa, out, "--max-steps", "1"), "model directory not found")
    assert out.is_dir() and os.listdir(out) == [".lock"]  # the lock file of the failed start, nothing else
    r = subprocess.run([sys.executable, "eval.py", "--model", str(out), "--tasks", "medmcqa"], cwd=ROOT,
                       capture_output=True, text=True)
    one_line_error(r, "holds neither a model (config.json) nor a train.py run")


def test_flags_that_name_the_wrong_thing(tiny_model_dir, medmcqa, tmp_path, capsys):
    import train
    run = tmp_path / "full"
    train.main(["--method", "full", "--recipe", "clean", "--model", tiny_model_dir, "--data", f"medmcqa={medmcqa}",
                "--out", str(run), "--device", "cpu", "--batch-size", "2", "--max-len", "96", "--max-steps", "1"])
    capsys.readouterr()
    for argv, needle in ((["--method", "full", "--model", str(run)], f"--model {run} is a train.py run directory, "
                          f"not a model: continue a full run from its export, --model {run / 'hf'}"),
                         (["--method", "smf", "--memory-layers", "1,1"], "layers [1, 1] name a layer twice"),
                         (["--method", "lora", "--seed", "99999999999999999999"], "--seed must be at most")):
        with pytest.raises(SystemExit) as e:
            train.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_eval_refuses_a_read_only_out_before_any_work(tiny_model_dir, tmp_path):
    """A read-only mount (a real one: tmpfs mounted read-only; skipped where this process may not mount)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        r = subprocess.run([sys.executable, "eval.py", "--model", tiny_model_dir, "--tasks", "medmcqa", "--out",
                            str(ro / "eval.json")], cwd=ROOT, capture_output=True, text=True)
        one_line_error(r, f"--out {ro / 'eval.json'}: cannot write in {ro} (read-only?)")
        assert "medmcqa" not in r.stderr.replace("--tasks medmcqa", "")  # refused before any probe ran
    finally:
        subprocess.run(["umount", str(ro)])
