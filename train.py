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

Read in this order: RECIPES, then train(), the loop shared by every method, and smf_step, one SMF step: the lines
marked "SMF 1. reads", "SMF 2. select" and "SMF 3. masked step" (memory.py's docstring shows the same step in eleven
lines; dense_step is LoRA's and full finetuning's), then the methods' stage builders, main() and the arguments. Only
parser(), parse_args() and main() see the argparse namespace: main() turns it into the frozen settings below (Run,
Loop, SMFStep), which the functions take.
"""

import argparse
import functools
import gc
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import memory
from checkpoint import (Checkpoint, Lock, append_log, begin_run, begin_stage, check_out_dir,
                        check_resume, check_resume_weights, export_run, finish_stage, finished_run, hub_revision,
                        is_finished, is_run_dir, lineage, load_model, load_trained, lora_from, memory_run,
                        previous_full_run, read_json, weights_fingerprint)
from common import (ArgParser, RunError, StepGuard, StopRun, Throughput, add_flag, bf16_autocast, default_dtype,
                    fits_in_memory, micro_batch_size, setup_ranks)
from data import Tokenizer
from eval import PROBES, check_tasks, default_batch_size, default_tasks, load_task_rows, run_tasks
from model import LORA_TARGETS, Qwen2, Qwen2Config, add_lora, atomic_write, lora_state_dict, resolve_model_dir

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
DEFAULT_LR = {"smf": 5e-4, "retrofit": 5e-4, "lora": 2e-4, "full": 5e-5}
PAPER_MICRO_BATCH = 4  # the paper's per-device batch: its SMF stage 2 selects rows and averages the loss per 4


# -----------------------------------------------------------------------------
# The settings the functions below take, built once from the flags by main() (frozen: nothing changes them)


@dataclass(frozen=True)
class Run:
    """What every stage of a run shares: where it goes, the base model (and its Hub revision: None for a local
    folder), the recipe as config.json records it, and the flags every stage reads."""
    out: str
    base_model: str
    base_revision: str | None
    base_fingerprint: str | None  # checkpoint.weights_fingerprint of the base (None: --init random)
    recipe: dict  # {"name": ..., every recipe flag: its value}
    seed: int
    max_len: int
    batch_size: int
    resume: bool
    data: dict  # {dataset: local file} (--data)


@dataclass(frozen=True)
class Loop:
    """The training loop's settings, the same for every method and stage (the flags of the same names)."""
    batch_size: int
    micro_batch: int | str
    warmup: int
    warmup_from_zero: bool
    weight_decay: float
    grad_clip: float
    save_every: int
    stop_at_step: int | None
    compile: bool
    values_lr_scale: float
    seed: int
    resume: bool
    eval_every: int
    eval_tasks: str
    eval_limit: int
    eval_data: dict


@dataclass(frozen=True)
class SMFStep:
    """SMF stage 2: the memories whose value rows train, the background reads they are ranked against, and how a
    step reads, selects and updates (the flags of the same names)."""
    memories: dict                # {layer: ProductKeyMemory}
    background: memory.BackgroundStats
    top_t: int
    rank: str
    optimizer: str                # SparseMemoryOptimizer mode
    select_per_micro_batch: bool
    count_pad_reads: bool
    sum_micro_batch_means: bool
    log_rows: bool


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
    smf: SMFStep | None = None    # SMF stage 2
    repetition_penalty: float = 1.0
    fsdp: bool = False            # the model is sharded with fully_shard (full finetuning, --fsdp)
    group: int = 1                # consecutive examples that always share a step (--group-size, the task's data)


def settings(cls, flags: dict, **values):
    """cls (Run, Loop, SMFStep) from the flags of its fields' names, and `values` for the others."""
    return cls(**{f.name: flags[f.name] for f in fields(cls) if f.name not in values}, **values)


# -----------------------------------------------------------------------------
# One training stage: the loop shared by every method


