"""
Speed of eval.py's probes (eval.run_tasks, not a copy) on a random model, and the paper table's evaluation time
extrapolated from it.

    python bench/bench_eval.py                       # CPU: random tiny model, 64 rows per probe
    python bench/bench_eval.py --cuda --shape DIR    # bf16 on a GPU at DIR's shape (a Qwen2.5 model folder:
                                                     # config.json and tokenizer; random weights), 1000 rows

Rows are synthetic in each probe's Hub schema (MedMCQA questions, WikiText text, TriviaQA questions), so the
MedMCQA and WikiText times are those of real rows of similar length; a random model's TriviaQA answers stop at a
random point (often only after all 32 new tokens), where a trained model stops at <|im_end|> after a few tokens.

Not a test: timings depend on the machine and what else runs on it.
"""

import argparse
import os
import random
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_train import sentence, write_model  # noqa: E402
from eval import default_batch_size, run_tasks  # noqa: E402
from data import Tokenizer  # noqa: E402
from model import Qwen2  # noqa: E402


def rows(n, seed=0):
    rng = random.Random(seed)
    return {
        "medmcqa": [{"question": sentence(rng, 20) + "?", "opa": sentence(rng, 2), "opb": sentence(rng, 2),
                     "opc": sentence(rng, 3), "opd": sentence(rng, 2), "cop": rng.randrange(4)} for _ in range(n)],
        "wikitext": [{"text": sentence(rng, 80)} for _ in range(n)],
        "triviaqa": [{"question": sentence(rng, 12) + "?", "answer": {"aliases": [sentence(rng, 2)]}}
                     for _ in range(n)],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cuda", action="store_true", help="run on the GPU in bf16, else the CPU in fp32")
    p.add_argument("--shape", default=None, help="a model folder whose config.json and tokenizer set the shape")
    p.add_argument("--limit", type=int, default=None, help="rows per probe (default: 1000 on a GPU, 64 on the CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="eval.py's --batch-size (default: eval.py's)")
    p.add_argument("--tasks", default="medmcqa,wikitext,triviaqa")
    p.add_argument("--models", type=int, default=10, help="models the table evaluates (base + 3 seeds x 3 methods)")
    p.add_argument("--compile", action="store_true", help="eval.py --compile: TriviaQA with the compiled decode step")
    args = p.parse_args()
    device = torch.device("cuda" if args.cuda else "cpu")
    limit = args.limit or (1000 if args.cuda else 64)
    batch = args.batch_size or default_batch_size(device)
    with tempfile.TemporaryDirectory() as work:
        model_dir = write_model(os.path.join(work, "model"), args.shape)
        model = Qwen2.from_pretrained(model_dir, dtype=torch.bfloat16 if args.cuda else torch.float32,
                                      device=device).eval()
        tok = Tokenizer.from_pretrained(model_dir)
        tasks = {t: r for t, r in rows(limit).items() if t in args.tasks.split(",")}
        # warm-up on a full batch and the last, partial one (with --compile: their decode steps compile here)
        run_tasks(model, tok, {t: r[:batch] + r[:limit % batch] for t, r in tasks.items()}, batch_size=batch,
                  repetition_penalty=1.1, compiled=args.compile)
        results = run_tasks(model, tok, tasks, batch_size=batch, repetition_penalty=1.1, compiled=args.compile)
    where = torch.cuda.get_device_name() if args.cuda else "CPU"
    print(f"{where}, {limit} rows per probe, batch {batch}, compiled decoding {args.compile}, torch {torch.__version__}")
    print("| probe | seconds | rows/s |")
    print("|---|---|---|")
    for t, r in results.items():
        print(f"| {t} | {r['seconds']:.1f} | {limit / r['seconds']:.1f} |")
    total = sum(r["seconds"] for r in results.values()) * 1000 / limit * args.models
    print(f"the table's evaluation ({args.models} models x 1000 rows per probe) at these rates: {total / 3600:.2f} h")


if __name__ == "__main__":
    main()
