"""
Speed of model.py against transformers' Qwen2ForCausalLM (a script that prints figures, not a test).

    python bench/bench_model.py            # CPU fp32: training step and cached greedy generation, with ratios
    python bench/bench_model.py --cuda     # also bf16 at the real 0.5B shape on the GPU (random weights)

Both models get the same random weights (ours loads transformers' state_dict), so they do the same arithmetic.
Ratios are ours / transformers' time (below 1: ours is faster) measured in one run, median of --repeats.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Qwen2, Qwen2Config  # noqa: E402

SMALL = dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6,
             tie_word_embeddings=True)
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                tie_word_embeddings=True)


def pair(shape: dict, dtype, device):
    """transformers' model and ours with identical random weights."""
    from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(HFConfig(**shape, attn_implementation="sdpa")).to(dtype=dtype, device=device)
    with torch.device("meta"):
        ours = Qwen2(Qwen2Config(**shape, torch_dtype=str(dtype).removeprefix("torch.")))
    ours.load_hub_state_dict({k: v.detach().clone() for k, v in hf.state_dict().items()}, dtype=dtype, device=device)
    return hf, ours


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns, repeats: int, device, warmup: int = 1) -> list[float]:
    """Median seconds of each fn() over repeats, after warmup calls. The fns take turns, so a machine shared
    with other work slows them alike and the ratio stays fair."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def train_step(model, idx, logits_of):
    loss = torch.nn.functional.cross_entropy(logits_of(model, idx[:, :-1]).flatten(0, 1).float(),
                                             idx[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)


def hf_logits(model, idx):
    return model(input_ids=idx, use_cache=False).logits


def our_logits(model, idx):
    return model(idx)


def hf_greedy(model, idx, n):
    return model.generate(input_ids=idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=None,
                          pad_token_id=0)


def bench_cpu(args):
    device = torch.device("cpu")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    print(f"machine: CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    hf, ours = pair(SMALL, torch.float32, device)
    hf.train(), ours.train()
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"config: hidden {SMALL['hidden_size']}, {SMALL['num_hidden_layers']} layers, heads "
          f"{SMALL['num_attention_heads']}/{SMALL['num_key_value_heads']} kv, vocab {SMALL['vocab_size']}, "
          f"{n_params / 1e6:.2f}M params, fp32")

    B, T = args.batch, args.length
    idx = torch.randint(0, SMALL["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf_logits(hf, idx) - our_logits(ours, idx)).abs().max().item()
    print(f"max |logits ours - transformers| = {diff:.2e}")
    t_hf, t_ours = timed([lambda: train_step(hf, idx, hf_logits), lambda: train_step(ours, idx, our_logits)],
                         args.repeats, device)
    tok = B * T
    print(f"train step (fwd+bwd), batch {B} x length {T}: transformers {t_hf * 1e3:.0f} ms "
          f"({tok / t_hf:.0f} tok/s), ours {t_ours * 1e3:.0f} ms ({tok / t_ours:.0f} tok/s), "
          f"ratio ours/transformers {t_ours / t_hf:.2f}")

    hf.eval(), ours.eval()
    n, P = args.new_tokens, args.prompt
    prompt = idx[:1, :P]
    with torch.inference_mode():
        same = torch.equal(hf_greedy(hf, prompt, n), ours.generate(prompt, n))
        t_hf, t_ours = timed([lambda: hf_greedy(hf, prompt, n), lambda: ours.generate(prompt, n)], args.repeats,
                             device)
    print(f"greedy generation, prompt {P}, {n} new tokens, batch 1: transformers {n / t_hf:.0f} tok/s, "
          f"ours {n / t_ours:.0f} tok/s, ratio ours/transformers time {t_ours / t_hf:.2f}, "
          f"same tokens: {same}")


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench_cuda(args, device=None, shape=QWEN_05B):
    """bf16 at the real Qwen2.5-0.5B shape, random weights: training tokens/s, MFU and peak memory, then
    generation tokens/s. One model on the GPU at a time, so peak memory is that model's alone.
    (device and shape are parameters so the code path can be smoke-tested on a CPU with a small shape.)"""
    if device is None:
        if not torch.cuda.is_available():
            print("cuda: not available, skipped")
            return
        device = torch.device("cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"machine: {name}, torch {torch.__version__}, bf16, MFU against {args.peak_tflops:.0f} TFLOP/s")
    hf_cpu, ours_cpu = pair(shape, torch.bfloat16, torch.device("cpu"))
    cfg = ours_cpu.config
    # training FLOPs per token: 6 per matmul weight (the embedding lookup is no matmul, but the tied lm_head
    # is), plus attention scores and values: 2 matmuls * 2 flops * T * C per layer forward, halved by the
    # causal mask, times 3 for forward + backward = 6 L T C
    n_matmul = sum(p.numel() for p in ours_cpu.parameters()) - \
        (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    B, T = args.gpu_batch, args.gpu_length
    flops_per_token = 6 * n_matmul + 6 * cfg.num_hidden_layers * T * cfg.hidden_size
    idx = torch.randint(0, cfg.vocab_size, (max(B, args.gpu_gen_batch), T + 1),
                        generator=torch.Generator().manual_seed(0)).to(device)
    n, P = args.new_tokens, args.prompt
    for label, model, logits_of, gen in [
            ("transformers", hf_cpu, hf_logits, lambda m, p: hf_greedy(m, p, n)),
            ("ours", ours_cpu, our_logits, lambda m, p: m.generate(p, n))]:
        model.to(device).train()
        reset_peak(device)
        t, = timed([lambda: train_step(model, idx[:B], logits_of)], args.repeats, device, warmup=2)
        tok_s = B * T / t
        print(f"  train step {label:>12}: batch {B} x {T}: {t * 1e3:.0f} ms, {tok_s:.0f} tok/s, "
              f"MFU {tok_s * flops_per_token / (args.peak_tflops * 1e12):.1%}, "
              f"peak memory {peak_gib(device):.1f} GiB")
        model.eval()
        for gb in (1, args.gpu_gen_batch):
            reset_peak(device)
            with torch.inference_mode():
                t, = timed([lambda: gen(model, idx[:gb, :P])], args.repeats, device)
            print(f"  generate   {label:>12}: batch {gb}, prompt {P}, {n} new: {gb * n / t:.0f} tok/s, "
                  f"peak memory {peak_gib(device):.2f} GiB")
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32, help="prompt length for generation")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--cuda", action="store_true", help="also the bf16 0.5B-shape benchmark on the GPU")
    p.add_argument("--gpu-batch", type=int, default=8)
    p.add_argument("--gpu-length", type=int, default=1024)
    p.add_argument("--gpu-gen-batch", type=int, default=16)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200 SXM: 989)")
    args = p.parse_args()
    bench_cpu(args)
    if args.cuda:
        bench_cuda(args)


if __name__ == "__main__":
    main()
