"""The command lines as a user meets them (train.py, eval.py on the tiny fixtures): run directories a user can
trust (what --out may be, the lock, a failed start, --resume with resolved paths and moved runs, kill -9 mid-run
and mid-save, killed exports, non-finite values, a dead model), a run's base known by its weights, errors as one
line before any work (flags for another method, values out of range, unusable data, broken files, full disks,
read-only folders), eval.py never writing over a run's files, and the README's commands as written."""

import functools
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import train
from checkpoint import is_temp_file
import eval as ev
from helpers import MEM, ROOT, call, one_line_error, read_log, run_script, steps, train_argv
from tiny_data import medmcqa_rows, oasst1_rows, write_jsonl, write_parquet

# a LoRA run, clean recipe, batch 2 of 96 tokens: what most tests here train
train_argv_lora = functools.partial(train_argv, batch_size=2, max_len=96, recipe="clean")


@pytest.fixture(scope="module")
def medmcqa(tmp_path_factory):
    return write_parquet(str(tmp_path_factory.mktemp("cli") / "medmcqa.parquet"), medmcqa_rows(40))


def train_cli(model_dir, medmcqa, out, *extra, wait=True):
    """`python train.py --method lora ...` on the tiny fixtures (extra flags after, so a later --method wins): run
    in this process through train.cli (helpers.call), or with wait=False as a process of its own (to kill it)."""
    argv = train_argv_lora(model_dir, medmcqa, out, "--method", "lora", *extra)
    return call(train.cli, argv) if wait else run_script("train.py", *argv, wait=False)


def eval_cli(*args):
    """`python eval.py ARGS`, run in this process through eval.cli (helpers.call)."""
    return call(ev.cli, args)


def lora_argv(base, medmcqa, out, *extra):
    """train.main's flags for a small LoRA run (r 2) on base."""
    return train_argv_lora(base, medmcqa, out, "--method", "lora", "--lora-r", "2", *extra)


# -----------------------------------------------------------------------------
# Run directories a user can trust


def test_out_must_be_new_empty_or_ours(tiny_model_dir, medmcqa, tmp_path):
    # a model folder: refused, nothing in it touched
    before = {n: os.path.getmtime(os.path.join(tiny_model_dir, n)) for n in os.listdir(tiny_model_dir)}
    one_line_error(train_cli(tiny_model_dir, medmcqa, tiny_model_dir, "--max-steps", "1"), "did not write",
                   "config.json" if "config.json" in before else "")
    assert {n: os.path.getmtime(os.path.join(tiny_model_dir, n)) for n in os.listdir(tiny_model_dir)} == before
    # a folder with a foreign log.jsonl and no args.json
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "log.jsonl").write_text('{"epoch": 1}\n')
    one_line_error(train_cli(tiny_model_dir, medmcqa, foreign, "--max-steps", "1"), "no args.json",
                   "not a train.py run")
    assert not (foreign / "args.json").exists()
    # a file
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(train_cli(tiny_model_dir, medmcqa, f, "--max-steps", "1"), "is a file")
    # --resume without a run
    one_line_error(train_cli(tiny_model_dir, medmcqa, tmp_path / "new", "--max-steps", "1", "--resume"),
                   "no run to resume", "without --resume")


def test_failed_start_writes_nothing_and_the_fixed_command_runs(tiny_model_dir, medmcqa, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "caf\xe9"}\n')  # not UTF-8
    out = tmp_path / "run"
    r = train_cli(tiny_model_dir, bad, out, "--max-steps", "1")
    one_line_error(r, "bad.jsonl")
    assert not (out / "args.json").exists() and not (out / "log.jsonl").exists()
    r = train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    assert "starting" in r.stderr and "resuming" not in r.stderr
    assert steps(out) == [1, 2]