def train(stage: Stage, loop: Loop, device, tok, ranks, on_step=None):
    """Train stage.model on stage.examples from its last checkpoint to the end (or --stop-at-step). on_step(step):
    called after each optimizer step, before its checkpoint (bench/bench_train.py times the steps with it)."""
    model, smf = stage.model, stage.smf
    pad_reads = smf is not None and smf.count_pad_reads  # pads run as in HF's Qwen2: their reads count
    for block in (b for b in model.model.layers if loop.compile and b.memory is None):
        block.compile()  # --compile: every block without a memory layer, in place (parameter names unchanged)
    stage.config["micro_batch"] = micro = micro_batch(stage, loop, device, tok, ranks)
    stream = data.MicroBatches(stage.examples, loop.batch_size, micro, loop.seed, tok.pad_id, device, ranks.rank,
                               ranks.world, multiple=64 if loop.compile and not pad_reads else 1, group=stage.group)
    total = stage.max_steps or max(1, int(stage.epochs * stream.per_epoch))
    warn_short_schedule(total, loop.warmup, loop.warmup_from_zero, ranks)
    autocast = bf16_autocast(device)
    guard, meter = StepGuard(stage.out), Throughput(model, device, ranks.world, stream)
    adamw, smf_opt = make_optimizers(stage, loop.weight_decay, loop.values_lr_scale, device, ranks, guard)
    optimizers = [o for o in (adamw, smf_opt) if o is not None]
    saver = Checkpoint(stage.out, model, stage.trained, stage.adamw_params, adamw, smf_opt, ranks, stage.fsdp)
    step = saver.load(device)  # weights, optimizer state and every rank's RNG state, if there is a checkpoint
    if step == 0:  # the training RNG (dropout) of each rank: its own stream, rank 0's as in a single process
        torch.manual_seed(loop.seed + 1_000_003 * ranks.rank)
    if not begin_stage(stage.out, stage.config, step, total, ranks):
        return
    eval_rows = load_task_rows(loop.eval_tasks.split(","), loop.eval_limit, loop.eval_data) if loop.eval_every else None
    # Data parallel: DDP (or FSDP) averages dense gradients across ranks in backward; SMF sums its read counts (so
    # every rank selects the same rows), then only those rows' gradients (DDP would all-reduce whole value tables)
    wrapped = ranks.wrap(model, device, ddp=smf is None and not stage.fsdp)  # DDP or FSDP: dense gradients averaged
    model.train()
    bar = tqdm(total=total, initial=step, desc=os.path.basename(stage.out), dynamic_ncols=True, disable=not ranks.main)
    while step < total:
        t0 = time.time()
        lr = lr_at(step, total, stage.lr, loop.warmup, loop.warmup_from_zero)
        for group in (g for opt in optimizers for g in opt.param_groups):
            group["lr"] = lr * group.get("lr_scale", 1.0)  # lr_scale: the memory values' (--values-lr-scale)
        batches = stream.step(step)  # [(micro-batch, its loss tokens on all ranks)]
        check = functools.partial(guard.check, step + 1)  # a non-finite loss or gradient norm stops the run here
        record = {"step": step + 1, "loss": None, "lr": lr, "tokens": sum(n for _, n in batches)}
        if smf is not None:
            record.update(smf_step(model, batches, smf, smf_opt, loop.grad_clip, autocast, ranks, check))
            selected = record.pop("selected")
            if smf.log_rows:
                log_rows(record, selected, stage.out, step, ranks)
        else:
            record.update(dense_step(wrapped, model, batches, list(stage.adamw_params.values()), loop.grad_clip,
                                     autocast, ranks, stage.fsdp, check))
        if adamw is not None:  # LoRA's adapters, full finetuning's weights, SMF's alpha (--train-alpha)
            adamw.step()
        for opt in optimizers:
            opt.zero_grad()
        step += 1
        if warning := guard.dead(record["loss"], record["grad_norm"], step):
            record["warning"] = warning
        record["seconds"] = round(time.time() - t0, 4)
        shown = meter(record, step - 1)  # tokens/s and (on a GPU) MFU
        if ranks.main:
            append_log(os.path.join(stage.out, "log.jsonl"), record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", **shown)
        if on_step is not None:
            on_step(step)
        if loop.eval_every and step % loop.eval_every == 0:  # evaluation: eval.py's probes, into eval.jsonl
            evaluate(stage, tok, eval_rows, step, ranks)
        if step % loop.save_every == 0 or step == total or step == loop.stop_at_step:  # checkpoint
            saver.save(step)
        if step == loop.stop_at_step and step < total:  # stop as if interrupted (--stop-at-step)
            bar.close()
            raise StopRun(f"stopped at step {step} as asked (--stop-at-step); continue with --resume")
    bar.close()


def smf_step(model, batches: list, smf: SMFStep, optimizer, grad_clip: float, autocast, ranks, check) -> dict:
    """One optimizer step of SMF's stage 2, as memory.py's docstring writes it: each micro-batch's forward, then
    1. reads, 2. select, backward; then 3. the masked step (optimizer: memory.SparseMemoryOptimizer). batches:
    [(micro-batch, its loss tokens on all ranks)]; ranks: every rank reads its share of the batch, and their read
    counts are summed, so that every rank selects the same rows (checked). -> {"loss": the step's mean token loss,
    "grad_norm", "rows": rows changed per layer, "selected": the rows selected per layer}."""
    n_tokens = sum(n for _, n in batches)  # loss tokens in this optimizer step, all ranks together
    loss_sum, counts, selected = 0.0, None, None
    for k, (b, n) in enumerate(batches):
        with autocast:
            loss_tokens = summed_loss(model, b, smf.count_pad_reads)  # each memory keeps the slots it read
        # divided by the step's token count: the gradient of the step's mean token loss; or by this micro-batch's own
        # count (all ranks), making the step's gradient the sum of micro-batch means (the paper's stage 2)
        loss = loss_tokens / max(1, n if smf.sum_micro_batch_means else n_tokens)
        # SMF 1. reads: how often this micro-batch read each memory slot (summed over ranks)
        reads = memory.read_counts(model, None if smf.count_pad_reads else b["attention_mask"])
        reads = {i: ranks.sum_(c) for i, c in reads.items()}
        counts = reads if counts is None else {i: counts[i] + reads[i] for i in counts}
        # SMF 2. select: the top-t rows per layer against the background reads, before the backward
        if smf.select_per_micro_batch:  # paper: this micro-batch's rows; its gradient is masked to them
            selected = memory.select_per_micro_batch(smf.memories, reads, smf.background, smf.rank, smf.top_t,
                                                     selected)
        elif k == len(batches) - 1:  # clean: once per step, from all the step's reads
            selected = memory.select_rows(counts, smf.background, smf.rank, smf.top_t)
        loss.backward()
        loss_sum = loss_sum + loss_tokens.detach()
    loss = ranks.sum_(loss_sum).item() / max(1, n_tokens)
    check(loss)
    ranks.same_rows(selected)
    # SMF 3. masked step: the selected rows' gradients (and alpha's) clipped together, then the update. paper
    # (dense_adamw): AdamW over whole tables, the other rows' gradients zero; clean (adamw): only these rows change
    stats = optimizer.step(selected, max_grad_norm=grad_clip or None)
    return {"loss": loss, "grad_norm": stats["grad_norm"], "rows": {str(k): v for k, v in stats["rows"].items()},
            "selected": selected}


def dense_step(wrapped, model, batches: list, params: list, grad_clip: float, autocast, ranks, fsdp: bool,
               check) -> dict:
    """The gradient of one optimizer step of LoRA or full finetuning (every trained parameter: params), clipped;
    torch's AdamW then steps them. wrapped: the model under DDP (or FSDP: fsdp), which averages the gradients across
    ranks in the backward of a step's last micro-batch. -> {"loss": the step's mean token loss, "grad_norm"}."""
    n_tokens = sum(n for _, n in batches)
    loss_sum = 0.0
    for k, (b, n) in enumerate(batches):
        with ranks.grad_sync(wrapped, model, fsdp, last=k == len(batches) - 1):
            with autocast:
                loss_tokens = summed_loss(wrapped, b, pad_reads=False)
            loss = loss_tokens / max(1, n_tokens)  # the gradient of the step's mean token loss, whatever the split
            (loss * ranks.world if ranks.world > 1 else loss).backward()  # ranks average: scaled up to their sum
        loss_sum = loss_sum + loss_tokens.detach()
    loss_sum = ranks.sum_(loss_sum)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
    loss_sum, grad_norm = torch.stack([loss_sum, norm.float().to(loss_sum.device)]).tolist()  # one host sync
    loss = loss_sum / max(1, n_tokens)
    check(loss, grad_norm)
    return {"loss": loss, "grad_norm": grad_norm}


def summed_loss(model, b, pad_reads: bool):
    """The summed next-token loss of micro-batch b, computed in chunks (no (B, T, vocab) logits). Batches are
    right-padded: causal attention without a mask gives every real token the same result (model.hidden_states),
    so the mask is passed only when the padding positions' memory reads count (pad_reads)."""
    return model(b["idx"], b["attention_mask"] if pad_reads else None, hf_padding=pad_reads, labels=b["labels"])


def warn_short_schedule(total: int, warmup: int, from_zero: bool, ranks):
    """A warning (stderr) when --warmup reaches past the last of `total` steps: the lr never reaches its peak."""
    if warmup >= total and ranks.main:
        top = max(lr_at(s, total, 1.0, warmup, from_zero) for s in range(total))
        print(f"warning: --warmup {warmup} reaches past the last step ({total}): the lr peaks at {top:.0%} of --lr; "
              f"give a --warmup below the step count", file=sys.stderr)


def lr_at(step, total, peak, warmup, from_zero=False):
    """Linear warmup to peak over `warmup` steps (from lr 0 at step 0 as Hugging Face's scheduler, if
    from_zero), then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + int(not from_zero)) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizers(stage, weight_decay, values_lr_scale, device, ranks, guard):
    """torch's AdamW for stage.adamw_params (None if empty; the memory values in a group of their own, its lr scaled
    by values_lr_scale, where that is not 1), and SMF's SparseMemoryOptimizer for the values (its reduction across
    ranks, alpha's joint clipping and the non-finite check configured here, once)."""
    adamw = smf_opt = None
    if stage.adamw_params:
        fused = device.type == "cuda" and not stage.fsdp  # as the paper's Trainer (optim "adamw_torch_fused")
        is_values = {k: k.endswith(".memory.values.weight") and values_lr_scale != 1 for k in stage.adamw_params}
        groups = [{"params": [p for k, p in stage.adamw_params.items() if not is_values[k]]},
                  {"params": [p for k, p in stage.adamw_params.items() if is_values[k]], "lr_scale": values_lr_scale}]
        adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=weight_decay, fused=fused or None)
    if stage.smf is not None:  # alpha (--train-alpha) is outside DDP: summed across ranks and clipped with the rows
        smf_opt = memory.SparseMemoryOptimizer(stage.smf.memories, lr=stage.lr, weight_decay=weight_decay,
                                               mode=stage.smf.optimizer, reduce=ranks.sum_,
                                               also=list(stage.adamw_params.values()),
                                               check_norm=guard.check_grad_norm, check=False)
    return adamw, smf_opt


