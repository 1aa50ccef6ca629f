"""
The probes of the paper's code (github.com/prakharg55/SMF-ICML smf_rebuild/eval_tasks.py), run as it runs them, on
a Hub model, a local model directory or a run directory; the paper's table uses the first three:

    medmcqa   accuracy; each of the 4 continuations " A. {opa}" .. " D. {opd}" scored by the mean log-probability
              of its tokens after "Medical exam question:\\nQuestion: ...\\nAnswer:"; argmax
    wikitext  token perplexity of the first N non-empty rows joined by "\\n\\n": windows of 1024 tokens, stride 512,
              each window scoring only the tokens no earlier window scored; exp(total NLL / scored tokens)
    triviaqa  accuracy; greedy decoding of 32 tokens after "Question: {q}\\nAnswer:" (stopping at the tokenizer's
              stop ids, with the checkpoint's generation_config repetition_penalty as Hugging Face's generate
              applies it); correct if a normalized alias is a substring of the normalized prediction
    hellaswag accuracy (off by default); each of the 4 endings scored by the summed log-probability of " " + ending
              after ctx; argmax
    gsm8k     accuracy (off by default); greedy decoding of 256 tokens after "Question: {q}\\nLet's think step by
              step.\\nAnswer:"; correct if the last number in the answer equals the one after "####"

    python eval.py --model Qwen/Qwen2.5-0.5B-Instruct --tasks medmcqa,wikitext,triviaqa --limit 1000 --out results.json
    python eval.py --model runs/smf-seed0 --prompt "What causes scurvy?"     # talk to a model instead

The eval_* functions take rows (data.load_rows) and a loaded model, so train.py can call them during training.
"""

import functools
import importlib.util
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import data
from checkpoint import (file_problem, first_change, is_eval_output, is_run_dir, load_model,
                        model_problem, read_json, write_json)
from common import DTYPES, ArgParser, add_flag
from model import atomic_write, first_line, looks_like_hub_id, resolve_model_dir


# -----------------------------------------------------------------------------
# Helpers


def progress(iterable, desc: str, total: int, show: bool):
    if not show:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True)


def model_device(model) -> torch.device:
    return model.lm_head.weight.device


def token_logprobs(model, h, targets, chunk: int = 512):
    """log p(target) for hidden states h (N, C) predicting targets (N,), lm_head applied `chunk` rows at a time
    so the (N, vocab) fp32 logits are never all in memory."""
    out = []
    for i in range(0, h.size(0), chunk):
        logits = model.lm_head(h[i:i + chunk]).float()  # (n, vocab)
        out.append(-F.cross_entropy(logits, targets[i:i + chunk], reduction="none"))
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


# -----------------------------------------------------------------------------
# MedMCQA: mean log-probability of each continuation


@torch.inference_mode()
def score_continuations(model, tok, pairs, batch_size: int = 64, show: bool = False, reduce: str = "mean",
                        desc: str = "medmcqa"):
    """
    Mean (reduce "sum": summed) token log-probability of each continuation given its context, for
    [(context, continuation), ...]. As the paper's code: context + continuation tokenized together; the scored
    tokens are those after the context's own token count. Sequences are sorted by length and run in right-padded
    batches of batch_size.
    """
    device = model_device(model)
    pad = tok.pad_id if tok.pad_id is not None else 0
    contexts = {c: len(tok.encode(c)) for c, _ in pairs}
    seqs = tok.encode_batch([c + x for c, x in pairs])
    starts = [contexts[c] for c, _ in pairs]  # index of the first scored token
    for (c, x), s, n in zip(pairs, seqs, starts):
        if len(s) <= n or n == 0:
            raise ValueError(f"continuation {x!r} gives no token to score after its context")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    scores = [0.0] * len(seqs)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress(batches, desc, len(batches), show):
        idx, mask = data.pad([seqs[i] for i in batch], pad)
        idx, mask = idx.to(device), mask.to(device)
        h = model.hidden_states(idx, mask)  # (B, T, C)
        rows, cols, targets = [], [], []
        for b, i in enumerate(batch):
            pos = range(starts[i] - 1, len(seqs[i]) - 1)  # hidden state at t predicts token t + 1
            rows += [b] * len(pos)
            cols += list(pos)
            targets += seqs[i][starts[i]:]
        lp = token_logprobs(model, h[rows, cols], torch.tensor(targets, device=device))  # (N,)
        rows = torch.tensor(rows, device=device)
        sums = lp.new_zeros(len(batch)).index_add_(0, rows, lp)  # (B,): each sequence's summed log-probability
        got = (sums if reduce == "sum" else sums / torch.bincount(rows, minlength=len(batch))).tolist()  # one sync
        for b, i in enumerate(batch):
            scores[i] = got[b]
    return scores