def test_resume_compares_resolved_paths(tiny_model_dir, medmcqa, tmp_path):
    out = tmp_path / "runs" / "x"
    r = train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "3", "--stop-at-step", "1")
    assert r.returncode == 0, r.stderr
    spelled = os.path.relpath(out, ROOT) + "/"  # another spelling of the same directory
    r = train_cli(tiny_model_dir, medmcqa, spelled, "--max-steps", "3", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and steps(out) == [1, 2, 3]


def test_resume_refuses_other_flags_and_allows_the_free_ones(tiny_model_dir, medmcqa, tmp_path):
    """--resume continues the run it finds with that run's flags: another --lr is a one-line error naming both
    values; the flags that do not change what is trained (checkpoint.RESUME_FREE: --save-every, ...) may differ."""
    out = tmp_path / "x"
    r = train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "3", "--stop-at-step", "1")
    assert r.returncode == 0, r.stderr
    one_line_error(train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "3", "--lr", "0.1", "--resume"),
                   "--resume: --lr is 0.1 but the run was started with 0.0002")
    r = train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "3", "--save-every", "7", "--resume")
    assert r.returncode == 0, r.stderr
    assert steps(out) == [1, 2, 3]


def test_kill_9_then_resume_gives_one_clean_log(tiny_model_dir, medmcqa, tmp_path):
    """Killed past its last checkpoint, the run resumes there: log.jsonl holds steps 1..N once each, and the
    temporary file of an interrupted save is removed."""
    out = tmp_path / "killed"
    long = ("--max-steps", "100000", "--save-every", "3")  # it cannot finish before the kill, however slow the poll
    p = train_cli(tiny_model_dir, medmcqa, out, *long, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the log is past the first checkpoint and not on a save step
        done = steps(out) if (out / "log.jsonl").exists() else []
        if len(done) >= 5 and len(done) % 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed = steps(out)  # the steps it got to (more than the poll saw, if it was slow)
    assert killed == list(range(1, len(killed) + 1)) and len(killed) > 3
    (out / "model.safetensors.tmp1234").write_text("half a save")
    stop = len(killed) + 3  # past where it was killed: the steps since the last checkpoint are run again
    r = train_cli(tiny_model_dir, medmcqa, out, *long, "--resume", "--stop-at-step", str(stop))
    assert r.returncode == 0, r.stderr
    assert steps(out) == list(range(1, stop + 1))
    assert not list(out.glob("*.tmp*"))


def test_a_second_writer_is_refused_and_a_stale_lock_is_no_obstacle(tiny_model_dir, medmcqa, tmp_path):
    out = tmp_path / "locked"
    lock = checkpoint.Lock(str(out))  # a live run holds the directory
    try:
        one_line_error(train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "1"),
                       "in use by another train.py process",
                       f"pid {os.getpid()}")
    finally:
        lock.release()
    out.mkdir(exist_ok=True)  # (the lock's release removed the folder it made, which held nothing else)
    (out / ".lock").write_text("12345")  # a lock file left behind, as after kill -9: no obstacle
    r = train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "1")
    assert r.returncode == 0, r.stderr


def test_non_finite_values_stop_before_the_update_and_are_never_saved(tiny_model_dir, medmcqa, tmp_path):
    out = tmp_path / "nan"
    r = train_cli(tiny_model_dir, medmcqa, out, "--method", "full", "--max-steps", "6", "--lr", "1e30",
                  "--grad-clip", "0", "--save-every", "1")
    one_line_error(r, "is nan" if "is nan" in r.stderr else "is inf", "start a new run with a lower --lr")
    if (out / "checkpoint.safetensors").exists():
        import torch
        assert all(torch.isfinite(v).all() for v in load_file(out / "checkpoint.safetensors").values())
    one_line_error(train_cli(tiny_model_dir, medmcqa, tmp_path / "x", "--lr", "inf"),
                   "--lr must be a finite number >= 0")


def test_dead_model_is_warned_in_stderr_and_log(tiny_model_dir, medmcqa, tmp_path):
    out = tmp_path / "dead"
    r = train_cli(tiny_model_dir, medmcqa, out, "--method", "full", "--max-steps", "12", "--lr", "1e6")
    assert r.returncode == 0 and "the model may be dead" in r.stderr
    log = read_log(out)
    assert sum("warning" in rec for rec in log) == 1


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
    r = eval_cli("--model", run, "--tasks", "medmcqa", "--data", f"medmcqa={medmcqa}", "--limit", "2", "--device",
                 "cpu")
    one_line_error(r, "is not the one it was trained on")
    moved = load_model(str(run), base=str(tmp_path / "moved"))[0]
    assert torch.equal(moved(torch.tensor([[1, 2, 3]])), want)
    with pytest.raises(ValueError, match="is not the one it was trained on"):
        load_model(str(run), base=str(base))


