"""
What is on disk (as nanochat's checkpoint_manager.py): the run directory (what --out may be, its lock, args.json and
--resume), chains of runs, checkpoints (trained tensors, optimizer state, every rank's RNG state and the step, in one
safetensors file), the step log and the cost of a stage (read here, computed by common.stage_cost), the exports (a
Hub-format folder, peft's adapter format), and rebuilding a model from a Hub id, a model folder or a run directory
(load_model). Files are written with model.py's atomic_write and write_json.

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
    eval*.json, samples*.jsonl   eval.py's results and per-example logs, if it was pointed here (is_eval_output)

train.py never writes into a directory holding anything else, and a live run holds an exclusive lock on its
directory (released by the OS when the process dies, so a run killed with kill -9 leaves no obstacle). What a
killed save leaves (is_temp_file: ours and safetensors' temporary files) is removed when the run resumes.
"""

import copy
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import memory
from common import RunError, default_dtype, parse_dtype, resolve_device, stage_cost
from data import Tokenizer
from model import (MLP, LoRALinear, Qwen2, Qwen2Config, add_lora, atomic_write, check_tensors, load_safetensors_dir,
                   load_tensors, looks_like_hub_id, lora_state_dict, merge_lora, read_json, resolve_model_dir,
                   safetensors_files, unreadable, write_json)

RUN_FILES = {"args.json", "config.json", "model.safetensors", "log.jsonl", "checkpoint.safetensors",
             "background.safetensors", "eval.jsonl", "retrofit", "hf", "peft", "merged", ".lock"}
# The flags that do not change what a run trains: they may differ between a run and its resumption (every other flag
# must be the same), and experiments/paper.py leaves them out when it names and groups runs.
RESUME_FREE = {"resume", "stop_at_step", "device", "eval_every", "eval_tasks", "eval_limit", "eval_data",
               "save_every", "compile", "out", "check_flags"}  # out: a moved run directory resumes where it is now


# -----------------------------------------------------------------------------
# Files: atomic writes, JSON, logs

def is_run_dir(path: str) -> bool:
    """A run directory of train.py (its config.json has a "method"), which load_model rebuilds; not a model
    folder in the Hub layout."""
    cfg = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.exists(cfg)):
        return False
    return "method" in read_json(cfg)


def is_eval_output(name: str) -> bool:
    """What eval.py may write into a run directory: results eval*.json and per-example logs samples*.jsonl
    (never train.py's eval.jsonl); train.py accepts these names there, so a run evaluated in place still resumes."""
    return re.fullmatch(r"eval[\w.-]*\.json|samples[\w.-]*\.jsonl", name) is not None



def is_temp_file(name: str) -> bool:
    """A temporary file of an interrupted save: atomic_write's NAME.tmpPID, or the .tmpXXXXXX that safetensors'
    save_file writes beside its target before renaming it."""
    return re.fullmatch(r".+\.tmp\d+|\.tmp[A-Za-z0-9]{6}", name) is not None


def remove_temp_files(folder: str):
    """Remove what interrupted saves left in `folder` (before writing there again)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if is_temp_file(name):
                os.remove(os.path.join(folder, name))


def file_problem(path: str) -> str | None:
    """Why a file cannot be written at path (a folder there, no folder to hold it, a read-only place), or None:
    checked by the scripts before their work, not after."""
    if os.path.isdir(path):
        return "is a folder; give a file name"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return "the folder it would go in does not exist"
    return None if writable(folder) else f"cannot write in {folder} (read-only?)"


def folder_problem(folder: str) -> str | None:
    """Why outputs cannot go in `folder` (a file there; it, or the nearest folder above it that exists, where it
    would be made, is read-only), or None: checked by the scripts before any work."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return "is a file, not a folder"
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    return None if writable(existing) else f"cannot write in {existing} (read-only?)"