def choice_accuracy(task, model, tok, items, batch_size, samples, show, reduce="mean") -> dict:
    """Accuracy over multiple-choice items [(context, [continuation, ...], index of the right one)]: each
    continuation scored by score_continuations, the prediction the first of the highest scores (as np.argmax).
    batch_size counts questions."""
    pairs = [(context, x) for context, continuations, _ in items for x in continuations]
    k = len(items[0][1])
    scores = score_continuations(model, tok, pairs, k * batch_size, show, reduce=reduce, desc=task)
    correct = 0
    for i, (context, continuations, target) in enumerate(items):
        s = scores[k * i:k * i + k]
        pred = max(range(k), key=lambda j: s[j])
        correct += pred == target
        if samples is not None:
            samples.append({"task": task, "index": i, "prompt": context, "choices": continuations,
                            "scores": s, "prediction": pred, "target": target, "correct": pred == target})
    return {"acc": correct / len(items), "n": len(items)}


def eval_medmcqa(model, tok, rows, batch_size: int = 16, samples: list | None = None, show: bool = False) -> dict:
    """Accuracy over rows (data.load_rows("medmcqa", ...)); batch_size counts questions (4 sequences each)."""
    return choice_accuracy("medmcqa", model, tok, [data.medmcqa_eval_item(r) for r in rows], batch_size, samples,
                           show)


# -----------------------------------------------------------------------------
# WikiText: sliding-window token perplexity


