"""
Finetune Qwen2.5 with Sparse Memory Finetuning (SMF), LoRA or full finetuning, as the paper did.

    python train.py --method smf        # stage 1 retrofit (OASST1) -> background reads -> stage 2 SMF (MedMCQA)
    python train.py --method retrofit   # stage 1 alone; reuse it with --method smf --memory-from RUN_DIR
    python train.py --method lora       # r 16, alpha 32, dropout 0.05 on q,k,v,o,gate,up,down, lr 2e-4
    python train.py --method full       # every base weight, lr 5e-5

Defaults reproduce the paper's public code (github.com/prakharg55/SMF-ICML): effective batch 16, 3 epochs on a
seeded 60k of the MedMCQA "single" questions, cosine schedule with 100 warmup steps, grad clip 1.0, max length 1024,
and `--recipe paper`, its exact recipe with its flaws (its lr was tuned with them); `--recipe clean` is our corrected
SMF (RECIPES below lists every difference, each also a flag). The run directory (--out, default
runs/<method>-seed<seed>; its files are listed in checkpoint.py) holds only what the method trained; on the CPU a
run resumed with --resume ends bit-identical to one never interrupted. Evaluate it with `python eval.py --model RUN`.

Read in this order: RECIPES and the arguments, then train() (the SMF step is marked "SMF 1. 2. 3."), then the
methods' stage builders and main().
"""

import argparse
import functools
import gc
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

import data
import memory
from checkpoint import (Checkpoint, Lock, RunError, StepGuard, StopRun, Throughput, after_step, append_log,
                        begin_run, begin_stage, check_out_dir, check_resume, export_lora_or_full, finish_stage,
                        finished_run, hub_revision, inherit_lora, is_finished, lineage, load_trained, memory_run,
                        micro_batch_size, previous_full_run, setup_ranks)
from eval import PROBES, default_tasks, load_model, load_task_rows
from model import (LORA_TARGETS, ArgParser, Qwen2, Qwen2Config, Tokenizer, add_lora, atomic_write, bf16_autocast,
                   default_dtype, lora_state_dict, resolve_model_dir, write_json)

METHODS = ("smf", "retrofit", "lora", "full")

# A recipe is a named bundle of defaults; each entry is also a flag of its own (below) that overrides it.
# "paper" reproduces the paper's public code (github.com/prakharg55/SMF-ICML, smf_rebuild/), flaws included:
# its lr 5e-4 for SMF was tuned with the leaky dense AdamW. "clean" is SMF as the method describes it.
RECIPES = {
    "paper": {"memory_precision": "bf16", "oasst1_format": "replies", "background_subset": 20000,
              "optimizer": "dense_adamw", "select_per_micro_batch": True, "count_pad_reads": True,
              "sum_micro_batch_means": True, "warmup_from_zero": True, "pure_bf16": True, "merge_lora_for_eval": True},
    "clean": {"memory_precision": "fp32", "oasst1_format": "chat", "background_subset": 0,
              "optimizer": "adamw", "select_per_micro_batch": False, "count_pad_reads": False,
              "sum_micro_batch_means": False, "warmup_from_zero": False, "pure_bf16": False,
              "merge_lora_for_eval": False},
}
SMF_ONLY = ("top_t", "rank", "optimizer", "select_per_micro_batch", "count_pad_reads", "sum_micro_batch_means",
            "train_alpha", "log_rows", "background_batches", "background_subset", "background_task", "memory_from")
STAGE1_INSIDE_SMF = ("retrofit_epochs", "retrofit_lr", "retrofit_limit", "retrofit_max_steps")
ONLY_FOR = {  # flags that act on some methods only: given for another method, they are an error, never ignored
    **{d: ("smf", "retrofit") for d in ["oasst1_format", "retrofit_task",
                                        *(dest for _, dest in memory.MemoryConfig.options())]},
    **{d: ("smf",) for d in SMF_ONLY + STAGE1_INSIDE_SMF}, "task": ("smf", "lora", "full"),
    **{d: ("lora",) for d in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "merge_lora_for_eval",
                              "export_peft", "export_merged", "lora_from")},
    "pure_bf16": ("full",), "fsdp": ("full",), "init": ("full",),
}
# every numeric flag: (lowest value, whether the lowest itself is allowed); floats must also be finite
RANGES = {"lr": (0, True), "epochs": (0, False), "max_steps": (1, True), "batch_size": (1, True), "warmup": (0, True),
          "weight_decay": (0, True), "grad_clip": (0, True), "max_len": (2, True), "limit": (1, True),
          "save_every": (1, True), "stop_at_step": (1, True), "seed": (0, True), "retrofit_epochs": (0, False),
          "retrofit_lr": (0, True), "retrofit_limit": (1, True), "retrofit_max_steps": (1, True),
          "background_batches": (1, True), "background_subset": (0, True), "top_t": (1, True), "lora_r": (1, True),
          "lora_alpha": (0, False), "lora_dropout": (0, True), "eval_every": (0, True), "eval_limit": (1, True)}
