"""
Speed of train.py's own training loop (train.train, not a copy) per method, against the bare model's
forward+backward on the same micro-batches, with the aten ops and host-device syncs each optimizer step issues.

    python bench/bench_train.py                          # CPU proxy: random 8-layer tiny model, batch 16 x 1
    python bench/bench_train.py --cuda --shape DIR       # bf16 on a GPU at DIR's shape (DIR: a Qwen2.5 model
                                                         # folder, e.g. Qwen2.5-0.5B-Instruct: its config.json and
                                                         # tokenizer; its weights are not read: random weights)

Each method runs train.main() on a random model written in the Hub's layout, on MedMCQA rows (--medmcqa FILE, or
synthetic rows of about --row-tokens tokens) and, for SMF, a one-step retrofit on OASST1-like replies. Per method
it prints ms per optimizer step, loss tokens/s, the bare model's tokens/s at the same micro-batches
(every weight trainable, no optimizer) and their ratio; then, from a second, counted run, aten ops and syncs per
step. Ops are counted with a TorchDispatchMode: each dispatched aten op is one kernel launch or more on a GPU.
A sync is an op whose result the host must wait for on a GPU (`.item()`, `nonzero`, `unique`, `bincount`,
boolean-mask indexing, ...). torch.optim's own ops are counted apart ("optim"): on a GPU train.py uses the fused
AdamW (a few launches per step), on the CPU the per-tensor one. Last, with --estimate, the training GPU time of the
paper's whole table from the measured rates (its evaluation: bench_eval.py).

Not a test: timings depend on the machine and what else runs on it.
"""

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import train  # noqa: E402
from checkpoint import save_pretrained  # noqa: E402
from model import write_json  # noqa: E402
from data import Tokenizer, train_bpe_tokenizer  # noqa: E402
from model import Qwen2, Qwen2Config  # noqa: E402

# ops whose output size or value the host needs: on a GPU each waits for every kernel queued before it
SYNC_OPS = {"_local_scalar_dense", "nonzero", "_coalesce", "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount",
            "masked_select", "equal", "is_nonzero", "allclose"}
# ops that only make a view or read metadata: no kernel runs for them on a GPU (they still cost dispatcher time)
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze",
            "split", "split_with_sizes", "unbind", "detach", "alias", "as_strided", "reshape", "_reshape_alias",
            "view_as", "chunk", "narrow", "lift_fresh", "_indices", "_values", "indices", "values"}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=True, torch_dtype="float32")
WORDS = ("the heart liver lung kidney brain blood bone acute chronic patient dose vitamin deficiency which most "
         "common cause sign treatment nerve artery syndrome enzyme drug infection fever pain").split()


def sync_reason(func, args, kwargs, device_type):
    """Why this op syncs the host with the device (its name), or None."""
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return name
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else []
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices):
            return name + "[bool mask]"
    if name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None \
            and len(args) == 1:
        return "repeat_interleave(tensor)"
    if name in ("_to_copy", "copy_") and device_type == "cuda":  # device -> host copies
        src = args[1] if name == "copy_" else args[0]
        dst_cpu = (args[0].device.type == "cpu") if name == "copy_" else kwargs.get("device") == torch.device("cpu")
        if isinstance(src, torch.Tensor) and src.device.type == "cuda" and dst_cpu:
            return "device->host copy"
    return None


def in_torch_optim() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if f"torch{os.sep}optim{os.sep}" in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops and syncs (by reason); torch.optim's apart."""

    def __init__(self, device_type):
        super().__init__()
        self.device_type, self.ops, self.optim_ops, self.syncs = device_type, 0, 0, Counter()
        self.kernel_ops = 0  # ops outside torch.optim that are not views
        self.by_name = Counter()  # every op outside torch.optim, by name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        optim = in_torch_optim()
        if optim:
            self.optim_ops += 1
        else:
            self.ops += 1
            self.kernel_ops += func.overloadpacket.__name__ not in VIEW_OPS
            self.by_name[str(func)] += 1
        why = sync_reason(func, args, kwargs, self.device_type)
        if why is not None:
            self.syncs[("optim: " if optim else "") + why] += 1
        return func(*args, **kwargs)

    def __enter__(self):  # Tensor.tolist dispatches nothing on the CPU; on a GPU it is a device -> host copy
        self._tolist = torch.Tensor.tolist

        def tolist(t):
            if t.device.type != "cpu" or self.device_type == "cpu":
                self.syncs[("optim: " if in_torch_optim() else "") + "tolist"] += 1
            return self._tolist(t)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def snapshot(self):
        return self.ops, self.optim_ops, Counter(self.syncs), self.kernel_ops