def micro_batch(stage, loop, device, tok, ranks) -> int:
    """--micro-batch (see its help): as given; as the run started (config.json "micro_batch", so that a resumed
    run continues exactly); the paper's 4 (across the ranks) for its SMF; else common.micro_batch_size."""
    per_rank = loop.batch_size // ranks.world
    config = os.path.join(stage.out, "config.json")
    if loop.micro_batch != "auto":
        return loop.micro_batch
    if loop.resume and os.path.exists(config) and (saved := read_json(config).get("micro_batch")) is not None:
        return saved
    if stage.smf is not None and (stage.smf.select_per_micro_batch or stage.smf.sum_micro_batch_means):
        return paper_micro_batch(loop.batch_size, ranks.world)
    longest = max(stage.examples, key=lambda e: len(e[0]))
    trained = list(stage.adamw_params.values()) + \
        ([mem.values.weight for mem in stage.smf.memories.values()] if stage.smf is not None else [])
    loss = functools.partial(summed_loss, pad_reads=stage.smf is not None and stage.smf.count_pad_reads)

    def fits(n):  # n copies of the longest example, forward and backward
        return fits_in_memory(stage.model, data.collate([longest] * n, tok.pad_id), trained, loss, device)
    return micro_batch_size(per_rank, device, ranks, fits, stage.fsdp, PAPER_MICRO_BATCH)


def evaluate(stage, tok, eval_rows, step, ranks):
    """--eval-every: eval.py's probes on the model being trained, appended to eval.jsonl (rank 0)."""
    if ranks.main:
        stage.model.eval()
        results = run_tasks(stage.model, tok, eval_rows, repetition_penalty=stage.repetition_penalty,
                            batch_size=default_batch_size(stage.model.lm_head.weight.device))
        append_log(os.path.join(stage.out, "eval.jsonl"), {"step": step, **results})
        stage.model.train()
    ranks.barrier()


def log_rows(record, selected, out, step, ranks):
    """--log-rows: the ids of the rows chosen at this step, in the step's log line (and, under several ranks,
    each rank's in selected.rankN.jsonl: evidence that every rank chose the same rows)."""
    record["selected"] = {str(k): v.tolist() for k, v in selected.items()}
    if ranks.world > 1:
        append_log(os.path.join(out, f"selected.rank{ranks.rank}.jsonl"), {"step": step + 1, **record["selected"]})


# -----------------------------------------------------------------------------
# The methods: each builds its stage


def run_config(run: Run, method: str, task: str, model, **extra) -> dict:
    """config.json: how eval.py rebuilds the model, and the recipe with every value it resolved to."""
    return {"method": method, "task": task, "lineage": [], "base_model": run.base_model,
            "base_revision": run.base_revision, "base_fingerprint": run.base_fingerprint,
            "base_config": model.config.to_dict(), "memory": None, "lora": None, "recipe": run.recipe, **extra}


def memory_flags(flags: dict) -> dict:
    """{MemoryConfig field: value} of the memory flags given ({dest: value}, e.g. vars(args); unset ones left out)."""
    return {name: flags[memory_dest(name)] for name in MEMORY_FLAGS if flags.get(memory_dest(name)) is not None}


def memory_config(flags: dict, base: dict | None = None) -> memory.MemoryConfig:
    """The MemoryConfig of the memory flags given (the others: MemoryConfig's defaults, or `base`'s values)."""
    return memory.MemoryConfig(**{**(base or {}), **memory_flags(flags)})


def retrofit_stage(run: Run, out: str, mem_cfg: memory.MemoryConfig, examples: list, stage1_data: dict, lr: float,
                   epochs: float, max_steps: int | None, device, ranks) -> Stage:
    """Stage 1: add fresh memory layers and train all their parameters densely on OASST1, base frozen.
    stage1_data: {"task", "path", "oasst1_format"} of `examples`, recorded for stage 2's background reads."""
    if ranks.main:
        os.makedirs(out, exist_ok=True)
    ranks.barrier()
    model, _, info = load_model(run.base_model, dtype=default_dtype(device), device=device)
    torch.manual_seed(run.seed)
    mem_cfg = mem_cfg.resolve(model.config.num_hidden_layers, model.config.hidden_size)
    memories = memory.add_memory(model, mem_cfg)
    model.requires_grad_(False)
    adamw_params = {}
    for i, mem in memories.items():
        for name, p in mem.named_parameters():
            p.requires_grad_(True)
            adamw_params[f"model.layers.{i}.memory.{name}"] = p
    return Stage(out=out, model=model, examples=examples, lr=lr, epochs=epochs, max_steps=max_steps,
                 adamw_params=adamw_params, trained=lambda: memory.memory_state_dict(model),
                 config=run_config(run, "retrofit", stage1_data["task"], model, memory=mem_cfg.to_dict(),
                                   stage1_data=stage1_data),  # for stage 2
                 repetition_penalty=info["repetition_penalty"])


def background_statistics(model, tok, stage1: dict, run: Run, subset: int, n: int, device, ranks):
    """Read counts and document frequency of every memory slot over n single-example batches of the stage-1 data
    (the retrofit's config.json "stage1_data"; data.background_examples, from a seeded random `subset` of it)."""
    picked = data.background_examples(stage1, tok, run.max_len, run.seed, subset, n)
    autocast = bf16_autocast(device)
    mine = tqdm(picked[ranks.rank::ranks.world], desc="background reads", dynamic_ncols=True, disable=not ranks.main)
    stats = memory.background_stats(model, (torch.tensor([ids], device=device) for ids, _ in mine), autocast)
    return stats.summed(ranks.sum_, device) if ranks.world > 1 else stats  # each rank read its share


def earlier_background(run_dir: str, memories: dict, base_config: dict, run: Run) -> memory.BackgroundStats:
    """The background statistics of a finished smf run on the same base (--background-from), checked to cover
    exactly these memories' layers and slots."""
    finished_run(run_dir, base_config, run.base_model, "--background-from", ("smf",), run.base_fingerprint)
    path = os.path.join(run_dir, "background.safetensors")
    try:
        stats = memory.BackgroundStats.load(path)
    except Exception as e:  # missing or unreadable, named
        raise RunError(f"--background-from {run_dir}: {path}: {e}") from e
    have = {i: tuple(c.shape) for i, c in stats.counts.items()}
    want = {i: (m.values.weight.shape[0],) for i, m in memories.items()}
    if have != want:
        raise RunError(f"--background-from {run_dir}: its reads cover {have} (layer: slots), this memory {want}")
    return stats


