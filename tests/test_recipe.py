"""
--recipe paper against re-implementations, written here, of what the paper's public code does
(github.com/prakharg55/SMF-ICML: smf_rebuild/ and memory_layers/memory.py), on a tiny model:

- the memory's bf16 maths: Meta's HashingMemory.forward under bf16 autocast, and in a bf16 model (evaluation)
- padding positions as Hugging Face's Qwen2 computes them (their memory reads are counted)
- stage 1: raw OASST1 replies, every memory weight trained by torch's AdamW from bf16-rounded init, the Trainer's
  token mean over the step and its warmup (transformers' get_cosine_schedule_with_warmup)
- stage 2: torch's AdamW over whole value tables and alpha with a gradient-mask hook, rows re-selected per
  micro-batch from read counts that include padding, each micro-batch's own mean loss summed over the step,
  values and alpha clipped together, values rounded to bf16 first
- full finetuning in pure bf16; LoRA merged into the bf16 base as peft's merge_and_unload
"""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import data
import memory
import train
from data import Tokenizer
from model import Qwen2
from tiny_data import medmcqa_rows, oasst1_rows
from helpers import read_log, train_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = (1, 2)


common = functools.partial(train_argv, batch_size=4, micro_batch=2, max_len=128, warmup=None)  # tiny fixtures


# -----------------------------------------------------------------------------
# The paper code's pieces, written from its source


def paper_memory_forward(w, x, cfg):
    """Meta's HashingMemory.forward (swilu projection) on x (N, C); w: the layer's tensors by our names. Under
    autocast (the paper's training) the linears and einsums run in bf16; in a bf16 model everything is bf16."""
    heads, k, n, half = cfg.heads, cfg.topk, cfg.n_keys, cfg.k_dim // 2
    query = F.linear(x, w["query.weight"], w["query.bias"]).view(-1, heads, cfg.k_dim)
    keys = w["keys"].view(heads, 2, n, half)
    s1 = torch.einsum("blh,lkh->blk", query[..., :half], keys[:, 0])
    s2 = torch.einsum("blh,lkh->blk", query[..., half:], keys[:, 1])
    s1, i1 = s1.topk(k, dim=2)
    s2, i2 = s2.topk(k, dim=2)
    all_scores = (s1.view(-1, heads, k, 1) + s2.view(-1, heads, 1, k)).view(-1, heads, k * k)
    all_indices = (i1.view(-1, heads, k, 1) * n + i2.view(-1, heads, 1, k)).view(-1, heads, k * k)
    scores, best = all_scores.topk(k, dim=2)
    indices = all_indices.gather(2, best).view(-1, heads * k)
    scores = F.softmax(scores.float(), dim=-1).type_as(scores).view(-1, heads * k)
    values = w["values.weight"]
    out = F.embedding_bag(indices, values, per_sample_weights=scores.to(values.dtype), mode="sum")
    proj = out * F.silu(F.linear(x, w["w1.weight"], w["w1.bias"]))
    return F.linear(proj.to(w["w2.weight"].dtype), w["w2.weight"], w["w2.bias"]), indices


class PaperMemory(nn.Module):
    """The memory branch of the paper's AdditiveMemoryMLP, alpha * memory(h), the memory under bf16 autocast;
    keeps the slot ids of every position (its read-count hook bincounts them all, padding included)."""

    def __init__(self, weights, cfg):
        super().__init__()
        self.cfg = cfg
        self.w = nn.ParameterDict({"t_" + k.replace(".", "__"): nn.Parameter(v.clone(), requires_grad=False)
                                   for k, v in weights.items()})  # ParameterDict keys can hold no "."
        self.indices = None

    def weights(self):
        return {k[2:].replace("__", "."): p for k, p in self.w.items()}

    def forward(self, h):
        B, T, C = h.shape
        w = self.weights()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, self.indices = paper_memory_forward(w, h.reshape(-1, C), self.cfg)
        return w["alpha"].to(h.dtype) * out.view(B, T, C).to(h.dtype)


