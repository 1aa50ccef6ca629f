"""
Learning vs forgetting on a synthetic world, offline on a CPU: SMF (clean with AdamW or SGD, and the paper's
recipe), LoRA and full finetuning.

    python experiments/forgetting.py                # about 5 minutes on 2 CPU cores; --quick: about 40 s

Steps (every training step is `python train.py ...`, every measurement eval.py's load_model and probes):
  1. data.py's synthetic world (seed): old entities as prose + question-answer lines (pretraining text), new
     entities as question-answer lines (the facts to learn), held-out prose about the old entities (for each
     entity a template its own pretraining text never used; other entities' texts use it); a byte-level BPE
     trained on the world's text; a tiny Qwen2 config.json.
  2. pretrain:  train.py --method full --init random --recipe clean   on the old world    -> base (pretrain/hf)
  3. retrofit:  train.py --method retrofit --recipe clean   on the old world, base frozen   -> memory (shared by
     every SMF finetune)
  4. finetune on the new facts, a learning-rate sweep per method (each SMF run first takes its background reads
     from the retrofit's data, --background-batches single-example batches of the old world):
       smf-clean  --recipe clean                  lazy AdamW: only the chosen rows and their moments change
       smf-sgd    --recipe clean --optimizer sgd  plain SGD on the chosen rows
       smf-paper  --recipe paper                  the paper code's whole stage-2 recipe: dense AdamW (rows chosen
                  earlier keep moving on their moments), rows chosen per micro-batch, pad reads counted, the sum
                  of micro-batch means, a warmup whose first step has lr 0, the memory's maths in bf16
       lora, full --recipe clean                  fp32 on the CPU, to compare the methods themselves; the paper
                  recipe's pure-bf16 full finetuning and merged LoRA evaluation belong to GPU runs
     Pretraining and the retrofit are pinned to --recipe clean (fp32), so every SMF variant starts from the same
     base and memory. Finetunes take 2 micro-batches per step, so that smf-paper's per-micro-batch selection and
     sum of micro-batch means act (under --recipe clean that step is the same as one micro-batch of twice the size).
  5. evaluate the base, the retrofit model and every finetune:
       new-fact acc  (learning)   the true value ranked first among the attribute's 10 values (chance 0.10)
       old-fact acc  (forgetting) the same probe on the pretraining entities
       held-out ppl  (forgetting) token perplexity of unseen prose about the old entities

Rule for the summary: for each method, among its learning rates whose new-fact accuracy reaches --target, the one
with the highest old-fact accuracy (ties: lower held-out perplexity); if none reaches it, the one with the highest
new-fact accuracy, marked "below target". The sweep table lists every run.
Outputs in --out: results.json, results.md (both tables), the runs, and logs/ (each train.py's output).
--quick is a smoke test of the pipeline (a tiny model, a few steps, one lr per method): it is not expected to learn.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import memory  # noqa: E402
from eval import eval_documents_ppl, eval_world_facts, load_model  # noqa: E402
from model import merge_lora, write_json  # noqa: E402

# Everything that differs between the full run and the --quick one (the test's plumbing check).
SCALES = {
    "full": dict(n_old=40, n_new=20, docs=2000, vocab=512, hidden=96, layers=4, heads=4, kv_heads=2, inter=256,
                 pretrain_steps=1000, pretrain_lr=3e-3, pretrain_batch=16,
                 retrofit_steps=200, retrofit_lr=3e-3, background=200,  # background: reads per SMF finetune
                 n_keys=32, mem_heads=2, mem_topk=8, mem_k_dim=64, top_t=64, lora_r=8,
                 ft_epochs=10, ft_batch=4, ft_accum=2,
                 # the memory's output is scaled by alpha (~0.01 after the retrofit): SMF's values need lrs far above
                 # LoRA's or full finetuning's (a first run with adamw 0.01-0.3 and sgd 1-1000 learned nothing)
                 sweeps={"smf-clean": [1.0, 3.0, 10.0, 30.0, 100.0], "smf-sgd": [1e4, 1e5, 1e6, 1e7],
                         "smf-paper": [1.0, 3.0, 10.0, 30.0, 100.0], "lora": [1e-3, 3e-3, 1e-2, 3e-2],
                         "full": [1e-4, 3e-4, 1e-3, 3e-3]}),
    "quick": dict(n_old=16, n_new=6, docs=400, vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, inter=128,
                  pretrain_steps=400, pretrain_lr=5e-3, pretrain_batch=16,
                  retrofit_steps=10, retrofit_lr=3e-3, background=20,
                  n_keys=8, mem_heads=2, mem_topk=4, mem_k_dim=32, top_t=16, lora_r=4,
                  ft_epochs=2, ft_batch=4, ft_accum=2,
                  sweeps={"smf-clean": [1e-2], "smf-sgd": [3.0], "smf-paper": [1e-2], "lora": [3e-3],
                          "full": [3e-4]}),
}
QUICK_NOTE = ("--quick: a SMOKE TEST of the pipeline (a tiny model, a few steps, one lr per method). It checks that "
              "every step runs; it is not expected to learn, and its numbers say nothing about the methods.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default runs/forgetting-seed<seed>[-quick])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke test of the pipeline at a tiny scale (for tests): "
                                                           "not expected to learn")
    p.add_argument("--target", type=float, default=0.9, help="new-fact accuracy each method must reach")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("runs", f"forgetting-seed{args.seed}" + ("-quick" if args.quick else ""))
    return args


# -----------------------------------------------------------------------------
# Step 1: world, tokenizer, config


def write_world(out, scale, seed):
    world = data.synthetic_world(seed, scale["n_old"], scale["n_new"])
    pretrain = data.world_pretrain_texts(world, seed, scale["docs"])
    files = {"pretrain": pretrain, "new_facts": data.world_qa_texts(world["new"]),
             "heldout": data.world_heldout_texts(world)}
    wdir = os.path.join(out, "world")
    os.makedirs(wdir, exist_ok=True)
    paths = {}
    for name, texts in files.items():
        paths[name] = os.path.join(wdir, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    write_json(os.path.join(wdir, "world.json"), world)
    # the tokenizer sees all the world's text (names of new entities included), as a real tokenizer would have
    cfg_dir = os.path.join(out, "base_config")
    n_vocab = data.train_world_tokenizer(pretrain + files["new_facts"] + files["heldout"], cfg_dir, scale["vocab"])
    tok_cfg = json.load(open(os.path.join(cfg_dir, "tokenizer.json")))
    ids = {t["content"]: t["id"] for t in tok_cfg["added_tokens"]}
    write_json(os.path.join(cfg_dir, "config.json"), {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "vocab_size": n_vocab, "hidden_size": scale["hidden"], "intermediate_size": scale["inter"],
        "num_hidden_layers": scale["layers"], "num_attention_heads": scale["heads"],
        "num_key_value_heads": scale["kv_heads"], "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32", "use_sliding_window": False,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]})
    return world, paths, cfg_dir


# -----------------------------------------------------------------------------
# Steps 2-4: train.py runs


def train(out, name, flags):
    """Run `python train.py <flags> --out out/name` (skipped if that run already finished); returns wall seconds."""
    run = os.path.join(out, name)
    cfg = os.path.join(run, "config.json")
    if os.path.exists(cfg) and json.load(open(cfg)).get("finished"):
        return json.load(open(os.path.join(out, "logs", name + ".time")))["seconds"]
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *map(str, flags), "--out", run, "--device", "cpu",
           "--save-every", "100000"]
    # one thread per process: on a small shared CPU, torch's default thread pool oversubscribes the cores and a
    # step can take 10-50 times longer
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.time()
    with open(os.path.join(out, "logs", name + ".log"), "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    seconds = time.time() - t0
    if rc != 0:
        tail = open(os.path.join(out, "logs", name + ".log")).read()[-3000:]
        raise SystemExit(f"train.py failed for {name} (exit {rc}):\n{' '.join(cmd)}\n{tail}")
    write_json(os.path.join(out, "logs", name + ".time"), {"seconds": seconds, "command": " ".join(cmd)})
    return seconds


# the train.py flags that make each finetune what the module docstring says it is
VARIANTS = {"smf-clean": ["--recipe", "clean"], "smf-sgd": ["--recipe", "clean", "--optimizer", "sgd"],
            "smf-paper": ["--recipe", "paper"], "lora": ["--recipe", "clean"], "full": ["--recipe", "clean"]}


def finetune_flags(method, lr, scale, base, retrofit_dir, task):
    common = [*VARIANTS[method], "--task", f"text:{task}", "--lr", lr, "--epochs", scale["ft_epochs"],
              "--batch-size", scale["ft_batch"], "--grad-accum", scale["ft_accum"], "--warmup", 5, "--max-len", 64,
              "--model", base]
    if method.startswith("smf-"):  # stage 2 takes its background reads from the retrofit's stage-1 data
        return ["--method", "smf", "--memory-from", retrofit_dir, "--background-batches", scale["background"],
                "--top-t", scale["top_t"], *common]
    if method == "lora":
        return ["--method", "lora", "--lora-r", scale["lora_r"], "--lora-alpha", 2 * scale["lora_r"],
                "--lora-dropout", 0.0, *common]
    return ["--method", "full", *common]


# -----------------------------------------------------------------------------
# Step 5: measurements


def hub_weights(model):
    """The base model's own tensors (no memory, no adapters), merged where LoRA adapters are present."""
    if any(k.endswith(".lora_A") for k in model.state_dict()):
        model = merge_lora(model)
    out, seen = {}, set()
    for k, v in model.state_dict().items():  # a tied lm_head is the embedding's storage: counted once
        if ".memory." not in k and "lora_" not in k and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v.detach().clone()
    return out