def sparse_stage(run: Run, task: str, memory_dir: str, mem_given: dict, step: SMFStep, background: dict,
                 train_alpha: bool, examples: list, lr: float, epochs: float, max_steps: int | None, device, tok,
                 ranks) -> Stage:
    """Stage 2: only the memory values train, and on each step only the top-t rows per layer that the batch
    read most (ranked against background reads, taken from the stage-1 data at the start of this stage) change.
    mem_given: the memory flags given (memory_flags); step: how a step reads, selects and updates (its memories
    and background filled in here); background: {"task" (None: the memory's stage-1 data), "subset", "batches",
    "from" (a finished smf run whose background statistics to take instead of reading them)}."""
    model, _, info = load_model(run.base_model, dtype=default_dtype(device), device=device)
    mem_run = memory_run(memory_dir, model.config.to_dict(), run.base_model, run.base_fingerprint)
    loaded = memory.MemoryConfig.from_dict(mem_run["memory"])
    mem_cfg = memory.MemoryConfig(**{**loaded.to_dict(), **mem_given})  # the loaded memory, this run's precision
    if problem := memory_conflict(mem_given, loaded, len(model.model.layers), model.config.hidden_size, train_alpha,
                                  memory_dir):
        raise RunError(problem)
    memories = memory.add_memory(model, mem_cfg, load=memory_loader(memory_dir))  # a retrofit's, or the chain's
    background_path = os.path.join(run.out, "background.safetensors")
    if run.resume and os.path.exists(background_path):  # a resumed run keeps the statistics it started with
        stats = memory.BackgroundStats.load(background_path)
    elif background["from"] is not None:  # read once for a chain: an earlier link's (--background-from)
        stats = earlier_background(background["from"], memories, model.config.to_dict(), run)
        if ranks.main:
            atomic_write(background_path, stats.save)
    else:
        stage1 = mem_run["stage1_data"] if background["task"] is None else {  # carried along a chain
            **mem_run["stage1_data"], "task": background["task"], "path": run.data.get(background["task"])}
        stats = background_statistics(model, tok, stage1, run, background["subset"], background["batches"], device,
                                      ranks)
        if ranks.main:
            atomic_write(background_path, stats.save)
    model.requires_grad_(False)
    adamw_params = {}
    for i, mem in memories.items():
        mem.values.weight.requires_grad_(True)
        mem.sparse_grad = True  # the values gradient holds only the rows read
        if train_alpha:
            mem.alpha.requires_grad_(True)
            adamw_params[f"model.layers.{i}.memory.alpha"] = mem.alpha
    config = run_config(run, "smf", task, model, memory=mem_cfg.to_dict(), memory_from=os.path.abspath(memory_dir),
                        stage1_data=mem_run["stage1_data"], lineage=lineage(memory_dir))
    return Stage(out=run.out, model=model, examples=examples, lr=lr, epochs=epochs, max_steps=max_steps,
                 adamw_params=adamw_params, trained=lambda: memory.memory_state_dict(model), config=config,
                 smf=replace(step, memories=memories, background=stats.to(device)),
                 repetition_penalty=info["repetition_penalty"])


def lora_or_full_stage(run: Run, method: str, task: str, examples: list, lr: float, epochs: float,
                       max_steps: int | None, device, ranks, lora: dict | None = None, lora_from: str | None = None,
                       init: str = "pretrained", pure_bf16: bool = False, fsdp: bool = False,
                       mem_cfg: memory.MemoryConfig | None = None, memory_dir: str | None = None,
                       data_of: dict | None = None) -> Stage:
    """LoRA (adapters only; lora: {"r", "alpha", "dropout", "targets", "merge_for_eval"}; lora_from: a finished
    LoRA run whose adapters to train on) or full finetuning (every weight; init "random": from scratch; pure_bf16:
    weights, gradients and AdamW state in bf16; fsdp: sharded across the ranks) with AdamW, of a model with memory
    layers where it has them (with_memory: fresh ones, or a finished run's; full trains them, LoRA keeps them)."""
    if init == "random":  # pretraining from scratch: --model only gives config.json and the tokenizer
        torch.manual_seed(run.seed)
        model = Qwen2(Qwen2Config.from_json(os.path.join(resolve_model_dir(run.base_model), "config.json")))
        model = model.init_weights().to(device, torch.bfloat16 if pure_bf16 else torch.float32)
        info = {"repetition_penalty": 1.0}
    else:  # full: fp32 master weights, or bf16 alone (--pure-bf16, the paper's); LoRA: a frozen base
        weights_dtype = (torch.bfloat16 if pure_bf16 else torch.float32) if method == "full" else default_dtype(device)
        model, _, info = load_model(run.base_model, dtype=weights_dtype, device=device)
    torch.manual_seed(run.seed)
    memory_info = with_memory(model, run, mem_cfg, memory_dir, data_of)
    if method == "lora":
        model.requires_grad_(False)
        add_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], targets=lora["targets"])
        if lora_from:  # a chain: the previous link's adapters, trained on (one base and one adapter set)
            finished_run(lora_from, model.config.to_dict(), run.base_model, "--lora-from", ("lora",),
                         run.base_fingerprint)
            load_trained(lora_state_dict(model), lora_from, "--lora-from")
        adamw_params = {k: p for k, p in model.named_parameters() if k.endswith((".lora_A", ".lora_B"))}
        trained = lambda: {**lora_state_dict(model), **memory.memory_state_dict(model)}  # noqa: E731 (frozen memory)
    else:
        saved = set(model.hub_state_shapes())  # every Hub tensor (tied embeddings: no lm_head.weight), memory's too
        if fsdp:
            ranks.shard(model, device)
        adamw_params = dict(model.named_parameters())  # tied embeddings appear once

        def trained():  # every Hub tensor, gathered in full (on rank 0 under FSDP)
            from torch.distributed.checkpoint.state_dict import (  # FSDP only: slow to import
                StateDictOptions, get_model_state_dict)
            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
                if fsdp else model.state_dict()
            return {k: v for k, v in sd.items() if k in saved}
    previous = lora_from if method == "lora" else previous_full_run(run.base_model)  # a chain's last link
    config = run_config(run, method, task, model, lora=lora, lineage=lineage(previous), **memory_info)
    return Stage(out=run.out, model=model, examples=examples, lr=lr, epochs=epochs, max_steps=max_steps,
                 adamw_params=adamw_params, trained=trained, config=config,
                 repetition_penalty=info["repetition_penalty"], fsdp=fsdp)


def with_memory(model, run: Run, mem_cfg: memory.MemoryConfig | None, memory_dir: str | None, data_of: dict):
    """Memory layers for a full or LoRA model, in place: fresh ones (mem_cfg, --memory-layers: a model pretrained
    with its memory, as Lin et al. 2025's; data_of: {"task", "path", "oasst1_format"} of its training data, which an
    smf run that continues it reads for its background), or a finished run's (memory_dir, --memory-from: finetuning
    a model that has them). -> config.json's entries for them ({} for neither)."""
    if memory_dir is not None:
        mem_run = memory_run(memory_dir, model.config.to_dict(), run.base_model, run.base_fingerprint)
        mem_cfg, data_of = memory.MemoryConfig.from_dict(mem_run["memory"]), mem_run["stage1_data"]
    if mem_cfg is None:
        return {}
    mem_cfg = mem_cfg.resolve(model.config.num_hidden_layers, model.config.hidden_size)
    memory.add_memory(model, mem_cfg, load=memory_loader(memory_dir) if memory_dir is not None else None)
    return {"memory": mem_cfg.to_dict(), "stage1_data": data_of,
            **({"memory_from": memory_dir} if memory_dir is not None else {})}