def windows(n_tokens: int, max_length: int = 1024, stride: int = 512) -> list[tuple[int, int, int]]:
    """[(begin, end, n_new)]: window tokens[begin:end] scores its last n_new tokens, those no earlier window
    scored, except the window's own first token, which has no context in the window (with stride < max_length
    that is only the text's first token; with stride == max_length, every window's first)."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.inference_mode()
def eval_wikitext(model, tok, rows, batch_size: int = 16, samples: list | None = None, show: bool = False,
                  max_length: int = 1024, stride: int = 512) -> dict:
    """Token perplexity of "\\n\\n".join(row texts) with the sliding-window recipe; batch_size counts windows."""
    device = model_device(model)
    ids = tok.encode("\n\n".join(r["text"] for r in rows))
    if len(ids) < 2:
        raise ValueError("wikitext: the text has fewer than 2 tokens")
    spans = windows(len(ids), max_length, stride)
    pad = tok.pad_id if tok.pad_id is not None else 0
    total_nll, total_tokens = 0.0, 0
    numbered = list(enumerate(spans))
    batches = [numbered[i:i + batch_size] for i in range(0, len(numbered), batch_size)]
    for batch in progress(batches, "wikitext", len(batches), show):
        idx, mask = data.pad([ids[b:e] for _, (b, e, _) in batch], pad)
        idx, mask = idx.to(device), mask.to(device)
        h = model.hidden_states(idx, mask)  # (B, T, C)
        firsts = [max(e - b - n_new, 1) for _, (b, e, n_new) in batch]  # each window's first scored position
        nlls = torch.stack([-token_logprobs(model, h[j, first - 1:e - b - 1], idx[j, first:e - b]).sum()
                            for j, ((_, (b, e, _)), first) in enumerate(zip(batch, firsts))]).tolist()  # one sync
        for (w, (b, e, _)), first, nll in zip(batch, firsts, nlls):
            n = e - b - first
            total_nll += nll
            total_tokens += n
            if samples is not None:
                samples.append({"task": "wikitext", "index": w, "begin": b, "end": e,
                                "scored_tokens": n, "nll": nll})
    return {"ppl": math.exp(total_nll / total_tokens), "tokens": total_tokens}


# -----------------------------------------------------------------------------
# TriviaQA: greedy answer, alias substring match


def normalize_answer(s: str) -> str:
    """Lowercase; drop the articles a, an, the; every character outside [a-z0-9 .-] becomes a space; collapse
    spaces; strip (as the paper's code). Non-ASCII letters are outside the set, so "café" becomes "caf"."""
    s = s.lower()
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    s = re.sub(r"[^a-z0-9 .\-]", " ", s)
    return re.sub(r" +", " ", s).strip()


def triviaqa_correct(prediction: str, aliases: list[str]) -> bool:
    """Any normalized alias (non-empty: an alias made only of emoji or articles normalizes to "", which would
    match everything) is a substring of the normalized prediction."""
    pred = normalize_answer(prediction)
    return any(a and a in pred for a in map(normalize_answer, aliases))


@torch.inference_mode()
def generate_answers(model, tok, prompts: list[str], batch_size: int = 16, max_new_tokens: int = 32,
                     repetition_penalty: float = 1.0, show: bool = False, desc: str = "triviaqa",
                     stop_ids: list[int] | None = None, compiled: bool = False, strip: bool = True) -> list[str]:
    """
    Greedy continuations of each prompt (left-padded batches, sorted by length), as the paper's Hugging Face
    generate made them: stop at the tokenizer's eos alone (<|im_end|>; stop_ids overrides), then decode every new
    token without special tokens (so an <|endoftext|> mid-answer is dropped, not a stop), stripped (unless strip
    is False). compiled: model.generate's compiled decoding (the same tokens).
    """
    device = model_device(model)
    stop = stop_ids or ([tok.eos_id] if tok.eos_id is not None else tok.stop_ids)
    pad = tok.pad_id if tok.pad_id is not None else stop[0]
    seqs = tok.encode_batch(prompts)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = [""] * len(seqs)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress(batches, desc, len(batches), show):
        idx, mask = data.pad([seqs[i] for i in batch], pad, side="left")
        T = idx.size(1)
        gen = model.generate(idx.to(device), max_new_tokens, temperature=0.0, eos_token_id=stop,
                             attention_mask=mask.to(device), repetition_penalty=repetition_penalty,
                             pad_token_id=pad, compiled=compiled)[:, T:].tolist()
        for b, i in enumerate(batch):
            new = gen[b]
            cut = next((k for k, t in enumerate(new) if t in stop), len(new))  # eos, then padding
            text = tok.decode(new[:cut], skip_special_tokens=True)
            out[i] = text.strip() if strip else text
    return out


def generation_accuracy(task, model, tok, prompts, targets, correct, batch_size, max_new_tokens, repetition_penalty,
                        show, compiled, samples) -> dict:
    """Accuracy of greedy answers (generate_answers) to prompts, correct(prediction, target) deciding each."""
    preds = generate_answers(model, tok, prompts, batch_size, max_new_tokens, repetition_penalty, show, desc=task,
                             compiled=compiled)
    n_correct = 0
    for i, (prompt, pred, target) in enumerate(zip(prompts, preds, targets)):
        ok = correct(pred, target)
        n_correct += ok
        if samples is not None:
            samples.append({"task": task, "index": i, "prompt": prompt, "prediction": pred, "target": target,
                            "correct": ok})
    return {"acc": n_correct / len(prompts), "n": len(prompts)}


def eval_triviaqa(model, tok, rows, batch_size: int = 16, samples: list | None = None, show: bool = False,
                  repetition_penalty: float = 1.0, max_new_tokens: int = 32, compiled: bool = False) -> dict:
    return generation_accuracy("triviaqa", model, tok, [data.triviaqa_prompt(r) for r in rows],
                               [data.triviaqa_aliases(r) for r in rows], triviaqa_correct, batch_size, max_new_tokens,
                               repetition_penalty, show, compiled, samples)


# -----------------------------------------------------------------------------
# HellaSwag and GSM8K: the paper code's other probes (its eval_tasks.py; off by default, as its table uses three)


def eval_hellaswag(model, tok, rows, batch_size: int = 16, samples: list | None = None, show: bool = False) -> dict:
    """Accuracy over rows (data.load_rows("hellaswag", ...): Rowan/hellaswag validation) as eval_tasks.py's
    eval_hellaswag: each ending scored as the summed log-probability of " " + ending after ctx (ctx + ending
    tokenized together, the tokens after ctx's own token count scored: its continuation_score, unnormalized), the
    prediction the first argmax (np.argmax), compared with int(label). batch_size counts questions (4 each)."""
    return choice_accuracy("hellaswag", model, tok, [data.hellaswag_item(r) for r in rows], batch_size, samples,
                           show, reduce="sum")


def gsm8k_correct(response: str, gold: str) -> bool:
    """eval_tasks.py's check: the last match of [-+]?\\d[\\d,]*\\.?\\d* in the response with commas removed equals
    the gold string exactly (so "-3" matches "-3" but "18.0" or a sentence-final "18." does not match "18"); no
    number: wrong."""
    numbers = re.findall(r"[-+]?\d[\d,]*\.?\d*", response.replace(",", ""))
    return bool(numbers) and numbers[-1] == gold


def eval_gsm8k(model, tok, rows, batch_size: int = 16, samples: list | None = None, show: bool = False,
               repetition_penalty: float = 1.0, max_new_tokens: int = 256, compiled: bool = False) -> dict:
    """Accuracy over rows (openai/gsm8k main test) as eval_tasks.py's eval_gsm8k: greedy decoding of up to 256
    tokens after "Question: {question}\\nLet's think step by step.\\nAnswer:" (generate_answers, as TriviaQA's:
    eos <|im_end|>, the checkpoint's repetition penalty), gsm8k_correct against the number after "####"."""
    return generation_accuracy("gsm8k", model, tok, [data.gsm8k_prompt(r) for r in rows],
                               [data.gsm8k_gold(r) for r in rows], gsm8k_correct, batch_size, max_new_tokens,
                               repetition_penalty, show, compiled, samples)


# -----------------------------------------------------------------------------
# The probes by name: `--tasks` offers them, run_tasks runs them, the table prints their metric. A new probe is
# its function and one entry here (its rows: data.load_rows by the same name, from the Hub if data.DATASETS knows
# it, else from the file given with --data NAME=PATH).


@dataclass(frozen=True)
class Probe:
    run: Callable           # (model, tok, rows, batch_size, samples, show[, repetition_penalty]) -> {metric: ...}
    metric: str             # the headline number of its results
    default: bool = True    # run when --tasks is not given
    generates: bool = False  # greedy decoding: takes the checkpoint's repetition penalty


PROBES = {
    "medmcqa": Probe(eval_medmcqa, "acc"),
    "wikitext": Probe(eval_wikitext, "ppl"),
    "triviaqa": Probe(eval_triviaqa, "acc", generates=True),
    "hellaswag": Probe(eval_hellaswag, "acc", default=False),
    "gsm8k": Probe(eval_gsm8k, "acc", default=False, generates=True),
}


# -----------------------------------------------------------------------------
# lm-evaluation-harness: any of its tasks as a forgetting probe (optional: pip install -r requirements-harness.txt)


class HarnessLM:
    """Our model behind lm-evaluation-harness's LM interface (run_harness mixes it into lm_eval.api.model.LM):
    loglikelihood (batched; the summed log-probability and whether every continuation token is the greedy one),
    loglikelihood_rolling (the harness's disjoint rolling windows of max_length tokens, the first after the eos
    token), generate_until (greedy, batched, cut at the first stop string; the checkpoint's repetition penalty,
    as Hugging Face's generate applies a generation_config's). Tokenized as the harness's HFLM: context and
    continuation together, the continuation being the tokens after the context's own count (trailing spaces of
    the context moved to the continuation); an empty context is the eos token. Inputs longer than max_length + 1
    tokens lose their first ones. Chat template (ChatML) only when the harness asks for it."""

    def __init__(self, model, tok, batch_size: int = 16, max_length: int = 1024, repetition_penalty: float = 1.0):
        super().__init__()
        self.model, self.tok, self.batch_size, self.max_length = model, tok, batch_size, max_length
        self.repetition_penalty = repetition_penalty
        self.prefix = tok.eos_id if tok.eos_id is not None else tok.stop_ids[0]

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix], self.tok.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.tok.encode(context + continuation), self.tok.encode(context)
        return ctx, whole[len(ctx):]

    @torch.inference_mode()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed log p, all greedy) of each (context ids, continuation ids), in right-padded batches."""
        device, pad = model_device(self.model), self.tok.pad_id if self.tok.pad_id is not None else 0
        seqs = [(c + x)[-(self.max_length + 1):] for c, x in pairs]  # the input is seq[:-1], the targets seq[1:]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = [None] * len(seqs)
        for k in range(0, len(order), self.batch_size):
            batch = order[k:k + self.batch_size]
            idx, mask = data.pad([seqs[i][:-1] for i in batch], pad)
            h = self.model.hidden_states(idx.to(device), mask.to(device))  # (B, T, C)
            rows, cols = [], []
            for b, i in enumerate(batch):  # the last len(continuation) positions predict the continuation
                n_in, n = len(seqs[i]) - 1, len(pairs[i][1])
                rows += [b] * n
                cols += range(n_in - n, n_in)
            targets = torch.tensor([t for i in batch for t in seqs[i][-len(pairs[i][1]):]], device=device)
            lp, greedy = [], []
            for j in range(0, len(rows), 256):  # (n, vocab) fp32 logits, 256 positions at a time
                logits = self.model.lm_head(h[rows[j:j + 256], cols[j:j + 256]]).float()
                lp.append(logits.log_softmax(-1).gather(1, targets[j:j + 256, None])[:, 0])
                greedy.append(logits.argmax(-1) != targets[j:j + 256])
            r = torch.tensor(rows, device=device)
            sums = torch.zeros(len(batch), device=device).index_add_(0, r, torch.cat(lp))
            misses = torch.zeros(len(batch), device=device).index_add_(0, r, torch.cat(greedy).float())
            for b, (total, missed) in enumerate(zip(sums.tolist(), misses.tolist())):
                out[batch[b]] = (total, missed == 0)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.score([self.pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        windows, owner = [], []
        for n, r in enumerate(requests):
            for w in get_rolling_token_windows(self.tok.encode(r.args[0]), self.prefix, self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, self.score(windows)):
            totals[n] += lp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = [None] * len(requests)
        groups = {}
        for n, r in enumerate(requests):  # one batched decoding per distinct set of generation arguments
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(n)
        for key, members in groups.items():
            kw = json.loads(key)
            if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError(f"--harness: the adapter decodes greedily; a task asked for sampling ({kw})")
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else until
            texts = generate_answers(self.model, self.tok, [requests[n].args[0] for n in members], self.batch_size,
                                     int(kw.get("max_gen_toks", 256)), self.repetition_penalty, desc="harness",
                                     strip=False)
            for n, text in zip(members, texts):
                out[n] = min((text.split(u)[0] for u in until if u), key=len, default=text)
        return out

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return "qwen2-chatml"

    def chat_template(self, chat_template=False) -> str:
        return "chatml" if chat_template else ""


@functools.lru_cache(maxsize=None)
def task_manager(cls, include: str | None):
    """lm-eval's index of its tasks (and those of the folder `include`): seconds to build, so built once a process."""
    return cls(include_path=include) if include else cls()