def test_a_moved_base_is_named_with_base_and_a_full_run_needs_none(tiny_model_dir, medmcqa, tmp_path):
    """Where a run's base is gone: eval.py's one line names --base, and --base on the command line evaluates it; a
    full run holds every weight and evaluates from its own hf/ (config, tokenizer), and with another model put at
    its base's path it gives the same logits (it needs only the base's config and tokenizer)."""
    base, lora, full = tmp_path / "base", tmp_path / "runs" / "lora", tmp_path / "runs" / "full"
    shutil.copytree(tiny_model_dir, base)
    train.main(lora_argv(base, medmcqa, lora, "--max-steps", "2", "--lr", "1e-2"))
    train.main(train_argv_lora(base, medmcqa, full, "--method", "full", "--max-steps", "2", "--lr", "1e-3"))
    ids = torch.tensor([[1, 2, 3]])
    want = {run: checkpoint.load_model(str(run))[0](ids) for run in (lora, full)}
    shutil.move(base, tmp_path / "moved")
    flags = ("--tasks", "medmcqa", "--data", f"medmcqa={medmcqa}", "--limit", "2", "--device", "cpu")
    one_line_error(eval_cli("--model", lora, *flags), "model directory not found", "moved? give its new place "
                   "with --base PATH")
    assert eval_cli("--model", lora, "--base", tmp_path / "moved", *flags).returncode == 0
    assert eval_cli("--model", full, *flags).returncode == 0
    assert torch.equal(checkpoint.load_model(str(full))[0](ids), want[full])
    from tiny import write_checkpoint
    write_checkpoint(str(base), seed=7)  # other weights of the same shape where the base was
    assert torch.equal(checkpoint.load_model(str(full))[0](ids), want[full])


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
    assert steps(out) == [1, 2, 3] and json.load(open(out / "config.json"))["base_model"] == str(moved)


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
    shutil.move(moved / "one", tmp_path / "one-aside")  # other weights put at the very path the link names
    shutil.copytree(moved / "other", moved / "one")
    with pytest.raises(train.RunError, match="--resume: --lora-from .*one holds other weights"):
        train.main(lora_argv(tiny_model_dir, medmcqa, moved / "two", "--max-steps", "3", "--resume",
                             "--lora-from", moved / "one"))
    shutil.rmtree(moved / "one")
    shutil.move(tmp_path / "one-aside", moved / "one")
    train.main(lora_argv(tiny_model_dir, medmcqa, moved / "two", "--max-steps", "3", "--resume",
                         "--lora-from", moved / "one"))
    assert steps(moved / "two") == [1, 2, 3]


def test_a_failed_start_leaves_no_run_directory(medmcqa, tmp_path):
    """A start that fails (here: no such base model) removes the run directory it made, so the README's next
    command (eval.py --model RUN) says there is no run there, not a Hub error."""
    out = tmp_path / "runs" / "x"
    one_line_error(train_cli(str(tmp_path / "no-model"), medmcqa, out, "--max-steps", "1"), "model directory not found")
    assert not out.exists()
    out.mkdir(parents=True)  # a directory the user made is kept, empty
    one_line_error(train_cli(str(tmp_path / "no-model"), medmcqa, out, "--max-steps", "1"), "model directory not found")
    assert out.is_dir() and os.listdir(out) == [".lock"]  # the lock file of the failed start, nothing else
    r = eval_cli("--model", out, "--tasks", "medmcqa")
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


def test_eval_refuses_a_read_only_out_before_any_work(tiny_model_dir, read_only_dir):
    ro = read_only_dir
    r = eval_cli("--model", tiny_model_dir, "--tasks", "medmcqa", "--out", ro / "eval.json")
    one_line_error(r, f"--out {ro / 'eval.json'}: cannot write in {ro} (read-only?)")
    assert "medmcqa" not in r.stderr.replace("--tasks medmcqa", "")  # refused before any probe ran