def writable(folder: str) -> bool:
    """Whether a file can be created in folder, tried (permissions, a read-only mount, a full disk), so that a
    script refuses an output place before its work, not after."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test"):
            return True
    except OSError:
        return False


def weights_fingerprint(folder: str) -> str:
    """What identifies a folder's weights (its model.safetensors or shards) wherever they lie: a digest of every
    tensor's name, dtype, shape and bytes, in name order (so a moved, copied or re-downloaded model, however it is
    sharded, has the same one, and other weights another). Recorded by train.py as the run's base_fingerprint."""
    digests = {}
    for file in safetensors_files(folder):
        try:
            with safe_open(file, "pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}\n".encode())
                    h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                    digests[name] = h.hexdigest()
        except Exception as e:  # safetensors' SafetensorError: truncated, corrupt, not safetensors
            raise unreadable(file, e) from e
    return hashlib.sha256("".join(f"{n} {d}\n" for n, d in sorted(digests.items())).encode()).hexdigest()[:20]


def check_base(run_dir: str, run: dict, base_dir: str):
    """A run's base model must be the weights it was trained on (config.json "base_fingerprint", recorded since
    train.py records it; a full run holds all its weights and needs only the base's config)."""
    want = run.get("base_fingerprint")
    if want is None or run.get("method") == "full":
        return
    if (have := weights_fingerprint(base_dir)) != want:
        raise ValueError(f"{run_dir}: the base model at {base_dir} is not the one it was trained on (weights "
                         f"fingerprint {have}, the run's {want}); give the run's base with --base PATH")


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



# -----------------------------------------------------------------------------
# The run directory


def check_out_dir(out: str, resume: bool):
    """--out must be a new or empty directory, or a run directory of train.py, where files can be written: refuse
    anything else, naming what is there. A run directory in which no step completed may be started afresh; one with
    a checkpoint needs --resume, and --resume needs a run, except one stopped before its first stage began (only its
    .lock, e.g. killed during the background reads), which is started afresh. -> whether there is a run to resume."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} is a file, not a directory: choose another --out")
    if problem := folder_problem(out):
        raise RunError(f"--out {out}: {problem}: choose another --out")
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
        if ".lock" in have and have - {".lock", "background.safetensors"} <= ours:  # stopped before its first stage
            print(f"--resume: {out} holds no step yet (stopped before its first stage began): starting it afresh",
                  file=sys.stderr)
            return False
        raise RunError(f"--resume: there is no run to resume in {out} (no args.json); run without --resume")
    if not resume and started:
        raise RunError(f"{out} already holds a run with completed steps: pass --resume to continue it with the same "
                       f"flags, or choose another --out")
    return resume


class Lock:
    """An exclusive lock on a run directory (fcntl.flock on its .lock file) for as long as the process lives; `who`
    names the kind of process in the error another one gets."""

    def __init__(self, out: str, who: str = "train.py"):
        self.created = not os.path.isdir(out)  # a directory this run made, removed again if the run never starts
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, ".lock")
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.seek(0)
            owner = self.f.read().strip() or "?"
            self.f.close()
            raise RunError(f"{out} is in use by another {who} process (pid {owner}): wait for it to end, or "
                           f"choose another --out") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(str(os.getpid()))
        self.f.flush()

    def release(self):
        """Unlock; a directory this run made that holds nothing but the lock (the run failed to start) is removed,
        so that no empty run directory is left to be mistaken for a run."""
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
        folder = os.path.dirname(self.path)
        if self.created and os.listdir(folder) == [".lock"]:
            os.remove(self.path)
            os.rmdir(folder)


def first_change(now: dict, before: dict, free=()) -> str | None:
    """The first setting of `now` (those in `free` aside) whose value, as JSON stores it, differs from the one
    recorded in `before`; a setting `before` lacks (a file of an older version) counts as unchanged. train.py's and
    eval.py's --resume both compare with it."""
    return next((k for k, v in now.items() if k not in free and k in before and json.loads(json.dumps(v)) != before[k]),
                None)