class PaperModel(nn.Module):
    """A Qwen2 as the paper's code trains it: the paper's memory beside the MLP of each memory layer, every memory
    weight rounded to bf16 (its code builds or loads the memory in a bf16 model), Hugging Face's labels= loss
    (the micro-batch's token mean, or its token sum over num_items_in_batch) and its padding positions. The base
    is our Qwen2 (it equals transformers' elsewhere, padding positions included with hf_padding), so that only
    the paper's recipe is under test here."""

    def __init__(self, model_dir, run_weights, cfg):
        super().__init__()
        self.qwen = Qwen2.from_pretrained(model_dir).eval()
        self.qwen.requires_grad_(False)
        self.mems = {}
        for i in LAYERS:
            prefix = f"model.layers.{i}.memory."
            w = {k[len(prefix):]: v.bfloat16().float() for k, v in run_weights.items() if k.startswith(prefix)}
            self.mems[i] = self.qwen.model.layers[i].memory = PaperMemory(w, cfg)

    def forward(self, input_ids, attention_mask=None, labels=None, num_items_in_batch=None):
        logits = self.qwen(input_ids, attention_mask, hf_padding=attention_mask is not None)
        if labels is None:
            return None
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                               reduction="sum" if num_items_in_batch else "mean")
        return loss / num_items_in_batch if num_items_in_batch else loss


def paper_kl_mask(counts, bg_counts, top_t):
    """SparseMemoryController.update_masks_from_current_batch, scoring "kl" (fp32)."""
    p_batch = counts.float() / counts.sum().float()
    bg = bg_counts.float() + 1.0
    p_bg = bg / bg.sum().clamp_min(1.0)
    score = (p_batch * torch.log((p_batch + 1e-8) / (p_bg + 1e-8))).masked_fill(counts == 0, float("-inf"))
    mask = torch.zeros_like(counts, dtype=torch.bool)
    mask[torch.topk(score, k=min(top_t, int((counts > 0).sum()))).indices] = True
    return mask


def reply_texts(path):
    """The paper's oasst1 preset: English assistant replies ranked 0 or 1 with at least 50 characters."""
    rows = [json.loads(line) for line in open(path)]
    return [r["text"] for r in rows if r["lang"] == "en" and r["role"] == "assistant" and r["rank"] in (0.0, 1.0)
            and len(r["text"] or "") >= 50]


def batches_of(examples, seed, batch_size, pad_id, count, grad_accum=2):
    """`count` micro-batches of batch_size in train.py's data order (steps of grad_accum micro-batches, epoch by
    epoch, a step never across two; data order is not part of the recipe), right-padded as Hugging Face's collator
    pads: pad id, attention 0, label -100."""
    per_epoch = len(examples) // (batch_size * grad_accum)  # optimizer steps per epoch
    for m in range(count):
        step, j = divmod(m, grad_accum)
        epoch, i = divmod(step, per_epoch)
        order = data.epoch_order(len(examples), seed, epoch)
        first = (i * grad_accum + j) * batch_size
        chunk = [examples[k] for k in order[first:first + batch_size]]
        T = max(len(ids) for ids in chunk)
        idx = torch.tensor([ids + [pad_id] * (T - len(ids)) for ids in chunk])
        mask = torch.tensor([[1] * len(ids) + [0] * (T - len(ids)) for ids in chunk])
        yield idx, mask, idx.masked_fill(mask == 0, -100)


def trainer_loop(hf, params, micro_batches, steps, grad_accum, lr, warmup, on_micro_batch=None, mean_per_micro=False):
    """Hugging Face's Trainer as the paper's scripts configure it: torch AdamW, cosine schedule with warmup, clip
    1.0; the loss of a micro-batch is its token sum over the step's token count (plain Trainer), or its own mean
    with no division by the accumulation steps (the paper's SparseMemoryTrainer: a sum of micro-batch means)."""
    from transformers import get_cosine_schedule_with_warmup
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, warmup, steps)
    micro_batches, norms = list(micro_batches), []
    for step in range(steps):
        chunk = micro_batches[step * grad_accum:(step + 1) * grad_accum]
        n_items = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in chunk)
        for idx, mask, labels in chunk:
            kw = {} if mean_per_micro else {"num_items_in_batch": n_items}
            loss = hf(input_ids=idx, attention_mask=mask, labels=labels, **kw)
            if on_micro_batch is not None:
                on_micro_batch()
            loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        opt.step()
        sched.step()
        opt.zero_grad()
    return norms


