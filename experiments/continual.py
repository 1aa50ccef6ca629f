"""
Continual learning on the synthetic world of experiments/world.py: K sets of new facts learned one after another,
each method continuing from its own previous run (SMF comes from continual learning: Lin et al. 2025, "Continual
Learning via Sparse Memory Finetuning", arXiv 2510.15103), with the retention matrix and backward transfer.

    python experiments/continual.py            # 5 seeds, K = 3 sets (the minutes: experiments/README.md)
    python experiments/continual.py --pilot    # the lr choice on seeds 10 and 11 (the rule below); prints LRS
    python experiments/continual.py --memory retrofit --facts siblings   # the earlier setting: a stress test
    python experiments/continual.py --quick    # a smoke test of the pipeline (what the tests run): it does not learn

Per seed (every training step is `python train.py ...`, every measurement eval.py's load_model and world.py's
probes), with forgetting.py's scale, world, memory and flags (forgetting.prepare: --facts, --memory; by default a
memory pretrained with the model and new facts of new attributes):
  1. a world whose K * m new entities are split, in order, into K disjoint sets of m (4 facts each)
  2. pretrain a tiny Qwen2 on the old entities (with its memory, or -> base and a retrofitted memory), the Lin et
     al. rows' background reads (once per seed), the read overlap (a measurement)
  3. per method (forgetting.RECIPES says what each row is), a chain of K train.py runs, link i learning set i (its
     question-answer lines) from link i - 1:
       smf-clean, smf-paper  --memory-from the previous link (link 1: the memory model or the retrofit); the
                             background reads stay on the memory's pretraining data (the chain carries it)
       smf-lin-t16           the same, each link taking the seed's background reads (--background-from: read once)
       lora                  --lora-from the previous link (link 1: fresh adapters; the memory model's memory kept)
       full                  --model the previous link's hf/ export (link 1: the base; with a memory model also
                             --memory-from the previous link: its memory, trained on)
     each link's optimizer starts fresh; every method from the same model, with forgetting.py's flags (recipes,
     batch, schedule) and an lr fixed beforehand (LRS)
  4. after every link (and before the first: the model each chain starts from), the accuracy on every set, the
     old-fact accuracy and the held-out perplexity

Summaries (per method, over seeds; 95% t-intervals as forgetting.py's, perplexity as a geometric mean):
  R[i][j]        accuracy on set j after stage i (i = 0: before any; chance 0.10)
  final          average final accuracy: mean over j of R[K][j]
  BWT            backward transfer: mean over j < K of R[K][j] - R[j][j] (negative: forgetting of earlier sets)
  old, ppl       old-fact accuracy and held-out perplexity after each stage

LRS, the rule (fixed before the final run, as forgetting.py's; what comes out is reported either way): on the pilot
seeds 10 and 11, for each method and each lr of its forgetting.py sweep, run the chain; take the smallest lr whose
mean over pilot seeds of R[j][j] (each set right after it is learned), averaged over j, reaches 0.8; if none does,
the lr with the highest. One lr per method, the same for every link.
Outputs in --out: results.json, results.md (the tables), the figure (needs matplotlib, optional), seed<k>/ (runs); a
full run (no --quick, --pilot or --seeds) also experiments/results/continual[-SETTING].md and its figure.
"""

import json
import math
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import forgetting  # noqa: E402
from checkpoint import load_model  # noqa: E402
from common import ArgParser  # noqa: E402
from world import WORLD_ATTRIBUTES, eval_documents_ppl, eval_world_facts, world_fact_items, world_qa_texts  # noqa: E402