def test_train_refuses_a_read_only_out_in_check_flags_and_before_work(tiny_model_dir, medmcqa, read_only_dir,
                                                                        tmp_path):
    """--check-flags checks --out as a run would (a read-only place refused, not 'flags ok'), and a run refuses it
    in one line; printed commands are quoted, so that a path with a space pastes back."""
    for extra in (["--check-flags"], []):
        r = train_cli(tiny_model_dir, medmcqa, read_only_dir / "run", "--max-steps", "1", *extra)
        one_line_error(r, f"--out {read_only_dir / 'run'}: cannot write in {read_only_dir} (read-only?)")
    out = tmp_path / "a run"
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "1").returncode == 0
    assert f"python eval.py --model '{out}'" in printed.getvalue()


# -----------------------------------------------------------------------------
# The joints of real use: kill -9 mid-save, runs evaluated in place, bad flags and data, broken files, the README


def temp_files(folder):
    return [n for _, _, names in os.walk(folder) for n in names if is_temp_file(n)]


def test_kill_9_during_a_save_then_resume_needs_no_cleanup(tiny_model_dir, medmcqa, tmp_path):
    """The run saves at every step and is killed the moment a temporary file of a save appears (ours or
    safetensors' .tmpXXXXXX); what such kills leave is planted as well, of both kinds; --resume then continues with
    no hand cleanup, its log holds every step once, and nothing temporary is left."""
    out = tmp_path / "run"
    long = ("--method", "full", "--max-steps", "100000", "--save-every", "1")
    p = train_cli(tiny_model_dir, medmcqa, out, *long, wait=False)
    deadline, caught = time.time() + 120, False
    while time.time() < deadline and p.poll() is None:
        names = os.listdir(out) if out.is_dir() else []
        if "checkpoint.safetensors" in names and any(is_temp_file(n) for n in names):
            caught = True
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert caught, "no save was seen in progress"
    for name in (".tmpAb3dE9", "model.safetensors.tmp4242", "checkpoint.safetensors.tmp17"):
        (out / name).write_text("half a save")
    stop = len(steps(out)) + 2
    r = train_cli(tiny_model_dir, medmcqa, out, *long, "--resume", "--stop-at-step", stop)
    assert r.returncode == 0, r.stderr
    assert steps(out) == list(range(1, stop + 1))
    assert temp_files(out) == []


@pytest.mark.parametrize("method,export", [("full", "hf"), ("lora", "peft"), ("lora", "merged")])
def test_an_export_killed_midway_is_cleaned_when_it_is_written_again(method, export, tiny_model_dir, medmcqa, tmp_path):
    out = tmp_path / "run"
    flags = ("--method", method, "--max-steps", "2", *({"peft": ["--export-peft"], "merged": ["--export-merged"]}
                                                       .get(export, [])))
    assert train_cli(tiny_model_dir, medmcqa, out, *flags, "--stop-at-step", "1").returncode == 0
    os.makedirs(out / export)
    for name in (".tmpZkbZVZ", "config.json.tmp77"):  # a kill in the middle of an export
        (out / export / name).write_text("half an export")
    r = train_cli(tiny_model_dir, medmcqa, out, *flags, "--resume")
    assert r.returncode == 0, r.stderr
    assert temp_files(out) == []
    assert (out / export / ("adapter_config.json" if export == "peft" else "config.json")).exists()


def test_a_run_evaluated_in_place_resumes_and_evaluates_again(tiny_model_dir, medmcqa, tmp_path):
    """The README's loop writes eval.py's results (and samples) into the run directory: a run holding them still
    resumes, and is evaluated again into the same files."""
    out = tmp_path / "run"
    r = train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "3", "--stop-at-step", "1")
    assert r.returncode == 0, r.stderr
    (out / "eval.json").write_text('{"medmcqa": {"acc": 0.25}}\n')  # as eval.py leaves it
    (out / "samples.jsonl").write_text("{}\n")
    r = train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "3", "--resume")
    assert r.returncode == 0, r.stderr
    assert steps(out) == [1, 2, 3]
    for _ in range(2):  # and a second evaluation into the same file
        r = eval_cli("--model", out, "--tasks", "medmcqa", "--data", f"medmcqa={medmcqa}", "--limit", "4",
                "--out", out / "eval.json", "--log-samples", out / "samples.jsonl", "--quiet")
        assert r.returncode == 0, r.stderr
        assert json.load(open(out / "eval.json"))["medmcqa"]["n"] == 4