DEFAULT_LR = {"smf": 5e-4, "retrofit": 5e-4, "lora": 2e-4, "full": 5e-5}


# -----------------------------------------------------------------------------
# Arguments


def parser():
    p = ArgParser(prog="train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, choices=METHODS,
                   help="smf: stage 1 (retrofit) + background reads + stage 2 (sparse finetuning); retrofit: "
                        "stage 1 alone; lora: adapters; full: every weight")
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="base model: Hub id or local directory")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="local file for a dataset (medmcqa, oasst1) in the Hub's column schema; repeatable")
    p.add_argument("--task", default="medmcqa",
                   help="finetuning data: medmcqa (question, options, answer, explanation) or text:PATH (a .jsonl "
                        "of {\"text\": ...} or a plain-text file, one example per line; loss on every token)")
    p.add_argument("--init", default="pretrained", choices=["pretrained", "random"],
                   help="random: build the model from --model's config.json with random weights (full only; "
                        "pretraining a small model from scratch)")
    p.add_argument("--out", default=None, help="run directory (default runs/<method>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order and dropout")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--recipe", default="paper", choices=sorted(RECIPES),
                   help="paper: the paper's code, flaws included (its lr was tuned with them); clean: our corrected "
                        "SMF. Sets the defaults of the flags marked [recipe]; each such flag overrides it")
    g = p.add_argument_group("optimization (shared)")
    g.add_argument("--lr", type=float, default=None, help="default: smf/retrofit 5e-4, lora 2e-4, full 5e-5")
    g.add_argument("--epochs", type=float, default=None, help="epochs over the training data (default: 3; retrofit 2)")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    g.add_argument("--batch-size", type=int, default=16,
                   help="examples per optimizer step, all ranks together (the paper's effective batch)")
    g.add_argument("--micro-batch", type=ArgParser.int_or_auto, default="auto",
                   help="examples per forward on each rank; gradient accumulation makes up the batch. auto: the "
                        "whole batch on the CPU; on a GPU the largest divisor of it that fits (tried on the longest "
                        "example, backing off on out-of-memory); 4 for SMF under --recipe paper, whose row "
                        "selection and loss are per micro-batch of 4")
    g.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then cosine decay to 0")
    g.add_argument("--warmup-from-zero", action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] lr = peak * s / warmup at step s = 0, 1, ..., the first update at lr 0 (Hugging "
                        "Face's; paper); else peak * (s + 1) / warmup (clean)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--max-len", type=int, default=1024, help="tokens per example (longer ones are truncated)")
    g.add_argument("--limit", type=int, default=None,
                   help="a seeded random N of the training examples, as the paper's code draws them (all of them, "
                        "in order, if there are no more than N; default: medmcqa 60000; retrofit --retrofit-limit; "
                        "text: all)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile every block without a memory layer (the SMF lookup stays eager), with batches "
                        "padded to a multiple of 64 tokens so that few shapes recompile (not when padding reads "
                        "count: there the padding is part of the recipe)")
    g.add_argument("--fsdp", action="store_true",
                   help="full finetuning under torchrun: shard weights, gradients and optimizer state across ranks "
                        "(PyTorch's fully_shard) instead of replicating them (DDP), for models that do not fit one GPU")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="stop after this step's checkpoint, as if interrupted (to test --resume); in --method smf "
                        "it applies to each stage in turn")
    add_smf_flags(p)
    add_baseline_flags(p)
    p.show_presets(RECIPES)  # [recipe] flags: the value each recipe gives them
    return p