# -----------------------------------------------------------------------------
# A random model in the Hub layout and data files


def write_model(out, shape_dir, seed=0):
    """config.json (+ tokenizer files) from shape_dir, or the tiny config and a small BPE; random weights."""
    os.makedirs(out, exist_ok=True)
    if shape_dir:
        with open(os.path.join(shape_dir, "config.json")) as f:
            config = json.load(f)
        for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json"):
            if os.path.exists(os.path.join(shape_dir, name)):
                with open(os.path.join(shape_dir, name), "rb") as src, open(os.path.join(out, name), "wb") as dst:
                    dst.write(src.read())
    else:
        n_tok = train_bpe_tokenizer([" ".join(random.Random(i).choices(WORDS, k=40)) for i in range(200)], out, 512)
        config = {**TINY, "vocab_size": max(TINY["vocab_size"], n_tok), "bos_token_id": n_tok - 3,
                  "eos_token_id": n_tok - 1, "pad_token_id": n_tok - 3}
    config = {**config, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    write_json(os.path.join(out, "config.json"), config)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Qwen2(Qwen2Config.from_dict(config))
    model = model.to_empty(device="cpu").init_weights().to(torch.bfloat16 if shape_dir else torch.float32)
    save_pretrained(model, out)
    return out


def sentence(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_rows(out, row_tokens, n_rows=4000, seed=0):
    """MedMCQA rows (about row_tokens tokens of training text each) and OASST1 replies, as jsonl."""
    rng = random.Random(seed)
    words = max(4, row_tokens // 3)
    med = [{"question": sentence(rng, words) + "?", "opa": sentence(rng, 2), "opb": sentence(rng, 2),
            "opc": sentence(rng, 2), "opd": sentence(rng, 2), "cop": rng.randrange(4), "choice_type": "single",
            "exp": sentence(rng, words)} for _ in range(n_rows)]
    oasst = []
    for t in range(200):
        oasst.append({"message_id": f"p{t}", "parent_id": None, "role": "prompter", "text": sentence(rng, 10),
                      "lang": "en", "rank": None})
        oasst.append({"message_id": f"a{t}", "parent_id": f"p{t}", "role": "assistant", "lang": "en", "rank": 0,
                      "text": sentence(rng, 3 * words)})
    paths = {"medmcqa": os.path.join(out, "medmcqa.jsonl"), "oasst1": os.path.join(out, "oasst1.jsonl")}
    for name, rows in (("medmcqa", med), ("oasst1", oasst)):
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return paths


# -----------------------------------------------------------------------------
# Timing and counting train.py's loop


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_train(argv, device, counter=None):
    """train.main(argv), marking the end of every optimizer step (train.train's on_step, before its checkpoint):
    [(seconds, ops, optim ops, syncs, non-view ops)] per optimizer step."""
    marks = []

    def on_step(step):
        sync(device)
        marks.append((time.perf_counter(), *(counter.snapshot() if counter else (0, 0, Counter(), 0))))

    with counter if counter is not None else contextlib.nullcontext():
        train.main(argv, on_step=on_step)
    return [tuple(y - x for x, y in zip(a, b)) for a, b in zip(marks, marks[1:])]  # (s, ops, optim, syncs, kernels)


def bare_model_rate(model_dir, task, path, args, device, steps, micro):
    """Loss tokens/s of the bare model's forward+backward (every weight trainable, no optimizer) on the first
    `steps` optimizer steps' micro-batches (of `micro` examples) of train.py's stream of `task` (medmcqa, or oasst1
    replies)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Qwen2.from_pretrained(model_dir, dtype=dtype, device=device).train()
    tok = Tokenizer.from_pretrained(model_dir)
    examples = data.training_examples(task, tok, args.max_len, 0, None, path, "replies")
    stream = data.MicroBatches(examples, args.batch_size, micro, 0, tok.pad_id, device)
    times, tokens = [], []
    for step in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        n_step = 0
        for b, n in stream.step(step):
            model(b["idx"], None, labels=b["labels"]).backward()  # right-padded: no mask, as train.py
            n_step += n
        model.zero_grad(set_to_none=True)
        sync(device)
        if step:  # the first step warms up
            times.append(time.perf_counter() - t0)
            tokens.append(n_step)
    return sum(tokens) / sum(times)


def method_argv(method, recipe, work, model_dir, paths, args, out, steps):
    argv = ["--method", method, "--model", model_dir, "--device", args.device, "--batch-size", str(args.batch_size),
            "--micro-batch", str(args.micro_batch), "--max-len", str(args.max_len), "--max-steps", str(steps),
            "--save-every", "1000000", "--out", out]
    argv += ["--data", f"oasst1={paths['oasst1']}"] if method == "retrofit" else ["--data", f"medmcqa={paths['medmcqa']}"]
    if recipe:
        argv += ["--recipe", recipe]
    if method == "smf":
        argv += ["--memory-from", os.path.join(work, "retrofit"), "--background-batches", "50"]
    if args.compile:
        argv += ["--compile"]
    return argv


def loss_tokens(out):
    """The loss tokens of each logged optimizer step of a run."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["tokens"] for line in f]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cuda", action="store_true", help="run on the GPU (bf16 base), else the CPU proxy")
    p.add_argument("--shape", default=None, help="a model folder whose config.json and tokenizer set the shape")
    p.add_argument("--medmcqa", default=None, help="a MedMCQA file (Hub columns); default: synthetic rows")
    p.add_argument("--row-tokens", type=int, default=70, help="tokens per synthetic MedMCQA example")
    p.add_argument("--methods", default="lora,full,smf:clean,smf:paper,retrofit", help="method[:recipe],...")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch", default="auto", help="train.py's --micro-batch")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per method (the first is dropped)")
    p.add_argument("--count-steps", type=int, default=4, help="counted steps per method (0: do not count)")
    p.add_argument("--count-after", type=int, default=8,
                   help="steps run before the counted ones (SMF's optimizer state grows in its first steps)")
    p.add_argument("--compile", action="store_true", help="pass --compile to train.py")
    p.add_argument("--estimate", action="store_true", help="also estimate the paper table's GPU time")
    args = p.parse_args()
    args.device = "cuda" if args.cuda else "cpu"
    device = torch.device(args.device)
    if not args.cuda:
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        model_dir = write_model(os.path.join(work, "model"), args.shape)
        paths = write_rows(work, args.row_tokens)
        if args.medmcqa:
            paths["medmcqa"] = os.path.abspath(args.medmcqa)
        methods = [m.partition(":")[::2] for m in args.methods.split(",")]
        if any(m == "smf" for m, _ in methods):  # a finished one-step retrofit to load the memory from
            train.main(["--method", "retrofit", "--model", model_dir, "--data", f"oasst1={paths['oasst1']}",
                        "--device", args.device, "--max-steps", "1", "--max-len", str(args.max_len),
                        "--out", os.path.join(work, "retrofit")])
        bare, rows = {}, []  # bare: (task, micro-batch) -> tokens/s
        for method, recipe in methods:
            name = method + (f" ({recipe})" if recipe else "")
            out = os.path.join(work, f"{method}-{recipe}-timed")
            secs = [t for t, *_ in run_train(method_argv(method, recipe, work, model_dir, paths, args, out,
                                                         args.steps), device)]  # steps 2..N
            rate = sum(loss_tokens(out)[1:]) / sum(secs)
            with open(os.path.join(out, "config.json")) as f:
                micro = json.load(f)["micro_batch"]  # the split train.py chose
            task = "oasst1" if method == "retrofit" else "medmcqa"
            if (task, micro) not in bare:
                bare[task, micro] = bare_model_rate(model_dir, task, paths[task], args, device, min(args.steps, 5), micro)
            bare_rate = bare[task, micro]
            row = {"method": name, "micro_batch": micro, "ms_per_step": 1000 * sum(secs) / len(secs), "tokens_per_s": rate,
                   "tokens_per_step": sum(loss_tokens(out)[1:]) / len(secs), "bare_tokens_per_s": bare_rate,
                   "of_bare": rate / bare_rate}
            if args.count_steps:
                out = os.path.join(work, f"{method}-{recipe}-counted")
                counted = run_train(method_argv(method, recipe, work, model_dir, paths, args, out,
                                                args.count_after + args.count_steps + 1),
                                    device, OpCounter(device.type))[-args.count_steps:]
                n = len(counted)
                syncs = sum((c[3] for c in counted), Counter())
                row.update(ops_per_step=sum(c[1] for c in counted) / n, kernel_ops_per_step=sum(c[4] for c in counted) / n,
                           optim_ops_per_step=sum(c[2] for c in counted) / n,
                           syncs_per_step=sum(v for k, v in syncs.items() if not k.startswith("optim")) / n,
                           syncs={k: v / n for k, v in sorted(syncs.items())})
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'cuda: ' + torch.cuda.get_device_name() if args.cuda else 'cpu'}, shape {args.shape or 'tiny, 8 layers'}, "
          f"batch {args.batch_size} x "
          f"micro-batch {args.micro_batch}, torch {torch.__version__}; tokens: loss tokens")
    print("| method | micro-batch | tokens/step | ms/step | tokens/s | bare model tokens/s | of bare | aten ops/step (+ torch.optim) "
          "| of them not views | syncs/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ops = f"{r['ops_per_step']:.0f} (+{r['optim_ops_per_step']:.0f})" if "ops_per_step" in r else "-"
        syncs = f"{r['syncs_per_step']:.0f}" if "syncs_per_step" in r else "-"
        kernels = f"{r['kernel_ops_per_step']:.0f}" if "kernel_ops_per_step" in r else "-"
        print(f"| {r['method']} | {r['micro_batch']} | {r['tokens_per_step']:.0f} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:.0f} | {r['bare_tokens_per_s']:.0f} | "
              f"{r['of_bare']:.2f} | {ops} | {kernels} | {syncs} |")
    for r in rows:
        if r.get("syncs"):
            print(f"syncs per step, {r['method']}: " + ", ".join(f"{k} {v:g}" for k, v in r["syncs"].items()))
    if args.estimate:
        estimate(rows)


def estimate(rows):
    """The paper table's GPU time from the measured ms/step at the paper's step counts: per seed (3) a stage 1
    (2 epochs of up to 50k OASST1 replies), SMF, LoRA and full finetuning (3 epochs of 60k MedMCQA each), all at
    effective batch 16. The evaluations are timed by bench/bench_eval.py."""
    secs = {r["method"]: r["ms_per_step"] / 1000 for r in rows}
    steps = {m: 3 * (2 * 50000 if m.startswith("retrofit") else 3 * 60000) // 16 for m in secs}
    hours = {m: steps[m] * s / 3600 for m, s in secs.items()}
    print("\nestimate, 3 seeds at the measured rates: " + ", ".join(f"{m} {steps[m]} steps {h:.2f} h" for m, h in
                                                                    hours.items()))
    smf = [m for m in secs if m.startswith("smf")][:1]
    base = [m for m in secs if m.startswith(("retrofit", "lora", "full"))]
    if smf and {"retrofit", "lora", "full"} <= {m.split()[0] for m in base}:
        print(f"the table's training (retrofit + {smf[0]} + lora + full): {sum(hours[m] for m in base + smf):.2f} h")


if __name__ == "__main__":
    main()