# The paths whose weights args.json identifies by a fingerprint: on --resume they may name another place holding the
# same weights (a moved base folder, a moved chain), which check_resume_weights checks once they are read
MOVABLE = {"model": "base_fingerprint", "memory_from": "from_fingerprint", "lora_from": "from_fingerprint"}


def check_resume_args(flags: dict, saved: dict):
    """--resume takes the run's own flags ({dest: value}, every flag of train.py); only RESUME_FREE may differ
    (paths compared resolved), and the paths of MOVABLE whose weights the run identified by a fingerprint."""
    movable = {k for k, fp in MOVABLE.items() if saved.get(fp) is not None} | set(MOVABLE.values())
    if looks_like_hub_id(str(flags.get("model"))) or looks_like_hub_id(str(saved.get("model"))):
        movable.discard("model")  # a Hub id names its weights itself: compared as given, before anything is fetched
    if (k := first_change(flags, saved, RESUME_FREE | movable)) in ("max_steps", "epochs"):
        raise RunError(f"--resume: --{k.replace('_', '-')} is {flags[k]!r} but the run was started with {saved[k]!r}; "
                       "a run resumes to its own end (its lr schedule ends there): to train on from a finished run, "
                       "start a new one from it (smf: --memory-from RUN, lora: --lora-from RUN, full: --model RUN/hf)")
    if k is not None:
        raise RunError(f"--resume: --{k.replace('_', '-')} is {flags[k]!r} but the run was started with {saved[k]!r}; "
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


def check_resume_weights(out: str, flags: dict):
    """--resume: the weights at --model (and --memory-from / --lora-from) are those the run started from, wherever
    they lie now (flags: with their fingerprints, as args.json records them)."""
    saved = read_json(os.path.join(out, "args.json"))
    for flag, key in MOVABLE.items():
        if flags.get(flag) is not None and saved.get(key) is not None and flags.get(key) != saved[key]:
            raise RunError(f"--resume: --{flag.replace('_', '-')} {flags[flag]} holds other weights than the run "
                           f"started from (weights fingerprint {flags.get(key)}, the run's {saved[key]}; it started "
                           f"from {saved.get(flag)})")


def check_resume(out: str, flags: dict):
    """--resume: the flags must be the run's (args.json), checked before anything is fetched or loaded."""
    check_resume_args(flags, read_json(os.path.join(out, "args.json")))


def begin_run(out: str, flags: dict, resume: bool, ranks, device):
    """Write args.json (flags: every resolved flag, and the base model's revision) once the first stage has loaded
    its model and data (a start-up error leaves none), or on --resume check that the flags match the run's."""
    if resume:
        check_resume(out, flags)
    elif ranks.main:
        write_json(os.path.join(out, "args.json"), {**flags, "device": str(device), "world_size": ranks.world,
                                                     **run_info()})


def begin_stage(out: str, config: dict, step: int, total: int, ranks) -> bool:
    """Whether a stage (at `step` of `total`, from its checkpoint) has steps left; if so, config.json is written
    unfinished. The log of a stage as one run: a fresh stage starts an empty log, a resumed one keeps the lines up to
    the checkpoint's step; temporary files of an interrupted save are removed."""
    if ranks.main:
        remove_temp_files(out)
        for name in ("log.jsonl", "eval.jsonl"):
            truncate_log(os.path.join(out, name), step)
        print(f"{'resuming' if step else 'starting'} {out} at step {step}/{total}", file=sys.stderr)
        if step < total:
            write_json(os.path.join(out, "config.json"), {**config, "finished": False})
    return step < total


def finish_stage(out, config, ranks, device):
    """Mark a stage finished (eval.py and --memory-from accept only finished runs), with what it cost."""
    config["finished"] = True
    if ranks.main:
        config["cost"] = run_cost(out, device, ranks.world)
        write_json(os.path.join(out, "config.json"), config)
    ranks.barrier()


# -----------------------------------------------------------------------------
# Chains: a run that continues a finished one (--memory-from, --lora-from, --model RUN/hf)


def finished_run(run_dir: str, base_config: dict, model_name: str, flag: str, methods: tuple,
                 base_fingerprint: str | None = None) -> dict:
    """The config.json of a run that a flag continues from (--memory-from, --lora-from): a finished run of one of
    `methods` on the same base model (its config, and its weights where both fingerprints are known)."""
    if not is_finished(run_dir):
        raise RunError(f"{flag} {run_dir}: not a finished {' or '.join(methods)} run (no finished config.json)")
    run = read_json(os.path.join(run_dir, "config.json"))
    if run.get("method") not in methods:
        raise RunError(f"{flag} {run_dir}: a {run.get('method')} run, not a {' or '.join(methods)} run")
    if run.get("base_config") != base_config:
        diff = sorted(k for k in base_config if base_config[k] != run.get("base_config", {}).get(k))
        raise RunError(f"{flag} {run_dir}: its base model differs from --model {model_name} "
                       f"({', '.join(diff) or 'config'})")
    if None not in (base_fingerprint, run.get("base_fingerprint")) and base_fingerprint != run["base_fingerprint"]:
        raise RunError(f"{flag} {run_dir}: it was trained on other base weights than --model {model_name} (weights "
                       f"fingerprint {run['base_fingerprint']}, --model's {base_fingerprint})")
    return run


def memory_run(memory_dir: str, base_config: dict, model_name: str, base_fingerprint: str | None = None) -> dict:
    """The config.json of a --memory-from run: a finished retrofit, an smf run (which carries its chain's stage-1
    data), or a full run of a model with memory layers (pretrained with them: its base is its own hf/ export), on
    the same base model."""
    full = is_finished(memory_dir) and read_json(os.path.join(memory_dir, "config.json")).get("method") == "full"
    run = finished_run(memory_dir, base_config, model_name, "--memory-from", ("retrofit", "smf", "full"),
                       None if full else base_fingerprint)  # a full run's own weights are its hf/: checked below
    if run.get("memory") is None or "stage1_data" not in run:
        raise RunError(f"--memory-from {memory_dir}: not a retrofit or smf run of this version of train.py, nor a "
                       f"full run with memory layers")
    export = os.path.join(memory_dir, "hf")
    if run["method"] == "full" and base_fingerprint != weights_fingerprint(export):
        raise RunError(f"--memory-from {memory_dir}: its memory was trained with the weights of {export}; give "
                       f"--model {export} (--model {model_name} holds other weights)")
    return run


def load_trained(own: dict, run_dir: str, flag: str):
    """Copy a finished run's model.safetensors into `own` ({name: tensor} of a model's parameters; every key and
    shape checked), or a RunError naming the file. `own` may be one part of that file: the memory (a full or LoRA
    run of a model with memory layers holds it beside its other tensors) or the adapters."""
    weights = os.path.join(run_dir, "model.safetensors")
    try:
        state = load_file(weights)
        for part in (".memory.", ".lora_"):
            if all(part in k for k in own):
                state = {k: v for k, v in state.items() if part in k}
        load_tensors(own, state, weights)
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


def lora_from(run_dir: str) -> dict:
    """--lora-from RUN: the adapters' shape of a LoRA run, {"r", "alpha", "targets"} (train.py's flags must agree)."""
    cfg = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg):
        raise ValueError(f"--lora-from {run_dir}: no config.json (not a run of train.py)")
    lora = read_json(cfg).get("lora") or {}
    for key in ("r", "alpha", "targets"):
        if key not in lora:
            raise ValueError(f"--lora-from {run_dir}: not a LoRA run (its config.json has no lora {key})")
    return {key: lora[key] for key in ("r", "alpha", "targets")}