def add_smf_flags(p):
    g = p.add_argument_group("SMF: memory layers (stage 1 builds them)")
    g.add_argument("--memory-from", default=None, metavar="RUN",
                   help="the memory of a finished retrofit run, or of a finished smf run to continue (a chain: the "
                        "background still from the chain's stage-1 data; the optimizer state starts fresh)")
    for f, _ in memory.MemoryConfig.options():  # one flag per MemoryConfig option; unset: MemoryConfig's default
        kw = {k: v for k, v in f.metadata.items() if k not in ("flag", "help", "per_run")}
        kw.setdefault("type", f.type if f.type in (int, float) else str)
        shown = "" if "(default" in f.metadata["help"] or f.name in ("precision",) else f" (default: {f.default})"
        g.add_argument(f.metadata["flag"], default=None, help=f.metadata["help"] + shown, **kw)
    g.add_argument("--retrofit-task", default="oasst1",
                   help="stage-1 and background data: oasst1 (see --oasst1-format) or text:PATH")
    g.add_argument("--oasst1-format", default=None, choices=["replies", "chat"],
                   help="[recipe] replies: English assistant replies ranked 0-1 with 50+ characters as raw text "
                        "(paper); chat: ChatML conversations, loss on the replies (clean)")
    g.add_argument("--retrofit-epochs", type=float, default=2, help="stage-1 epochs inside --method smf")
    g.add_argument("--retrofit-lr", type=float, default=5e-4, help="stage-1 lr inside --method smf")
    g.add_argument("--retrofit-limit", type=int, default=50000, help="stage-1 examples (a seeded random subset)")
    g.add_argument("--retrofit-max-steps", type=int, default=None, help="stage-1 steps inside --method smf")
    g.add_argument("--background-batches", type=int, default=2000,
                   help="single-example batches of the stage-1 data read for the background, at stage 2's start")
    g.add_argument("--background-subset", type=int, default=None,
                   help="[recipe] N: they are the first of a seeded random N of the stage-1 data (paper: 20000); 0: "
                        "of a seeded shuffle of all of it (clean)")
    g = p.add_argument_group("SMF: stage 2 (sparse finetuning)")
    g.add_argument("--top-t", type=int, default=512, help="memory rows updated per layer per step")
    g.add_argument("--rank", default="kl", choices=sorted(memory.RANKS), help="how rows are ranked (memory.RANKS)")
    g.add_argument("--optimizer", default=None, choices=list(memory.SparseMemoryOptimizer.MODES),
                   help="[recipe] dense_adamw: AdamW over whole value tables, other rows' gradients zeroed, moments "
                        "leak (paper); adamw: lazy, only chosen rows change (clean); sgd: plain SGD (Lin et al.)")
    g.add_argument("--select-per-micro-batch", action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] re-select rows on every micro-batch (paper); else once per step (clean)")
    g.add_argument("--count-pad-reads", action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] padding positions count as reads, run as HF's Qwen2 runs them (paper); else not")
    g.add_argument("--sum-micro-batch-means", action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] the step's loss is the sum of micro-batch means, as HF's Trainer makes of the "
                        "paper's compute_loss (paper); else the token mean over the step (clean)")
    g.add_argument("--background-task", default=None,
                   help="the background reads' data: oasst1 or text:PATH (default: the stage-1 data of the memory)")
    g.add_argument("--train-alpha", action="store_true", help="also train the memory's scale alpha")
    g.add_argument("--log-rows", action="store_true", help="also log the ids of the rows chosen at every step")


