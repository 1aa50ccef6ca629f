"""
The plumbing around train.py's loop, so that train.py reads as the algorithm (as nanochat's checkpoint_manager.py
and common.py): data-parallel ranks, the run directory (what --out may be, its lock, args.json and --resume),
checkpoints (trained tensors, optimizer state, every rank's RNG state and the step, in one safetensors file), the
step log and its cost, the exports, and the micro-batch size that fits the GPU. Imported by train.py alone.

A run directory (train.py --out) holds only files train.py writes, each written atomically (write, then rename):

    args.json                every resolved argument, library versions, base model revision, git commit
    config.json              how to rebuild the model: method, base model, memory / LoRA configuration, recipe;
                             once finished, what the stage cost (run_cost)
    model.safetensors        only what the method trained (SMF: the memory layers; LoRA: adapters; full: all)
    log.jsonl                one line per optimizer step (loss, lr, grad norm, tokens, seconds, tokens/s, MFU on a
                             GPU, SMF rows per layer)
    checkpoint.safetensors   everything --resume needs (trained tensors, optimizer, RNG, step) in one file
    background.safetensors   (SMF) read statistics of every memory slot on the stage-1 data, from stage 2's start
    retrofit/                (SMF) the stage-1 run directory, itself a `--method retrofit` run
    peft/, merged/, hf/      exports (LoRA: --export-peft, --export-merged; full: always hf/)
    eval.jsonl, .lock        --eval-every results; the lock a live run holds
    eval*.json, samples*.jsonl   eval.py's results and per-example logs, if it was pointed here (model.is_eval_output)

train.py never writes into a directory holding anything else, and a live run holds an exclusive lock on its
directory (released by the OS when the process dies, so a run killed with kill -9 leaves no obstacle). What a
killed save leaves (model.is_temp_file: ours and safetensors' temporary files) is removed when the run resumes.
"""

import copy
import fcntl
import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from eval import default_batch_size, run_tasks
from model import (Qwen2, atomic_write, bf16_autocast, check_tensors, is_eval_output, is_temp_file, load_tensors,
                   merge_lora, read_json, remove_temp_files, resolve_device, save_peft_adapter, write_json)

RUN_FILES = {"args.json", "config.json", "model.safetensors", "log.jsonl", "checkpoint.safetensors",
             "background.safetensors", "eval.jsonl", "retrofit", "hf", "peft", "merged", ".lock"}
# flags that may differ between a run and its resumption; every other flag must be the same
RESUME_FREE = {"resume", "stop_at_step", "device", "eval_every", "eval_tasks", "eval_limit", "save_every", "compile",
               "out"}  # a moved run directory resumes where it is now


class RunError(Exception):
    """A problem with the user's input or the run; printed as one line, exit status 1."""


class StopRun(Exception):
    """--stop-at-step reached: leave as if interrupted, exit status 0."""


# -----------------------------------------------------------------------------
# Ranks


@dataclass
class Ranks:
    """Where this process stands under torchrun: rank r of `world` processes, each with its own data shard.
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

    def wrap(self, model, device, ddp: bool):
        """The model under DDP when several ranks average dense gradients, else the model itself."""
        if self.world == 1 or not ddp:
            return model
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    @staticmethod
    def grad_sync(wrapped, model, fsdp: bool, last: bool):
        """Gradients cross ranks on a step's last micro-batch only (DDP's no_sync, FSDP's gradient sync flag)."""
        if fsdp:
            model.set_requires_gradient_sync(last)
        return wrapped.no_sync() if isinstance(wrapped, DDP) and not last else nullcontext()

    @staticmethod
    def shard(model, device):
        """--fsdp: each block, then the rest (embeddings, norm, head), sharded across the ranks (fully_shard)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        for block in model.model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)

    def same_rows(self, selected: dict):
        """Every rank must choose the same memory rows (their read counts are summed first); a fingerprint
        of each layer's selection proves it."""
        if self.world == 1:
            return
        fp = selection_fingerprint(selected)
        seen = [torch.zeros_like(fp) for _ in range(self.world)]
        dist.all_gather(seen, fp)
        if any(not torch.equal(seen[0], s) for s in seen):
            raise RunError("data-parallel ranks selected different memory rows (their read counts disagree)")