def is_finished(run_dir) -> bool:
    """Whether run_dir holds a run whose config.json says it finished."""
    try:
        return read_json(os.path.join(run_dir, "config.json")).get("finished", False)
    except (OSError, ValueError):
        return False


# -----------------------------------------------------------------------------
# Cost: the wall time, GPU-hours, tokens/s and MFU of a finished stage (config.json "cost")


def run_cost(out, device, world) -> dict:
    """What a finished stage cost (common.stage_cost) from its log.jsonl and its checkpoint's wall time (summed over
    resumed runs up to the last checkpoint, in its metadata)."""
    log, ckpt = os.path.join(out, "log.jsonl"), os.path.join(out, "checkpoint.safetensors")
    with open(log) if os.path.exists(log) else nullcontext([]) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    wall = None
    if os.path.exists(ckpt):
        with safe_open(ckpt, "pt") as f:
            wall = float(f.metadata().get("wall_seconds", "nan"))
    return stage_cost(steps, wall, device, world)


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

    def dense_names(self) -> list[str]:
        """The names of dense_opt's parameters in the order of its state_dict's indices (group by group)."""
        name = {id(p): n for n, p in self.dense.items()}
        return [name[id(p)] for group in self.dense_opt.param_groups for p in group["params"]]

    def dense_state(self):
        """AdamW's state as {"adamw.<parameter name>.<step|exp_avg|exp_avg_sq>": full tensor} (a collective under
        FSDP, where rank 0 alone receives it)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (  # FSDP only: slow to import
                StateDictOptions, get_optimizer_state_dict)
            state = get_optimizer_state_dict(self.model, self.dense_opt, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True)).get("state", {})
        else:
            names = self.dense_names()
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
            from torch.distributed.checkpoint.state_dict import (  # FSDP only: slow to import
                StateDictOptions, set_model_state_dict)
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
            from torch.distributed.checkpoint.state_dict import (  # FSDP only: slow to import
                StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict)
            sd = get_optimizer_state_dict(self.model, self.dense_opt, options=StateDictOptions(full_state_dict=True))
            sd["state"] = state
            set_optimizer_state_dict(self.model, self.dense_opt, sd, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))
            return
        index = {name: i for i, name in enumerate(self.dense_names())}
        sd = self.dense_opt.state_dict()
        sd["state"] = {index[name]: s for name, s in state.items()}
        self.dense_opt.load_state_dict(sd)


# -----------------------------------------------------------------------------
# Exports: a Hub-format model folder, peft's adapter format


def save_pretrained(model: Qwen2, out_dir: str, tokenizer_from: str | None = None):
    """Write a Hub-format directory (config.json + model.safetensors) of a plain Qwen2 that transformers and we can
    load; tokenizer_from: a model (Hub id or directory) whose tokenizer and generation config files to copy."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("save_pretrained: the model has LoRA adapters; merge_lora(model) first, "
                         "or save_peft_adapter for the adapters alone")
    if any(b.memory is not None or b.mlp is None for b in model.model.layers):
        raise ValueError("save_pretrained: the model has memory layers, which a Hub Qwen2 checkpoint cannot hold; "
                         "save them with memory.memory_state_dict (train.py's run directory does)")
    os.makedirs(out_dir, exist_ok=True)
    remove_temp_files(out_dir)  # what an interrupted export left
    hub = model.hub_state_shapes()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in hub}
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    atomic_write(os.path.join(out_dir, "model.safetensors"), lambda p: save_file(state, p, metadata={"format": "pt"}))
    write_json(os.path.join(out_dir, "config.json"), cfg)
    if tokenizer_from is not None:
        src = resolve_model_dir(tokenizer_from)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json",
                     "chat_template.jinja"):
            if os.path.exists(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))


