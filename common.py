"""
The machine, shared by every script (as nanochat's common.py): device and dtype, data-parallel ranks (DDP, FSDP),
argparse as the scripts use it, the micro-batch that fits the GPU, tokens/s and MFU, the step guard that stops a
run before a non-finite update, and child processes that die with their script. Imports nothing of this project.
"""

import argparse
import ctypes
import math
import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP



class RunError(Exception):
    """A problem with the user's input or the run; printed as one line, exit status 1."""


class StopRun(Exception):
    """--stop-at-step reached: leave as if interrupted, exit status 0."""


def die_with_parent():
    """A child process's preexec_fn: on Linux, SIGTERM it when the script that started it dies (even by kill -9), so
    that no training job outlives an interrupted experiment (elsewhere: nothing)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# -----------------------------------------------------------------------------
# Device and dtype: the one policy every script uses

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name="auto") -> torch.device:
    """"auto" (or None): cuda when available, else cpu; a cuda device on a machine without CUDA is a ValueError."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r}: not a device name (expected auto, cpu, cuda, cuda:1, ...)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name}: CUDA is not available on this machine")
    return device


def bf16_autocast(device):
    """bf16 autocast on GPU (the frozen base is bf16 there); nothing on CPU, where everything runs in fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else nullcontext()


def default_dtype(device) -> torch.dtype:
    """Weights that do not train: bfloat16 on GPU, float32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(name) -> torch.dtype:
    """A torch.dtype, or one of the names in DTYPES ("bf16", "float32", ...)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


# -----------------------------------------------------------------------------
# Command lines: argparse as every script here uses it


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show real defaults (0 included); flags whose default is None, False or empty say theirs in their help."""

    def _get_help_string(self, action):
        quiet = action.default is None or action.default is False or action.default in ([], "") or \
            action.default == argparse.SUPPRESS or "(default" in (action.help or "")
        return action.help if quiet else super()._get_help_string(action)


class ArgParser(argparse.ArgumentParser):
    """argparse with real defaults in --help and an error as one line plus a hint, not 35 lines of usage."""

    def __init__(self, **kw):
        super().__init__(formatter_class=HelpFormatter, **kw)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def given(self, argv=None) -> set:
        """The dests of the flags on the command line (parsed again with every default suppressed)."""
        defaults = {a: a.default for a in self._actions}
        for a in defaults:
            a.default = argparse.SUPPRESS
        try:
            return set(vars(self.parse_args(argv)))
        finally:
            for a, d in defaults.items():
                a.default = d

    @staticmethod
    def flag(dest: str) -> str:
        return "--" + dest.replace("_", "-")

    @staticmethod
    def int_or_auto(s: str):  # a flag's type: argparse names it in its errors
        return s if s == "auto" else int(s)

    def show_presets(self, presets: dict):
        """Append to each flag set by a preset (a {name: {dest: value}}, e.g. train.py's recipes) every preset's
        value: "(default: paper bf16, clean fp32)"."""
        for action in self._actions:
            if action.dest in next(iter(presets.values())):
                action.help += " (default: " + ", ".join(f"{n} {v[action.dest]}" for n, v in presets.items()) + ")"

    def check_flags(self, args, given: set, method: str | None = None):
        """The checks declared beside each flag (add_flag): a flag given (`given`: self.given(argv)) for a method
        it does not apply to is an error, never ignored; then every number is finite and in its range."""
        for a in self._actions:
            if getattr(a, "methods", None) is not None and a.dest in given and method not in a.methods:
                self.error(f"{a.option_strings[0]} does not apply to --method {method} "
                           f"({a.hint or 'only to ' + ', '.join(a.methods)})")
        for a in self._actions:
            low, high, v = getattr(a, "low", None), getattr(a, "high", None), getattr(args, a.dest, None)
            if low is not None and v is not None and not (math.isfinite(v) and (v > low[0] if low[1] else
                                                                                 v >= low[0])):
                self.error(f"{a.option_strings[0]} must be a finite number {'>' if low[1] else '>='} {low[0]}, "
                           f"got {v}")
            if high is not None and v is not None and (v >= high[0] if high[1] else v > high[0]):
                self.error(f"{a.option_strings[0]} must be {'below' if high[1] else 'at most'} {high[0]}, got {v}")


def add_flag(group, *names, at_least=None, above=None, at_most=None, below=None, methods=None, hint=None,
             **kw) -> argparse.Action:
    """group.add_argument(*names, **kw) with its checks declared beside it (ArgParser.check_flags runs them; every
    script's range checks are these): the lowest value allowed (at_least, or above: strictly greater; numbers must
    also be finite), the highest (at_most, or below: strictly less), and the methods it applies to (hint: what the
    error says instead of listing them)."""
    action = group.add_argument(*names, **kw)
    action.high = (at_most, False) if at_most is not None else (below, True) if below is not None else None
    action.low = (at_least, False) if at_least is not None else (above, True) if above is not None else None
    action.methods, action.hint = methods, hint
    return action


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
# Micro-batches: as few per step as memory allows (train.py's --micro-batch auto)