def memory_conflict(given: dict, loaded: memory.MemoryConfig, n_layers: int, hidden: int, train_alpha: bool,
                    memory_dir: str) -> str | None:
    """Why the memory flags given (memory_flags) or --train-alpha cannot apply to the memory of --memory-from
    (`loaded`, of a model of n_layers blocks this wide), or None: a flag outside MEMORY_PER_RUN that contradicts it,
    or --train-alpha on a memory without alpha. parse_args asks before any work, sparse_stage on the loaded model."""
    resolved = memory.MemoryConfig(**{**loaded.to_dict(), **given}).resolve(n_layers, hidden)
    for name, (flag, _, _) in MEMORY_FLAGS.items():
        if name not in MEMORY_PER_RUN and getattr(resolved, name) != getattr(loaded, name):
            return (f"{flag} {given[name]} contradicts the memory of --memory-from {memory_dir} ({name} "
                    f"{getattr(loaded, name)}): drop the flag")
    if train_alpha and loaded.alpha_init is None:
        return f"--train-alpha: the memory of {memory_dir} has no alpha (it was built with --alpha-init none)"
    return None


def memory_loader(memory_dir: str):
    """add_memory's load: the trained memory of a finished run (--memory-from), its key set and shapes checked."""
    return functools.partial(load_trained, run_dir=memory_dir, flag="--memory-from")


def task_examples(task: str, path: str | None, tok, run: Run, limit: int | None, oasst1_format: str | None = None,
                  group: int = 1):
    """The examples of a stage's data (a seeded random `limit` of them), at least a batch of them, in whole groups
    of `group` (--group-size: checked here, before any stage trains)."""
    examples = data.training_examples(task, tok, run.max_len, run.seed, limit, path, oasst1_format)
    data.check_groups(len(examples), run.batch_size, group)
    return data.at_least_a_batch(examples, run.batch_size, task)


# -----------------------------------------------------------------------------
# The pipeline


def run_stage(stage: Stage, loop: Loop, device, tok, ranks, begin=None, then=None, on_step=None):
    """begin() (the first stage: args.json, once its model and data have loaded), the loop, then() (exports), the
    stage finished."""
    if begin is not None:
        begin()
    train(stage, loop, device, tok, ranks, on_step)
    if then is not None:
        then()
    finish_stage(stage.out, stage.config, ranks, device)
    return stage.model


def main(argv=None, on_step=None):
    """Run the pipeline; returns the trained model (for tests and notebooks). on_step: see train()."""
    args = parse_args(argv)
    if args.check_flags:  # parse_args checked them (and the files they name); --out as a run would
        check_out_dir(args.out, args.resume)
        print(f"flags ok: {args.out}")
        return None
    ranks, device = setup_ranks(args.device)
    lock = None
    try:
        if ranks.main:
            args.resume = check_out_dir(args.out, args.resume)  # False: nothing to resume yet, a fresh start
            lock = Lock(args.out)  # held until this process ends
            if args.resume:  # the flags checked before anything is fetched
                check_resume(args.out, vars(args))
        ranks.barrier()
        base_dir = resolve_model_dir(args.model)  # fetches a Hub id
        continued = args.memory_from or args.lora_from  # a chain's previous link, whose weights this run starts from
        flags = {**vars(args), "base_revision": hub_revision(base_dir),  # args.json: the weights, wherever they lie
                 "base_fingerprint": None if args.init == "random" else weights_fingerprint(base_dir),
                 "from_fingerprint": weights_fingerprint(continued) if continued and is_finished(continued) else None}
        if args.resume:
            check_resume_weights(args.out, flags)
        run = settings(Run, flags, base_model=args.model,
                       recipe={"name": args.recipe, **{k: flags[k] for k in RECIPES[args.recipe]}})
        torch.manual_seed(args.seed)
        tok = Tokenizer.from_pretrained(args.model)
        begin = functools.partial(begin_run, run.out, flags, run.resume, ranks, device)  # args.json: every flag
        stages = functools.partial(run_stage, loop=settings(Loop, flags), device=device, tok=tok, ranks=ranks,
                                   on_step=on_step)
        stage1_data = {"task": args.retrofit_task, "path": args.data.get("oasst1"), "oasst1_format": args.oasst1_format}
        if args.method == "retrofit":  # stage 1 alone takes the shared flags (--lr, --epochs, ...)
            examples = task_examples(args.retrofit_task, args.data.get("oasst1"), tok, run, args.limit,
                                     args.oasst1_format)
            model = stages(retrofit_stage(run, args.out, memory_config(flags), examples, stage1_data, args.lr,
                                          args.epochs, args.max_steps, device, ranks), begin=begin)
        elif args.method == "smf":  # stage 1 in the sub-run retrofit/ (the --retrofit-* flags), unless --memory-from
            memory_dir = args.memory_from or os.path.join(args.out, "retrofit")
            stage1 = args.memory_from is None and not is_finished(memory_dir)
            examples = task_examples(args.task, args.data.get("medmcqa"), tok, run, args.limit,  # before stage 1
                                     group=args.group_size)
            if stage1:
                retro = task_examples(args.retrofit_task, args.data.get("oasst1"), tok, run, args.retrofit_limit,
                                      args.oasst1_format)
                stages(retrofit_stage(run, memory_dir, memory_config(flags), retro, stage1_data, args.retrofit_lr,
                                      args.retrofit_epochs, args.retrofit_max_steps, device, ranks), begin=begin)
            background = {"task": args.background_task, "subset": args.background_subset,
                          "batches": args.background_batches, "from": args.background_from}
            step = settings(SMFStep, flags, memories={}, background=None)  # sparse_stage fills these in
            stage = sparse_stage(run, args.task, memory_dir, memory_flags(flags), step, background, args.train_alpha,
                                 examples, args.lr, args.epochs, args.max_steps, device, tok, ranks)
            model = stages(replace(stage, group=args.group_size), begin=None if stage1 else begin)
        else:
            lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                    "targets": args.lora_targets, "merge_for_eval": args.merge_lora_for_eval}
            examples = task_examples(args.task, args.data.get("medmcqa"), tok, run, args.limit, group=args.group_size)
            fresh = args.memory_layers is not None  # full only (parse_args)
            stage = lora_or_full_stage(run, args.method, args.task, examples, args.lr, args.epochs, args.max_steps,
                                       device, ranks, lora=lora if args.method == "lora" else None,
                                       lora_from=args.lora_from, init=args.init, pure_bf16=args.pure_bf16,
                                       fsdp=args.fsdp, mem_cfg=memory_config(flags) if fresh else None,
                                       memory_dir=args.memory_from, data_of={"task": args.task, "path":
                                                                             args.data.get("medmcqa"),
                                                                             "oasst1_format": None})
            stage = replace(stage, group=args.group_size)
            model = stages(stage, begin=begin,
                           then=functools.partial(export, stage, args.export_peft, args.export_merged, ranks))
    except StopRun as stop:
        if ranks.main:
            print(stop, file=sys.stderr)
        raise
    finally:
        if ranks.world > 1:
            dist.destroy_process_group()
        if lock is not None:
            lock.release()
    if ranks.main:
        print(f"done: {args.out}  (evaluate: python eval.py --model {shlex.quote(args.out)})")
    return model