# peft's file format, so an adapter trained here loads with PeftModel.from_pretrained (and back):
# adapter_model.safetensors with keys `base_model.model.<our module name>.lora_{A,B}.weight`, adapter_config.json.
PEFT_PREFIX = "base_model.model."


def save_peft_adapter(model, out_dir: str, base_model_name_or_path: str):
    """Write the adapters as peft does (adapter_model.safetensors + adapter_config.json), without peft."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters")
    settings = {(m.r, m.lora_alpha, m.lora_dropout.p) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"save_peft_adapter: adapters differ in (r, alpha, dropout): {sorted(settings)}")
    (r, alpha, dropout), = settings
    state = {}
    for name, m in layers.items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous()  # (r, in)
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous()  # (out, r)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    os.makedirs(out_dir, exist_ok=True)
    remove_temp_files(out_dir)  # what an interrupted export left
    atomic_write(os.path.join(out_dir, "adapter_model.safetensors"),
                 lambda p: save_file(state, p, metadata={"format": "pt"}))
    write_json(os.path.join(out_dir, "adapter_config.json"), config)


def export_run(out: str, model, run: dict, peft: bool = False, merged: bool = False):
    """A stage's exports into its run directory `out` (run: its config.json; each export first removes what an
    interrupted one left): full: a Hub-format model in hf/ (always; rebuilt from the saved model.safetensors, so
    the same with or without FSDP); LoRA: peft's adapter format in peft/, the merged model in merged/, if asked."""
    base = run["base_model"]
    if run["method"] == "full":
        final, _ = rebuild(out, run, dtype=None, device=None)
        save_pretrained(without_memory(final), os.path.join(out, "hf"), tokenizer_from=base)
    if peft:
        save_peft_adapter(model, os.path.join(out, "peft"), base)
    if merged:
        save_pretrained(merge_lora(copy.deepcopy(model)), os.path.join(out, "merged"), tokenizer_from=base)