METHODS = ["smf-clean", "smf-paper", "smf-lin-t16", "lora", "full"]  # forgetting.RECIPES says what each is
K, PER_SET = 3, 8  # sets of new facts, entities per set (x 4 attributes = 32 facts a set)
# the lrs per memory (--memory), chosen with --pilot on seeds 10 and 11 by the rule of the docstring
# (--memory retrofit: smf-lin-t16's 1e7 is the lr of the review that asked for the row, not the rule's: not piloted)
LRS = {"retrofit": {"smf-clean": 100.0, "smf-paper": 100.0, "smf-lin-t16": 1e7, "lora": 3e-3, "full": 1e-3},
       "pretrained": {"smf-clean": 1.0, "smf-paper": 0.3, "smf-lin-t16": 300.0, "lora": 1e-2, "full": 3e-3}}
QUICK = dict(k=2, per_set=2, pretrain_steps=60, ft_epochs=1,  # on forgetting.py's quick scale, shorter still;
             lrs={"smf-clean": 1e-2, "smf-lin-t16": 1.0, "lora": 3e-3, "full": 3e-4})  # smf-paper: forgetting's
QUICK_NOTE = ("--quick: a SMOKE TEST of the pipeline (a tiny model, a few steps, 2 sets). It checks that every step "
              "runs; it is not expected to learn, and its numbers say nothing about the methods.")


def parse_args(argv=None):
    p = ArgParser(prog="continual.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--out", default=None, help="output folder (default runs/continual[-quick|-pilot])")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0-4 (--quick: 0; --pilot: 10 11)")
    p.add_argument("--jobs", type=int, default=2, help="train.py processes at a time (one thread each)")
    p.add_argument("--figure", default=None, help="the PNG (default <out>/continual.png; needs matplotlib)")
    p.add_argument("--facts", default="new-attributes", choices=["new-attributes", "siblings"],
                   help="the new facts (forgetting.py's flag)")
    p.add_argument("--memory", default="pretrained", choices=["pretrained", "retrofit"],
                   help="SMF's memory (forgetting.py's flag)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true",
                   help="a smoke test at a tiny scale (for tests): not expected to learn")
    g.add_argument("--pilot", action="store_true", help="choose LRS by the docstring's rule on seeds 10 and 11")
    args = p.parse_args(argv)
    kind = "-quick" if args.quick else "-pilot" if args.pilot else ""
    args.out = os.path.abspath(args.out or os.path.join("runs", "continual" + kind))
    args.figure = args.figure or os.path.join(args.out, "continual.png")
    return args


def scale_of(args) -> dict:
    """forgetting.py's scale with K * PER_SET new entities, and this run's seeds and lrs ({method: [lr, ...]})."""
    if args.quick:
        scale = {**forgetting.scale_of("quick", args.facts, args.memory, METHODS), **QUICK,
                 "n_new": QUICK["k"] * QUICK["per_set"], "lrs": {m: [lr] for m, lr in QUICK["lrs"].items()}}
    else:
        full = forgetting.scale_of("full", args.facts, args.memory, METHODS)
        lrs = full["sweeps"] if args.pilot else {m: [lr] for m, lr in LRS[args.memory].items()}
        scale = {**full, "n_new": K * PER_SET, "k": K, "per_set": PER_SET, "lrs": lrs}
    scale["seeds"] = args.seeds or ([10, 11] if args.pilot else [0] if args.quick else scale["seeds"])
    return scale


# -----------------------------------------------------------------------------
# One chain: K train.py runs, each measured on every set


def set_files(out, world, scale) -> list[str]:
    """The K sets' training files (question-answer lines), the entities split in order."""
    paths = []
    for j in range(scale["k"]):
        path = os.path.join(out, "world", f"set{j}.jsonl")
        with open(path, "w") as f:
            entities = world["new"][j * scale["per_set"]:(j + 1) * scale["per_set"]]
            f.writelines(json.dumps({"text": t}) + "\n" for t in world_qa_texts(entities))
        paths.append(path)
    return paths