def export(stage: Stage, peft: bool, merged: bool, ranks):
    """The exports of a LoRA or full run (checkpoint.export_run), once its last checkpoint is saved."""
    stage.model.eval()
    if ranks.main:
        export_run(stage.out, stage.model, stage.config, peft=peft, merged=merged)


# -----------------------------------------------------------------------------
# Arguments: each flag's range and the methods it applies to are declared beside it (common.add_flag); the flags
# that may change on --resume are checkpoint.RESUME_FREE

def comma_separated_ints(s: str) -> list[int]:  # flag parsers: argparse names them in its errors
    return [int(x) for x in s.split(",")]


def number_auto_or_none(s: str):
    return s if s in ("auto", "none") else float(s)


# One flag per memory.MemoryConfig field: {field: (flag, help, argparse keywords)}. A new memory option is a field
# there (and its use in ProductKeyMemory) and one line here. Unset, a flag takes MemoryConfig's default.
MEMORY_FLAGS = {
    "layers": ("--memory-layers", "comma-separated layer ids (default: L/4, L/2, 3L/4: 6, 12, 18 of Qwen2.5-0.5B's "
               "24)", {"type": comma_separated_ints}),
    "n_keys": ("--n-keys", "half-keys per half: n_keys^2 slots per layer", {}),
    "heads": ("--mem-heads", "memory heads", {}),
    "topk": ("--mem-topk", "slots read per head and token", {}),
    "k_dim": ("--mem-k-dim", "query / key size per head (two halves)", {}),
    "query_norm": ("--mem-query-norm", "layer: each half-query layer-normalised (no learned parameters) before "
                   "it meets its keys; none: as the paper's memory", {"choices": ["none", "layer"]}),
    "mode": ("--memory-mode", "additive: x + mlp(h) + alpha * mem(h); replacement: x + mem(h), no MLP",
             {"choices": ["additive", "replacement"]}),
    "alpha_init": ("--alpha-init", "the memory's learnable output scale at init, or none (auto: 0.01 in additive "
                   "mode, as the paper; none in replacement mode, whose paper version has no scale)",
                   {"type": number_auto_or_none}),
    "precision": ("--memory-precision", "[recipe] the memory's maths: bf16 as the paper's code runs it (weights "
                  "rounded to bf16, values read in fp32 while training, the whole memory bf16 at evaluation; paper) "
                  "or fp32 (clean)", {"choices": ["bf16", "fp32"]}),
}
MEMORY_PER_RUN = ("precision",)  # a stage-2 run may choose it for a loaded memory; the others are the memory's


def memory_dest(name: str) -> str:
    """The argparse dest of a MemoryConfig field's flag (e.g. "memory_layers" for "layers")."""
    return MEMORY_FLAGS[name][0][2:].replace("-", "_")


STAGE1_INSIDE_SMF = ("retrofit_epochs", "retrofit_lr", "retrofit_limit", "retrofit_max_steps")
STAGE1_HINT = "--method retrofit takes the shared flags: --lr, --epochs, --max-steps, --limit"


def parser():
    p = ArgParser(prog="train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, choices=METHODS,
                   help="smf: stage 1 (retrofit) + background reads + stage 2 (sparse finetuning); retrofit: "
                        "stage 1 alone; lora: adapters; full: every weight")
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="base model: Hub id or local directory")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="local file for a dataset (medmcqa, oasst1) in the Hub's column schema; repeatable")
    add_flag(p, "--task", methods=("smf", "lora", "full"), default="medmcqa",
                   help="finetuning data: medmcqa (question, options, answer, explanation) or text:PATH (a .jsonl "
                        "of {\"text\": ...} or a plain-text file, one example per line; loss on every token)")
    add_flag(p, "--init", methods=("full",), default="pretrained", choices=["pretrained", "random"],
                   help="random: build the model from --model's config.json with random weights (full only; "
                        "pretraining a small model from scratch)")
    p.add_argument("--out", default=None, help="run directory (default runs/<method>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--check-flags", action="store_true",
                   help="check every flag (and the files they name) and exit, loading and writing nothing (how "
                        "experiments/paper.py checks a plan's commands before its first job)")
    add_flag(p, "--seed", at_least=0, at_most=2**32 - 1, type=int, default=0,
             help="initialisation, data order and dropout")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--recipe", default="paper", choices=sorted(RECIPES),
                   help="paper: the paper's code, flaws included (its lr was tuned with them); clean: our corrected "
                        "SMF. Sets the defaults of the flags marked [recipe]; each such flag overrides it")
    g = p.add_argument_group("optimization (shared)")
    add_flag(g, "--lr", at_least=0, type=float, default=None, help="default: smf/retrofit 5e-4, lora 2e-4, full 5e-5")
    add_flag(g, "--epochs", above=0, type=float, default=None,
             help="epochs over the training data (default: 3; retrofit 2)")
    add_flag(g, "--max-steps", at_least=1, type=int, default=None, help="optimizer steps; overrides --epochs")
    add_flag(g, "--batch-size", at_least=1, type=int, default=16,
                   help="examples per optimizer step, all ranks together (the paper's effective batch)")
    g.add_argument("--micro-batch", type=ArgParser.int_or_auto, default="auto",
                   help="examples per forward on each rank; gradient accumulation makes up the batch. auto: the "
                        "whole batch on the CPU; on a GPU the largest divisor of it that fits (tried on the longest "
                        "example, backing off on out-of-memory); 4 for SMF under --recipe paper, whose row "
                        "selection and loss are per micro-batch of 4")
    add_flag(g, "--warmup", at_least=0, type=int, default=100,
             help="linear warmup steps, then cosine decay to 0 (a warning if it reaches past the last step: the lr "
                  "would never reach --lr)")
    g.add_argument("--warmup-from-zero", action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] lr = peak * s / warmup at step s = 0, 1, ..., the first update at lr 0 (Hugging "
                        "Face's; paper); else peak * (s + 1) / warmup (clean)")
    add_flag(g, "--weight-decay", at_least=0, type=float, default=0.0, help="AdamW's decoupled weight decay")
    add_flag(g, "--grad-clip", at_least=0, type=float, default=1.0, help="max gradient norm (0: off)")
    add_flag(g, "--max-len", at_least=2, type=int, default=1024, help="tokens per example (longer ones are truncated)")
    add_flag(g, "--group-size", at_least=1, methods=("smf", "lora", "full"), type=int, default=1,
             help="the --task data's consecutive examples in groups of N that always share a step (the shuffle moves "
                  "whole groups; --batch-size a multiple of N): e.g. Lin et al. 2025's batches, one fact and its "
                  "paraphrases per step, from a text file that lists each fact's paraphrases on N consecutive lines")
    add_flag(g, "--limit", at_least=1, type=int, default=None,
                   help="a seeded random N of the training examples, as the paper's code draws them (all of them, "
                        "in order, if there are no more than N; default: medmcqa 60000; retrofit --retrofit-limit; "
                        "text: all)")
    add_flag(g, "--save-every", at_least=1, type=int, default=500,
             help="checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile every block without a memory layer (the SMF lookup stays eager), with batches "
                        "padded to a multiple of 64 tokens so that few shapes recompile (not when padding reads "
                        "count: there the padding is part of the recipe)")
    add_flag(g, "--fsdp", methods=("full",), action="store_true",
                   help="full finetuning under torchrun: shard weights, gradients and optimizer state across ranks "
                        "(PyTorch's fully_shard) instead of replicating them (DDP), for models that do not fit one GPU")
    add_flag(g, "--stop-at-step", at_least=1, type=int, default=None,
                   help="stop after this step's checkpoint, as if interrupted (to test --resume); in --method smf "
                        "it applies to each stage in turn")
    add_smf_flags(p)
    add_baseline_flags(p)
    p.show_presets(RECIPES)  # [recipe] flags: the value each recipe gives them
    return p