def without_memory(model):
    """The model without its memory layers, in place (hf/ of a full run with memory layers: the base an smf run
    puts that memory back into with --memory-from): a block whose MLP the memory replaced gets an all-zero MLP,
    which adds nothing, so the block is its attention alone."""
    for block in model.model.layers:
        if block.memory is not None:
            block.memory = None
            if block.mlp is None:
                like = block.input_layernorm.weight
                block.mlp = MLP(model.config).to(like.device, like.dtype).requires_grad_(False)
                for p in block.mlp.parameters():
                    p.zero_()
    return model


# -----------------------------------------------------------------------------
# Rebuilding a model: a Hub id, a model folder, or a run directory


def rebuild(run_dir: str, run: dict, dtype, device, base: str | None = None):
    """The model a run directory describes (its config.json `run`) -> (model, base model folder): the base rebuilt
    from "base_model" (at "base_revision"; or from `base`, a folder where that model lies now), checked to be the
    weights the run was trained on (check_base), memory layers (smf, retrofit) or LoRA adapters (lora) added, and
    the run's model.safetensors loaded into them, its key set and every shape checked; for "full" that file holds
    every Hub tensor (and the memory's, for a model trained with memory layers: fp32, as every memory is built).
    dtype None: the base's weights as stored."""
    base = resolve_model_dir(base) if base else recorded_base(run_dir, run)
    check_base(run_dir, run, base)
    weights = os.path.join(run_dir, "model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"run directory without weights: {weights}")
    state = load_safetensors_dir(run_dir)
    method = run["method"]
    if method not in ("smf", "retrofit", "lora", "full"):
        raise ValueError(f"{run_dir}/config.json: unknown method {method!r} (expected smf, retrofit, lora or full)")
    if method == "full":  # every Hub tensor is in the run's file; only the base's config.json is needed
        with torch.device("meta"):
            model = Qwen2(Qwen2Config.from_json(os.path.join(base, "config.json")))
    else:
        model = Qwen2.from_pretrained(base, dtype=dtype, device=device)
    if run.get("memory"):  # smf, retrofit; a full or LoRA run of a model with memory layers (in its file too)
        with torch.device("meta") if method == "full" else nullcontext():
            memory.add_memory(model, memory.MemoryConfig.from_dict(run["memory"]))
    if method == "full":
        model = model.load_hub_state_dict(state, dtype=dtype, device=device)
        for mem in memory.memory_layers(model).values():
            mem.float()
        return model, base
    if method == "lora":
        lora = run["lora"]
        add_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], targets=lora["targets"])
    expected = {**lora_state_dict(model), **memory.memory_state_dict(model)}  # the adapters (lora), the memory
    load_tensors(expected, state, weights)  # key set and shapes checked, copied into the fp32 tensors
    return model, base