def selection_fingerprint(selected: dict):
    """Per layer (count, sum of the sorted slot ids weighted 1, 2, ...): equal for the same rows in any order."""
    return torch.stack([torch.stack([r.numel() * torch.ones((), dtype=torch.long, device=r.device),
                                     (r.sort().values * torch.arange(1, r.numel() + 1, device=r.device)).sum()])
                        for r in selected.values()]).flatten()


def setup_ranks(device_name: str):
    """(Ranks, device): join the process group torchrun set up (WORLD_SIZE > 1), NCCL with one GPU per process,
    else gloo on CPU."""
    try:
        device = resolve_device(device_name)
    except ValueError as e:
        raise RunError(f"--device: {e}") from e
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), world), device


# -----------------------------------------------------------------------------
# The run directory


def check_out_dir(out: str, resume: bool):
    """--out must be a new or empty directory, or a run directory of train.py: refuse anything else, naming what
    is there. A run directory in which no step completed may be started afresh; one with a checkpoint needs
    --resume, and --resume needs a run."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} is a file, not a directory: choose another --out")
    have = set(os.listdir(out)) if os.path.isdir(out) else set()
    ours = {n for n in have if n.startswith("selected.rank") or is_temp_file(n) or is_eval_output(n)}
    if foreign := sorted(have - RUN_FILES - ours):
        raise RunError(f"--out {out} holds files train.py did not write ({', '.join(foreign[:3])}"
                       f"{', ...' if len(foreign) > 3 else ''}): choose a new or empty directory")
    if "args.json" not in have and {n for n in have if not is_temp_file(n)} - {".lock", "retrofit",
                                                                                "background.safetensors"}:
        raise RunError(f"--out {out} has no args.json, so it is not a train.py run: choose a new or empty directory")
    started = [p for p in ("checkpoint.safetensors", "retrofit/checkpoint.safetensors")
               if os.path.exists(os.path.join(out, p))]
    if resume and "args.json" not in have:
        raise RunError(f"--resume: there is no run to resume in {out} (no args.json); run without --resume")
    if not resume and started:
        raise RunError(f"{out} already holds a run with completed steps: pass --resume to continue it with the same "
                       f"flags, or choose another --out")


class Lock:
    """An exclusive lock on a run directory (fcntl.flock on its .lock file) for as long as the process lives."""

    def __init__(self, out: str):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, ".lock")
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.seek(0)
            owner = self.f.read().strip() or "?"
            self.f.close()
            raise RunError(f"{out} is in use by another train.py process (pid {owner}): wait for it to end, or "
                           f"choose another --out") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(str(os.getpid()))
        self.f.flush()

    def release(self):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def check_resume_args(args, saved: dict):
    """--resume takes the run's own flags; only RESUME_FREE may differ (paths compared resolved)."""
    for k, v in vars(args).items():
        if k not in RESUME_FREE and k in saved and json.loads(json.dumps(v)) != saved[k]:
            raise RunError(f"--resume: --{k.replace('_', '-')} is {v!r} but the run was started with {saved[k]!r}; "
                           f"resume with the run's flags, or start a new run with --out elsewhere (an SMF run "
                           f"can reuse a finished stage 1 there with --memory-from RUN/retrofit)")


def run_info():
    """Library versions and git commit, for args.json."""
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


def check_resume(args):
    """--resume: the flags must be the run's (args.json), checked before anything is fetched or loaded."""
    check_resume_args(args, read_json(os.path.join(args.out, "args.json")))


def begin_run(args, ranks, device):
    """Write args.json once the first stage has loaded its model and data (a start-up error leaves none), or on
    --resume check that the flags match the run's (now with the base model's revision)."""
    path = os.path.join(args.out, "args.json")
    if args.resume:
        check_resume(args)
    elif ranks.main:
        write_json(path, {**vars(args), "device": str(device), "world_size": ranks.world, **run_info()})