def measure(run_dir, world, heldout_rows, scale) -> dict:
    """Accuracy on every set, old-fact accuracy and held-out perplexity of a model or run directory."""
    model, tok, _ = load_model(run_dir, dtype=torch.float32, device="cpu")
    sets = [world["new"][j * scale["per_set"]:(j + 1) * scale["per_set"]] for j in range(scale["k"])]
    return {"sets": [eval_world_facts(model, tok, world_fact_items(s))["acc"] for s in sets],
            "old_acc": eval_world_facts(model, tok, world_fact_items(world["old"]))["acc"],
            "heldout_ppl": eval_documents_ppl(model, tok, [r["text"] for r in heldout_rows])["ppl"]}


def link_flags(method, lr, scale, ctx, task, previous):
    """forgetting.py's finetune flags for one link, continuing from `previous` (None: the chain's first link): SMF
    the previous link's memory, LoRA its adapters (and the memory model's memory, kept), full its hf/ export (and
    its memory, trained on); the Lin et al. rows take the background reads of the seed's background run."""
    base = os.path.join(previous, "hf") if method == "full" and previous else ctx["base"]
    has_memory = method.startswith("smf") or ctx["pretrained"]
    memory_from = (previous if previous and method != "lora" else ctx["memory"]) if has_memory else None
    flags = forgetting.finetune_flags(method, lr, scale, task, base, memory_from, ctx["background"])
    return flags + (["--lora-from", previous] if method == "lora" and previous else [])


def chain(out, scale, seed, ctx, method, lr, log) -> dict:
    """The K links of one method's chain -> {"seed", "method", "lr", "R": (K + 1) x K accuracies, "old", "ppl"}."""
    m0 = ctx["start"][method.startswith("smf")]  # SMF chains start from the retrofit, LoRA and full from the base
    r = {"seed": seed, "method": method, "lr": lr, "R": [m0["sets"]], "old": [m0["old_acc"]],
         "ppl": [m0["heldout_ppl"]], "seconds": 0.0}
    previous = None
    for i, task in enumerate(ctx["sets"]):
        name = f"{method}-lr{lr:g}-stage{i + 1}"
        r["seconds"] += forgetting.train(out, name, link_flags(method, lr, scale, ctx, task, previous)
                                         + ["--seed", seed])
        previous = os.path.join(out, name)
        m = measure(previous, ctx["world"], ctx["heldout_rows"], scale)
        r["R"].append(m["sets"])
        r["old"].append(m["old_acc"])
        r["ppl"].append(m["heldout_ppl"])
        log(f"seed {seed} {name}: sets {' '.join(f'{a:.2f}' for a in m['sets'])} old {m['old_acc']:.3f} "
            f"ppl {m['heldout_ppl']:.3f}")
    return r


def prepare(out, scale, seed, log):
    """forgetting.prepare (world, pretrain, its memory, the background reads, the read overlap) plus the K set files
    and the start models' measurements."""
    _, ctx = forgetting.prepare(out, scale, seed, log)
    ctx["sets"] = set_files(out, ctx["world"], scale)
    smf_start = measure(ctx["memory"], ctx["world"], ctx["heldout_rows"], scale)
    # LoRA and full finetuning start from the memory model itself, or from the base without the retrofit
    ctx["start"] = {True: smf_start, False: smf_start if ctx["pretrained"] else
                    measure(ctx["base"], ctx["world"], ctx["heldout_rows"], scale)}
    return ctx


def run_all(out, scale, log) -> list[dict]:
    """Every seed's chains, `jobs` train.py processes at a time (each chain's links in order)."""
    chains, overlap = [], {}
    with ThreadPoolExecutor(max_workers=scale["jobs"]) as pool:
        pending = {pool.submit(prepare, os.path.join(out, f"seed{s}"), scale, s, log): ("prepare", s)
                   for s in scale["seeds"]}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                kind, s = pending.pop(fut)
                if kind == "prepare":
                    ctx = fut.result()
                    overlap[s] = ctx["overlap"]
                    for method, lrs in scale["lrs"].items():
                        for lr in lrs:
                            pending[pool.submit(chain, os.path.join(out, f"seed{s}"), scale, s, ctx, method, lr,
                                                log)] = ("chain", s)
                else:
                    chains.append(fut.result())
    return sorted(chains, key=lambda c: (c["seed"], METHODS.index(c["method"]), c["lr"])), dict(sorted(overlap.items()))