def measure(run_dir, world, heldout_rows, base_weights=None, ref_memory=None):
    model, tok, _ = load_model(run_dir, dtype=torch.float32, device="cpu")
    r = {"new_acc": eval_world_facts(model, tok, data.world_fact_items(world["new"]))["acc"],
         "old_acc": eval_world_facts(model, tok, data.world_fact_items(world["old"]))["acc"],
         "heldout_ppl": eval_documents_ppl(model, tok, [r["text"] for r in heldout_rows])["ppl"]}
    mems = memory.memory_layers(model)
    if ref_memory is not None and mems:  # SMF: memory value rows that differ from the retrofit's, compared in the
        # run's memory dtype (bf16 under --recipe paper: the retrofit's values rounded, as stage 2 rounds them)
        rows = sum(int((mems[i].values.weight != ref_memory[i].to(mems[i].values.weight.dtype)).any(dim=1).sum())
                   for i in mems)
        total = sum(m.values.weight.shape[0] for m in mems.values())
        r["changed"] = f"{rows} of {total} memory rows"
    elif base_weights is not None:
        now = hub_weights(model)
        changed = sum(int((now[k] != v).sum()) for k, v in base_weights.items())
        total = sum(v.numel() for v in base_weights.values())
        r["changed"] = f"{changed} of {total} weights"
    return r