def add_smf_flags(p):
    g = p.add_argument_group("SMF: memory layers (stage 1 builds them; with --method full, --memory-layers gives "
                             "the model memory layers trained with every weight)")
    add_flag(g, "--memory-from", methods=("smf", "full", "lora"), default=None, metavar="RUN",
                   help="the memory of a finished retrofit run, or of a finished smf run to continue (a chain: the "
                        "background still from the chain's stage-1 data; the optimizer state starts fresh), or of a "
                        "full run with memory layers (--model its hf/); full and lora: finetune the model with this "
                        "memory (full trains it, lora keeps it)")
    defaults = {f.name: f for f in fields(memory.MemoryConfig)}
    for name, (flag, help, kw) in MEMORY_FLAGS.items():  # unset: MemoryConfig's default
        f = defaults[name]
        kw = {"type": f.type if f.type in (int, float) else str, **kw}
        shown = "" if "(default" in help or name in MEMORY_PER_RUN else f" (default: {f.default})"
        add_flag(g, flag, methods=("smf", "retrofit", "full"), default=None, help=help + shown, **kw)
    add_flag(g, "--values-lr-scale", above=0, methods=("full", "retrofit"), type=float, default=1.0,
             help="the memory values' lr is --lr times this, where the values train densely (a model pretrained with "
                  "memory layers, a retrofit): values are read sparsely, a few rows per token, and product-key "
                  "memories train them at a higher lr than the rest (lucidrains/product-key-memory: 1e-2 against "
                  "1e-3)")
    add_flag(g, "--retrofit-task", methods=("smf", "retrofit"), default="oasst1",
                   help="stage-1 and background data: oasst1 (see --oasst1-format) or text:PATH")
    add_flag(g, "--oasst1-format", methods=("smf", "retrofit"), default=None, choices=["replies", "chat"],
                   help="[recipe] replies: English assistant replies ranked 0-1 with 50+ characters as raw text "
                        "(paper); chat: ChatML conversations, loss on the replies (clean)")
    add_flag(g, "--retrofit-epochs", above=0, methods=("smf",), hint=STAGE1_HINT, type=float, default=2,
             help="stage-1 epochs inside --method smf")
    add_flag(g, "--retrofit-lr", at_least=0, methods=("smf",), hint=STAGE1_HINT, type=float, default=5e-4,
             help="stage-1 lr inside --method smf")
    add_flag(g, "--retrofit-limit", at_least=1, methods=("smf",), hint=STAGE1_HINT, type=int, default=50000,
             help="stage-1 examples (a seeded random subset)")
    add_flag(g, "--retrofit-max-steps", at_least=1, methods=("smf",), hint=STAGE1_HINT, type=int, default=None,
             help="stage-1 steps inside --method smf")
    add_flag(g, "--background-batches", at_least=1, methods=("smf",), type=int, default=2000,
                   help="single-example batches of the stage-1 data read for the background, at stage 2's start")
    add_flag(g, "--background-subset", at_least=0, methods=("smf",), type=int, default=None,
                   help="[recipe] N: they are the first of a seeded random N of the stage-1 data (paper: 20000); 0: "
                        "of a seeded shuffle of all of it (clean)")
    g = p.add_argument_group("SMF: stage 2 (sparse finetuning)")
    add_flag(g, "--top-t", at_least=1, methods=("smf",), type=int, default=512,
             help="memory rows updated per layer per step")
    add_flag(g, "--rank", methods=("smf",), default="kl", choices=sorted(memory.RANKS),
             help="how rows are ranked (memory.RANKS)")
    add_flag(g, "--optimizer", methods=("smf",), default=None, choices=list(memory.SparseMemoryOptimizer.MODES),
                   help="[recipe] dense_adamw: AdamW over whole value tables, other rows' gradients zeroed, moments "
                        "leak (paper); adamw: lazy, only chosen rows change (clean); sgd: plain SGD (Lin et al.)")
    add_flag(g, "--select-per-micro-batch", methods=("smf",), action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] re-select rows on every micro-batch (paper); else once per step (clean)")
    add_flag(g, "--count-pad-reads", methods=("smf",), action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] padding positions count as reads, run as HF's Qwen2 runs them (paper); else not")
    add_flag(g, "--sum-micro-batch-means", methods=("smf",), action=argparse.BooleanOptionalAction, default=None,
                   help="[recipe] the step's loss is the sum of micro-batch means, as HF's Trainer makes of the "
                        "paper's compute_loss (paper); else the token mean over the step (clean)")
    add_flag(g, "--background-task", methods=("smf",), default=None,
                   help="the background reads' data: oasst1 or text:PATH (default: the stage-1 data of the memory)")
    add_flag(g, "--background-from", methods=("smf",), default=None, metavar="RUN",
             help="the background reads of a finished smf run (its background.safetensors), not read again: "
                  "computed once for a chain, as Lin et al. 2025 (the same reads when no memory lies below another)")
    add_flag(g, "--train-alpha", methods=("smf",), action="store_true", help="also train the memory's scale alpha")
    add_flag(g, "--log-rows", methods=("smf",), action="store_true",
             help="also log the ids of the rows chosen at every step")


def add_baseline_flags(p):
    g = p.add_argument_group("LoRA")
    add_flag(g, "--lora-r", at_least=1, methods=("lora",), type=int, default=16, help="adapter rank r")
    add_flag(g, "--lora-alpha", above=0, methods=("lora",), type=float, default=32,
             help="the adapters' output is scaled by alpha / r")
    add_flag(g, "--lora-dropout", at_least=0, below=1, methods=("lora",), type=float, default=0.05,
             help="dropout on the adapters' input")
    add_flag(g, "--lora-targets", methods=("lora",), default=",".join(LORA_TARGETS),
             help="the linear layers that get adapters")
    add_flag(g, "--lora-from", methods=("lora",), default=None, metavar="RUN",
                   help="train on the adapters of a finished LoRA run (a chain: its r, alpha, targets; new optimizer)")
    add_flag(g, "--export-peft", methods=("lora",), action="store_true",
             help="also write the adapter in peft's format to peft/")
    add_flag(g, "--export-merged", methods=("lora",), action="store_true",
             help="also write the merged model (Hub format) to merged/")
    add_flag(g, "--merge-lora-for-eval", methods=("lora",), action=argparse.BooleanOptionalAction, default=None,
             help="[recipe] eval.py merges the adapters into the base in its dtype (paper); else not (clean)")
    g = p.add_argument_group("full finetuning")
    add_flag(g, "--pure-bf16", methods=("full",), action=argparse.BooleanOptionalAction, default=None,
             help="[recipe] weights, gradients, AdamW state in bf16 (paper); else fp32 weights (clean)")
    g = p.add_argument_group("evaluation during training")
    add_flag(g, "--eval-every", at_least=0, type=int, default=0, help="run eval.py's probes every N steps (0: never)")
    g.add_argument("--eval-tasks", default=",".join(default_tasks()),
                   help=f"probes of eval.PROBES ({','.join(PROBES)})")
    add_flag(g, "--eval-limit", at_least=1, type=int, default=200, help="examples per probe")
    g.add_argument("--eval-data", action="append", default=[], metavar="NAME=PATH",
                   help="local file for a probe, as eval.py --data; repeatable")