def test_eval_never_writes_over_a_runs_files(tiny_model_dir, medmcqa, tmp_path):
    out = tmp_path / "run"
    assert train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "1", "--method", "full").returncode == 0
    before = {n: (out / n).read_bytes() for n in ("model.safetensors", "config.json", "args.json", "log.jsonl")}
    ev_args = ("--model", out, "--tasks", "medmcqa", "--data", f"medmcqa={medmcqa}", "--limit", "4", "--quiet")
    for target in ("model.safetensors", "config.json", "log.jsonl", "eval.jsonl", "results.json",
                   "hf/config.json", "hf/eval.jsonl"):
        one_line_error(eval_cli(*ev_args, "--out", out / target), "would write into the run or model directory")
    one_line_error(eval_cli(*ev_args, "--log-samples", out / "log.jsonl"), "samples*.jsonl")
    one_line_error(eval_cli(*ev_args, "--out", tmp_path / "r.json", "--log-samples", tmp_path / "r.json"),
                   "the same file")
    assert {n: (out / n).read_bytes() for n in before} == before
    r = eval_cli(*ev_args, "--out", out / "hf" / "eval-hf.json")  # an eval file is allowed, in the export too
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("method,flags,needle", [
    ("lora", ["--top-t", "5"], "--top-t does not apply to --method lora"),
    ("lora", ["--rank", "tfidf"], "--rank does not apply to --method lora"),
    ("lora", ["--memory-layers", "1"], "--memory-layers does not apply to --method lora"),
    ("smf", ["--lora-r", "8"], "--lora-r does not apply to --method smf"),
    ("full", ["--lora-r", "16"], "--lora-r does not apply to --method full"),  # even at its default value
    ("full", ["--train-alpha"], "--train-alpha does not apply to --method full"),
    ("retrofit", ["--retrofit-max-steps", "3"], "--method retrofit takes the shared flags"),
    ("smf", ["--memory-from", "x", "--retrofit-lr", "1e-3"], "--retrofit-lr acts on stage 1, which --memory-from"),
    ("full", ["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0, got -1.0"),
    ("full", ["--epochs", "0"], "--epochs must be a finite number > 0, got 0.0"),
    ("full", ["--epochs", "-1"], "--epochs must be a finite number > 0"),
    ("full", ["--warmup", "-5"], "--warmup must be a finite number >= 0"),
    ("full", ["--eval-every", "-1"], "--eval-every must be a finite number >= 0"),
    ("full", ["--max-len", "1"], "--max-len must be a finite number >= 2"),
    ("full", ["--seed", "-1"], "--seed must be a finite number >= 0"),
    ("lora", ["--lora-alpha", "nan"], "--lora-alpha must be a finite number > 0, got nan"),
    ("lora", ["--lora-dropout", "1"], "--lora-dropout must be below 1"),
    ("smf", ["--alpha-init", "nan"], "alpha_init must be a finite number"),
    ("full", ["--values-lr-scale", "10"], "--values-lr-scale: the model has no memory layers"),
    ("lora", ["--values-lr-scale", "10"], "--values-lr-scale does not apply to --method lora"),
    ("retrofit", ["--group-size", "4"], "--group-size does not apply to --method retrofit"),
    ("lora", ["--group-size", "4"], "--group-size 4: groups are consecutive lines of a text:PATH --task"),
    ("full", ["--task", "text:x.jsonl", "--group-size", "4", "--limit", "8"], "--group-size 4: --limit draws"),
    ("full", ["--task", "text:x.jsonl", "--group-size", "4", "--batch-size", "6"],
     "--group-size 4: --batch-size 6 is not a multiple of it"),
])
def test_flags_for_another_method_and_values_out_of_range_are_errors(method, flags, needle, tiny_model_dir, medmcqa,
                                                                     tmp_path, capsys):
    """(In process: train.py's command line runs the same main, and these stop in its argument parsing.)"""
    with pytest.raises(SystemExit) as e:
        train.main(["--method", method, "--recipe", "clean", "--model", tiny_model_dir, "--data", f"medmcqa={medmcqa}",
                    "--out", str(tmp_path / "run"), "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err  # one line, the usage not repeated
    assert needle in err and err.endswith("(see train.py --help)\n"), err
    assert not (tmp_path / "run").exists()


def test_unusable_data_stops_before_any_stage_trains(tiny_model_dir, medmcqa, tmp_path):
    # more examples per step than there are: refused, not silently smaller
    last = one_line_error(train_cli(tiny_model_dir, medmcqa, tmp_path / "a", "--batch-size", "100000"))
    assert "32 usable training examples, fewer than one --batch-size (100000)" in last
    # no English reply at all: under smf the stage-2 data is fine, stage 1 has nothing; and stage 2's data is
    # checked before stage 1 trains (a junk stage 1 is never kept)
    german = write_jsonl(str(tmp_path / "de.jsonl"), [r for r in oasst1_rows(12) if r["lang"] == "de"])
    smf = ("--method", "smf", "--recipe", "paper", "--data", f"oasst1={german}", *MEM, "--retrofit-max-steps", "2",
           "--batch-size", "4")  # the paper recipe's SMF steps are micro-batches of 4
    one_line_error(train_cli(tiny_model_dir, medmcqa, tmp_path / "b", *smf), "de.jsonl passes the filter",
                   "English assistant replies")  # the cause named (the filter), not "no token to predict"
    assert not (tmp_path / "b" / "retrofit" / "checkpoint.safetensors").exists()
    empty = write_parquet(str(tmp_path / "multi.parquet"), [r for r in medmcqa_rows(40) if r["choice_type"] != "single"])
    oasst = write_jsonl(str(tmp_path / "oa.jsonl"), oasst1_rows(30))
    r = train_cli(tiny_model_dir, empty, tmp_path / "c", "--method", "smf", "--data", f"oasst1={oasst}", *MEM,
                  "--retrofit-max-steps", "2")
    one_line_error(r, "medmcqa")
    assert not (tmp_path / "c" / "retrofit").exists()
    # 6 lines do not split into groups of 4: said before stage 1 trains, not when stage 2 starts
    six = write_jsonl(str(tmp_path / "six.jsonl"), [{"text": f"fact {i} is a fact"} for i in range(6)])
    r = train_cli(tiny_model_dir, medmcqa, tmp_path / "d", "--method", "smf", "--data", f"oasst1={oasst}", *MEM,
                  "--retrofit-max-steps", "2", "--task", f"text:{six}", "--group-size", "4", "--batch-size", "4",
                  "--recipe", "clean")
    one_line_error(r, "--group-size 4: the batch size (4) and the number of training examples (6)")
    assert not (tmp_path / "d" / "retrofit").exists()


def test_a_truncated_base_is_one_line(tiny_model_dir, medmcqa, tmp_path):
    """A base whose model.safetensors is cut short: train.py (which fingerprints the base first) says so in one line,
    as eval.py does, and makes no run directory."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for method in ("lora", "full"):
        r = train_cli(base, medmcqa, tmp_path / method, "--method", method)
        one_line_error(r, "model.safetensors is unreadable (truncated or corrupt?)")
        assert not (tmp_path / method).exists()
    one_line_error(eval_cli("--model", base, "--tasks", "medmcqa", "--data", f"medmcqa={medmcqa}"), "unreadable")


def test_a_missing_model_is_named_before_any_data_is_read(tmp_path, monkeypatch):
    """eval.py --model with a typo: refused before the probes' data is fetched (with the Hub, minutes of download)."""
    import data
    monkeypatch.setattr(data, "load_rows", lambda *a, **k: pytest.fail("data read before the model was checked"))
    r = eval_cli("--model", tmp_path / "no" / "such" / "run", "--tasks", "medmcqa")
    assert r.returncode != 0 and "model directory not found" in r.stderr.strip().splitlines()[-1]


def test_resume_of_a_start_stopped_before_its_first_stage_starts_it(tiny_model_dir, medmcqa, tmp_path):
    """A run killed before its first stage began (e.g. during the background reads) leaves only its .lock: --resume
    starts it, saying so; --resume of a folder that is not there is still refused."""
    out = tmp_path / "r"
    out.mkdir()
    (out / ".lock").write_text("")
    r = train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "2", "--resume")
    assert r.returncode == 0 and "holds no step yet" in r.stderr, r.stderr
    assert json.load(open(out / "config.json"))["finished"] is True
    one_line_error(train_cli(tiny_model_dir, medmcqa, tmp_path / "typo", "--max-steps", "2", "--resume"),
                   "there is no run to resume")


def test_resume_with_more_steps_says_how_to_train_on(tiny_model_dir, medmcqa, tmp_path):
    train_cli(tiny_model_dir, medmcqa, tmp_path / "r", "--max-steps", "2")
    r = train_cli(tiny_model_dir, medmcqa, tmp_path / "r", "--max-steps", "4", "--resume")
    one_line_error(r, "--max-steps is 4 but the run was started with 2", "start a new one from it",
                   "lora: --lora-from RUN")


def test_a_warmup_past_the_last_step_is_warned(tiny_model_dir, medmcqa, tmp_path):
    r = train_cli(tiny_model_dir, medmcqa, tmp_path / "short", "--max-steps", "3", "--warmup", "100")
    assert r.returncode == 0 and "warning: --warmup 100 reaches past the last step (3): the lr peaks at 3% of --lr" \
        in r.stderr, r.stderr
    r = train_cli(tiny_model_dir, medmcqa, tmp_path / "ok", "--max-steps", "3", "--warmup", "2")
    assert r.returncode == 0 and "--warmup" not in r.stderr


def test_file_system_errors_are_one_line(tiny_model_dir, medmcqa, tmp_path, monkeypatch, capsys):
    # --out under a file: the lock cannot be made
    (tmp_path / "file").write_text("x")
    one_line_error(train_cli(tiny_model_dir, medmcqa, tmp_path / "file" / "run", "--max-steps", "1"), "file")
    # a failing disk during a checkpoint (safetensors' own error names no file): the file is named, one line
    import checkpoint

    def full_disk(*a, **k):
        from safetensors import SafetensorError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    out = tmp_path / "full"
    status = train.cli(["--method", "lora", "--recipe", "clean", "--model", tiny_model_dir, "--data",
                        f"medmcqa={medmcqa}", "--out", str(out), "--device", "cpu", "--batch-size", "2", "--max-len", "96",
                        "--max-steps", "1"])
    assert status.startswith(f"error: could not write {out / 'model.safetensors'}: ") and "No space left" in status
    assert "\n" not in status and temp_files(out) == []


def test_a_broken_json_file_is_named(tiny_model_dir, medmcqa, tmp_path):
    out = tmp_path / "run"
    assert train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "2", "--stop-at-step", "1").returncode == 0
    args = (out / "args.json").read_text()
    (out / "args.json").write_text(args[:10])  # truncated by hand (train.py itself writes it atomically)
    one_line_error(train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "2", "--resume"),
                   f"{out / 'args.json'} is not valid JSON")
    (out / "args.json").write_text(args)
    assert train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "2", "--resume").returncode == 0
    (out / "config.json").write_text('{"method": "lora", ')
    one_line_error(eval_cli("--model", out, "--tasks", "medmcqa", "--data", f"medmcqa={medmcqa}"),
                   f"{out / 'config.json'} is not valid JSON")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "config.json").write_text("")
    one_line_error(eval_cli("--model", model, "--tasks", "medmcqa", "--data", f"medmcqa={medmcqa}"),
                   f"{model / 'config.json'} is not valid JSON")