def micro_batch_size(per_rank: int, device, ranks, fits, fsdp: bool = False, fsdp_cap: int = 4) -> int:
    """Examples per forward on each rank when train.py's --micro-batch is auto: the whole batch on the CPU (memory
    is not what limits there); on a GPU the largest divisor of per_rank for which fits(n) (one forward+backward of
    n examples, e.g. fits_in_memory), the smallest any rank can hold. Under FSDP a forward is collective, so no
    rank may probe alone: the largest divisor up to fsdp_cap."""
    if device.type != "cuda":
        return per_rank
    if fsdp:
        return largest_that_fits(per_rank, lambda n: n <= fsdp_cap)
    size = largest_that_fits(per_rank, fits)
    if ranks.world > 1:  # every rank runs the same split
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


def fits_in_memory(model, batch: dict, trained: list, loss_fn, device) -> bool:
    """Whether one forward+backward of `batch` (loss_fn(model, batch): its summed loss) fits, beside a buffer the
    size of the optimizer state (not allocated yet: AdamW's two moments of every `trained` tensor). It leaves no
    gradient behind and draws no random number that training uses (the training RNG is seeded after it)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    state_bytes = sum(2 * p.numel() * p.element_size() for p in trained)
    held = []
    try:
        held.append(torch.empty(state_bytes, dtype=torch.uint8, device=device))  # the optimizer state's place
        with bf16_autocast(device):
            loss = loss_fn(model, batch)
        loss.backward()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        held.clear()
        loss = None
        for p in model.parameters():
            p.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


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


# -----------------------------------------------------------------------------
# Cost, all of it here: of a step (Throughput: tokens/s, MFU), of a stage (stage_cost, config.json "cost") and of
# several runs (summed_cost, paper.py's table)


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


def stage_cost(steps: list, wall: float | None, device, world) -> dict:
    """What a finished stage cost: the loop's wall time (`wall`: steps, checkpoints, --eval-every; not loading,
    background reads or exports; None or NaN: the steps' own time), GPU-hours (that time x processes, on a GPU), and
    from its log records (`steps`) the optimizer steps' own time, tokens, tokens/s and the time-weighted mean MFU."""
    seconds = sum(r["seconds"] for r in steps)
    tokens = sum(r.get("input_tokens", 0) for r in steps)
    mfu = [(r["mfu"], r["seconds"]) for r in steps if "mfu" in r]
    on_gpu = torch.device(device).type == "cuda"
    wall = seconds if wall is None or math.isnan(wall) else wall
    return {"device": device_name(device), "world_size": world, "steps": len(steps), "wall_seconds": round(wall, 2),
            "step_seconds": round(seconds, 2), "gpu_hours": round(wall * world / 3600, 4) if on_gpu else 0.0,
            "input_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "mfu": round(sum(m * s for m, s in mfu) / seconds, 5) if mfu and seconds else None}


def summed_cost(costs: list) -> dict:
    """Several runs' stage_cost summed: {"runs", "wall_seconds", "gpu_hours", "unknown" (runs of an older train.py,
    which recorded none: None in costs)}."""
    known = [c for c in costs if c is not None]
    return {"runs": len(costs), "wall_seconds": sum((c["wall_seconds"] for c in known), 0.0),
            "gpu_hours": sum((c["gpu_hours"] for c in known), 0.0), "unknown": len(costs) - len(known)}


class StepGuard:
    """Stops a run before an update with a non-finite loss or gradient norm (so no non-finite tensor is ever
    saved), and warns once when the gradient norm has been 0 and the loss flat (within 1e-3) for `patience`
    steps (a dead model, e.g. after too large an lr)."""

    def __init__(self, out, patience=5):
        self.out, self.patience, self.still, self.last, self.warned = out, patience, 0, None, False
        self.step = 0

    def check(self, step, loss, grad_norm=0.0):
        """Stop (a RunError) if the loss or gradient norm of step `step` is not finite."""
        self.step = step
        for what, v in (("loss", loss), ("gradient norm", grad_norm)):
            if not math.isfinite(v):
                raise RunError(f"{what} is {v} at step {step} in {self.out}; stopped before the update. The last "
                               f"checkpoint holds only finite values: start a new run with a lower --lr (--resume "
                               f"continues with the same flags) or check the data")

    def check_grad_norm(self, grad_norm):
        """check() of the gradient norm alone, at the step whose loss check() saw last (an optimizer calls it
        between computing the norm and changing any weight)."""
        self.check(self.step, 0.0, grad_norm)

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