def add_baseline_flags(p):
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=16, help="adapter rank r")
    g.add_argument("--lora-alpha", type=float, default=32, help="the adapters' output is scaled by alpha / r")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", default=",".join(LORA_TARGETS), help="the linear layers that get adapters")
    g.add_argument("--lora-from", default=None, metavar="RUN",
                   help="train on the adapters of a finished LoRA run (a chain: its r, alpha, targets; new optimizer)")
    g.add_argument("--export-peft", action="store_true", help="also write the adapter in peft's format to peft/")
    g.add_argument("--export-merged", action="store_true", help="also write the merged model (Hub format) to merged/")
    g.add_argument("--merge-lora-for-eval", action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] eval.py merges the adapters into the base in its dtype (paper); else not (clean)")
    g = p.add_argument_group("full finetuning")
    g.add_argument("--pure-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] weights, gradients, AdamW state in bf16 (paper); else fp32 weights (clean)")
    g = p.add_argument_group("evaluation during training")
    g.add_argument("--eval-every", type=int, default=0, help="run eval.py's probes every N steps (0: never)")
    g.add_argument("--eval-tasks", default=",".join(default_tasks()),
                   help=f"probes of eval.PROBES ({','.join(PROBES)})")
    g.add_argument("--eval-limit", type=int, default=200, help="examples per probe")
    g.add_argument("--eval-data", action="append", default=[], metavar="NAME=PATH",
                   help="local file for a probe, as eval.py --data; repeatable")


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    given = p.given(argv)
    for name in sorted(given & set(ONLY_FOR)):
        if args.method not in ONLY_FOR[name]:
            hint = " (--method retrofit takes the shared flags: --lr, --epochs, --max-steps, --limit)" \
                if name in STAGE1_INSIDE_SMF else f" (only to {', '.join(ONLY_FOR[name])})"
            p.error(f"{p.flag(name)} does not apply to --method {args.method}{hint}")
    if args.memory_from and (skipped := sorted(given & {*STAGE1_INSIDE_SMF, "retrofit_task", "oasst1_format"})):
        p.error(f"{p.flag(skipped[0])} acts on stage 1, which --memory-from skips (its memory is already trained)")
    p.check_ranges(args, RANGES)
    if args.lora_dropout >= 1:
        p.error(f"--lora-dropout must be below 1, got {args.lora_dropout}")
    for name, value in RECIPES[args.recipe].items():  # the recipe fills every flag left unset
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.data = data.parse_data_flags(args.data, ("medmcqa", "oasst1"))
        args.eval_data = data.parse_data_flags(args.eval_data, tuple(PROBES))
    except ValueError as e:
        p.error(str(e))
    if unknown := [t for t in args.eval_tasks.split(",") if t not in PROBES]:
        p.error(f"--eval-tasks: unknown probe {unknown[0]!r} (choose from {','.join(PROBES)})")
    args.lr = DEFAULT_LR[args.method] if args.lr is None else args.lr
    args.epochs = (args.retrofit_epochs if args.method == "retrofit" else 3) if args.epochs is None else args.epochs
    if args.limit is None:  # the paper: a seeded random 60k of the single-answer MedMCQA train questions
        args.limit = args.retrofit_limit if args.method == "retrofit" else 60000 if args.task == "medmcqa" else None
    args.out = os.path.abspath(args.out or os.path.join("runs", f"{args.method}-seed{args.seed}"))
    if args.memory_from:  # paths resolved, so that --resume compares them whatever their spelling
        args.memory_from = os.path.abspath(args.memory_from)
    if os.path.isdir(args.model):
        args.model = os.path.abspath(args.model)
    try:
        memory_config_from_args(args)
    except ValueError as e:
        p.error(str(e))
    args.lora_targets = [t for t in args.lora_targets.split(",") if t]
    if bad := [t for t in args.lora_targets if t not in LORA_TARGETS]:
        p.error(f"--lora-targets: unknown module {bad[0]!r} (choose from {','.join(LORA_TARGETS)})")
    try:
        inherit_lora(args, given)  # --lora-from: the adapters' shape is the previous run's
    except ValueError as e:
        p.error(str(e))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
    if args.micro_batch != "auto" and (args.micro_batch < 1 or (args.batch_size // world) % args.micro_batch):
        p.error(f"--micro-batch {args.micro_batch} must be a positive divisor of the batch per process "
                f"({args.batch_size // world})")
    for name, known in (("task", "medmcqa"), ("retrofit_task", "oasst1"), ("background_task", "oasst1")):
        try:
            if getattr(args, name) is not None:
                setattr(args, name, data.check_task(getattr(args, name), known))
        except ValueError as e:
            p.error(f"{p.flag(name)}: {e}")
    if args.fsdp and args.eval_every:
        p.error("--eval-every is not supported with --fsdp (evaluate the run afterwards with eval.py)")
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        p.error("--fsdp needs torchrun with 2 or more processes (torchrun --nproc_per_node=N train.py ...)")
    return args


# -----------------------------------------------------------------------------
# Data


def task_examples(args, tok):
    """The finetuning examples of --task (--data medmcqa=PATH for a local file), a seeded random --limit of them."""
    examples = data.training_examples(args.task, tok, args.max_len, args.seed, args.limit, args.data.get("medmcqa"))
    return data.at_least_a_batch(examples, args.batch_size, args.task)


def summed_loss(model, b, pad_reads: bool):
    """The summed next-token loss of micro-batch b, computed in chunks (no (B, T, vocab) logits). Batches are
    right-padded: causal attention without a mask gives every real token the same result (model.hidden_states),
    so the mask is passed only when the padding positions' memory reads count (pad_reads)."""
    return model(b["idx"], b["attention_mask"] if pad_reads else None, hf_padding=pad_reads, labels=b["labels"])


def lr_at(step, total, peak, warmup, from_zero=False):
    """Linear warmup to peak over `warmup` steps (from lr 0 at step 0 as Hugging Face's scheduler, if
    from_zero), then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + int(not from_zero)) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------
# One training stage: the loop shared by every method


@dataclass
class Stage:
    out: str                      # run directory
    model: torch.nn.Module
    examples: list                # [(ids, loss_mask)]
    lr: float
    epochs: float
    max_steps: int | None
    adamw_params: dict            # name -> Parameter stepped by torch.optim.AdamW (adapters, weights, memory, alpha)
    trained: callable             # () -> {name: tensor}: what model.safetensors holds
    config: dict                  # config.json
    smf: dict | None = None       # SMF stage 2: {"memories": {layer: memory}, "background": BackgroundStats}
    repetition_penalty: float = 1.0
    fsdp: bool = False            # the model is sharded with fully_shard (full finetuning, --fsdp)


def train(stage: Stage, args, device, tok, ranks):
    model, smf = stage.model, stage.smf
    pad_reads = smf is not None and args.count_pad_reads  # pads run as in HF's Qwen2: their reads count
    if args.compile:
        for block in model.model.layers:
            if block.memory is None:
                block.compile()  # in place: parameter names unchanged
    stage.config["micro_batch"] = micro = micro_batch_size(stage, args, device, tok, ranks,
                                                             functools.partial(summed_loss, pad_reads=pad_reads))
    stream = data.MicroBatches(stage.examples, args.batch_size, micro, args.seed, tok.pad_id, device, ranks.rank,
                               ranks.world, multiple=64 if args.compile and not pad_reads else 1)
    total = stage.max_steps or max(1, int(stage.epochs * stream.per_epoch))
    autocast = bf16_autocast(device)
    adamw, smf_opt = make_optimizers(stage, args, device)
    optimizers = [o for o in (adamw, smf_opt) if o is not None]
    saver = Checkpoint(stage.out, model, stage.trained, stage.adamw_params, adamw, smf_opt, ranks, stage.fsdp)
    step = saver.load(device)  # weights, optimizer state and every rank's RNG state, if there is a checkpoint
    if step == 0:  # the training RNG (dropout) of each rank: its own stream, rank 0's as in a single process
        torch.manual_seed(args.seed + 1_000_003 * ranks.rank)
    begin_stage(stage.out, step, total, ranks)
    if step >= total:
        return
    if ranks.main:
        write_json(os.path.join(stage.out, "config.json"), {**stage.config, "finished": False})
    eval_rows = load_task_rows(args.eval_tasks.split(","), args.eval_limit, args.eval_data) if args.eval_every else None
    # Data parallel: DDP (or FSDP's reduce-scatter) averages the dense gradients across ranks as backward runs.
    # SMF instead sums its read counts across ranks (so every rank selects the same rows) and then only the
    # selected rows' gradients (SparseMemoryOptimizer's reduce hook): DDP would all-reduce whole value tables.
    wrapped = ranks.wrap(model, device, ddp=smf is None and not stage.fsdp)
    averaged = ranks.world > 1 and smf is None  # gradients arrive averaged over ranks: scale the loss up
    sum_of_means = smf is not None and args.sum_micro_batch_means
    guard, meter = StepGuard(stage.out), Throughput(model, device, ranks.world, stream)
    log_path = os.path.join(stage.out, "log.jsonl")
    model.train()
    bar = tqdm(total=total, initial=step, desc=os.path.basename(stage.out), dynamic_ncols=True, disable=not ranks.main)
    while step < total:
        t0 = time.time()
        lr = lr_at(step, total, stage.lr, args.warmup, args.warmup_from_zero)
        for group in (g for opt in optimizers for g in opt.param_groups):
            group["lr"] = lr
        batches = stream.step(step)
        n_tokens = sum(n for _, n in batches)  # loss tokens in this optimizer step, all ranks together
        loss_sum, counts, selected = torch.zeros((), device=device), None, None
        for k, (b, n) in enumerate(batches):
            with ranks.grad_sync(wrapped, model, stage.fsdp, last=k == len(batches) - 1):
                with autocast:
                    loss_tokens = summed_loss(wrapped, b, pad_reads)
                # divided by the step's token count: the gradient of the step's mean token loss, whatever the split
                # into micro-batches and ranks; or by this micro-batch's own count (all ranks), making the step's
                # gradient the sum of micro-batch means (paper, stage 2)
                loss = loss_tokens / max(1, n if sum_of_means else n_tokens)
                if smf is not None:  # SMF 1. reads: which memory slots this micro-batch read (all ranks)
                    reads = memory.read_counts(model, None if pad_reads else b["attention_mask"])
                    reads = {i: ranks.sum_(c) for i, c in reads.items()}
                    counts = reads if counts is None else {i: counts[i] + reads[i] for i in counts}
                    if args.select_per_micro_batch:  # the paper's code: rows chosen per micro-batch, before backward
                        selected = memory.select_per_micro_batch(smf["memories"], reads, smf["background"],
                                                                 args.rank, args.top_t, selected)
                (loss * ranks.world if averaged else loss).backward()
            loss_sum += loss_tokens.detach()
        loss_sum = ranks.sum_(loss_sum)  # the step's mean token loss, whatever the recipe, is loss_sum / n_tokens
        record = {"step": step + 1, "loss": None, "lr": lr, "tokens": n_tokens}  # loss: filled in below
        if smf is not None:
            record["loss"] = loss_mean = loss_sum.item() / max(1, n_tokens)
            alpha = list(stage.adamw_params.values())  # under --train-alpha (outside DDP): summed across ranks here
            for p in alpha:
                ranks.sum_(p.grad)
            if not args.select_per_micro_batch:  # SMF 2. select: the top-t rows per layer from all the step's reads
                selected = memory.select_rows(counts, smf["background"], args.rank, args.top_t)
            ranks.same_rows(selected)
            # SMF 3. masked step: only those rows change (values and alpha clipped together, as one clip_grad_norm_)
            stats = smf_opt.step(selected, max_grad_norm=args.grad_clip or None, reduce=ranks.sum_, also=alpha,
                                 check_norm=functools.partial(guard.check, step + 1, loss_mean), check=False)
            record.update(grad_norm=stats["grad_norm"], rows={str(k): v for k, v in stats["rows"].items()})
            if args.log_rows:
                record["selected"] = {str(k): v.tolist() for k, v in selected.items()}
                if ranks.world > 1:  # evidence that every rank chose the same rows
                    append_log(os.path.join(stage.out, f"selected.rank{ranks.rank}.jsonl"),
                               {"step": step + 1, **record["selected"]})
        else:
            norm = torch.nn.utils.clip_grad_norm_(list(stage.adamw_params.values()), args.grad_clip or math.inf)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
            loss_sum, record["grad_norm"] = torch.stack([loss_sum, norm.float().to(device)]).tolist()  # one sync
            record["loss"] = loss_mean = loss_sum / max(1, n_tokens)
            guard.check(step + 1, loss_mean, record["grad_norm"])
        if adamw is not None:
            adamw.step()
        for opt in optimizers:
            opt.zero_grad()
        step += 1
        if warning := guard.dead(record["loss"], record["grad_norm"], step):
            record["warning"] = warning
        record["seconds"] = round(time.time() - t0, 4)
        shown = meter(record, step - 1)  # tokens/s and (on a GPU) MFU
        if ranks.main:
            append_log(log_path, record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_mean:.4f}", **shown)
        after_step(step, total, stage, args, tok, ranks, saver, eval_rows, bar)
    bar.close()


def make_optimizers(stage, args, device):
    """torch's AdamW for stage.adamw_params (None if empty), and SMF's SparseMemoryOptimizer for the values."""
    adamw = smf_opt = None
    if stage.adamw_params:
        fused = device.type == "cuda" and not stage.fsdp  # as the paper's Trainer (optim "adamw_torch_fused")
        adamw = torch.optim.AdamW(list(stage.adamw_params.values()), lr=stage.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=args.weight_decay, fused=fused or None)
    if stage.smf is not None:
        smf_opt = memory.SparseMemoryOptimizer(stage.smf["memories"], lr=stage.lr, weight_decay=args.weight_decay,
                                               mode=args.optimizer)
    return adamw, smf_opt


# -----------------------------------------------------------------------------
# The methods: each builds its stage


def run_config(args, method, model, **extra):
    """config.json: how eval.py rebuilds the model, and the recipe with every value it resolved to."""
    recipe = {"name": args.recipe, **{k: getattr(args, k) for k in RECIPES[args.recipe]}}
    return {"method": method, "task": args.retrofit_task if method == "retrofit" else args.task, "lineage": [],
            "base_model": args.model, "base_revision": args.base_revision, "base_config": model.config.to_dict(),
            "memory": None, "lora": None, "recipe": recipe, **extra}


def memory_config_from_args(args, base: dict | None = None):
    """The MemoryConfig of the flags given (the others: MemoryConfig's defaults, or `base`'s values)."""
    given = {f.name: getattr(args, d) for f, d in memory.MemoryConfig.options() if getattr(args, d) is not None}
    return memory.MemoryConfig(**{**(base or {}), **given})


def retrofit_stage(args, out, device, tok, ranks) -> Stage:
    """Stage 1: add fresh memory layers and train all their parameters densely on OASST1, base frozen."""
    if ranks.main:
        os.makedirs(out, exist_ok=True)
    ranks.barrier()
    model, _, info = load_model(args.model, dtype=default_dtype(device), device=device)
    torch.manual_seed(args.seed)
    mem_cfg = memory_config_from_args(args).resolve(model.config.num_hidden_layers, model.config.hidden_size)
    memories = memory.add_memory(model, mem_cfg)
    if mem_cfg.precision == "bf16":  # the paper's code builds the memory inside its bf16 model
        memory.round_to_bf16_(memories)
    model.requires_grad_(False)
    adamw_params = {}
    for i, mem in memories.items():
        for name, p in mem.named_parameters():
            p.requires_grad_(True)
            adamw_params[f"model.layers.{i}.memory.{name}"] = p
    alone = args.method == "retrofit"  # stage 1 on its own takes the shared flags, inside smf the --retrofit-* ones
    examples = data.training_examples(args.retrofit_task, tok, args.max_len, args.seed,
                                      args.limit if alone else args.retrofit_limit, args.data.get("oasst1"),
                                      args.oasst1_format)
    data.at_least_a_batch(examples, args.batch_size, args.retrofit_task)
    stage = Stage(out=out, model=model, examples=examples,
                  lr=args.lr if alone else args.retrofit_lr,
                  epochs=args.epochs if alone else args.retrofit_epochs,
                  max_steps=args.max_steps if alone else args.retrofit_max_steps,
                  adamw_params=adamw_params, trained=lambda: memory.memory_state_dict(model),
                  config=run_config(args, "retrofit", model, memory=mem_cfg.to_dict(), stage1_data={  # for stage 2
                      "task": args.retrofit_task, "path": args.data.get("oasst1"),
                      "oasst1_format": args.oasst1_format}),
                  repetition_penalty=info["repetition_penalty"])
    return stage


def background_statistics(model, tok, args, device, ranks, stage1):
    """Read counts and document frequency of every memory slot over --background-batches single-example batches
    of the stage-1 data (the retrofit's config.json "stage1_data"; data.background_examples)."""
    picked = data.background_examples(stage1, tok, args.max_len, args.seed, args.background_subset,
                                      args.background_batches)
    autocast = bf16_autocast(device)
    mine = tqdm(picked[ranks.rank::ranks.world], desc="background reads", dynamic_ncols=True, disable=not ranks.main)
    stats = memory.background_stats(model, (torch.tensor([ids], device=device) for ids, _ in mine), autocast)
    return stats.summed(ranks.sum_, device) if ranks.world > 1 else stats  # each rank read its share


def sparse_stage(args, device, tok, memory_dir, ranks, examples) -> Stage:
    """Stage 2: only the memory values train, and on each step only the top-t rows per layer that the batch
    read most (ranked against background reads, taken from the stage-1 data at the start of this stage) change."""
    model, _, info = load_model(args.model, dtype=default_dtype(device), device=device)
    mem_run = memory_run(memory_dir, model.config.to_dict(), args.model)
    loaded = memory.MemoryConfig.from_dict(mem_run["memory"])
    mem_cfg = memory_config_from_args(args, base=loaded.to_dict())  # the loaded memory, this run's precision
    resolved = mem_cfg.resolve(len(model.model.layers), model.config.hidden_size)
    for f, dest in memory.MemoryConfig.options():  # a flag that contradicts the loaded memory is an error
        if not f.metadata.get("per_run") and getattr(resolved, f.name) != getattr(loaded, f.name):
            raise RunError(f"{f.metadata['flag']} {getattr(args, dest)} contradicts the memory of --memory-from "
                           f"{memory_dir} ({f.name} {getattr(loaded, f.name)}): drop the flag")
    if args.train_alpha and loaded.alpha_init is None:
        raise RunError(f"--train-alpha: the memory of {memory_dir} has no alpha (it was built with --alpha-init none)")
    memories = memory.add_memory(model, mem_cfg)
    load_trained(memory.memory_state_dict(model), memory_dir, "--memory-from")  # a retrofit's, or the chain's
    if mem_cfg.precision == "bf16":  # the paper's code loads the memory into its bf16 model, then trains fp32 copies
        memory.round_to_bf16_(memories)
    background_path = os.path.join(args.out, "background.safetensors")
    if args.resume and os.path.exists(background_path):  # a resumed run keeps the statistics it started with
        background = memory.BackgroundStats.load(background_path)
    else:
        stage1 = mem_run["stage1_data"] if args.background_task is None else {  # carried along a chain
            **mem_run["stage1_data"], "task": args.background_task, "path": args.data.get(args.background_task)}
        background = background_statistics(model, tok, args, device, ranks, stage1)
        if ranks.main:
            atomic_write(background_path, background.save)
    model.requires_grad_(False)
    adamw_params = {}
    for i, mem in memories.items():
        mem.values.weight.requires_grad_(True)
        mem.sparse_grad = True  # the values gradient holds only the rows read
        if args.train_alpha:
            mem.alpha.requires_grad_(True)
            adamw_params[f"model.layers.{i}.memory.alpha"] = mem.alpha
    config = run_config(args, "smf", model, memory=mem_cfg.to_dict(), memory_from=os.path.abspath(memory_dir),
                        stage1_data=mem_run["stage1_data"], lineage=lineage(memory_dir))
    return Stage(out=args.out, model=model, examples=examples, lr=args.lr, epochs=args.epochs,
                 max_steps=args.max_steps, adamw_params=adamw_params,
                 trained=lambda: memory.memory_state_dict(model), config=config,
                 smf={"memories": memories, "background": background.to(device)},
                 repetition_penalty=info["repetition_penalty"])


def lora_or_full_stage(args, device, tok, ranks) -> Stage:
    """LoRA (adapters only) or full finetuning (every weight) on MedMCQA with AdamW."""
    if args.init == "random":  # pretraining from scratch: --model only gives config.json and the tokenizer
        torch.manual_seed(args.seed)
        model = Qwen2(Qwen2Config.from_json(os.path.join(resolve_model_dir(args.model), "config.json")))
        model = model.init_weights().to(device, torch.bfloat16 if args.pure_bf16 else torch.float32)
        info = {"repetition_penalty": 1.0}
    else:  # full: fp32 master weights, or bf16 alone (--pure-bf16, the paper's); LoRA: a frozen base
        weights_dtype = (torch.bfloat16 if args.pure_bf16 else torch.float32) if args.method == "full" \
            else default_dtype(device)
        model, _, info = load_model(args.model, dtype=weights_dtype, device=device)
    torch.manual_seed(args.seed)
    lora_cfg = None
    if args.method == "lora":
        lora_cfg = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                    "targets": args.lora_targets, "merge_for_eval": args.merge_lora_for_eval}
        model.requires_grad_(False)
        add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_targets)
        if args.lora_from:  # a chain: the previous link's adapters, trained on (one base and one adapter set)
            finished_run(args.lora_from, model.config.to_dict(), args.model, "--lora-from", ("lora",))
            load_trained(lora_state_dict(model), args.lora_from, "--lora-from")
        adamw_params = {k: p for k, p in model.named_parameters() if k.endswith((".lora_A", ".lora_B"))}
        trained = lambda: lora_state_dict(model)  # noqa: E731
    else:
        hub_names = set(model.hub_state_shapes())  # tied embeddings: no lm_head.weight
        if args.fsdp:
            ranks.shard(model, device)
        adamw_params = dict(model.named_parameters())  # tied embeddings appear once

        def trained():  # every Hub tensor, gathered in full (on rank 0 under FSDP)
            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
                if args.fsdp else model.state_dict()
            return {k: v for k, v in sd.items() if k in hub_names}
    previous = args.lora_from if args.method == "lora" else previous_full_run(args.model)  # a chain's last link
    config = run_config(args, args.method, model, lora=lora_cfg, lineage=lineage(previous))
    return Stage(out=args.out, model=model, examples=task_examples(args, tok), lr=args.lr, epochs=args.epochs,
                 max_steps=args.max_steps, adamw_params=adamw_params, trained=trained, config=config,
                 repetition_penalty=info["repetition_penalty"], fsdp=args.fsdp)


# -----------------------------------------------------------------------------


def run_stage(stage: Stage, args, device, tok, ranks, then=None, first=True):
    """args.json (once the first stage's model and data have loaded), the loop, `then` (exports), finished."""
    if first:
        begin_run(args, ranks, device)
    train(stage, args, device, tok, ranks)
    if then is not None:
        then()
    finish_stage(stage.out, stage.config, ranks, device)
    return stage.model


def main(argv=None):
    """Run the pipeline; returns the trained model (for tests and notebooks)."""
    args = parse_args(argv)
    ranks, device = setup_ranks(args.device)
    lock = None
    try:
        if ranks.main:
            check_out_dir(args.out, args.resume)
            lock = Lock(args.out)  # held until this process ends
            if args.resume:  # the flags checked before anything is fetched
                check_resume(args)
        ranks.barrier()
        args.base_revision = hub_revision(resolve_model_dir(args.model))  # fetches a Hub id; a resume must match
        torch.manual_seed(args.seed)
        tok = Tokenizer.from_pretrained(args.model)
        if args.method == "retrofit":
            model = run_stage(retrofit_stage(args, args.out, device, tok, ranks), args, device, tok, ranks)
        elif args.method == "smf":
            memory_dir = args.memory_from or os.path.join(args.out, "retrofit")
            stage1 = args.memory_from is None and not is_finished(memory_dir)  # in a sub-run of its own
            examples = task_examples(args, tok)  # stage 2's data checked before stage 1 trains
            if stage1:
                run_stage(retrofit_stage(args, memory_dir, device, tok, ranks), args, device, tok, ranks)
            model = run_stage(sparse_stage(args, device, tok, memory_dir, ranks, examples), args, device, tok, ranks,
                              first=not stage1)
        else:
            stage = lora_or_full_stage(args, device, tok, ranks)
            model = run_stage(stage, args, device, tok, ranks,
                              then=lambda: export_lora_or_full(args, stage.model, ranks))
    finally:
        if ranks.world > 1:
            dist.destroy_process_group()
        if lock is not None:
            lock.release()
    if ranks.main:
        print(f"done: {args.out}  (evaluate: python eval.py --model {args.out})")
    return model


def cli(argv=None):
    """`python train.py`: main() with every user or file-system error as one line and a non-zero exit status."""
    try:
        main(argv)
        return 0
    except StopRun:
        return 0
    except (RunError, OSError, ValueError) as e:  # OSError: a missing file, a full disk, a read-only --out
        return f"error: {e}"
    except KeyboardInterrupt:
        return "interrupted: the last checkpoint is intact; continue with --resume"


if __name__ == "__main__":
    status = cli()  # the exception and the frames it held (the model, under FSDP its device mesh) are gone here:
    gc.collect()    # free them now, not in the interpreter's shutdown, where gloo's threads abort the process
    sys.exit(status)
