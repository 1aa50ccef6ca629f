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
runs/<method>-seed<seed>):

    args.json                every resolved argument, library versions, base model revision, git commit
    config.json              how to rebuild the model: method, base model, memory / LoRA configuration
    model.safetensors        only what the method trained (SMF: the memory layers; LoRA: adapters; full: all)
    log.jsonl                one line per optimizer step (loss, lr, grad norm, tokens, seconds, SMF rows per layer)
    checkpoint.safetensors   everything --resume needs (trained tensors, optimizer, RNG, step) in one file
    background.safetensors   (SMF) read statistics of every memory slot on the stage-1 data, from the start of stage 2
    retrofit/                (SMF) the stage-1 run directory, itself a `--method retrofit` run
    peft/, merged/, hf/      optional exports (LoRA: --export-peft, --export-merged; full: always hf/)

Every file is written atomically (write, then rename). On the CPU a run resumed with --resume ends bit-identical
to one that was never interrupted. Evaluate a run with `python eval.py --model runs/<run>`.
"""

import argparse
import copy
import functools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import memory
from eval import load_model, load_task_rows, run_tasks
from model import (LORA_TARGETS, Qwen2, Qwen2Config, Tokenizer, add_lora, atomic_write, lora_state_dict, merge_lora,
                   resolve_model_dir, save_peft_adapter, write_json)

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
RECIPE_METHODS = {  # the methods each recipe flag acts on; given explicitly for another method, it is an error
    "memory_precision": ("smf", "retrofit"), "oasst1_format": ("smf", "retrofit"), "background_subset": ("smf",),
    "optimizer": ("smf",), "select_per_micro_batch": ("smf",), "count_pad_reads": ("smf",),
    "sum_micro_batch_means": ("smf",), "warmup_from_zero": METHODS, "pure_bf16": ("full",),
    "merge_lora_for_eval": ("lora",),
}
DEFAULT_LR = {"smf": 5e-4, "retrofit": 5e-4, "lora": 2e-4, "full": 5e-5}
DEFAULT_DATA = {"smf": "medmcqa", "lora": "medmcqa", "full": "medmcqa", "retrofit": "oasst1"}


class RunError(Exception):
    """A problem with the user's input or the run; printed as one line, exit status 1."""


class StopRun(Exception):
    """--stop-at-step reached: leave as if interrupted, exit status 0."""