def run_harness(model, tok, tasks: list[str], repetition_penalty: float, batch_size: int, limit: int | None,
                include: str | None = None, fewshot: int | None = None, chat: bool = False) -> dict:
    """lm-evaluation-harness's tasks on our model (HarnessLM) -> {"results": {task: metrics}, "versions",
    "n-samples", "config"}; include: a folder of task YAMLs (local tasks). A one-line error without lm-eval."""
    try:
        import lm_eval
        from lm_eval.api.model import LM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ValueError(f"--harness needs lm-evaluation-harness ({e}): pip install -r requirements-harness.txt")
    lm = type("HarnessModel", (HarnessLM, LM), {})(model, tok, batch_size, repetition_penalty=repetition_penalty)
    try:
        manager = task_manager(TaskManager, include)
    except Exception as e:  # a bad --harness-include folder
        raise ValueError(f"--harness-include {include}: {e}") from e
    if unknown := [t for t in tasks if t not in manager.all_tasks]:
        raise ValueError(f"--harness: unknown task {unknown[0]!r} (lm-eval --tasks list shows them; local ones need "
                         f"--harness-include)")
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=fewshot, limit=limit, task_manager=manager,
                                      apply_chat_template=chat, log_samples=False, bootstrap_iters=0)
    except (OSError, ValueError, RuntimeError, ConnectionError) as e:  # e.g. its datasets unreachable offline
        raise ValueError(f"--harness {','.join(tasks)}: {first_line(e)}") from e
    keep = lambda d: {k: v for k, v in d.items() if isinstance(v, (int, float, str)) or v is None}  # noqa: E731
    return {"results": {t: keep(m) for t, m in res["results"].items()}, "versions": res.get("versions", {}),
            "n-samples": res.get("n-samples", {}), "fewshot": fewshot, "chat_template": chat}