def begin_stage(out: str, step: int, total: int, ranks):
    """The log of a stage as one run: a fresh stage starts an empty log, a resumed one keeps the lines up to the
    checkpoint's step; temporary files of an interrupted save are removed."""
    if not ranks.main:
        return
    remove_temp_files(out)
    for name in ("log.jsonl", "eval.jsonl"):
        truncate_log(os.path.join(out, name), step)
    print(f"{'resuming' if step else 'starting'} {out} at step {step}/{total}", file=sys.stderr)


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path, step):
    """Keep the log lines up to `step` (none for a fresh start)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, lambda p: open(p, "w").writelines(lines))


def finish_stage(out, config, ranks, device):
    """Mark a stage finished (eval.py and --memory-from accept only finished runs), with what it cost."""
    config["finished"] = True
    if ranks.main:
        config["cost"] = run_cost(out, device, ranks.world)
        write_json(os.path.join(out, "config.json"), config)
    ranks.barrier()


def finished_run(run_dir: str, base_config: dict, model_name: str, flag: str, methods: tuple) -> dict:
    """The config.json of a run that a flag continues from (--memory-from, --lora-from): a finished run of one of
    `methods` on the same base model."""
    if not is_finished(run_dir):
        raise RunError(f"{flag} {run_dir}: not a finished {' or '.join(methods)} run (no finished config.json)")
    run = read_json(os.path.join(run_dir, "config.json"))
    if run.get("method") not in methods:
        raise RunError(f"{flag} {run_dir}: a {run.get('method')} run, not a {' or '.join(methods)} run")
    if run.get("base_config") != base_config:
        diff = sorted(k for k in base_config if base_config[k] != run.get("base_config", {}).get(k))
        raise RunError(f"{flag} {run_dir}: its base model differs from --model {model_name} "
                       f"({', '.join(diff) or 'config'})")
    return run


def memory_run(memory_dir: str, base_config: dict, model_name: str) -> dict:
    """The config.json of a --memory-from run: a finished retrofit, or an smf run (which carries its chain's
    stage-1 data), on the same base model."""
    run = finished_run(memory_dir, base_config, model_name, "--memory-from", ("retrofit", "smf"))
    if run.get("memory") is None or "stage1_data" not in run:
        raise RunError(f"--memory-from {memory_dir}: not a retrofit or smf run of this version of train.py")
    return run


def load_trained(own: dict, run_dir: str, flag: str):
    """Copy a finished run's model.safetensors into `own` ({name: tensor} of a model's parameters; every key and
    shape checked), or a RunError naming the file."""
    weights = os.path.join(run_dir, "model.safetensors")
    try:
        load_tensors(own, load_file(weights), weights)
    except Exception as e:  # unreadable file, missing or misshapen tensor (named)
        raise RunError(f"{flag} {run_dir}: {weights}: {e}") from e


def lineage(previous: str | None) -> list:
    """The chain of runs a run continues (config.json "lineage"): the lineage of the run it started from plus that
    run itself ({"run", "method", "task"}); [] for a run from the base model."""
    if previous is None:
        return []
    prev = read_json(os.path.join(previous, "config.json"))
    return prev.get("lineage", []) + [{"run": os.path.abspath(previous), "method": prev["method"],
                                       "task": prev.get("task")}]


def previous_full_run(model_dir: str) -> str | None:
    """A full run whose hf/ export is --model (a full chain's previous link), else None."""
    parent = os.path.dirname(os.path.abspath(model_dir))
    if os.path.basename(os.path.normpath(model_dir)) == "hf" and is_finished(parent):
        return parent if read_json(os.path.join(parent, "config.json")).get("method") == "full" else None
    return None


def inherit_lora(args, given: set):
    """--lora-from RUN: the adapters' shape (r, alpha, targets) is the run's; a flag given for it must agree."""
    if args.lora_from is None:
        return
    args.lora_from = os.path.abspath(args.lora_from)  # resolved, so that --resume compares it whatever its spelling
    cfg = os.path.join(args.lora_from, "config.json")
    if not os.path.exists(cfg):
        raise ValueError(f"--lora-from {args.lora_from}: no config.json (not a run of train.py)")
    lora = read_json(cfg).get("lora") or {}
    for key, dest in (("r", "lora_r"), ("alpha", "lora_alpha"), ("targets", "lora_targets")):
        if key not in lora:
            raise ValueError(f"--lora-from {args.lora_from}: not a LoRA run (its config.json has no lora {key})")
        if dest in given and getattr(args, dest) != lora[key]:
            raise ValueError(f"--{dest.replace('_', '-')} {getattr(args, dest)} contradicts the adapters of "
                             f"--lora-from {args.lora_from} ({key} {lora[key]}): drop the flag")
        setattr(args, dest, lora[key])


def is_finished(run_dir):
    try:
        return read_json(os.path.join(run_dir, "config.json")).get("finished", False)
    except (OSError, ValueError):
        return False


# -----------------------------------------------------------------------------
# Checkpoints: one safetensors file (trained tensors, optimizer state, RNG, step) plus model.safetensors


class Checkpoint:
    """Saves and restores everything --resume needs for one stage. trained(): {name: tensor} of what the
    method trains (model.safetensors); dense: {name: parameter} stepped by dense_opt (torch's AdamW)."""

    def __init__(self, out, model, trained, dense, dense_opt, smf_opt, ranks, fsdp=False):
        self.path = os.path.join(out, "checkpoint.safetensors")
        self.out, self.model, self.trained, self.dense = out, model, trained, dense
        self.dense_opt, self.smf_opt, self.ranks, self.fsdp = dense_opt, smf_opt, ranks, fsdp
        self.started, self.wall_before = time.time(), 0.0  # the loop's wall time, over every resumed segment

    def wall(self) -> float:
        return self.wall_before + time.time() - self.started

    def rng_states(self, device):
        """Every rank's CPU (and CUDA) RNG state, gathered so that rank 0 can write them all."""
        states = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(device)
        if self.ranks.world == 1:
            return {f"rng.{k}.0": v for k, v in states.items()}
        out = {}
        for k, v in states.items():
            v = v.to(device)
            seen = [torch.zeros_like(v) for _ in range(self.ranks.world)]
            dist.all_gather(seen, v)
            out.update({f"rng.{k}.{r}": s.cpu() for r, s in enumerate(seen)})
        return out

    def dense_state(self):
        """AdamW's state as {"adamw.<parameter name>.<step|exp_avg|exp_avg_sq>": full tensor} (a collective under
        FSDP, where rank 0 alone receives it)."""
        if self.fsdp:
            state = get_optimizer_state_dict(self.model, self.dense_opt, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True)).get("state", {})
        else:
            names = list(self.dense)
            state = {names[i]: s for i, s in self.dense_opt.state_dict()["state"].items()}
        return {f"adamw.{name}.{k}": torch.as_tensor(v).detach().cpu().contiguous()
                for name, s in state.items() for k, v in s.items()}

    def save(self, step):
        device = next(self.model.parameters()).device
        rng = self.rng_states(device)  # collectives first: every rank takes part
        trained = self.trained()
        dense = self.dense_state() if self.dense_opt is not None else {}
        if not self.ranks.main:
            self.ranks.barrier()
            return
        trained = {k: v.detach().contiguous().cpu() for k, v in trained.items()}
        if bad := next((k for k, v in trained.items() if not torch.isfinite(v).all()), None):
            raise RunError(f"tensor {bad} is not finite at step {step}; the checkpoint of {self.out} is left as it "
                           f"was: start a new run with a lower --lr or check the data")
        tensors = {f"model.{k}": v for k, v in trained.items()}
        tensors.update(dense)
        if self.smf_opt is not None:
            tensors.update({f"smf_opt.{k}": v.detach().cpu().contiguous()
                            for k, v in self.smf_opt.state_dict().items()})
        tensors.update(rng)
        meta = {"step": str(step), "world_size": str(self.ranks.world), "wall_seconds": f"{self.wall():.2f}"}
        atomic_write(os.path.join(self.out, "model.safetensors"), lambda p: save_file(trained, p))
        atomic_write(self.path, lambda p: save_file(tensors, p, metadata=meta))
        self.ranks.barrier()

    def load(self, device) -> int:
        """Restore the last checkpoint if there is one; returns its step (0: none)."""
        if not os.path.exists(self.path):
            return 0
        ranks = self.ranks
        try:
            with safe_open(self.path, "pt") as f:
                step, world = int(f.metadata()["step"]), int(f.metadata()["world_size"])
                self.started, self.wall_before = time.time(), float(f.metadata().get("wall_seconds", 0))
                # under FSDP only rank 0 reads the weights and AdamW moments; the others receive their shards
                tensors = {k: f.get_tensor(k) for k in f.keys()
                           if ranks.main or not self.fsdp or not k.startswith(("model.", "adamw."))}
        except Exception as e:
            raise RunError(f"checkpoint {self.path} is unreadable: {e}") from e
        if world != ranks.world:
            raise RunError(f"checkpoint {self.path} was written by {world} process(es); resume it with the same "
                           f"number (now {ranks.world})")
        trained = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        own = self.model.state_dict()
        try:
            check_tensors(own, trained, f"checkpoint {self.path} (different flags?)", allow_missing=True)
            problem = None
        except ValueError as e:
            problem = str(e)
        if int(ranks.sum_(torch.tensor(int(problem is not None), device=device))):  # every rank stops, none waits
            raise RunError(problem or f"checkpoint {self.path} does not match the model (rank 0 says why)")
        if self.fsdp:  # rank 0 broadcasts the full tensors; every rank keeps its shards
            set_model_state_dict(self.model, trained, options=StateDictOptions(full_state_dict=True, strict=False,
                                                                               broadcast_from_rank0=True))
        else:
            with torch.no_grad():
                for k, v in trained.items():
                    own[k].copy_(v)
        if self.dense_opt is not None:
            self.load_dense_state(tensors, device)
        if self.smf_opt is not None:
            self.smf_opt.load_state_dict({k[len("smf_opt."):]: v.to(device) for k, v in tensors.items()
                                          if k.startswith("smf_opt.")})
        torch.set_rng_state(tensors[f"rng.cpu.{ranks.rank}"])
        if device.type == "cuda" and f"rng.cuda.{ranks.rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{ranks.rank}"], device)
        return step

    def load_dense_state(self, tensors, device):
        state = {}
        for key, v in tensors.items():
            if key.startswith("adamw."):
                name, k = key[len("adamw."):].rsplit(".", 1)
                state.setdefault(name, {})[k] = v if (k == "step" or self.fsdp) else v.to(device)
        if self.fsdp:  # rank 0 holds the full moments (on CPU) and broadcasts them; every rank keeps its shards
            sd = get_optimizer_state_dict(self.model, self.dense_opt, options=StateDictOptions(full_state_dict=True))
            sd["state"] = state
            set_optimizer_state_dict(self.model, self.dense_opt, sd, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))
            return
        index = {name: i for i, name in enumerate(self.dense)}
        sd = self.dense_opt.state_dict()
        sd["state"] = {index[name]: s for name, s in state.items()}
        self.dense_opt.load_state_dict(sd)