# -----------------------------------------------------------------------------
# Arguments


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show real defaults; flags whose default is None, False or empty say theirs in their help text."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False, []) else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
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
    g.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch")
    g.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    g.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then cosine decay to 0")
    g.add_argument("--warmup-from-zero", action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] lr = peak * s / warmup at step s = 0, 1, ... (Hugging Face's scheduler: the first "
                        "update runs at lr 0; paper); else peak * (s + 1) / warmup (clean)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--max-len", type=int, default=1024, help="tokens per example (longer ones are truncated)")
    g.add_argument("--limit", type=int, default=None,
                   help="a seeded random N of the training examples, as the paper's code draws them (all of them, "
                        "in order, if there are no more than N; default: medmcqa 60000; retrofit --retrofit-limit; "
                        "text: all)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--fsdp", action="store_true",
                   help="full finetuning under torchrun: shard weights, gradients and optimizer state across ranks "
                        "(PyTorch's fully_shard) instead of replicating them (DDP), for models that do not fit one GPU")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="stop after this step's checkpoint, as if interrupted (to test --resume); in --method smf "
                        "it applies to each stage in turn")
    g = p.add_argument_group("SMF: memory layers (stage 1 builds them)")
    g.add_argument("--memory-from", default=None, help="reuse the memory of a finished retrofit (or smf) run")
    g.add_argument("--memory-mode", default="additive", choices=["additive", "replacement"])
    g.add_argument("--memory-layers", default=None, help="comma-separated layer ids (default: L/4, L/2, 3L/4)")
    g.add_argument("--n-keys", type=int, default=128, help="keys per half: n_keys^2 slots per layer")
    g.add_argument("--mem-heads", type=int, default=4)
    g.add_argument("--mem-topk", type=int, default=16, help="slots read per head per token")
    g.add_argument("--mem-k-dim", type=int, default=256)
    g.add_argument("--memory-precision", default=None, choices=["bf16", "fp32"],
                   help="[recipe] the memory's maths: bf16 as the paper's code runs it (memory weights rounded to "
                        "bf16, values read in fp32 while training; the whole memory bf16 at evaluation; paper) or "
                        "fp32 (clean)")
    g.add_argument("--retrofit-task", default="oasst1",
                   help="stage-1 and background data: oasst1 (see --oasst1-format) or text:PATH")
    g.add_argument("--oasst1-format", default=None, choices=["replies", "chat"],
                   help="[recipe] replies: the text alone of English assistant replies ranked 0 or 1 with 50+ "
                        "characters, loss on every token (paper); chat: ChatML conversations, loss on replies (clean)")
    g.add_argument("--retrofit-epochs", type=float, default=2, help="stage-1 epochs inside --method smf")
    g.add_argument("--retrofit-lr", type=float, default=5e-4, help="stage-1 lr inside --method smf")
    g.add_argument("--retrofit-limit", type=int, default=50000, help="stage-1 examples (a seeded random subset)")
    g.add_argument("--retrofit-max-steps", type=int, default=None, help="stage-1 steps inside --method smf")
    g.add_argument("--background-batches", type=int, default=2000,
                   help="single-example batches of the stage-1 data for the background read statistics, computed "
                        "at the start of stage 2")
    g.add_argument("--background-subset", type=int, default=None,
                   help="[recipe] N > 0: the first --background-batches examples of a seeded random N of the "
                        "stage-1 data (all of them, in order, if no more than N; paper: 20000); 0: a seeded shuffle "
                        "of all of it (clean)")
    g = p.add_argument_group("SMF: stage 2 (sparse finetuning)")
    g.add_argument("--top-t", type=int, default=512, help="memory rows updated per layer per step")
    g.add_argument("--rank", default="kl", choices=["counts", "tfidf", "kl"], help="how rows are ranked")
    g.add_argument("--optimizer", default=None, choices=list(memory.SparseMemoryOptimizer.MODES),
                   help="[recipe] dense_adamw: AdamW over the whole value table with the other rows' gradients "
                        "zeroed, so earlier rows keep moving on their moments (paper); adamw: lazy AdamW, only the "
                        "chosen rows and their state change (clean); sgd: plain SGD (Lin et al.)")
    g.add_argument("--select-per-micro-batch", action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] re-select rows on every micro-batch, so more than top-t rows may change per step "
                        "(paper); else one selection per optimizer step from all its reads (clean)")
    g.add_argument("--count-pad-reads", action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] padding positions count as reads, computed as Hugging Face's Qwen2 computes them "
                        "(paper); else real tokens only (clean)")
    g.add_argument("--sum-micro-batch-means", action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] each micro-batch's loss is its own token mean and the step's gradient their sum, "
                        "as Hugging Face's Trainer makes of the paper's compute_loss (paper); else the token mean "
                        "over the whole step (clean)")
    g.add_argument("--train-alpha", action="store_true", help="also train the memory scale alpha (additive)")
    g.add_argument("--log-rows", action="store_true", help="also log the ids of the rows chosen at every step")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-targets", default=",".join(LORA_TARGETS))
    g.add_argument("--export-peft", action="store_true", help="also write the adapter in peft's format to peft/")
    g.add_argument("--export-merged", action="store_true", help="also write the merged model (Hub format) to merged/")
    g.add_argument("--merge-lora-for-eval", action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] eval.py merges the adapters into the base weights in the evaluation dtype (bf16 "
                        "on GPU) before evaluating (paper); else evaluates them unmerged (clean)")
    g = p.add_argument_group("full finetuning")
    g.add_argument("--pure-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] weights, gradients and AdamW state in bf16, no fp32 master copy (paper); else "
                        "fp32 weights with bf16 autocast on GPU (clean)")
    g = p.add_argument_group("evaluation during training")
    g.add_argument("--eval-every", type=int, default=0, help="run eval.py's probes every N steps (0: never)")
    g.add_argument("--eval-tasks", default="medmcqa,wikitext,triviaqa")
    g.add_argument("--eval-limit", type=int, default=200, help="examples per probe")
    g.add_argument("--eval-data", action="append", default=[], metavar="NAME=PATH",
                   help="local file for a probe (medmcqa, wikitext, triviaqa), as in eval.py; repeatable")
    args = p.parse_args(argv)
    for name, value in RECIPES[args.recipe].items():  # the recipe fills every flag left unset
        if getattr(args, name) is None:
            setattr(args, name, value)
        elif args.method not in RECIPE_METHODS[name]:
            p.error(f"--{name.replace('_', '-')} does not apply to --method {args.method}")

    args.data = dict(parse_data_flag(p, d, ("medmcqa", "oasst1")) for d in args.data)
    args.eval_data = dict(parse_data_flag(p, d, ("medmcqa", "wikitext", "triviaqa")) for d in args.eval_data)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.method]
    if args.epochs is None:
        args.epochs = args.retrofit_epochs if args.method == "retrofit" else 3
    if args.method == "retrofit" and args.limit is None:
        args.limit = args.retrofit_limit
    if args.method != "retrofit" and args.task == "medmcqa" and args.limit is None:
        args.limit = 60000  # the paper: a seeded random 60k of the single-answer MedMCQA train questions
    if args.out is None:
        args.out = os.path.join("runs", f"{args.method}-seed{args.seed}")
    if args.memory_layers is not None:
        try:
            args.memory_layers = [int(x) for x in args.memory_layers.split(",")]
        except ValueError:
            p.error(f"--memory-layers must be comma-separated integers, got {args.memory_layers!r}")
    args.lora_targets = [t for t in args.lora_targets.split(",") if t]
    if bad := [t for t in args.lora_targets if t not in LORA_TARGETS]:
        p.error(f"--lora-targets: unknown module {bad[0]!r} (choose from {','.join(LORA_TARGETS)})")
    if args.background_subset < 0:
        p.error("--background-subset must be 0 or more")
    for name in ("batch_size", "grad_accum", "top_t", "max_len", "save_every", "lora_r", "n_keys", "mem_heads",
                 "mem_topk", "background_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be at least 1")
    for flag in ("task", "retrofit_task"):
        value = getattr(args, flag)
        if value.startswith("text:"):
            if not os.path.exists(value[5:]):
                p.error(f"--{flag.replace('_', '-')}: file not found: {value[5:]}")
        elif value not in ({"task": "medmcqa", "retrofit_task": "oasst1"}[flag],):
            p.error(f"--{flag.replace('_', '-')}: unknown task {value!r} (expected "
                    f"{'medmcqa' if flag == 'task' else 'oasst1'} or text:PATH)")
    if args.fsdp and args.method != "full":
        p.error("--fsdp only applies to --method full")
    if args.fsdp and args.eval_every:
        p.error("--eval-every is not supported with --fsdp (evaluate the run afterwards with eval.py)")
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        p.error("--fsdp needs torchrun with 2 or more processes (torchrun --nproc_per_node=N train.py ...)")
    if args.init == "random" and args.method != "full":
        p.error("--init random only applies to --method full (pretraining from scratch)")
    if args.memory_from and args.method != "smf":
        p.error("--memory-from only applies to --method smf")
    if (args.export_peft or args.export_merged) and args.method != "lora":
        p.error("--export-peft and --export-merged only apply to --method lora")
    if args.train_alpha and args.memory_mode == "replacement":
        p.error("--train-alpha needs --memory-mode additive (replacement memory has no alpha)")
    return args