def trainable_params(run_dir):
    """Parameters the run trained, from its model.safetensors (SMF: the memory values; the retrofit trains all
    memory tensors)."""
    from safetensors import safe_open
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    with safe_open(os.path.join(run_dir, "model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if cfg["method"] != "smf" or k.endswith(".values.weight")]
        return sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                   else torch.Size(f.get_slice(k).get_shape()).numel() for k in keys)


def choose(rows, target):
    """Per method: the chosen sweep row (see the module docstring)."""
    chosen = {}
    for r in rows:
        m = r["method"]
        key = (r["new_acc"] >= target, r["old_acc"] if r["new_acc"] >= target else r["new_acc"], -r["heldout_ppl"])
        if m not in chosen or key > chosen[m][0]:
            chosen[m] = (key, r)
    return [{**r, "note": "" if k[0] else "below target"} for k, r in chosen.values()]


COLUMNS = ["method", "lr", "new_acc", "old_acc", "heldout_ppl", "trainable", "changed", "seconds", "note"]


def markdown(rows):
    fmt = {"lr": lambda v: "-" if v is None else f"{v:g}", "new_acc": "{:.3f}".format, "old_acc": "{:.3f}".format,
           "heldout_ppl": "{:.3f}".format, "seconds": "{:.0f}".format}
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(fmt.get(c, str)(r.get(c, "")) if r.get(c) is not None or c == "lr"
                                             else "" for c in COLUMNS) + " |\n" for r in rows)