def assert_same_training(ours, reference, log, norms, atol):
    """Weights equal up to float noise, which Adam amplifies where a gradient is near 0 and bf16 rounding of the
    memory's activations then carries on (atol well under one step of the lr; a missing bf16 rounding of the
    initial weights, a wrong lr or a wrong selection moves weights by more); the logged gradient norms (before
    clipping: the loss's scale) equal the reference's."""
    for name, ref in reference.items():
        torch.testing.assert_close(ours[name], ref.detach(), atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert [r["grad_norm"] for r in log] == pytest.approx(norms, rel=1e-3)


# -----------------------------------------------------------------------------
# The memory's bf16 maths


@pytest.mark.parametrize("evaluation", [False, True])
def test_bf16_memory_equals_the_paper_codes_forward(evaluation):
    torch.manual_seed(0)
    cfg = memory.MemoryConfig(n_keys=8, heads=2, topk=4, k_dim=16, precision="bf16").resolve(1, 24)
    mem = memory.ProductKeyMemory(24, cfg)
    memory.round_to_bf16_({0: mem})
    x = torch.randn(2, 7, 24)
    w = dict(mem.named_parameters())
    if evaluation:  # the whole model in bf16
        mem.to(torch.bfloat16)
        x = x.bfloat16()
        w = {k: v.detach() for k, v in mem.named_parameters()}
        ref, ids = paper_memory_forward(w, x.view(14, 24), cfg)
    else:  # fp32 weights and activations, bf16 autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref, ids = paper_memory_forward(w, x.view(14, 24), cfg)
    ref = w["alpha"].to(x.dtype) * ref.view(2, 7, 24).to(x.dtype)
    ours = mem(x)
    assert torch.equal(mem.last_indices.view(14, 8), ids)
    assert ours.dtype == x.dtype
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # and it is not the fp32 maths
    mem.cfg = memory.MemoryConfig(**{**cfg.to_dict(), "precision": "fp32"})
    if not evaluation:
        assert not torch.equal(mem(x), ours)


def test_padding_positions_equal_transformers_with_hf_padding(tiny_model_dir):
    """hf_padding: every position of a right-padded batch, padding included, as transformers computes it with the
    attention mask (pads attend to the real tokens only, at positions 0..T-1). Real positions never change."""
    from transformers import Qwen2ForCausalLM
    ours = Qwen2.from_pretrained(tiny_model_dir).eval()
    hf = Qwen2ForCausalLM.from_pretrained(tiny_model_dir).eval()
    idx = torch.randint(0, 300, (3, 9))
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])
    with torch.no_grad():
        ref = hf(input_ids=idx, attention_mask=mask).logits
        torch.testing.assert_close(ours(idx, mask, hf_padding=True), ref, atol=1e-5, rtol=1e-5)
        plain = ours(idx, mask)
    real = mask.bool()
    torch.testing.assert_close(plain[real], ref[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain[~real], ref[~real], atol=1e-3)  # the plain causal path differs at pads


# -----------------------------------------------------------------------------
# Stage 1 and stage 2 against the Trainer-style reference


def test_paper_retrofit_equals_the_paper_codes_stage_1(retrofit_run, tiny_model_dir, files):
    cfg = memory.MemoryConfig.from_dict(json.load(open(os.path.join(retrofit_run, "config.json")))["memory"])
    torch.manual_seed(0)  # train.py's init: the run's seed, then add_memory
    init = Qwen2.from_pretrained(tiny_model_dir)
    memory.add_memory(init, cfg)
    hf = PaperModel(tiny_model_dir, memory.memory_state_dict(init), cfg)
    params = [p for mem in hf.mems.values() for p in mem.w.values()]
    for p in params:
        p.requires_grad_(True)
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    examples = [ids for ids in (tok.encode(t)[:128] for t in reply_texts(files["oasst1"])) if len(ids) > 1]
    norms = trainer_loop(hf, params, batches_of(examples, 0, 2, tok.pad_id, 6), steps=3, grad_accum=2, lr=1e-3,
                         warmup=1)
    log = read_log(retrofit_run)
    assert_same_training(load_file(os.path.join(retrofit_run, "model.safetensors")),
                         {f"model.layers.{i}.memory.{name}": p for i, mem in hf.mems.items()
                          for name, p in mem.weights().items()}, log, norms, atol=3e-5)


def test_paper_stage_2_equals_the_paper_codes_stage_2(retrofit_run, tiny_model_dir, files, tmp_path):
    out = tmp_path / "smf"
    train.main(common(tiny_model_dir, files, out, "--method", "smf", "--memory-from", retrofit_run, "--max-steps",
                      "3", "--warmup", "2", "--top-t", "12", "--train-alpha", "--background-batches", "4",
                      "--background-subset", "5", "--lr", "1e-2", "--seed", "1", "--log-rows"))
    cfg = memory.MemoryConfig.from_dict(json.load(open(os.path.join(retrofit_run, "config.json")))["memory"])
    hf = PaperModel(tiny_model_dir, load_file(os.path.join(retrofit_run, "model.safetensors")), cfg)
    mlps = hf.mems
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    # background: the first 4 single-example batches of _limit(replies, 5, seed), recomputed in stage 2
    replies = reply_texts(files["oasst1"])
    picked = [replies[j] for j in np.random.default_rng(1).permutation(len(replies))[:5]]
    picked = [ids for ids in (tok.encode(t)[:128] for t in picked) if len(ids) > 1][:4]
    bg = {i: torch.zeros(cfg.n_keys ** 2, dtype=torch.long) for i in LAYERS}
    with torch.no_grad():
        for ids in picked:
            hf(input_ids=torch.tensor([ids]))
            for i in LAYERS:
                bg[i] += torch.bincount(mlps[i].indices.flatten(), minlength=cfg.n_keys ** 2)
    assert torch.equal(memory.BackgroundStats.load(os.path.join(out, "background.safetensors")).counts[1], bg[1])
    # the values and alpha train; a gradient hook keeps the rows selected on the current micro-batch
    masks, chosen = {}, []  # chosen: per micro-batch, the rows it selected per layer
    params = []
    for i, mlp in mlps.items():
        for name in ("values.weight", "alpha"):
            mlp.weights()[name].requires_grad_(True)
            params.append(mlp.weights()[name])
        mlp.weights()["values.weight"].register_hook(lambda g, i=i: g * masks[i][:, None].to(g.dtype))

    def select():  # after the forward, before backward: counts over every position, padding included
        for i, mlp in mlps.items():
            masks[i] = paper_kl_mask(torch.bincount(mlp.indices.flatten(), minlength=cfg.n_keys ** 2), bg[i], 12)
        chosen.append({str(i): set(m.nonzero().flatten().tolist()) for i, m in masks.items()})

    def medmcqa_text(r):  # the paper's medmcqa preset
        options = [r["opa"], r["opb"], r["opc"], r["opd"]]
        text = (f"Medical exam question:\nQuestion: {r['question']}\nA. {options[0]}\nB. {options[1]}\n"
                f"C. {options[2]}\nD. {options[3]}\nAnswer: {'ABCD'[r['cop']]}. {options[r['cop']]}")
        return text + f"\nExplanation: {r['exp'].strip()}" if (r.get("exp") or "").strip() else text

    rows = [r for r in medmcqa_rows(40) if r["choice_type"] == "single"]
    examples = [tok.encode(medmcqa_text(r))[:128] for r in rows]
    norms = trainer_loop(hf, params, batches_of(examples, 1, 2, tok.pad_id, 6), steps=3, grad_accum=2, lr=1e-2,
                         warmup=2, on_micro_batch=select, mean_per_micro=True)
    log = read_log(out)
    assert_same_training(load_file(os.path.join(out, "model.safetensors")),
                         {f"model.layers.{i}.memory.{name}": mlp.weights()[name] for i, mlp in mlps.items()
                          for name in ("values.weight", "alpha")}, log, norms, atol=3e-5)
    assert log[0]["lr"] == 0.0 and log[1]["lr"] == pytest.approx(5e-3)  # the Trainer's warmup starts at lr 0
    for step, record in enumerate(log):  # the step's rows: the union of its 2 micro-batches' selections
        a, b = chosen[2 * step], chosen[2 * step + 1]
        assert {k: set(v) for k, v in record["selected"].items()} == {k: a[k] | b[k] for k in a}


# -----------------------------------------------------------------------------
# Baselines


def test_full_finetuning_in_pure_bf16(tiny_model_dir, files, tmp_path):
    """Weights, gradients and AdamW state in bf16 with no fp32 master copy: train.py equals torch's AdamW on a
    bf16 model step for step (our Qwen2 equals transformers' in bf16 elsewhere)."""
    out = tmp_path / "full"
    train.main(common(tiny_model_dir, files, out, "--method", "full", "--max-steps", "2", "--warmup", "1",
                      "--lr", "1e-3"))
    ref = Qwen2.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    params = list(ref.parameters())
    from transformers import get_cosine_schedule_with_warmup
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 1, 2)
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    rows = data.load_rows("medmcqa", path=files["medmcqa"], split="train")
    examples = [tok.encode(data.medmcqa_train_text(r))[:128] for r in rows]
    batches = list(batches_of(examples, 0, 2, tok.pad_id, 4))
    for step in range(2):
        chunk = batches[2 * step:2 * step + 2]
        n = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in chunk)
        for idx, mask, labels in chunk:
            logits = ref(idx, mask)
            (F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum") / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    ours = load_file(os.path.join(out, "model.safetensors"))
    assert {v.dtype for v in ours.values()} == {torch.bfloat16}
    for k, v in ref.state_dict().items():
        if k in ours:
            assert torch.equal(ours[k], v), k
    ckpt = load_file(os.path.join(out, "checkpoint.safetensors"))
    assert {v.dtype for k, v in ckpt.items() if k.startswith("adamw.") and "exp_avg" in k} == {torch.bfloat16}


def test_lora_is_evaluated_merged_into_the_bf16_base_as_peft_merges(tiny_model_dir, files, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import Qwen2ForCausalLM
    from checkpoint import load_model
    from model import LoRALinear
    out = tmp_path / "lora"
    train.main(common(tiny_model_dir, files, out, "--method", "lora", "--max-steps", "3", "--lr", "1e-2",
                      "--warmup", "1", "--export-peft"))
    ours, _, _ = load_model(str(out), dtype=torch.bfloat16)
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
    hf = Qwen2ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    merged = peft.PeftModel.from_pretrained(hf, str(out / "peft")).merge_and_unload()
    theirs = merged.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    clean = out.parent / "lora-clean"
    train.main(common(tiny_model_dir, files, clean, "--method", "lora", "--recipe", "clean", "--max-steps", "1"))
    unmerged, _, _ = load_model(str(clean), dtype=torch.bfloat16)
    assert any(isinstance(m, LoRALinear) for m in unmerged.modules())


# -----------------------------------------------------------------------------
# The recipe mechanics


def test_warmup_follows_transformers_scheduler():
    from transformers import get_cosine_schedule_with_warmup
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = get_cosine_schedule_with_warmup(opt, 3, 10)
    for step in range(10):
        assert train.lr_at(step, 10, 2.0, 3, from_zero=True) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [train.lr_at(s, 10, 2.0, 3) for s in range(3)] == pytest.approx([2 / 3, 4 / 3, 2.0])  # clean


def test_recipe_fills_unset_flags_and_records_them(tiny_model_dir, files, tmp_path):
    args = train.parse_args(["--method", "smf"])
    assert args.recipe == "paper" and args.optimizer == "dense_adamw" and args.select_per_micro_batch
    args = train.parse_args(["--method", "smf", "--recipe", "paper", "--no-count-pad-reads", "--optimizer", "adamw"])
    assert (args.count_pad_reads, args.optimizer, args.sum_micro_batch_means) == (False, "adamw", True)
    args = train.parse_args(["--method", "smf", "--recipe", "clean"])
    assert {k: getattr(args, k) for k in train.RECIPES["clean"]} == train.RECIPES["clean"]
    r = subprocess.run([sys.executable, "train.py", "--method", "lora", "--pure-bf16"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--pure-bf16 does not apply to --method lora" in r.stderr
    out = tmp_path / "lora"
    train.main(common(tiny_model_dir, files, out, "--method", "lora", "--max-steps", "1", "--no-warmup-from-zero"))
    cfg = json.load(open(out / "config.json"))
    saved = json.load(open(out / "args.json"))
    assert cfg["recipe"] == {"name": "paper", **train.RECIPES["paper"], "warmup_from_zero": False}
    assert all(saved[k] == v for k, v in cfg["recipe"].items() if k != "name") and saved["recipe"] == "paper"


def test_seeded_subsets_are_the_paper_codes(tiny_model_dir, files):
    """data.seeded_subset is datasets' shuffle(seed).select(range(n)): numpy's default_rng(seed).permutation;
    the whole set in order when it is not larger than the limit. MedMCQA's training subset follows the seed."""
    assert data.seeded_subset(10, 4, 7) == np.random.default_rng(7).permutation(10)[:4].tolist()
    assert data.seeded_subset(10, 10, 7) == list(range(10)) and data.seeded_subset(10, None, 7) == list(range(10))
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    rows = [r for r in medmcqa_rows(40) if r["choice_type"] == "single"]
    for seed in (0, 1):
        args = train.parse_args(common(tiny_model_dir, files, "unused", "--method", "lora", "--seed", str(seed)))
        got = data.training_examples("medmcqa", tok, args.max_len, seed, 5, files["medmcqa"])
        want = [rows[j] for j in np.random.default_rng(seed).permutation(len(rows))[:5]]
        assert [ids for ids, _ in got] == [tok.encode(data.medmcqa_train_text(r)) for r in want]


def test_defaults_are_the_papers_setup():
    """Every default that the paper's table depends on, as its public code (github.com/prakharg55/SMF-ICML) sets
    it; a change here changes what `python train.py --method M` reproduces."""
    import train
    shared = dict(batch_size=16, max_len=1024, warmup=100, grad_clip=1.0, weight_decay=0.0, recipe="paper",
                  warmup_from_zero=True)
    want = {
        "smf": dict(lr=5e-4, epochs=3, limit=60000, top_t=512, rank="kl", retrofit_lr=5e-4, retrofit_epochs=2,
                    retrofit_limit=50000, background_batches=2000, background_subset=20000, oasst1_format="replies",
                    optimizer="dense_adamw", select_per_micro_batch=True, count_pad_reads=True,
                    sum_micro_batch_means=True, memory_precision="bf16"),
        "retrofit": dict(lr=5e-4, epochs=2, limit=50000, oasst1_format="replies", memory_precision="bf16"),
        "lora": dict(lr=2e-4, epochs=3, limit=60000, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                     lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     merge_lora_for_eval=True),
        "full": dict(lr=5e-5, epochs=3, limit=60000, pure_bf16=True),
    }
    for method, values in want.items():
        args = vars(train.parse_args(["--method", method]))
        assert {k: args[k] for k in {**shared, **values}} == {**shared, **values}, method
    cfg = train.memory_config(vars(train.parse_args(["--method", "smf"]))).resolve(24, 896)
    assert (cfg.layers, cfg.mode, cfg.alpha_init, cfg.n_keys, cfg.heads, cfg.topk, cfg.k_dim, cfg.v_dim) == \
        ([6, 12, 18], "additive", 0.01, 128, 4, 16, 256, 896)  # at Qwen2.5-0.5B's 24 layers and hidden size 896


def test_oasst1_replies_filter():
    rows = oasst1_rows(30)
    got = data.oasst1_replies(rows)
    want = [r["text"] for r in rows if r["lang"] == "en" and r["role"] == "assistant" and r["rank"] in (0, 1)
            and len(r["text"]) >= 50]
    assert got == want and 0 < len(got) < sum(r["role"] == "assistant" for r in rows)
    assert all(not t.startswith("<|") for t in got)
    with pytest.raises(ValueError, match="lang and rank"):
        data.oasst1_replies([{k: v for k, v in rows[1].items() if k != "rank"}])
    edge = [{"lang": "en", "role": "assistant", "rank": rank, "text": "x" * n} for rank, n in
            [(0, 50), (1, 50), (0, 49), (2, 80), (None, 80)]]  # 50 characters are enough; ranks 0 and 1 only
    assert data.oasst1_replies(edge) == ["x" * 50, "x" * 50]


def test_a_fresh_start_recomputes_a_stale_background(retrofit_run, tiny_model_dir, files, tmp_path):
    """A stage-2 start that failed after writing its background reads leaves them behind; the fixed command,
    not a resume, computes them anew from its own flags."""
    out = tmp_path / "smf"
    out.mkdir()
    stale = memory.BackgroundStats({1: torch.ones(64, dtype=torch.long)}, {1: torch.ones(64, dtype=torch.long)}, 99)
    stale.save(str(out / "background.safetensors"))
    train.main(common(tiny_model_dir, files, out, "--method", "smf", "--memory-from", retrofit_run, "--max-steps",
                      "1", "--background-batches", "3"))
    assert memory.BackgroundStats.load(str(out / "background.safetensors")).n_batches == 3


# -----------------------------------------------------------------------------
# The recipe's flags combine independently


def test_the_loss_divisor_follows_sum_micro_batch_means_alone(retrofit_run, tiny_model_dir, files, tmp_path):
    """--recipe paper --no-select-per-micro-batch still sums the micro-batch means (a gradient 1.5 to 3 times the
    token mean's over 2 micro-batches); adding --no-sum-micro-batch-means divides by the step's tokens. lr 0: the
    same steps, read from each run's log."""
    norms = {}
    for name, extra in (("sum", []), ("mean", ["--no-sum-micro-batch-means"])):
        train.main(common(tiny_model_dir, files, tmp_path / name, "--method", "smf", "--memory-from", retrofit_run,
                          "--no-select-per-micro-batch", "--max-steps", "2", "--lr", "0", "--top-t", "8",
                          "--background-batches", "4", *extra))
        norms[name] = [r["grad_norm"] for r in read_log(tmp_path / name)]
    assert all(s / m > 1.4 for s, m in zip(norms["sum"], norms["mean"])), norms


def test_grad_clip_0_turns_clipping_off_for_smf(retrofit_run, tiny_model_dir, files, tmp_path):
    """--grad-clip 0 is no clipping for SMF as for the other methods: the step's rows move (clipping to norm 0 would
    leave them)."""
    out = tmp_path / "smf"
    train.main(common(tiny_model_dir, files, out, "--method", "smf", "--memory-from", retrofit_run, "--recipe",
                      "clean", "--optimizer", "sgd", "--grad-clip", "0", "--max-steps", "1", "--lr", "1",
                      "--warmup", "0", "--top-t", "8", "--background-batches", "4"))
    before = load_file(os.path.join(retrofit_run, "model.safetensors"))
    after = load_file(os.path.join(out, "model.safetensors"))
    key = next(k for k in after if k.endswith("values.weight"))
    moved = (after[key] != before[key]).any(1).sum().item()
    assert 0 < moved <= 8  # the selected rows of this layer, and only those