def recorded_base(run_dir: str, run: dict) -> str:
    """The folder of the base model a run recorded (config.json "base_model", at "base_revision"). Where it is not
    there any more: a full run's own hf/ export (it holds every weight; the base gives only config and tokenizer),
    else an error that names --base."""
    try:
        return resolve_model_dir(run["base_model"], run.get("base_revision"))
    except FileNotFoundError as e:
        own = os.path.join(run_dir, "hf")
        if run["method"] == "full" and os.path.isfile(os.path.join(own, "config.json")):
            return own
        raise FileNotFoundError(f"{e} (the base model of run {run_dir}: moved? give its new place with --base "
                                "PATH)") from e


def model_problem(name: str) -> str | None:
    """Why a folder holds nothing load_model can load, told before loading anything (eval.py checks it before it
    reads its data): neither a model folder (config.json) nor a train.py run (e.g. what a run that failed to start
    left), an unfinished run, or a broken config.json; None for a loadable folder or a name that is no folder."""
    if not os.path.isdir(name):
        return None  # a Hub id, or missing: load_model says which
    if not os.path.exists(os.path.join(name, "config.json")):
        return "holds neither a model (config.json) nor a train.py run"
    try:
        if is_run_dir(name) and read_json(os.path.join(name, "config.json")).get("finished") is False:
            return "the run has not finished (continue it with train.py --resume)"
    except ValueError as e:  # a broken config.json, named
        return str(e)
    return None


def load_model(name_or_dir: str, dtype=None, device=None, base: str | None = None):
    """
    -> (model in eval mode, tokenizer, info). name_or_dir: a Hub id, a model directory (Hub layout), or a finished
    run directory of train.py (rebuild; base: where its base model lies now, if not where the run recorded it).
    The base is in `dtype` (a torch.dtype or a name in common.DTYPES; default common.default_dtype: bf16 GPU, fp32
    CPU); memory and adapters stay fp32, except as the run's recipe says (the paper's: a memory of precision "bf16"
    is cast to bf16, LoRA adapters are merged). device: a torch.device or a name ("auto", "cpu", "cuda:1", ...). A
    folder that holds nothing to load (model_problem) is a ValueError naming it.
    info: {"path", "method", "base_model", "dtype", "device", "repetition_penalty", "generation_config"}.
    """
    device = resolve_device(device)
    dtype = default_dtype(device) if dtype is None else parse_dtype(dtype)
    if problem := model_problem(name_or_dir):
        raise ValueError(f"{name_or_dir}: {problem}")
    method, run = None, {}
    if is_run_dir(name_or_dir):
        run = read_json(os.path.join(name_or_dir, "config.json"))
        method = run["method"]
        if "base_model" not in run:
            raise ValueError(f"{name_or_dir}/config.json has no base_model")
        model, base = rebuild(name_or_dir, run, dtype, device, base)
        if run.get("memory") and run["memory"].get("precision") == "bf16":
            for mem in memory.memory_layers(model).values():  # the paper's code evaluates the whole model
                mem.to(torch.bfloat16)                        # in bf16, memory included
        if method == "lora" and run["lora"].get("merge_for_eval"):
            merge_lora(model)  # into the base weights in their dtype, as the paper's merge_and_unload
    else:
        if base is not None:
            raise ValueError(f"--base applies to a run directory; {name_or_dir} is a model")
        base = resolve_model_dir(name_or_dir)
        model = Qwen2.from_pretrained(base, dtype=dtype, device=device)
    model.eval()
    tok = Tokenizer.from_pretrained(base)
    gen_path = os.path.join(base, "generation_config.json")
    gen = read_json(gen_path) if os.path.exists(gen_path) else {}
    info = {"path": name_or_dir, "method": method, "base_model": run.get("base_model", name_or_dir),
            "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "repetition_penalty": float(gen.get("repetition_penalty", 1.0)), "generation_config": gen}
    return model, tok, info
