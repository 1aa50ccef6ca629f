"""The joints of real use, through the command lines as a user meets them: a kill -9 in the middle of a save, a
run evaluated in place and then resumed, eval.py pointed at a run's own files, flags for another method, values out
of range, unusable data, a broken JSON file, a failing disk, a moved run, --resume with flags left out."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import train
from checkpoint import is_temp_file
from tiny_data import medmcqa_rows, oasst1_rows, write_jsonl, write_parquet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEM = ["--n-keys", "8", "--mem-heads", "2", "--mem-topk", "4", "--mem-k-dim", "16", "--memory-layers", "1,2"]


@pytest.fixture(scope="module")
def med(tmp_path_factory):
    return write_parquet(str(tmp_path_factory.mktemp("seams") / "medmcqa.parquet"), medmcqa_rows(40))


def run(script, *args, env=None, wait=True):
    cmd = [sys.executable, script, *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def train_cli(model_dir, med, out, *extra, **kw):
    return run("train.py", "--method", "lora", "--recipe", "clean", "--model", model_dir, "--data",
               f"medmcqa={med}", "--out", out, "--device", "cpu", "--batch-size", "2", "--max-len", "96",
               "--warmup", "1", *extra, **kw)


def one_line_error(r, *needles):
    """A non-zero exit whose stderr ends in one error line naming the problem, with no traceback."""
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr
    for n in needles:
        assert n in last, (n, last)
    return last


def steps(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]


def temp_files(folder):
    return [n for _, _, names in os.walk(folder) for n in names if is_temp_file(n)]


def test_kill_9_during_a_save_then_resume_needs_no_cleanup(tiny_model_dir, med, tmp_path):
    """The run saves at every step and is killed the moment a temporary file of a save appears (ours or
    safetensors' .tmpXXXXXX); what such kills leave is planted as well, of both kinds; --resume then continues with
    no hand cleanup, its log holds every step once, and nothing temporary is left."""
    out = tmp_path / "run"
    long = ("--method", "full", "--max-steps", "100000", "--save-every", "1")
    p = train_cli(tiny_model_dir, med, out, *long, wait=False)
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
    r = train_cli(tiny_model_dir, med, out, *long, "--resume", "--stop-at-step", stop)
    assert r.returncode == 0, r.stderr
    assert steps(out) == list(range(1, stop + 1))
    assert temp_files(out) == []


@pytest.mark.parametrize("method,export", [("full", "hf"), ("lora", "peft"), ("lora", "merged")])
def test_an_export_killed_midway_is_cleaned_when_it_is_written_again(method, export, tiny_model_dir, med, tmp_path):
    out = tmp_path / "run"
    flags = ("--method", method, "--max-steps", "2", *({"peft": ["--export-peft"], "merged": ["--export-merged"]}
                                                       .get(export, [])))
    assert train_cli(tiny_model_dir, med, out, *flags, "--stop-at-step", "1").returncode == 0
    os.makedirs(out / export)
    for name in (".tmpZkbZVZ", "config.json.tmp77"):  # a kill in the middle of an export
        (out / export / name).write_text("half an export")
    r = train_cli(tiny_model_dir, med, out, *flags, "--resume")
    assert r.returncode == 0, r.stderr
    assert temp_files(out) == []
    assert (out / export / ("adapter_config.json" if export == "peft" else "config.json")).exists()


def test_a_run_evaluated_in_place_resumes_and_evaluates_again(tiny_model_dir, med, tmp_path):
    """The README's loop writes eval.py's results (and samples) into the run directory: a run holding them still
    resumes, and is evaluated again into the same files."""
    out = tmp_path / "run"
    r = train_cli(tiny_model_dir, med, out, "--max-steps", "3", "--stop-at-step", "1")
    assert r.returncode == 0, r.stderr
    (out / "eval.json").write_text('{"medmcqa": {"acc": 0.25}}\n')  # as eval.py leaves it
    (out / "samples.jsonl").write_text("{}\n")
    r = train_cli(tiny_model_dir, med, out, "--max-steps", "3", "--resume")
    assert r.returncode == 0, r.stderr
    assert steps(out) == [1, 2, 3]
    for _ in range(2):  # and a second evaluation into the same file
        r = run("eval.py", "--model", out, "--tasks", "medmcqa", "--data", f"medmcqa={med}", "--limit", "4",
                "--out", out / "eval.json", "--log-samples", out / "samples.jsonl", "--quiet")
        assert r.returncode == 0, r.stderr
        assert json.load(open(out / "eval.json"))["medmcqa"]["n"] == 4


def test_eval_never_writes_over_a_runs_files(tiny_model_dir, med, tmp_path):
    out = tmp_path / "run"
    assert train_cli(tiny_model_dir, med, out, "--max-steps", "1", "--method", "full").returncode == 0
    before = {n: (out / n).read_bytes() for n in ("model.safetensors", "config.json", "args.json", "log.jsonl")}
    ev = ("eval.py", "--model", out, "--tasks", "medmcqa", "--data", f"medmcqa={med}", "--limit", "4", "--quiet")
    for target in ("model.safetensors", "config.json", "log.jsonl", "eval.jsonl", "results.json",
                   "hf/config.json", "hf/eval.jsonl"):
        one_line_error(run(*ev, "--out", out / target), "would write into the run or model directory")
    one_line_error(run(*ev, "--log-samples", out / "log.jsonl"), "samples*.jsonl")
    one_line_error(run(*ev, "--out", tmp_path / "r.json", "--log-samples", tmp_path / "r.json"), "the same file")
    assert {n: (out / n).read_bytes() for n in before} == before
    r = run(*ev, "--out", out / "hf" / "eval-hf.json")  # an eval file is allowed, in the export too
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
])
def test_flags_for_another_method_and_values_out_of_range_are_errors(method, flags, needle, tiny_model_dir, med,
                                                                     tmp_path, capsys):
    """(In process: train.py's command line runs the same main, and these stop in its argument parsing.)"""
    with pytest.raises(SystemExit) as e:
        train.main(["--method", method, "--recipe", "clean", "--model", tiny_model_dir, "--data", f"medmcqa={med}",
                    "--out", str(tmp_path / "run"), "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err  # one line, the usage not repeated
    assert needle in err and err.endswith("(see train.py --help)\n"), err
    assert not (tmp_path / "run").exists()


def test_unusable_data_stops_before_any_stage_trains(tiny_model_dir, med, tmp_path):
    # more examples per step than there are: refused, not silently smaller
    last = one_line_error(train_cli(tiny_model_dir, med, tmp_path / "a", "--batch-size", "100000"))
    assert "32 usable training examples, fewer than one --batch-size (100000)" in last
    # no English reply at all: under smf the stage-2 data is fine, stage 1 has nothing; and stage 2's data is
    # checked before stage 1 trains (a junk stage 1 is never kept)
    german = write_jsonl(str(tmp_path / "de.jsonl"), [r for r in oasst1_rows(12) if r["lang"] == "de"])
    smf = ("--method", "smf", "--recipe", "paper", "--data", f"oasst1={german}", *MEM, "--retrofit-max-steps", "2")
    one_line_error(train_cli(tiny_model_dir, med, tmp_path / "b", *smf), "de.jsonl passes the filter",
                   "English assistant replies")  # the cause named (the filter), not "no token to predict"
    assert not (tmp_path / "b" / "retrofit" / "checkpoint.safetensors").exists()
    empty = write_parquet(str(tmp_path / "multi.parquet"), [r for r in medmcqa_rows(40) if r["choice_type"] != "single"])
    oasst = write_jsonl(str(tmp_path / "oa.jsonl"), oasst1_rows(30))
    r = train_cli(tiny_model_dir, empty, tmp_path / "c", "--method", "smf", "--data", f"oasst1={oasst}", *MEM,
                  "--retrofit-max-steps", "2")
    one_line_error(r, "medmcqa")
    assert not (tmp_path / "c" / "retrofit").exists()


def test_file_system_errors_are_one_line(tiny_model_dir, med, tmp_path, monkeypatch, capsys):
    # --out under a file: the lock cannot be made
    (tmp_path / "file").write_text("x")
    one_line_error(train_cli(tiny_model_dir, med, tmp_path / "file" / "run", "--max-steps", "1"), "file")
    # a failing disk during a checkpoint (safetensors' own error names no file): the file is named, one line
    import checkpoint

    def full_disk(*a, **k):
        from safetensors import SafetensorError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    out = tmp_path / "full"
    status = train.cli(["--method", "lora", "--recipe", "clean", "--model", tiny_model_dir, "--data",
                        f"medmcqa={med}", "--out", str(out), "--device", "cpu", "--batch-size", "2", "--max-len", "96",
                        "--max-steps", "1"])
    assert status.startswith(f"error: could not write {out / 'model.safetensors'}: ") and "No space left" in status
    assert "\n" not in status and temp_files(out) == []


def test_a_broken_json_file_is_named(tiny_model_dir, med, tmp_path):
    out = tmp_path / "run"
    assert train_cli(tiny_model_dir, med, out, "--max-steps", "2", "--stop-at-step", "1").returncode == 0
    args = (out / "args.json").read_text()
    (out / "args.json").write_text(args[:10])  # truncated by hand (train.py itself writes it atomically)
    one_line_error(train_cli(tiny_model_dir, med, out, "--max-steps", "2", "--resume"),
                   f"{out / 'args.json'} is not valid JSON")
    (out / "args.json").write_text(args)
    assert train_cli(tiny_model_dir, med, out, "--max-steps", "2", "--resume").returncode == 0
    (out / "config.json").write_text('{"method": "lora", ')
    one_line_error(run("eval.py", "--model", out, "--tasks", "medmcqa", "--data", f"medmcqa={med}"),
                   f"{out / 'config.json'} is not valid JSON")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "config.json").write_text("")
    one_line_error(run("eval.py", "--model", model, "--tasks", "medmcqa", "--data", f"medmcqa={med}"),
                   f"{model / 'config.json'} is not valid JSON")


def test_a_moved_run_resumes_and_resume_checks_flags_before_fetching(tiny_model_dir, med, tmp_path):
    out = tmp_path / "run"
    assert train_cli(tiny_model_dir, med, out, "--max-steps", "3", "--stop-at-step", "1").returncode == 0
    moved = tmp_path / "elsewhere" / "run"
    os.makedirs(moved.parent)
    shutil.move(out, moved)
    r = train_cli(tiny_model_dir, med, moved, "--max-steps", "3", "--resume")
    assert r.returncode == 0, r.stderr
    assert steps(moved) == [1, 2, 3]
    # --resume with --model left out (the Hub default): the mismatch is reported, no fetch is tried (offline)
    r = run("train.py", "--method", "lora", "--recipe", "clean", "--data", f"medmcqa={med}", "--out", moved,
            "--device", "cpu", "--batch-size", "2", "--max-len", "96", "--warmup", "1", "--max-steps", "3", "--resume")
    one_line_error(r, "--resume: --model is 'Qwen/Qwen2.5-0.5B-Instruct' but the run was started with")
    assert "Hub" not in r.stderr and "fetch" not in r.stderr


def test_usage_errors_are_one_line_with_a_hint():
    for script, args, needle in (("train.py", ["--method", "magic"], "invalid choice: 'magic'"),
                                 ("train.py", [], "the following arguments are required: --method"),
                                 ("eval.py", ["--limit", "x"], "--limit: invalid int value: 'x'")):
        r = run(script, *args)
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