# flags that may differ between a run and its resumption; every other flag must be the same
RESUME_FREE = {"resume", "stop_at_step", "device", "eval_every", "eval_tasks", "eval_limit", "save_every"}


def check_resume_args(args, args_path):
    if not os.path.exists(args_path):
        raise RunError(f"--resume: no run to resume in {args.out} (no args.json)")
    with open(args_path) as f:
        saved = json.load(f)
    for k, v in vars(args).items():
        if k not in RESUME_FREE and k in saved and json.loads(json.dumps(v)) != saved[k]:
            raise RunError(f"--resume: --{k.replace('_', '-')} is {v!r} but the run was started with {saved[k]!r}")


def parse_data_flag(p, flag, names):
    name, sep, path = flag.partition("=")
    if not sep or not path:
        p.error(f"--data expects NAME=PATH, got {flag!r}")
    if name not in names:
        p.error(f"--data: unknown dataset {name!r} here (choose from {', '.join(names)})")
    if not os.path.exists(path):
        p.error(f"--data {name}: file not found: {path}")
    return name, path


# -----------------------------------------------------------------------------
# Device, data, records


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


@dataclass
class DataParallel:
    """Where this process stands under torchrun: rank r of world processes, each with its own data shard.
    With one process (plain `python train.py`) every method below is a no-op."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:  # rank 0 alone logs, shows progress and writes files
        return self.rank == 0

    def sum_(self, t):
        """All-reduce (sum) a tensor in place across ranks."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def setup_data_parallel(args):
    """Join the process group torchrun set up (WORLD_SIZE > 1): NCCL with one GPU per process, else gloo on CPU."""
    device = resolve_device(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DataParallel(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DataParallel(dist.get_rank(), world), device


def training_examples(task, args, tok, limit, path=None, oasst1_format=None):
    """Tokenized examples [(ids, loss_mask)] of a seeded random `limit` of the task's examples (data.seeded_subset,
    as the paper's code draws its subsets): MedMCQA text, plain text or OASST1 replies (loss on every token), or
    OASST1 chats (loss on the assistant replies). Examples with no token to predict are dropped, as the paper's
    code drops sequences of one token. path, oasst1_format: default --data and --oasst1-format."""
    path = path or args.data.get(task)
    oasst1_format = oasst1_format or args.oasst1_format
    if task.startswith("text:"):
        items = [r["text"] for r in data.load_rows("wikitext", path=task[5:])]
    else:
        rows = data.load_rows(task, path=path, split="train")
        if task == "medmcqa":
            items = rows
        elif oasst1_format == "replies":
            items = data.oasst1_replies(rows)
        else:
            items = data.oasst1_conversations(rows)
    if limit is not None and len(items) < limit:
        print(f"{task}: only {len(items)} examples available (limit {limit}); using all of them", file=sys.stderr)
    items = [items[i] for i in data.seeded_subset(len(items), limit, args.seed)]
    if task == "medmcqa":
        items = [data.medmcqa_train_text(r) for r in items]
    if task == "oasst1" and oasst1_format == "chat":
        examples = [data.encode_chat(tok, c, args.max_len) for c in items]
    else:
        examples = [data.encode_text(tok, t, args.max_len) for t in items]
    kept = [e for e in examples if any(e[1][1:])]  # e.g. a reply truncated away leaves nothing to learn
    if len(kept) < len(examples):
        print(f"{task}: dropped {len(examples) - len(kept)} of {len(examples)} examples with no token to predict "
              f"within --max-len {args.max_len}", file=sys.stderr)
    return kept


def run_info(args):
    """Library versions, base revision and git commit, for args.json."""
    def git(*cmd):
        try:
            here = os.path.dirname(os.path.abspath(__file__))
            return subprocess.run(["git", *cmd], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return None
    import huggingface_hub, safetensors, tokenizers
    return {"python": platform.python_version(), "torch": torch.__version__, "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__, "huggingface_hub": huggingface_hub.__version__,
            "git_commit": git("rev-parse", "HEAD") or None, "git_dirty": bool(git("status", "--porcelain")),
            "command": " ".join(sys.argv)}


def hub_revision(model_dir):
    """The commit hash of a Hub snapshot directory (.../snapshots/<hash>), None for a plain local directory."""
    parent, name = os.path.split(os.path.normpath(model_dir))
    return name if os.path.basename(parent) == "snapshots" else None


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
    dense: dict                   # name -> Parameter trained by torch.optim.AdamW
    saved: callable               # () -> {name: tensor}: what model.safetensors holds
    config: dict                  # config.json
    smf: dict | None = None       # SMF stage 2: memories, background
    eval_rows: dict | None = None  # {task: rows} for --eval-every
    repetition_penalty: float = 1.0
    fsdp: bool = False            # the model is sharded with fully_shard (full finetuning, --fsdp)


def train(stage: Stage, args, device, tok, dp: DataParallel):
    model, ex = stage.model, stage.examples
    global_batch = args.batch_size * dp.world  # one micro-batch across all ranks; rank r takes its r-th slice
    if len(ex) < global_batch and dp.world > 1:
        raise RunError(f"{len(ex)} training examples are fewer than one micro-batch across ranks ({global_batch})")
    n_micro = max(1, len(ex) // global_batch)  # micro-batches per epoch (an incomplete last one is dropped)
    total = stage.max_steps or max(1, int(stage.epochs * n_micro) // args.grad_accum)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    dense_opt = None
    if stage.dense:
        fused = device.type == "cuda" and not stage.fsdp  # as the paper's Trainer (optim "adamw_torch_fused")
        dense_opt = torch.optim.AdamW(list(stage.dense.values()), lr=stage.lr, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=args.weight_decay, fused=fused or None)
    smf_opt = None
    if stage.smf is not None:
        smf_opt = memory.SparseMemoryOptimizer(stage.smf["memories"], lr=stage.lr, weight_decay=args.weight_decay,
                                               mode=args.optimizer)
    optimizers = [o for o in (dense_opt, smf_opt) if o is not None]

    ckpt_path = os.path.join(stage.out, "checkpoint.safetensors")
    log_path = os.path.join(stage.out, "log.jsonl")
    step = 0
    if os.path.exists(ckpt_path):  # resume: weights, optimizer state and every rank's RNG state
        step = load_checkpoint(ckpt_path, model, stage, dense_opt, smf_opt, device, dp)
    else:  # the training RNG (dropout) of each rank: its own stream, rank 0's as in a single process
        torch.manual_seed(args.seed + 1_000_003 * dp.rank)
        if dp.main:
            truncate_log(log_path, step)
            print(f"resuming {stage.out} at step {step}/{total}", file=sys.stderr)
    if step >= total:
        return
    if dp.main:
        write_json(os.path.join(stage.out, "config.json"), {**stage.config, "finished": False})
    if args.eval_every:
        stage.eval_rows = load_task_rows(args.eval_tasks.split(","), args.eval_limit, args.eval_data)
    # Data parallel: DDP (or FSDP's reduce-scatter) averages the dense gradients across ranks as backward runs.
    # SMF instead sums its read counts across ranks (so every rank selects the same rows) and then only the
    # selected rows' gradients (SparseMemoryOptimizer's reduce hook): DDP would all-reduce whole value tables.
    forward = model
    if dp.world > 1 and stage.smf is None and not stage.fsdp:
        forward = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    averaged = dp.world > 1 and stage.smf is None  # gradients arrive averaged over ranks: scale the loss up
    pad_reads = stage.smf is not None and args.count_pad_reads  # pads run as in HF's Qwen2: their reads count
    sum_of_means = stage.smf is not None and args.sum_micro_batch_means

    @functools.lru_cache(maxsize=2)  # one shuffle per epoch, not one per micro-batch
    def epoch_order(epoch):
        return data.epoch_order(len(ex), args.seed, epoch)

    def micro_batch(m):  # this rank's part of the m-th micro-batch of the endless, epoch-by-epoch shuffled stream
        epoch, i = divmod(m, n_micro)
        order = epoch_order(epoch)
        ids = order[i * global_batch:(i + 1) * global_batch]
        n_loss = sum(sum(ex[j][1][1:]) for j in ids)  # loss tokens across all ranks (predicting token 1..)
        mine = ids[dp.rank * args.batch_size:(dp.rank + 1) * args.batch_size]
        return {k: v.to(device) for k, v in data.collate([ex[j] for j in mine], tok.pad_id).items()}, n_loss

    model.train()
    bar = tqdm(total=total, initial=step, desc=os.path.basename(stage.out.rstrip("/")), dynamic_ncols=True,
               disable=not dp.main)
    while step < total:
        t0 = time.time()
        lr = lr_at(step, total, stage.lr, args.warmup, args.warmup_from_zero)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        batches = [micro_batch(m) for m in range(step * args.grad_accum, (step + 1) * args.grad_accum)]
        n_tokens = sum(n for _, n in batches)  # loss tokens in this optimizer step, all ranks together
        loss_sum, counts, selected = torch.zeros((), device=device), None, None
        for k, (b, n) in enumerate(batches):
            last = k == len(batches) - 1  # gradients cross ranks on the step's last micro-batch only
            if stage.fsdp:
                model.set_requires_gradient_sync(last)
            with forward.no_sync() if isinstance(forward, DDP) and not last else nullcontext():
                with autocast:
                    logits = forward(b["idx"], b["attention_mask"], hf_padding=pad_reads)  # (B, T, vocab) fp32
                # next-token loss, summed here and divided by the step's token count: the gradient of the step's
                # mean token loss, whatever the split into micro-batches and ranks; or divided by this micro-batch's
                # own count (all ranks), making the step's gradient the sum of micro-batch means (paper, stage 2)
                loss_tokens = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                              ignore_index=-100, reduction="sum")
                loss = loss_tokens / max(1, n if sum_of_means else n_tokens)
                if stage.smf is not None:  # SMF: which memory slots this micro-batch read (all ranks)
                    reads = memory.read_counts(model, None if args.count_pad_reads else b["attention_mask"])
                    reads = {i: dp.sum_(c) for i, c in reads.items()}
                    counts = reads if counts is None else {i: counts[i] + reads[i] for i in counts}
                    if args.select_per_micro_batch:  # the paper's code: rows chosen per micro-batch, before backward
                        selected = memory.select_per_micro_batch(stage.smf["memories"], reads,
                                                                 stage.smf["background"], args.rank, args.top_t,
                                                                 selected)
                (loss * dp.world if averaged else loss).backward()
            loss_sum += loss_tokens.detach()
        loss_sum = dp.sum_(loss_sum).item() / max(1, n_tokens)  # the step's mean token loss, whatever the recipe
        if not math.isfinite(loss_sum):
            raise RunError(f"loss is {loss_sum} at step {step + 1} in {stage.out}; stopping before the update. The "
                           f"last good checkpoint is kept: lower --lr or check the data, then --resume")
        record = {"step": step + 1, "loss": loss_sum, "lr": lr, "tokens": n_tokens}
        if stage.smf is not None:
            alpha = list(stage.dense.values())  # alpha under --train-alpha (outside DDP): summed across ranks here
            for p in alpha:
                dp.sum_(p.grad)
            if not args.select_per_micro_batch:  # SMF: one choice of rows per optimizer step, from all its reads
                selected = memory.select_rows(counts, stage.smf["background"], args.rank, args.top_t)
            check_same_rows(selected, dp)
            # values and alpha are clipped together, as one clip_grad_norm_ over every trained parameter
            stats = smf_opt.step(selected, max_grad_norm=args.grad_clip or None, reduce=dp.sum_, also=alpha)
            record["grad_norm"] = stats["grad_norm"]
            record["rows"] = {str(k): v for k, v in stats["rows"].items()}
            if args.log_rows:
                record["selected"] = {str(k): v.tolist() for k, v in selected.items()}
                if dp.world > 1:  # evidence that every rank chose the same rows
                    append_log(os.path.join(stage.out, f"selected.rank{dp.rank}.jsonl"),
                               {"step": step + 1, **record["selected"]})
        elif dense_opt is not None:
            params = list(stage.dense.values())
            norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip else float("inf"))
            if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
                norm = norm.full_tensor()
            record["grad_norm"] = float(norm)
        if dense_opt is not None:
            dense_opt.step()
        for opt in optimizers:
            opt.zero_grad()
        step += 1
        record["seconds"] = round(time.time() - t0, 4)
        if dp.main:
            append_log(log_path, record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{n_tokens / max(1e-9, record['seconds']):.0f}")
        if args.eval_every and step % args.eval_every == 0:
            if dp.main:
                model.eval()
                results = run_tasks(model, tok, stage.eval_rows, repetition_penalty=stage.repetition_penalty)
                append_log(os.path.join(stage.out, "eval.jsonl"), {"step": step, **results})
                model.train()
            dp.barrier()
        if step % args.save_every == 0 or step == total or step == args.stop_at_step:
            save_checkpoint(ckpt_path, step, model, stage, dense_opt, smf_opt, dp)
        if step == args.stop_at_step and step < total:
            bar.close()
            if dp.main:
                print(f"stopped at step {step} as asked (--stop-at-step); continue with --resume", file=sys.stderr)
            raise StopRun()
    bar.close()


# -----------------------------------------------------------------------------
# Checkpoints: one safetensors file (trained tensors, optimizer state, RNG) plus model.safetensors


def check_same_rows(selected, dp):
    """Every rank must choose the same rows (their read counts are summed first); a cheap fingerprint proves it."""
    if dp.world == 1:
        return
    fp = torch.stack([torch.stack([r.numel() * torch.ones((), dtype=torch.long, device=r.device),
                                   (r.sort().values * torch.arange(1, r.numel() + 1, device=r.device)).sum()])
                      for r in selected.values()]).flatten()
    seen = [torch.zeros_like(fp) for _ in range(dp.world)]
    dist.all_gather(seen, fp)
    if any(not torch.equal(seen[0], s) for s in seen):
        raise RunError("data-parallel ranks selected different memory rows (their read counts disagree)")


def rng_states(dp, device):
    """Every rank's CPU (and CUDA) RNG state, gathered so that rank 0 can write them all."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    if dp.world == 1:
        return {f"rng.{k}.0": v for k, v in states.items()}
    out = {}
    for k, v in states.items():
        v = v.to(device)
        seen = [torch.zeros_like(v) for _ in range(dp.world)]
        dist.all_gather(seen, v)
        out.update({f"rng.{k}.{r}": s.cpu() for r, s in enumerate(seen)})
    return out


def dense_optimizer_state(model, opt, stage):
    """AdamW's state as {"adamw.<parameter name>.<step|exp_avg|exp_avg_sq>": full tensor} (a collective under
    FSDP, where rank 0 alone receives it)."""
    if stage.fsdp:
        state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True)).get("state", {})
    else:
        names = list(stage.dense)
        state = {names[i]: s for i, s in opt.state_dict()["state"].items()}
    return {f"adamw.{name}.{k}": torch.as_tensor(v).detach().cpu().contiguous()
            for name, s in state.items() for k, v in s.items()}


def load_dense_optimizer_state(model, opt, stage, tensors, device):
    state = {}
    for key, v in tensors.items():
        if key.startswith("adamw."):
            name, k = key[len("adamw."):].rsplit(".", 1)
            state.setdefault(name, {})[k] = v if (k == "step" or stage.fsdp) else v.to(device)
    if stage.fsdp:  # rank 0 holds the full moments (on CPU) and broadcasts them; every rank keeps its shards
        sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
        sd["state"] = state
        set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=True))
        return
    index = {name: i for i, name in enumerate(stage.dense)}
    sd = opt.state_dict()
    sd["state"] = {index[name]: s for name, s in state.items()}
    opt.load_state_dict(sd)


def save_checkpoint(path, step, model, stage, dense_opt, smf_opt, dp):
    device = next(model.parameters()).device
    rng = rng_states(dp, device)  # collectives first: every rank takes part
    trained = stage.saved()
    dense = dense_optimizer_state(model, dense_opt, stage) if dense_opt is not None else {}
    if not dp.main:
        dp.barrier()
        return
    trained = {k: v.detach().contiguous().cpu() for k, v in trained.items()}
    tensors = {f"model.{k}": v for k, v in trained.items()}
    tensors.update(dense)
    if smf_opt is not None:
        for k, v in smf_opt.state_dict().items():
            tensors[f"smf_opt.{k}"] = v.detach().cpu().contiguous()
    tensors.update(rng)
    meta = {"step": str(step), "world_size": str(dp.world)}
    atomic_write(os.path.join(stage.out, "model.safetensors"), lambda p: save_file(trained, p))
    atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))
    dp.barrier()


def load_checkpoint(path, model, stage, dense_opt, smf_opt, device, dp):
    try:
        with safe_open(path, "pt") as f:
            step, world = int(f.metadata()["step"]), int(f.metadata()["world_size"])
            # under FSDP only rank 0 reads the weights and AdamW moments; the others receive their shards from it
            tensors = {k: f.get_tensor(k) for k in f.keys()
                       if dp.main or not stage.fsdp or not k.startswith(("model.", "adamw."))}
    except Exception as e:
        raise RunError(f"checkpoint {path} is unreadable: {e}") from e
    if world != dp.world:
        raise RunError(f"checkpoint {path} was written by {world} process(es); resume it with the same number "
                       f"(now {dp.world})")
    trained = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    own = model.state_dict()
    problem = None
    if bad := sorted(set(trained) - set(own)):
        problem = f"checkpoint {path}: tensor {bad[0]} does not belong to this model (different flags?)"
    for k, v in trained.items():
        if problem is None and own[k].shape != v.shape:
            problem = f"checkpoint {path}: tensor {k} has shape {tuple(v.shape)}, model has {tuple(own[k].shape)}"
    if int(dp.sum_(torch.tensor(int(problem is not None), device=device))):  # every rank stops, none waits
        raise RunError(problem or f"checkpoint {path} does not match the model (rank 0 says why)")
    if stage.fsdp:  # rank 0 broadcasts the full tensors; every rank keeps its shards
        set_model_state_dict(model, trained, options=StateDictOptions(full_state_dict=True, strict=False,
                                                                      broadcast_from_rank0=True))
    else:
        with torch.no_grad():
            for k, v in trained.items():
                own[k].copy_(v)
    if dense_opt is not None:
        load_dense_optimizer_state(model, dense_opt, stage, tensors, device)
    if smf_opt is not None:
        smf_opt.load_state_dict({k[len("smf_opt."):]: v.to(device) for k, v in tensors.items()
                                 if k.startswith("smf_opt.")})
    torch.set_rng_state(tensors[f"rng.cpu.{dp.rank}"])
    if device.type == "cuda" and f"rng.cuda.{dp.rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda.{dp.rank}"], device)
    return step


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path, step):
    """Keep the log lines up to the checkpoint's step, so a resumed run's log reads as one run."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, lambda p: open(p, "w").writelines(lines))


def is_finished(run_dir):
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return json.load(f).get("finished", False)
    except (OSError, ValueError):
        return False


def finish(stage, dp):
    """Mark a stage finished: eval.py and --memory-from accept only finished runs."""
    stage.config["finished"] = True
    if dp.main:
        write_json(os.path.join(stage.out, "config.json"), stage.config)
    dp.barrier()


# -----------------------------------------------------------------------------
# The methods


def run_config(args, method, model, **extra):
    """config.json: how eval.py rebuilds the model, and the recipe with every value it resolved to."""
    recipe = {"name": args.recipe, **{k: getattr(args, k) for k in RECIPES[args.recipe]}}
    return {"method": method, "base_model": args.model, "base_revision": args.base_revision,
            "base_config": model.config.to_dict(), "memory": None, "lora": None, "recipe": recipe, **extra}


def memory_config_from_args(args):
    return memory.MemoryConfig(layers=args.memory_layers, n_keys=args.n_keys, heads=args.mem_heads,
                               topk=args.mem_topk, k_dim=args.mem_k_dim, mode=args.memory_mode,
                               precision=args.memory_precision)


def retrofit(args, out, device, tok, dp):
    """Stage 1: add fresh memory layers and train all their parameters densely on OASST1, base frozen."""
    if dp.main:
        os.makedirs(out, exist_ok=True)
    dp.barrier()
    model, _, info = load_model(args.model, dtype=frozen_dtype(device), device=device)
    torch.manual_seed(args.seed)
    mem_cfg = memory_config_from_args(args).resolve(model.config.num_hidden_layers, model.config.hidden_size)
    memories = memory.add_memory(model, mem_cfg)
    if mem_cfg.precision == "bf16":  # the paper's code builds the memory inside its bf16 model
        memory.round_to_bf16_(memories)
    model.requires_grad_(False)
    dense = {}
    for i, mem in memories.items():
        for name, p in mem.named_parameters():
            p.requires_grad_(True)
            dense[f"model.layers.{i}.memory.{name}"] = p
    alone = args.method == "retrofit"  # stage 1 on its own takes the shared flags, inside smf the --retrofit-* ones
    examples = training_examples(args.retrofit_task, args, tok, args.limit if alone else args.retrofit_limit)
    stage = Stage(out=out, model=model, examples=examples,
                  lr=args.lr if alone else args.retrofit_lr,
                  epochs=args.epochs if alone else args.retrofit_epochs,
                  max_steps=args.max_steps if alone else args.retrofit_max_steps,
                  dense=dense, saved=lambda: memory.memory_state_dict(model),
                  config=run_config(args, "retrofit", model, memory=mem_cfg.to_dict(), stage1_data=stage1_data(args)),
                  repetition_penalty=info["repetition_penalty"])
    train(stage, args, device, tok, dp)
    finish(stage, dp)
    return model


def stage1_data(args):
    """What stage 1 trained on (recorded in the retrofit's config.json; stage 2 takes its background reads from it)."""
    task = args.retrofit_task
    if task.startswith("text:"):
        task = "text:" + os.path.abspath(task[5:])
    return {"task": task, "path": os.path.abspath(args.data[task]) if task in args.data else None,
            "oasst1_format": args.oasst1_format}


@torch.inference_mode()
def background_statistics(model, tok, args, device, dp, stage1):
    """Read counts and document frequency of every memory slot over --background-batches single-example batches
    of the stage-1 data (stage1_data()): the first ones of a seeded random --background-subset of it (the paper's),
    or a seeded shuffle of all of it (--background-subset 0)."""
    examples = training_examples(stage1["task"], args, tok, args.background_subset or None, stage1["path"],
                                 stage1["oasst1_format"])
    if args.background_subset:
        picked = examples[:args.background_batches]
    else:
        picked = [examples[j] for j in data.epoch_order(len(examples), args.seed, epoch=10**6)]
        picked = picked[:args.background_batches]
    stats = memory.BackgroundStats()
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    for ids, _ in tqdm(picked[dp.rank::dp.world], desc="background reads", dynamic_ncols=True, disable=not dp.main):
        with autocast:
            model(torch.tensor([ids], device=device))  # (1, T)
        stats.update(memory.read_counts(model))
    if dp.world > 1:  # each rank read its share of the batches: sum them
        for table in (stats.counts, stats.doc_freq):
            for i, c in table.items():
                c.copy_(dp.sum_(c.to(device)).cpu())
        stats.n_batches = int(dp.sum_(torch.tensor(stats.n_batches, device=device)))
    model.train()
    return stats


def frozen_dtype(device):
    """Frozen base weights: bf16 on GPU (autocast computes in bf16 anyway), fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def sparse_finetune(args, device, tok, memory_dir, dp):
    """Stage 2: only the memory values train, and on each step only the top-t rows per layer that the batch
    read most (ranked against background reads, taken from the stage-1 data at the start of this stage) change."""
    if not is_finished(memory_dir):
        raise RunError(f"--memory-from {memory_dir}: not a finished retrofit or smf run (no finished config.json)")
    with open(os.path.join(memory_dir, "config.json")) as f:
        mem_run = json.load(f)
    if mem_run.get("memory") is None:
        raise RunError(f"--memory-from {memory_dir}: the run has no memory layers (method {mem_run.get('method')})")
    model, _, info = load_model(args.model, dtype=frozen_dtype(device), device=device)
    base_config = model.config.to_dict()
    if mem_run.get("base_config") != base_config:
        diff = sorted(k for k in base_config if base_config[k] != mem_run.get("base_config", {}).get(k))
        raise RunError(f"--memory-from {memory_dir}: its base model differs from --model {args.model} ({', '.join(diff) or 'config'})")
    mem_cfg = memory.MemoryConfig.from_dict({**mem_run["memory"], "precision": args.memory_precision})
    memories = memory.add_memory(model, mem_cfg)
    weights = os.path.join(memory_dir, "model.safetensors")
    try:
        memory.load_memory_state_dict(model, load_file(weights))
    except Exception as e:  # unreadable file, missing or misshapen tensor (named)
        raise RunError(f"--memory-from {memory_dir}: {weights}: {e}") from e
    if mem_cfg.precision == "bf16":  # the paper's code loads the memory into its bf16 model, then trains fp32 copies
        memory.round_to_bf16_(memories)
    background_path = os.path.join(args.out, "background.safetensors")
    if os.path.exists(background_path):  # a resumed run keeps the statistics it started with
        background = memory.BackgroundStats.load(background_path)
    else:
        stage1 = mem_run.get("stage1_data") or stage1_data(args)  # a run of an older version: from the flags
        background = background_statistics(model, tok, args, device, dp, stage1)
        if dp.main:
            atomic_write(background_path, background.save)
    model.requires_grad_(False)
    dense = {}
    for i, mem in memories.items():
        mem.values.weight.requires_grad_(True)
        mem.sparse_grad = True  # the values gradient holds only the rows read
        if args.train_alpha:
            mem.alpha.requires_grad_(True)
            dense[f"model.layers.{i}.memory.alpha"] = mem.alpha
    config = run_config(args, "smf", model, memory=mem_cfg.to_dict(), memory_from=os.path.abspath(memory_dir))
    stage = Stage(out=args.out, model=model, examples=training_examples(args.task, args, tok, args.limit),
                  lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, dense=dense,
                  saved=lambda: memory.memory_state_dict(model), config=config,
                  smf={"memories": memories, "background": background},
                  repetition_penalty=info["repetition_penalty"])
    train(stage, args, device, tok, dp)
    finish(stage, dp)
    return model


def finetune_baseline(args, device, tok, dp):
    """LoRA (adapters only) or full finetuning (every weight) on MedMCQA with AdamW."""
    if args.init == "random":  # pretraining from scratch: --model only gives config.json and the tokenizer
        torch.manual_seed(args.seed)
        model = Qwen2(Qwen2Config.from_json(os.path.join(resolve_model_dir(args.model), "config.json")))
        model = model.init_weights().to(device, torch.bfloat16 if args.pure_bf16 else torch.float32)
        info = {"repetition_penalty": 1.0}
    else:  # full: fp32 master weights, or bf16 alone (--pure-bf16, the paper's); LoRA: a frozen base
        weights_dtype = (torch.bfloat16 if args.pure_bf16 else torch.float32) if args.method == "full" \
            else frozen_dtype(device)
        model, _, info = load_model(args.model, dtype=weights_dtype, device=device)
    torch.manual_seed(args.seed)
    lora_cfg = None
    if args.method == "lora":
        lora_cfg = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                    "targets": args.lora_targets, "merge_for_eval": args.merge_lora_for_eval}
        model.requires_grad_(False)
        add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_targets)
        dense = {k: p for k, p in model.named_parameters() if k.endswith((".lora_A", ".lora_B"))}
        saved = lambda: lora_state_dict(model)  # noqa: E731
    else:
        hub_names = set(model.hub_state_shapes())  # tied embeddings: no lm_head.weight
        if args.fsdp:  # each block, then the rest (embeddings, norm, head), sharded across the ranks
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if device.type == "cuda" else MixedPrecisionPolicy()
            for block in model.model.layers:
                fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
        dense = dict(model.named_parameters())  # tied embeddings appear once

        def saved():  # every Hub tensor, gathered in full (on rank 0 under FSDP)
            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
                if args.fsdp else model.state_dict()
            return {k: v for k, v in sd.items() if k in hub_names}
    config = run_config(args, args.method, model, lora=lora_cfg)
    stage = Stage(out=args.out, model=model, examples=training_examples(args.task, args, tok, args.limit),
                  lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, dense=dense, saved=saved, config=config,
                  repetition_penalty=info["repetition_penalty"], fsdp=args.fsdp)
    train(stage, args, device, tok, dp)
    model.eval()
    if dp.main and args.method == "full":  # from the saved weights: the same path with or without FSDP
        with torch.device("meta"):
            final = Qwen2(model.config)
        final.load_hub_state_dict(load_file(os.path.join(args.out, "model.safetensors")))
        export_hub_dir(final, args.model, os.path.join(args.out, "hf"))
    if dp.main and args.export_peft:
        save_peft_adapter(model, os.path.join(args.out, "peft"), args.model)
    if dp.main and args.export_merged:
        export_hub_dir(merge_lora(copy.deepcopy(model)), args.model, os.path.join(args.out, "merged"))
    finish(stage, dp)
    return model


def export_hub_dir(model, base, out):
    """A Hub-format model directory (config, weights, tokenizer files) that transformers and model.py load."""
    model.save_pretrained(out)
    src = resolve_model_dir(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(out, name))


# -----------------------------------------------------------------------------


def main(argv=None):
    """Run the pipeline; returns the trained model (for tests and notebooks)."""
    args = parse_args(argv)
    dp, device = setup_data_parallel(args)
    try:
        args.base_revision = hub_revision(resolve_model_dir(args.model))  # fetches a Hub id; a resume must match
        args_path = os.path.join(args.out, "args.json")
        if args.resume:
            check_resume_args(args, args_path)
        elif os.path.exists(args_path):
            raise RunError(f"{args.out} already holds a run: pass --resume to continue it, or choose another --out")
        dp.barrier()  # every rank has checked before rank 0 writes
        if dp.main and not args.resume:
            os.makedirs(args.out, exist_ok=True)
            write_json(args_path, {**vars(args), "device": str(device), "world_size": dp.world, **run_info(args)})
        dp.barrier()
        torch.manual_seed(args.seed)
        tok = Tokenizer.from_pretrained(args.model)
        if args.method == "retrofit":
            model = retrofit(args, args.out, device, tok, dp)
        elif args.method == "smf":
            memory_dir = args.memory_from
            if memory_dir is None:  # stage 1 in a sub-run of its own, skipped if it already finished
                memory_dir = os.path.join(args.out, "retrofit")
                if not is_finished(memory_dir):
                    retrofit(args, memory_dir, device, tok, dp)
            model = sparse_finetune(args, device, tok, memory_dir, dp)
        else:
            model = finetune_baseline(args, device, tok, dp)
    finally:
        if dp.world > 1:
            dist.destroy_process_group()
    if dp.main:
        print(f"done: {args.out}  (evaluate: python eval.py --model {args.out})")
    return model


if __name__ == "__main__":
    try:
        main()
    except StopRun:
        sys.exit(0)
    except (RunError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the last checkpoint is intact; continue with --resume")
