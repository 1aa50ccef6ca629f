"""
Memory and time of one SMF stage-2 step against one LoRA step, then the same memory sums at the real shape.

    python bench/bench_smf.py                  # small random model, CPU or CUDA
    python bench/bench_smf.py --device cuda --hidden 896 --layers 24

Part 1 runs each method in its own subprocess on a small random Qwen2 (default hidden 256, 8 layers, default
memory: 16,384 slots, 4 heads, top-k 16) and reports, per step: what the method's own tensors take (trainable
parameters, gradients, optimizer state: measured from the tensors), the peak memory of the step above what was
allocated before it (CUDA: torch.cuda.max_memory_allocated; CPU: the peak resident set size, VmHWM after
resetting it through /proc/self/clear_refs), and the mean time of a step.
Part 2 is arithmetic: the same tensors at Qwen2.5-0.5B's shape (3 memory layers of 16,384 x 896 values,
LoRA r=16 on q,k,v,o,gate,up,down of 24 layers).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from memory import (BackgroundStats, MemoryConfig, SparseMemoryOptimizer, add_memory, memory_layers,  # noqa: E402
                    read_counts, select_rows)
from model import LORA_TARGETS, Qwen2, Qwen2Config, add_lora  # noqa: E402

MB = 1e6


def tensor_bytes(t) -> int:
    if t is None:
        return 0
    if t.is_sparse:
        return tensor_bytes(t._values()) + tensor_bytes(t._indices())
    return t.numel() * t.element_size()


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM, the peak resident set size
        f.write("5")
    return rss_bytes("VmRSS")


def peak_above(device, before) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return rss_bytes("VmHWM") - before


def one_method(args) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=2)
    model = Qwen2(cfg).to(device).init_weights()
    model.requires_grad_(False)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device) for _ in range(args.steps + 1)]

    if args.method == "smf":
        memories = add_memory(model, MemoryConfig())
        for mem in memories.values():
            mem.requires_grad_(False)
            mem.values.weight.requires_grad_(True)  # stage 2: only the value tables
            mem.sparse_grad = True
        background = BackgroundStats()
        with torch.no_grad():
            for _ in range(4):
                model(torch.randint(0, args.vocab, (1, args.seq), device=device))
                background.update(read_counts(model))
        opt = SparseMemoryOptimizer(memories, lr=5e-4)
    else:
        add_lora(model, r=16, alpha=32, dropout=0.05, targets=LORA_TARGETS)
        opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=2e-4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    info = {}

    def step(idx):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        info["grad_bytes"] = sum(tensor_bytes(p.grad) for p in trainable)
        if args.method == "smf":
            counts = read_counts(model)
            info["reads_per_layer"] = next(iter(memories.values())).last_indices.numel()
            info["rows_read_per_layer"] = int((next(iter(counts.values())) > 0).sum())
            opt.step(select_rows(counts, background, "kl", 512), max_grad_norm=1.0)
        else:
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
        opt.zero_grad()

    step(batches[0])  # warm-up (also allocates AdamW's state)
    before = reset_peak(device)
    times = []
    for idx in batches[1:]:
        t0 = time.perf_counter()
        step(idx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = peak_above(device, before)
    if args.method == "smf":
        state = sum(tensor_bytes(t) for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
        state_dense = 2 * sum(tensor_bytes(m.values.weight) for m in memory_layers(model).values())
    else:
        state = sum(tensor_bytes(t) for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        state_dense = state
    return {"method": args.method, "trainable_bytes": sum(tensor_bytes(p) for p in trainable),
            "grad_bytes": info["grad_bytes"], "optimizer_state_bytes": state, "dense_state_bytes": state_dense,
            "peak_step_bytes": peak, "step_s": sum(times) / len(times), **{k: v for k, v in info.items()
                                                                           if k != "grad_bytes"}}


def analytic_table():
    """Bytes of the tensors each method adds for training, at Qwen2.5-0.5B-Instruct's shape, fp32."""
    q = Qwen2Config()
    C, F_, L, kv = q.hidden_size, q.intermediate_size, q.num_hidden_layers, q.num_key_value_heads * q.head_dim
    slots, layers, t = 128 ** 2, 3, 512
    values = layers * slots * C * 4
    shapes = {"q_proj": (C, C), "k_proj": (C, kv), "v_proj": (C, kv), "o_proj": (C, C),
              "gate_proj": (C, F_), "up_proj": (C, F_), "down_proj": (F_, C)}
    lora = L * sum(16 * (i + o) for i, o in shapes.values()) * 4
    # dense memory params besides the values: query (C -> 4*256, bias), keys 4*2*128*128, w1, w2
    other = layers * ((C * 1024 + 1024) + 4 * 2 * 128 * 128 + 2 * C * C) * 4
    rows = [
        ("SMF: value tables (trainable)", values),
        ("SMF: rest of the memory layers (frozen)", other),
        ("SMF: values grad, dense", values),
        ("SMF: values grad, sparse, per 1,000 distinct rows read per layer", layers * 1000 * (C * 4 + 8)),
        ("SMF: lazy AdamW state after 1 step (3 x 512 rows)", layers * t * (2 * C * 4 + 16)),
        ("SMF: lazy AdamW state, every row touched (upper bound)", layers * slots * (2 * C * 4 + 16)),
        ("SMF: paper-mode dense AdamW state (from step 1)", 2 * values + layers * slots * 8),
        ("SMF: SGD state", 0),
        ("LoRA r=16: adapters (trainable)", lora),
        ("LoRA r=16: grads", lora),
        ("LoRA r=16: AdamW state", 2 * lora),
    ]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: on a shared machine, OpenMP threads waiting on a descheduled peer "
                        "make small ops take milliseconds)")
    p.add_argument("--method", choices=["smf", "lora"], default=None, help="(internal) run one method, print JSON")
    args = p.parse_args()
    if args.method:
        print(json.dumps(one_method(args)))
        return

    print(f"# part 1: one step, small random model on {args.device}: hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}, batch {args.batch} x {args.seq} tokens, {args.threads} CPU thread(s); "
          f"SMF memory at layers "
          f"{[args.layers // 4, args.layers // 2, 3 * args.layers // 4]}, 16,384 slots, top-t 512, kl")
    results = []
    for method in ("smf", "lora"):
        cmd = [sys.executable, os.path.abspath(__file__), "--method", method] + \
              [f"--{k}={getattr(args, k)}" for k in ("device", "hidden", "layers", "vocab", "batch", "seq", "steps",
                                                                     "threads")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'method':6} {'trainable MB':>13} {'grads MB':>9} {'opt state MB':>13} {'peak step MB':>13} {'step s':>8}")
    for r in results:
        print(f"{r['method']:6} {r['trainable_bytes'] / MB:13.2f} {r['grad_bytes'] / MB:9.2f} "
              f"{r['optimizer_state_bytes'] / MB:13.2f} {r['peak_step_bytes'] / MB:13.1f} {r['step_s']:8.3f}")
    smf = results[0]
    D = args.hidden
    print(f"SMF per layer: {smf['reads_per_layer']:,} reads, {smf['rows_read_per_layer']:,} distinct rows read; "
          f"values grad as F.embedding_bag(sparse=True) would make it: "
          f"{3 * smf['reads_per_layer'] * (D * 4 + 8) / MB:.2f} MB, dense: {3 * 16384 * D * 4 / MB:.2f} MB; "
          f"dense AdamW state would be {smf['dense_state_bytes'] / MB:.2f} MB")
    print("opt state = allocated (SMF: row-indexed, capacity grown by doubling, plus the (S,) slot->row map); "
          "peak step = the step's peak above what was allocated before it "
          + ("(torch.cuda.max_memory_allocated)" if args.device.startswith("cuda") else "(CPU: peak RSS delta, VmHWM)"))
    print("\n# part 2: arithmetic at Qwen2.5-0.5B-Instruct's shape (fp32), memory at layers 6, 12, 18")
    for name, b in analytic_table():
        print(f"{name:68} {b / MB:9.1f} MB")


if __name__ == "__main__":
    main()