# -----------------------------------------------------------------------------
# Summaries


def retention(R) -> dict:
    """From one chain's (K + 1) x K accuracies R[i][j] (row i: after stage i, row 0 before any; set j is learned at
    stage j + 1): the average final accuracy, mean over j of R[K][j], and the backward transfer, mean over the K - 1
    sets learned before the last of R[K][j] - R[j + 1][j] (None for K = 1)."""
    k = len(R[0])
    final = sum(R[k]) / k
    bwt = sum(R[k][j] - R[j + 1][j] for j in range(k - 1)) / (k - 1) if k > 1 else None
    return {"final": final, "bwt": bwt}


def summarize(chains) -> dict:
    """Per (method, lr): the retention matrix, final accuracy, BWT, old-fact accuracy and perplexity after each
    stage, each as (mean, 95% half-width, n) over seeds (perplexity: geometric mean, (mean, low, high, n))."""
    out = []
    for method in METHODS:
        for lr in sorted({c["lr"] for c in chains if c["method"] == method}):
            cs = [c for c in chains if c["method"] == method and c["lr"] == lr]
            stages, k = len(cs[0]["R"]), len(cs[0]["R"][0])
            per = [retention(c["R"]) for c in cs]
            out.append({
                "method": method, "lr": lr, "n": len(cs),
                "R": [[forgetting.interval([c["R"][i][j] for c in cs]) for j in range(k)] for i in range(stages)],
                "final": forgetting.interval([p["final"] for p in per]),
                "bwt": forgetting.interval([p["bwt"] for p in per if p["bwt"] is not None]),
                "learned": forgetting.interval([sum(c["R"][j + 1][j] for j in range(k)) / k for c in cs]),
                "old": [forgetting.interval([c["old"][i] for c in cs]) for i in range(stages)],
                "ppl": [forgetting.ppl_interval(forgetting.interval([math.log(c["ppl"][i]) for c in cs]))
                        for i in range(stages)]})
    return {"per_method": out}


def choose_lrs(summary, target=0.8) -> dict:
    """The docstring's rule: per method the smallest lr whose mean R[j][j] (averaged over j) reaches `target`, else
    the lr with the highest."""
    lrs = {}
    for method in METHODS:
        rows = sorted((r for r in summary["per_method"] if r["method"] == method), key=lambda r: r["lr"])
        if rows:
            hit = [r for r in rows if r["learned"][0] >= target]
            lrs[method] = (hit[0] if hit else max(rows, key=lambda r: r["learned"][0]))["lr"]
    return lrs


def report(summary, k) -> str:
    pm, table = forgetting.pm, forgetting.table
    md = ["Average final accuracy, backward transfer (BWT), and each set right after it was learned (mean ± 95% "
          "t-interval over seeds; chance 0.10):\n\n",
          table(["method", "lr", "seeds", "final acc", "BWT", "just learned"],
                [[r["method"], f"{r['lr']:g}", r["n"], pm(r["final"]), pm(r["bwt"]), pm(r["learned"])]
                 for r in summary["per_method"]]),
          "\nOld-fact accuracy after each stage (stage 0: the model the chain starts from):\n\n",
          table(["method", "lr", *[f"stage {i}" for i in range(k + 1)]],
                [[r["method"], f"{r['lr']:g}", *map(pm, r["old"])] for r in summary["per_method"]]),
          "\nHeld-out perplexity after each stage (geometric mean [95% interval]):\n\n",
          table(["method", "lr", *[f"stage {i}" for i in range(k + 1)]],
                [[r["method"], f"{r['lr']:g}", *map(forgetting.ppl_text, r["ppl"])] for r in summary["per_method"]])]
    for r in summary["per_method"]:
        md += [f"\nRetention matrix of {r['method']} (lr {r['lr']:g}): accuracy on set j (columns) after stage i "
               f"(rows)\n\n",
               table(["stage", *[f"set {j + 1}" for j in range(k)]],
                     [[i, *map(pm, row)] for i, row in enumerate(r["R"])])]
    return "".join(md)