def paper_micro_batch(batch_size: int, world: int) -> int:
    """The micro-batch per process of the paper's SMF stage 2 (its 4 examples across the processes); a RunError
    where --batch-size does not split into them (checked by parse_args, before any work)."""
    if PAPER_MICRO_BATCH % world or (batch_size // world) % (PAPER_MICRO_BATCH // world):
        raise RunError(f"--recipe paper's SMF selects rows per micro-batch of {PAPER_MICRO_BATCH}: give a "
                         f"--batch-size that splits into them across {world} process(es) (e.g. "
                         f"{max(PAPER_MICRO_BATCH, batch_size // PAPER_MICRO_BATCH * PAPER_MICRO_BATCH)}), or "
                         "--micro-batch")
    return PAPER_MICRO_BATCH // world


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    given = p.given(argv)
    p.check_flags(args, given, args.method)  # the methods and ranges declared beside each flag
    if args.memory_from and (skipped := sorted(given & {*STAGE1_INSIDE_SMF, "retrofit_task", "oasst1_format"})):
        p.error(f"{p.flag(skipped[0])} acts on stage 1, which --memory-from skips (its memory is already trained)")
    memory_given = sorted(given & {memory_dest(n) for n in MEMORY_FLAGS} - {memory_dest(n) for n in MEMORY_PER_RUN})
    if args.method == "full" and memory_given and (args.memory_layers is None or args.memory_from):
        p.error(f"{p.flag(memory_given[0])}: " + ("the memory of --memory-from is as it was built: drop the flag"
                                                  if args.memory_from else
                                                  "give --memory-layers to train a full model with memory layers"))
    if args.method == "full" and (args.memory_layers is not None or args.memory_from) and args.fsdp:
        p.error("--fsdp does not apply to a model with memory layers (their lookup is not sharded)")
    if args.background_from and (skipped := sorted(given & {"background_batches", "background_subset",
                                                            "background_task"})):
        p.error(f"{p.flag(skipped[0])} acts on the background reads, which --background-from takes as they are")
    for name, value in RECIPES[args.recipe].items():  # the recipe fills every flag left unset
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.data = data.parse_data_flags(args.data, ("medmcqa", "oasst1"))
        args.eval_data = data.parse_data_flags(args.eval_data, tuple(PROBES))
    except ValueError as e:
        p.error(str(e))
    try:
        check_tasks(args.eval_tasks.split(","))
    except ValueError as e:
        p.error(f"--eval-tasks: {e}")
    args.lr = DEFAULT_LR[args.method] if args.lr is None else args.lr
    args.epochs = (args.retrofit_epochs if args.method == "retrofit" else 3) if args.epochs is None else args.epochs
    if args.values_lr_scale != 1 and args.method == "full" and args.memory_layers is None and not args.memory_from:
        p.error("--values-lr-scale: the model has no memory layers (give --memory-layers or --memory-from)")
    if args.group_size > 1 and (problem := group_problem(args.task, args.limit, args.batch_size, args.group_size)):
        p.error(f"--group-size {args.group_size}: {problem}")
    if args.limit is None:  # the paper: a seeded random 60k of the single-answer MedMCQA train questions
        args.limit = args.retrofit_limit if args.method == "retrofit" else 60000 if args.task == "medmcqa" else None
    args.out = os.path.abspath(args.out or os.path.join("runs", f"{args.method}-seed{args.seed}"))
    if args.memory_from:  # paths resolved, so that --resume compares them whatever their spelling
        args.memory_from = os.path.abspath(args.memory_from)
    if args.background_from:
        args.background_from = os.path.abspath(args.background_from)
    if os.path.isdir(args.model):
        args.model = os.path.abspath(args.model)
    if is_run_dir(args.model):
        p.error(f"--model {args.model} is a train.py run directory, not a model: continue a full run from its "
                f"export, --model {os.path.join(args.model, 'hf')}; an smf or lora run with --memory-from or "
                f"--lora-from")
    try:
        memory_config(vars(args))
        if args.method == "smf" and args.memory_from and is_finished(args.memory_from):  # else a job before makes it
            run = read_json(os.path.join(args.memory_from, "config.json"))
            if run.get("memory") and run.get("base_config"):  # checked as sparse_stage will, before any work
                problem = memory_conflict(memory_flags(vars(args)), memory.MemoryConfig.from_dict(run["memory"]),
                                          run["base_config"]["num_hidden_layers"], run["base_config"]["hidden_size"],
                                          args.train_alpha, args.memory_from)
                if problem:
                    p.error(problem)
    except ValueError as e:
        p.error(str(e))
    args.lora_targets = [t for t in args.lora_targets.split(",") if t]
    if bad := [t for t in args.lora_targets if t not in LORA_TARGETS]:
        p.error(f"--lora-targets: unknown module {bad[0]!r} (choose from {','.join(LORA_TARGETS)})")
    if args.lora_from:  # a chain: the adapters' shape (r, alpha, targets) is the previous run's
        args.lora_from = os.path.abspath(args.lora_from)  # resolved, so that --resume compares it whatever its spelling
        try:
            inherited = lora_from(args.lora_from)
        except ValueError as e:
            p.error(str(e))
        for key, dest in (("r", "lora_r"), ("alpha", "lora_alpha"), ("targets", "lora_targets")):
            if dest in given and getattr(args, dest) != inherited[key]:
                p.error(f"{p.flag(dest)} {getattr(args, dest)} contradicts the adapters of --lora-from "
                        f"{args.lora_from} ({key} {inherited[key]}): drop the flag")
            setattr(args, dest, inherited[key])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
    if args.micro_batch != "auto" and (args.micro_batch < 1 or (args.batch_size // world) % args.micro_batch):
        p.error(f"--micro-batch {args.micro_batch} must be a positive divisor of the batch per process "
                f"({args.batch_size // world})")
    if args.method == "smf" and args.micro_batch == "auto" and (args.select_per_micro_batch
                                                                or args.sum_micro_batch_means):
        try:
            paper_micro_batch(args.batch_size, world)
        except RunError as e:
            p.error(str(e))
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


def group_problem(task: str, limit: int | None, batch_size: int, group: int) -> str | None:
    """Why the task's data cannot keep groups of `group` consecutive examples together (None: it can)."""
    if not task.startswith("text:"):
        return "groups are consecutive lines of a text:PATH --task"
    if limit is not None:
        return "--limit draws a random subset of the lines, which would split the groups: drop it"
    if batch_size % group:
        return f"--batch-size {batch_size} is not a multiple of it (a step holds whole groups)"
    return None


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