def default_tasks() -> list[str]:
    return [name for name, probe in PROBES.items() if probe.default]


def check_tasks(tasks):
    """The one check of probe names (eval.py --tasks, train.py --eval-tasks, run_tasks)."""
    if unknown := [t for t in tasks if t not in PROBES]:
        raise ValueError(f"unknown task {unknown[0]!r} (choose from {','.join(PROBES)})")


def load_task_rows(tasks, limit: int | None = None, data_paths: dict | None = None) -> dict:
    """{task: rows} with each probe's default split and filtering; data_paths {task: local file} overrides the Hub."""
    data_paths = data_paths or {}
    check_tasks(tasks)
    return {t: data.load_rows(t, data_paths.get(t), limit=limit) for t in tasks}


def default_batch_size(device) -> int:
    """Examples per forward when none is given: 64 on a GPU (where a batch of 16 leaves it mostly idle), 16 on the
    CPU."""
    return 64 if torch.device(device).type == "cuda" else 16


def run_tasks(model, tok, tasks, limit: int | None = None, data_paths: dict | None = None, batch_size: int = 16,
              repetition_penalty: float = 1.0, samples: list | None = None, show: bool = False,
              compiled: bool = False) -> dict:
    """
    {task: metrics + "seconds"}. tasks: a list of task names (rows loaded here with load_task_rows(tasks, limit,
    data_paths)) or a {task: rows} dict (loaded once by the caller; limit and data_paths are then unused).
    repetition_penalty: TriviaQA's greedy decoding; pass load_model's info["repetition_penalty"] to follow the
    paper (1.1 for Qwen2.5-Instruct). samples: a list that receives one dict per example (per window for WikiText).
    compiled: generating probes decode with model.generate(compiled=True) (passed only when True).
    """
    task_rows = tasks if isinstance(tasks, dict) else load_task_rows(tasks, limit, data_paths)
    was_training = model.training
    model.eval()
    results = {}
    for task, rows in task_rows.items():
        t0 = time.time()
        check_tasks([task])
        probe = PROBES[task]
        extra = {"repetition_penalty": repetition_penalty, **({"compiled": True} if compiled else {})} \
            if probe.generates else {}
        r = probe.run(model, tok, rows, batch_size, samples, show, **extra)
        r["seconds"] = round(time.time() - t0, 2)
        results[task] = r
    model.train(was_training)
    return results