def test_a_moved_run_resumes_and_resume_checks_flags_before_fetching(tiny_model_dir, medmcqa, tmp_path):
    out = tmp_path / "run"
    assert train_cli(tiny_model_dir, medmcqa, out, "--max-steps", "3", "--stop-at-step", "1").returncode == 0
    moved = tmp_path / "elsewhere" / "run"
    os.makedirs(moved.parent)
    shutil.move(out, moved)
    r = train_cli(tiny_model_dir, medmcqa, moved, "--max-steps", "3", "--resume")
    assert r.returncode == 0, r.stderr
    assert steps(moved) == [1, 2, 3]
    # --resume with --model left out (the Hub default): the mismatch is reported, no fetch is tried (offline)
    r = run_script("train.py", "--method", "lora", "--recipe", "clean", "--data", f"medmcqa={medmcqa}", "--out", moved,
            "--device", "cpu", "--batch-size", "2", "--max-len", "96", "--warmup", "1", "--max-steps", "3", "--resume")
    one_line_error(r, "--resume: --model is 'Qwen/Qwen2.5-0.5B-Instruct' but the run was started with")
    assert "Hub" not in r.stderr and "fetch" not in r.stderr


def test_usage_errors_are_one_line_with_a_hint():
    for script, args, needle in (("train.py", ["--method", "magic"], "invalid choice: 'magic'"),
                                 ("train.py", [], "the following arguments are required: --method"),
                                 ("eval.py", ["--limit", "x"], "--limit: invalid int value: 'x'")):
        r = run_script(script, *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert needle in r.stderr and r.stderr.startswith("error: ") and f"(see {script} --help)" in r.stderr


def readme_block(text, after):
    start = text.index("```bash", text.index(after)) + len("```bash")
    return text[start:text.index("```", start)]


def test_the_readmes_tiny_commands_run_as_written(tmp_path):
    """The README's block of commands on tiny local fixtures, then its chain commands (continual learning), run as
    written (their /tmp and runs/ moved into a temporary folder), with nothing but the runtime packages."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = readme_block(text, "The same commands on tiny local fixtures") + readme_block(text, "## Continual learning")
    block = block.replace("/tmp/", f"{tmp_path}/").replace("runs/", f"{tmp_path}/runs/")
    blocker = tmp_path / "no_transformers"
    os.makedirs(blocker / "transformers")
    (blocker / "transformers" / "__init__.py").write_text("raise ImportError('a test-only package')\n")
    r = subprocess.run(["bash", "-ec", block], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(blocker), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(tmp_path / "runs" / "tiny-smf" / "eval.json"))["medmcqa"]["n"] == 8
    for link, previous in (("tiny-smf-2", "tiny-smf"), ("tiny-lora-2", "tiny-lora"), ("tiny-full-2", "tiny-full")):
        lineage = json.load(open(tmp_path / "runs" / link / "config.json"))["lineage"]
        assert lineage[-1]["run"] == str(tmp_path / "runs" / previous), link


def test_help_shows_true_defaults_under_both_recipes(capsys):
    import re
    import eval as ev
    raw = train.parser().format_help()
    raw = raw[raw.index("\noptions:"):]
    entries = {m.group(1): " ".join(m.group(0).split()) for m in re.finditer(r"\n  (--[\w-]+).*?(?=\n  -|\n\n|$)", raw,
                                                                           re.S)}
    for flag, shown in (("--memory-precision", "(default: paper bf16, clean fp32)"),
                        ("--optimizer", "(default: paper dense_adamw, clean adamw)"),
                        ("--pure-bf16", "(default: paper True, clean False)"),
                        ("--seed", "(default: 0)"), ("--weight-decay", "(default: 0.0)"), ("--lora-r", "(default: 16)"),
                        ("--lora-dropout", "(default: 0.05)")):
        assert shown in entries[flag], (flag, entries[flag])
    assert "fp32)" not in entries["--memory-precision"].replace("clean fp32)", "")
    assert entries["--memory-layers"].count("default") == 1
    for name, value in train.RECIPES["paper"].items():  # every [recipe] flag shows both recipes' values
        assert f"(default: paper {value}, clean {train.RECIPES['clean'][name]})" in entries[train.ArgParser.flag(name)]
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    assert "(default: 1000)" in " ".join(capsys.readouterr().out.split())