def main(argv=None):
    args = parse_args(argv)
    scale = SCALES["quick" if args.quick else "full"]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    if args.quick:
        print(QUICK_NOTE, flush=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # see train()
    torch.manual_seed(args.seed)
    world, paths, cfg_dir = write_world(out, scale, args.seed)
    heldout_rows = [json.loads(line) for line in open(paths["heldout"])]
    seed = ["--seed", args.seed]

    print(f"pretraining a {scale['layers']}-layer, {scale['hidden']}-wide Qwen2 on {len(world['old'])} old entities "
          f"({scale['pretrain_steps']} steps)...", flush=True)
    secs = train(out, "pretrain", ["--method", "full", "--init", "random", "--recipe", "clean", "--model", cfg_dir,
                                   "--task", f"text:{paths['pretrain']}", "--lr", scale["pretrain_lr"], "--max-steps",
                                   scale["pretrain_steps"], "--batch-size", scale["pretrain_batch"],
                                   "--grad-accum", 1, "--warmup", 50, "--max-len", 128, "--weight-decay", 0.0, *seed])
    base = os.path.join(out, "pretrain", "hf")
    table = [{"method": "base", "lr": scale["pretrain_lr"], "seconds": secs, **measure(base, world, heldout_rows)}]
    base_model, _, _ = load_model(base, dtype=torch.float32, device="cpu")
    base_weights = hub_weights(base_model)
    table[0]["trainable"] = sum(p.numel() for p in base_model.parameters())  # tied embeddings once
    print(f"base: old-fact acc {table[0]['old_acc']:.3f} (chance 0.10), new-fact acc {table[0]['new_acc']:.3f}, "
          f"held-out ppl {table[0]['heldout_ppl']:.3f}", flush=True)

    print("retrofitting memory layers on the old world...", flush=True)
    retro = os.path.join(out, "retrofit")
    secs = train(out, "retrofit", ["--method", "retrofit", "--recipe", "clean", "--model", base, "--retrofit-task",
                                   f"text:{paths['pretrain']}", "--lr", scale["retrofit_lr"], "--max-steps",
                                   scale["retrofit_steps"], "--batch-size", scale["pretrain_batch"], "--grad-accum", 1,
                                   "--warmup", 10, "--max-len", 128, "--n-keys", scale["n_keys"], "--mem-heads",
                                   scale["mem_heads"], "--mem-topk", scale["mem_topk"], "--mem-k-dim",
                                   scale["mem_k_dim"], *seed])
    retro_model, _, _ = load_model(retro, dtype=torch.float32, device="cpu")
    ref_memory = {i: m.values.weight.detach().clone() for i, m in memory.memory_layers(retro_model).items()}
    table.append({"method": "retrofit", "lr": scale["retrofit_lr"], "seconds": secs,
                  "trainable": trainable_params(retro), **measure(retro, world, heldout_rows, base_weights)})

    sweep = []
    for method, lrs in scale["sweeps"].items():
        for lr in lrs:
            name = f"{method}-lr{lr:g}"
            secs = train(out, name, finetune_flags(method, lr, scale, base, retro, paths["new_facts"]) + seed)
            r = {"method": method, "lr": lr, "seconds": secs, "trainable": trainable_params(os.path.join(out, name)),
                 **measure(os.path.join(out, name), world, heldout_rows, base_weights,
                           ref_memory if method.startswith("smf") else None)}
            print(f"{name}: new {r['new_acc']:.3f} old {r['old_acc']:.3f} ppl {r['heldout_ppl']:.3f} "
                  f"({secs:.0f} s)", flush=True)
            sweep.append(r)

    summary = table + choose(sweep, args.target)
    wall = time.time() - t_start
    md = (f"{QUICK_NOTE}\n\n" if args.quick else "") + (
          f"seed {args.seed}, {'quick' if args.quick else 'full'} scale, target new-fact acc {args.target}, "
          f"chance 0.10, wall time {wall / 60:.1f} min\n\n"
          f"Chosen setting per method (reaches the target with the highest old-fact acc):\n\n{markdown(summary)}\n"
          f"Every run of the sweep:\n\n{markdown(table + sweep)}")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    write_json(os.path.join(out, "results.json"), {"seed": args.seed, "quick": args.quick, "target": args.target,
                                                   "chance": 0.1, "wall_seconds": wall, "scale": scale,
                                                   "summary": summary, "sweep": table + sweep})
    print("\n" + md)
    return summary


if __name__ == "__main__":
    main()