def format_table(results: dict) -> str:
    lines = [f"{'task':<10}{'metric':<8}{'value':>10}{'n':>10}{'seconds':>10}"]
    for task, r in results.items():
        if task in PROBES:
            metric = PROBES[task].metric
            n = r.get("n", r.get("tokens"))
            lines.append(f"{task:<10}{metric:<8}{r[metric]:>10.4f}{n:>10}{r['seconds']:>10.1f}")
    for task, metrics in results.get("harness", {}).get("results", {}).items():  # lm-eval's "acc,none" names
        lines += [f"{task} {name.split(',')[0]}: {v:.4f}" for name, v in metrics.items()
                  if isinstance(v, float) and "stderr" not in name]
    return "\n".join(lines)


def parser() -> ArgParser:
    p = ArgParser(prog="eval.py", description="Evaluate a model on MedMCQA, WikiText and TriviaQA (and HellaSwag, "
                                              "GSM8K) with the protocol of the paper's code "
                                              "(github.com/prakharg55/SMF-ICML).")
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct",
                   help="Hub id, local model directory, or run directory written by train.py")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="a run directory's base model where it lies now, if it moved (its weights are checked against "
                        "the ones the run was trained on)")
    p.add_argument("--tasks", default=",".join(default_tasks()),
                   help=f"comma-separated probes, from {','.join(PROBES)} (eval.PROBES)")
    add_flag(p, "--limit", at_least=1, type=int, default=1000,
                   help="first N examples per task (MedMCQA: single-answer validation questions; WikiText: "
                        "non-empty rows; TriviaQA: validation questions)")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="read a task from a local .parquet/.jsonl (WikiText: also plain text) file in the Hub's "
                        "column schema instead of the Hub; repeatable")
    p.add_argument("--out", default=None,
                   help="write the results JSON here, rewritten as each task finishes (a failure keeps those done); "
                        "inside a run or model directory only as eval*.json (e.g. RUN/eval.json)")
    p.add_argument("--log-samples", default=None, metavar="FILE",
                   help="write one JSON line per example (WikiText: per window) with prompt, prediction or "
                        "per-choice scores, target and correctness; rewritten as each task finishes; inside a run or "
                        "model directory only as samples*.jsonl")
    add_flag(p, "--batch-size", at_least=1, type=int, default=None,
                   help="questions (MedMCQA, 4 sequences each), 1024-token windows (WikiText) or prompts "
                        "(TriviaQA) per forward (default: 64 on a GPU, 16 on the CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--no-repetition-penalty", action="store_true",
                   help="TriviaQA: greedy decoding without the checkpoint's generation_config repetition_penalty "
                        "(which the paper's Hugging Face generate applied; 1.1 for Qwen2.5-Instruct)")
    add_flag(p, "--seed", at_least=0, at_most=2**32 - 1, type=int, default=0,
             help="torch seed (the probes are deterministic; for completeness)")
    p.add_argument("--compile", action="store_true",
                   help="TriviaQA: decode with a compiled step over a static KV cache (CUDA graphs on a GPU; the same "
                        "tokens; each batch shape compiles once)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--resume", action="store_true",
                   help="keep the tasks already in --out (written with the same model and settings) and run only the "
                        "others, e.g. after an interrupted evaluation; with every task there, nothing is loaded")
    g = p.add_argument_group("talk to the model instead (--prompt): its reply, streamed, then exit")
    g.add_argument("--prompt", default=None, help="the user message (in the chat template unless --raw)")
    g.add_argument("--system", default=None, help="system message (default: Qwen's own)")
    g.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    add_flag(g, "--max-new-tokens", at_least=1, type=int, default=256)
    add_flag(g, "--temperature", at_least=0, type=float, default=0.0, help="0 = greedy")
    add_flag(g, "--top-k", at_least=1, type=int, default=None)
    add_flag(g, "--top-p", above=0, at_most=1, type=float, default=None)
    g = p.add_argument_group("lm-evaluation-harness (optional: pip install -r requirements-harness.txt)")
    g.add_argument("--harness", default=None, metavar="TASKS",
                   help="comma-separated lm-eval tasks, run on this model through its LM interface (eval.HarnessLM) "
                        "after the probes, alone if --tasks is not given; results under \"harness\" in --out")
    g.add_argument("--harness-include", default=None, metavar="DIR", help="a folder of task YAMLs (local tasks)")
    add_flag(g, "--harness-fewshot", at_least=0, type=int, default=None,
             help="few-shot examples (default: each task's own)")
    g.add_argument("--harness-chat-template", action="store_true",
                   help="prompts in the ChatML chat template (off: raw text, as the paper's probes)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    p.check_flags(args, given=set())  # the ranges declared beside each flag
    if args.prompt is not None:
        return talk(args.model, args.prompt, args.system, args.raw, args.max_new_tokens, args.temperature, args.top_k,
                    args.top_p, 1.0 if args.no_repetition_penalty else None, args.seed, args.device, args.dtype,
                    args.base)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.harness and "tasks" not in p.given(argv):
        tasks = []  # the harness alone
    try:
        check_tasks(tasks)
    except ValueError as e:
        p.error(str(e))
    if not (tasks or args.harness):
        p.error("no task given")
    if args.harness is not None and not [t for t in args.harness.split(",") if t.strip()]:
        p.error("--harness: give at least one lm-evaluation-harness task")
    if args.harness and importlib.util.find_spec("lm_eval") is None:
        p.error("--harness needs lm-evaluation-harness: pip install -r requirements-harness.txt")
    if args.harness_include and not os.path.isdir(args.harness_include):
        p.error(f"--harness-include {args.harness_include}: no such folder")
    if problem := model_problem(args.model):
        p.error(f"--model {args.model}: {problem}")
    try:
        data_paths = data.parse_data_flags(args.data, PROBES)
    except ValueError as e:
        p.error(str(e))
    for flag, path in (("--out", args.out), ("--log-samples", args.log_samples)):  # refused now, not after a task
        if problem := output_problem(path, "eval" if flag == "--out" else "samples"):
            p.error(f"{flag} {path}: {problem}")
    if args.out and args.log_samples and os.path.abspath(args.out) == os.path.abspath(args.log_samples):
        p.error("--out and --log-samples name the same file; give each its own")
    if args.resume and not args.out:
        p.error("--resume keeps the tasks already in --out: give --out")
    if not looks_like_hub_id(args.model):  # a local path: a typo is told before any data is read (or fetched)
        try:
            resolve_model_dir(args.model)
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
    settings = {"model": args.model, "limit": args.limit, "data": data_paths, "seed": args.seed,
                "compile": args.compile, "no_repetition_penalty": args.no_repetition_penalty,
                **{k: getattr(args, k) for k in ("dtype", "batch_size") if getattr(args, k) is not None}}
    torch.manual_seed(args.seed)
    try:
        results = results_to_keep(args.out, settings) if args.resume else {}
        kept_meta = results.pop("meta", {})
        todo = [t for t in tasks if t not in results]
        if not todo and not args.harness:
            print(f"every task is already in {args.out} (--resume): nothing to run")
            print(format_table(results))
            return
        task_rows = load_task_rows(todo, args.limit, data_paths)  # data errors before the model loads
        model, tok, info = load_model(args.model, args.dtype, args.device, args.base)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    rp = 1.0 if args.no_repetition_penalty else info["repetition_penalty"]
    if args.batch_size is None:
        args.batch_size = default_batch_size(model_device(model))
    meta = {**settings, "method": info["method"], "base_model": info["base_model"], "tasks": [*results, *todo],
            "dtype": info["dtype"], "device": info["device"], "batch_size": args.batch_size, "repetition_penalty": rp,
            **({"harness": args.harness, "harness_fewshot": args.harness_fewshot,
                "harness_chat_template": args.harness_chat_template} if args.harness else {})}
    loaded = {k: meta[k] for k in ("method", "base_model", "dtype", "batch_size", "repetition_penalty")}
    if results and (k := first_change(loaded, kept_meta)) is not None:  # known only now that the model has loaded
        sys.exit(f"error: --resume: {args.out} was written with another {k} ({kept_meta.get(k)!r}, now "
                 f"{meta[k]!r}): evaluate into another --out, or drop --resume to replace it")
    samples = None if not args.log_samples else kept_samples(args.log_samples, results) if args.resume else []
    for task, rows in task_rows.items():  # each task is written as soon as it finishes, so a failure keeps them
        try:
            results.update(run_tasks(model, tok, {task: rows}, batch_size=args.batch_size, repetition_penalty=rp,
                                     samples=samples, show=not args.quiet, compiled=args.compile))
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: e.g. CUDA out of memory
            written = " and ".join(f for f in (args.out, args.log_samples) if f)
            kept = f"; finished: {', '.join(results)}, in {written}" if results and written else ""
            sys.exit(f"error: {task}: {first_line(e)}{kept}")
        write_results(args.out, args.log_samples, {**results, "meta": meta}, samples)
    if args.harness:  # lm-eval fetches its tasks' data: offline, a one-line error after its retries
        try:
            results["harness"] = run_harness(model, tok, args.harness.split(","), rp, args.batch_size, args.limit,
                                             args.harness_include, args.harness_fewshot, args.harness_chat_template)
        except ValueError as e:
            sys.exit(f"error: {e}")
        write_results(args.out, args.log_samples, {**results, "meta": meta}, samples)
    print(format_table(results))


def talk(model_name, prompt, system=None, raw=False, max_new_tokens=256, temperature=0.0, top_k=None, top_p=None,
         repetition_penalty=None, seed=0, device="auto", dtype=None, base=None):
    """eval.py --prompt: the model's reply to one message, streamed to stdout; any model eval.py loads (a Hub id,
    a model folder, a run directory of every method). repetition_penalty None: the checkpoint's own."""
    torch.manual_seed(seed)
    try:
        model, tok, info = load_model(model_name, dtype, device, base)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if raw:
        text = prompt
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
    idx = torch.tensor([tok.encode(text)], device=model_device(model))
    eos, printed, shown = tok.stop_ids, [], [""]

    def stream(nxt):  # decode the whole continuation each time so multi-byte characters print whole
        if int(nxt[0]) in eos:
            return
        printed.append(int(nxt[0]))
        text = tok.decode(printed)
        if not text.endswith("\ufffd"):
            print(text[len(shown[0]):], end="", flush=True)
            shown[0] = text

    rp = info["repetition_penalty"] if repetition_penalty is None else repetition_penalty
    model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos or None,
                   repetition_penalty=rp, stream=stream)
    print()