def figure(summary, k, path, title):
    """One panel per method: the accuracy of each set over the stages (mean ± 95% t-interval), old facts dashed.
    Imports matplotlib (ImportError without)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = summary["per_method"]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.4), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], rows):
        stages = list(range(len(r["R"])))
        for j in range(k):
            ys = [row[j] for row in r["R"]]
            ax.errorbar(stages, [y[0] for y in ys], yerr=[y[1] or 0 for y in ys], marker="o", capsize=2,
                        label=f"set {j + 1}")
        ax.errorbar(stages, [o[0] for o in r["old"]], yerr=[o[1] or 0 for o in r["old"]], color="black",
                    linestyle="--", capsize=2, label="old facts")
        ax.set_title(f"{r['method']} (lr {r['lr']:g})", fontsize=10)
        ax.set_xlabel("after stage")
        ax.set_xticks(stages)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.25)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    scale = {**scale_of(args), "jobs": args.jobs}
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    if args.quick:
        print(QUICK_NOTE, flush=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    def log(msg):
        print(f"[{time.time() - t_start:5.0f} s] {msg}", flush=True)

    log(f"seeds {scale['seeds']}: {scale['k']} sets of {scale['per_set'] * len(WORLD_ATTRIBUTES)} facts "
        f"({args.facts}), memory {args.memory}, methods:")
    for m, lrs in scale["lrs"].items():
        log(f"  {m}: {forgetting.RECIPES[m].format(**scale)}; lrs {' '.join(f'{lr:g}' for lr in lrs)}")
    chains, overlap = run_all(args.out, scale, log)
    summary = summarize(chains)
    wall = time.time() - t_start
    t = os.times()
    cpu = t.user + t.system + t.children_user + t.children_system
    res = {"seeds": scale["seeds"], "quick": args.quick, "pilot": args.pilot, "k": scale["k"], "chance": 0.1,
           "wall_seconds": wall, "cpu_seconds": cpu, "jobs": args.jobs, "lrs": scale["lrs"], "facts": args.facts,
           "memory": args.memory, "overlap": overlap, "chains": chains,
           "summary": summary}
    head = (f"{len(scale['seeds'])} seeds ({', '.join(map(str, scale['seeds']))}), "
            f"{'quick' if args.quick else 'pilot' if args.pilot else 'full'} scale, {scale['k']} sets, {args.jobs} "
            f"processes at a time, wall time {wall / 60:.1f} min, CPU time {cpu / 60:.1f} min\n\n")
    md = (f"{QUICK_NOTE}\n\n" if args.quick else "") + head + \
        forgetting.recipes_and_overlap(scale, scale["lrs"], overlap) + "\n" + report(summary, scale["k"])
    if args.pilot:
        res["chosen"] = choose_lrs(summary)
        md += f"\nChosen by the rule (put these in LRS): {res['chosen']}\n"
    title = (f"{'QUICK SMOKE TEST: ' if args.quick else ''}continual learning of {scale['k']} sets, mean over "
             f"{len(scale['seeds'])} seeds, 95% t-intervals")
    default = (args.facts, args.memory) == ("new-attributes", "pretrained")
    command = "python experiments/continual.py" + ("" if default else f" --memory {args.memory} --facts {args.facts}")
    return forgetting.write_results(args.out, res, md, lambda: figure(summary, scale["k"], args.figure, title),
                                    args.figure, command=command,
                                    publish=None if args.quick or args.pilot or args.seeds
                                    else "continual" + ("" if default else f"-{args.memory}-{args.facts}"))

if __name__ == "__main__":
    main()