def export_lora_or_full(args, model, ranks):
    """full: a Hub-format model in hf/; LoRA: optionally peft's adapter format and the merged model (each export
    first removes what an interrupted one left)."""
    model.eval()
    if ranks.main and args.method == "full":  # from the saved weights: the same path with or without FSDP
        with torch.device("meta"):
            final = Qwen2(model.config)
        final.load_hub_state_dict(load_file(os.path.join(args.out, "model.safetensors")))
        final.save_pretrained(os.path.join(args.out, "hf"), tokenizer_from=args.model)
    if ranks.main and args.export_peft:
        save_peft_adapter(model, os.path.join(args.out, "peft"), args.model)
    if ranks.main and args.export_merged:
        merge_lora(copy.deepcopy(model)).save_pretrained(os.path.join(args.out, "merged"), tokenizer_from=args.model)



# -----------------------------------------------------------------------------
# Micro-batches: as few per step as memory allows (train.py's --micro-batch auto)

# the paper's per-device batch: its SMF stage 2 selects rows and averages the loss per micro-batch of 4
PAPER_MICRO_BATCH = 4


def micro_batch_size(stage, args, device, tok, ranks, loss_fn) -> int:
    """--micro-batch: examples per forward on each rank (see train.py's help). A resumed run keeps the size it
    started with (config.json "micro_batch"), so that it continues exactly. loss_fn(model, batch): the summed
    training loss of a micro-batch, as the loop computes it."""
    per_rank = args.batch_size // ranks.world
    config = os.path.join(stage.out, "config.json")
    if args.micro_batch != "auto":
        return args.micro_batch
    if args.resume and os.path.exists(config) and (saved := read_json(config).get("micro_batch")) is not None:
        return saved
    if stage.smf is not None and (args.select_per_micro_batch or args.sum_micro_batch_means):
        if PAPER_MICRO_BATCH % ranks.world or per_rank % (PAPER_MICRO_BATCH // ranks.world):
            raise RunError(f"--recipe paper's SMF selects rows per micro-batch of {PAPER_MICRO_BATCH}: give a "
                           f"--batch-size that splits into them across {ranks.world} process(es), or --micro-batch")
        return PAPER_MICRO_BATCH // ranks.world
    if device.type != "cuda":  # memory is not what limits a CPU run
        return per_rank
    if stage.fsdp:  # a sharded forward is collective: no rank may probe alone; the paper's micro-batch or less
        return largest_that_fits(per_rank, lambda n: n <= PAPER_MICRO_BATCH)
    size = largest_that_fits(per_rank, lambda n: fits_in_memory(stage, n, device, tok, loss_fn))
    if ranks.world > 1:  # every rank runs the same split: the smallest any rank can hold
        t = torch.tensor(size, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        size = int(t)
    if ranks.main:
        print(f"micro-batch: {size} examples per forward on each rank (of {per_rank}); --micro-batch sets it",
              file=sys.stderr)
    return size


def largest_that_fits(n: int, fits) -> int:
    """The largest divisor d of n for which fits(d), trying the largest first."""
    for d in (d for d in range(n, 0, -1) if n % d == 0):
        if fits(d):
            return d
    raise RunError("out of GPU memory with a micro-batch of 1: lower --max-len")


def fits_in_memory(stage, size, device, tok, loss_fn) -> bool:
    """Whether one forward+backward of `size` copies of the longest training example fits, beside a buffer the
    size of the optimizer state (not allocated yet: AdamW's two moments of every trained tensor). It leaves no
    gradient behind and draws no random number that training uses (the training RNG is seeded after it)."""
    longest = max(stage.examples, key=lambda e: len(e[0]))
    b = {k: v.to(device) for k, v in data.collate([longest] * size, tok.pad_id).items()}
    trained = list(stage.adamw_params.values())
    if stage.smf is not None:
        trained += [mem.values.weight for mem in stage.smf["memories"].values()]
    state_bytes = sum(2 * p.numel() * p.element_size() for p in trained)
    held = []
    try:
        held.append(torch.empty(state_bytes, dtype=torch.uint8, device=device))  # the optimizer state's place
        with bf16_autocast(device):
            loss = loss_fn(stage.model, b)
        loss.backward()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        held.clear()
        loss = None
        for p in stage.model.parameters():
            p.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def after_step(step, total, stage, args, tok, ranks, saver, eval_rows, bar):
    """What train.py's loop does after each step: --eval-every probes (into eval.jsonl), the checkpoint every
    --save-every steps and at the end, and --stop-at-step."""
    if args.eval_every and step % args.eval_every == 0:
        if ranks.main:
            stage.model.eval()
            results = run_tasks(stage.model, tok, eval_rows, repetition_penalty=stage.repetition_penalty,
                                batch_size=default_batch_size(stage.model.lm_head.weight.device))
            append_log(os.path.join(stage.out, "eval.jsonl"), {"step": step, **results})
            stage.model.train()
        ranks.barrier()
    if step % args.save_every == 0 or step == total or step == args.stop_at_step:
        saver.save(step)
    if step == args.stop_at_step and step < total:
        bar.close()
        if ranks.main:
            print(f"stopped at step {step} as asked (--stop-at-step); continue with --resume", file=sys.stderr)
        raise StopRun()


# -----------------------------------------------------------------------------
# Cost: tokens/s and MFU per step (as nanochat logs them), the run's time and GPU-hours in config.json

# dense bf16 peak FLOP/s (no sparsity) of known GPUs, by a part of torch.cuda.get_device_name (first match wins)
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12,
                   "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device) -> float | None:
    """The device's dense bf16 peak from PEAK_BF16_FLOPS; None on a CPU or an unknown GPU (no MFU then)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"


class Throughput:
    """Tokens per second and, on a GPU of known peak, the model FLOPs utilisation of each optimizer step, added to
    its log record (input_tokens, tok_s, mfu) and returned for the progress bar. FLOPs as nanochat and PaLM count
    them: per token 6 per weight of every matmul (forward 2, backward 4, as if every weight trained: for LoRA and
    SMF, whose frozen weights skip their weight gradients, this overstates the work by up to a third) plus
    12 * layers * hidden * length for attention; lookups (embeddings, the memory's value table) are not matmuls,
    and tied embeddings count once, as the output layer. Tokens are the examples' own (padding excluded)."""

    def __init__(self, model, device, world, stream):
        cfg = model.config
        self.stream, self.world, self.peak = stream, world, peak_flops(device)
        lookups = [p for name, p in model.named_parameters() if name.endswith("memory.values.weight")
                   or (name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings)]
        self.matmul_weights = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in lookups)
        self.attention = 12 * cfg.num_hidden_layers * cfg.hidden_size

    def flops(self, lengths) -> int:
        """Training FLOPs of one step over examples of these token counts."""
        return sum(6 * self.matmul_weights * t + self.attention * t * t for t in lengths)

    def __call__(self, record, step) -> dict:
        lengths = self.stream.lengths(step)
        seconds = max(1e-9, record["seconds"])
        record["input_tokens"] = sum(lengths)
        record["tok_s"] = round(record["input_tokens"] / seconds, 1)
        shown = {"tok_s": f"{record['tok_s']:.0f}"}
        if self.peak:
            record["mfu"] = round(self.flops(lengths) / seconds / (self.peak * self.world), 5)
            shown["mfu"] = f"{record['mfu']:.1%}"
        return shown


def run_cost(out, device, world) -> dict:
    """What a finished stage cost: the loop's wall time (steps, checkpoints, --eval-every; summed over resumed runs
    up to the last checkpoint, from its metadata; not loading, background reads or exports), GPU-hours (that time x
    processes, on a GPU), and from the log the optimizer steps' own time, tokens, tokens/s and the time-weighted
    mean MFU."""
    log, ckpt = os.path.join(out, "log.jsonl"), os.path.join(out, "checkpoint.safetensors")
    with open(log) if os.path.exists(log) else nullcontext([]) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    wall = None
    if os.path.exists(ckpt):
        with safe_open(ckpt, "pt") as f:
            wall = float(f.metadata().get("wall_seconds", "nan"))
    seconds = sum(r["seconds"] for r in steps)
    tokens = sum(r.get("input_tokens", 0) for r in steps)
    mfu = [(r["mfu"], r["seconds"]) for r in steps if "mfu" in r]
    on_gpu = torch.device(device).type == "cuda"
    wall = seconds if wall is None or math.isnan(wall) else wall
    return {"device": device_name(device), "world_size": world, "steps": len(steps), "wall_seconds": round(wall, 2),
            "step_seconds": round(seconds, 2), "gpu_hours": round(wall * world / 3600, 4) if on_gpu else 0.0,
            "input_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "mfu": round(sum(m * s for m, s in mfu) / seconds, 5) if mfu and seconds else None}


class StepGuard:
    """Stops a run before an update with a non-finite loss or gradient norm (so no non-finite tensor is ever
    saved), and warns once when the gradient norm has been 0 and the loss flat (within 1e-3) for `patience`
    steps (a dead model, e.g. after too large an lr)."""

    def __init__(self, out, patience=5):
        self.out, self.patience, self.still, self.last, self.warned = out, patience, 0, None, False

    def check(self, step, loss, grad_norm=0.0):
        for what, v in (("loss", loss), ("gradient norm", grad_norm)):
            if not math.isfinite(v):
                raise RunError(f"{what} is {v} at step {step} in {self.out}; stopped before the update. The last "
                               f"checkpoint holds only finite values: start a new run with a lower --lr (--resume "
                               f"continues with the same flags) or check the data")

    def dead(self, loss, grad_norm, step):
        """A warning (printed, and returned for the log) the first time the model looks dead, else None."""
        self.still = self.still + 1 if grad_norm == 0 and (self.last is None or abs(loss - self.last) < 1e-3) else 0
        self.last = loss
        if self.still < self.patience or self.warned:
            return None
        self.warned = True
        msg = (f"warning: the loss has stayed near {loss:.6g} with a gradient norm of 0 for {self.still} steps (step "
               f"{step}): the model may be dead (too large an --lr?)")
        print(msg, file=sys.stderr)
        return msg