def results_to_keep(out: str, settings: dict) -> dict:
    """--resume: the results already in `out` ({} if there is none), with their "meta", if it was written with
    these settings (the flags known before the model loads; main() checks the others once it has)."""
    if not os.path.exists(out):
        return {}
    old = read_json(out)
    meta = old.get("meta", {})
    if (k := first_change(settings, meta)) is not None:
        raise ValueError(f"--resume: {out} was written with another {k} ({meta[k]!r}, now {settings[k]!r}): evaluate "
                         f"into another --out, or drop --resume to replace it")
    return {k: v for k, v in old.items() if k in PROBES or k == "meta"}


def kept_samples(path: str, results: dict) -> list:
    """--resume: the lines of --log-samples of the tasks kept (the file is rewritten with them first)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [s for s in map(json.loads, filter(str.strip, f)) if s.get("task") in results]


def output_problem(path: str | None, kind: str) -> str | None:
    """Why eval.py must not write a results file (kind "eval") or samples file ("samples") at path, or None. In
    a run directory of train.py (or any folder inside one) or a model folder (config.json), only names that the
    run recognises as eval.py's (checkpoint.is_eval_output) are allowed, so a run's own files are never replaced."""
    if not path:
        return None
    if problem := file_problem(path):
        return problem
    folder, name = os.path.split(os.path.abspath(path))
    inside = [d for d in (folder, *parents(folder)) if is_run_dir(d)] or \
        ([folder] if os.path.exists(os.path.join(folder, "config.json")) else [])
    wanted = "eval*.json" if kind == "eval" else "samples*.jsonl"
    if inside and not (is_eval_output(name) and name.startswith(kind)):
        return f"would write into the run or model directory {inside[0]}; name it {wanted} there, or write elsewhere"
    return None


def parents(folder: str):
    while (up := os.path.dirname(folder)) != folder:
        yield up
        folder = up


def write_results(out: str | None, log_samples: str | None, results: dict, samples: list | None):
    """--out (the results JSON) and --log-samples (one JSON line per example), each replaced atomically; a failed
    write (a full disk, a folder made read-only since the start) is a one-line error."""
    def write_samples(path):
        with open(path, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
    try:
        if out:
            write_json(out, results)
        if log_samples:
            atomic_write(log_samples, write_samples)
    except OSError as e:
        sys.exit(f"error: {e}")


def cli(argv=None):
    """`python eval.py`: main() with Ctrl-C as one line (the tasks finished so far are in --out)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        return "interrupted: the tasks finished so far are in --out; continue with --resume"


if __name__ == "__main__":
    sys.exit(cli())
