"""train.py end to end on a tiny model and tiny local data (CPU, seconds each)."""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from common import Ranks
import train
from checkpoint import load_model
from model import Qwen2
from grads import assert_same_gradients
from tiny_data import write_jsonl
from helpers import MEM, call, read_log, run_script, train_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


common = functools.partial(train_argv, batch_size=4, micro_batch=2, max_len=128)  # train.py flags, tiny fixtures


def test_retrofit_trains_every_memory_tensor(retrofit_run, tiny_model_dir):
    cfg = json.load(open(os.path.join(retrofit_run, "config.json")))
    assert cfg["method"] == "retrofit" and cfg["finished"] and cfg["memory"]["layers"] == [1, 2]
    saved = load_file(os.path.join(retrofit_run, "model.safetensors"))
    assert saved and all(".memory." in k for k in saved)
    assert {k.split(".memory.")[0] for k in saved} == {"model.layers.1", "model.layers.2"}
    # stage 1 trained every memory tensor away from its init (rebuilt with the run's seed)
    import memory
    torch.manual_seed(0)
    fresh = memory.add_memory(Qwen2.from_pretrained(tiny_model_dir), memory.MemoryConfig.from_dict(cfg["memory"]))
    for i, mem in fresh.items():
        for name, p in mem.state_dict().items():
            assert not torch.equal(saved[f"model.layers.{i}.memory.{name}"], p), f"{name} of layer {i} did not train"
    assert len(read_log(retrofit_run)) == 3
    args = json.load(open(os.path.join(retrofit_run, "args.json")))
    assert args["method"] == "retrofit" and "torch" in args and "git_commit" in args
    assert not os.path.exists(os.path.join(retrofit_run, "background.safetensors"))  # stage 2 computes it


@pytest.mark.parametrize("recipe", ["paper", "clean"])
def test_stage2_background_reads_the_retrofits_data(recipe, retrofit_run, tiny_model_dir, files, tmp_path):
    """Stage 2 reads the background from the data its memory was retrofitted on (here the paper's raw OASST1
    replies): paper, the first --background-batches of a seeded random --background-subset (numpy's
    default_rng(seed).permutation, as datasets' shuffle); clean, a seeded shuffle of all of them. Every token
    reads heads * topk slots once per memory layer, pads never (single-example batches)."""
    import numpy as np
    import memory
    from data import Tokenizer
    out = tmp_path / "smf"
    train.main(common(tiny_model_dir, files, out, "--method", "smf", "--recipe", recipe, "--memory-from",
                      retrofit_run, "--max-steps", "1", "--background-batches", "4", "--seed", "3",
                      *(["--background-subset", "5"] if recipe == "paper" else [])))
    stats = memory.BackgroundStats.load(os.path.join(out, "background.safetensors"))
    rows = [json.loads(line) for line in open(files["oasst1"])]
    replies = [r["text"] for r in rows if r["lang"] == "en" and r["role"] == "assistant" and r["rank"] in (0, 1)
               and len(r["text"]) >= 50]
    assert 5 < len(replies) < 30
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    if recipe == "paper":
        picked = [tok.encode(replies[j]) for j in np.random.default_rng(3).permutation(len(replies))[:5]][:4]
    else:
        import data
        picked = [tok.encode(replies[j]) for j in data.epoch_order(len(replies), 3, epoch=10**6)[:4]]
    assert stats.n_batches == 4
    for i in (1, 2):
        assert int(stats.counts[i].sum()) == sum(len(ids) for ids in picked) * 2 * 4
        assert int(stats.doc_freq[i].max()) <= 4 and int(stats.doc_freq[i].sum()) > 0


def test_loss_equals_transformers_and_accumulation_equals_a_big_batch(tiny_model_dir, files, tmp_path,
                                                                      optimizer_steps):
    """The logged loss of step 1 (before any update) is transformers' labels= loss on the same batch; and
    2 micro-batches of 2 give full finetuning's AdamW the gradients of one batch of 4 (at lr 0: the same weights
    at every step)."""
    import data
    from data import Tokenizer
    from transformers import Qwen2ForCausalLM
    base = ["--method", "full", "--recipe", "clean", "--lr", "0", "--max-steps", "2"]
    train.main(common(tiny_model_dir, files, tmp_path / "big", *base, "--micro-batch", "4"))
    big = list(optimizer_steps)
    optimizer_steps.clear()
    train.main(common(tiny_model_dir, files, tmp_path / "acc", *base, "--micro-batch", "2"))
    assert_same_gradients(big, optimizer_steps)
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    rows = data.load_rows("medmcqa", path=files["medmcqa"], split="train")
    examples = [data.encode_text(tok, data.medmcqa_train_text(r), 128) for r in rows]
    first = [examples[j] for j in data.epoch_order(len(examples), 0, 0)[:4]]
    batch = data.collate(first, tok.pad_id)
    hf = Qwen2ForCausalLM.from_pretrained(tiny_model_dir)
    ref = hf(batch["idx"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.item()
    for run in ("big", "acc"):
        assert read_log(tmp_path / run)[0]["loss"] == pytest.approx(ref, rel=1e-5)


def test_smf_changes_only_selected_value_rows(retrofit_run, tiny_model_dir, files, tmp_path):
    """Stage 2 step by step: each step changes at most top-t value rows per layer, exactly those chosen;
    nothing but the values changes; the base model is untouched."""
    out = tmp_path / "smf"
    args = common(tiny_model_dir, files, out, "--method", "smf", "--recipe", "clean", "--memory-from", retrofit_run,
                  "--max-steps", "3", "--top-t", "5", "--log-rows", "--lr", "1e-2")
    before = load_file(os.path.join(retrofit_run, "model.safetensors"))
    snapshots = [before]
    for k in (1, 2):
        with pytest.raises(train.StopRun):
            train.main(args + ["--stop-at-step", str(k)] + (["--resume"] if k > 1 else []))
        snapshots.append(load_file(os.path.join(out, "model.safetensors")))
    train.main(args + ["--resume"])
    snapshots.append(load_file(os.path.join(out, "model.safetensors")))
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    for step, (a, b) in enumerate(zip(snapshots, snapshots[1:])):
        assert set(a) == set(b)
        for k in a:
            if not k.endswith("values.weight"):
                assert torch.equal(a[k], b[k]), f"{k} changed in stage 2"
                continue
            layer = k.split(".")[2]
            chosen = sorted(log[step]["selected"][layer])
            changed = (a[k] != b[k]).any(dim=1).nonzero().flatten().tolist()
            assert 0 < len(chosen) <= 5
            assert set(changed) <= set(chosen)
            assert len(changed) >= 1
            assert log[step]["rows"][layer] == len(changed)


@pytest.mark.parametrize("method", ["lora", "smf"])
def test_group_size_trains_each_group_in_one_step(method, retrofit_run, tiny_model_dir, files, tmp_path, monkeypatch):
    """--group-size 4 with --batch-size 4: each step trains one whole group of 4 consecutive lines (Lin et al.'s one
    fact and its paraphrases), in the stage of either kind (sparse, dense)."""
    import data
    text = write_jsonl(str(tmp_path / "facts.jsonl"),
                       [{"text": f"fact {k} said the {j} way"} for k in range(3) for j in range(4)])
    steps_seen = []

    class Recording(data.MicroBatches):
        def step(self, s):
            steps_seen.append(self.step_ids(s))
            return super().step(s)
    monkeypatch.setattr(data, "MicroBatches", Recording)
    smf = ["--memory-from", retrofit_run, "--background-batches", "2"] if method == "smf" else []
    train.main(common(tiny_model_dir, files, tmp_path / method, "--method", method, "--recipe", "clean", "--task",
                      f"text:{text}", "--group-size", "4", "--max-steps", "6", *smf))
    assert len(steps_seen) == 6
    assert all(ids == list(range(ids[0], ids[0] + 4)) and ids[0] % 4 == 0 for ids in steps_seen), steps_seen
    assert len({ids[0] for ids in steps_seen[:3]}) == 3  # an epoch: each group once, in a shuffled order


def test_smf_full_pipeline_loss_goes_down_and_evaluates(tiny_model_dir, files, tmp_path):
    out = tmp_path / "smf"
    model = train.main(common(tiny_model_dir, files, out, "--method", "smf", "--retrofit-max-steps", "2",
                              "--background-batches", "4", "--max-steps", "12", "--limit", "4", "--lr", "0.5",
                              "--top-t", "16", *MEM))
    assert os.path.exists(out / "retrofit" / "config.json") and os.path.exists(out / "background.safetensors")
    base = Qwen2.from_pretrained(tiny_model_dir)
    own = model.state_dict()
    for k, v in base.state_dict().items():  # base weights bit-identical after both stages
        assert torch.equal(own[k], v), k
    log = read_log(out)
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < first - 0.05, (first, last)
    # the run directory round-trips through eval.py
    res = subprocess.run([sys.executable, "eval.py", "--model", str(out), "--tasks", "medmcqa",
                          "--data", f"medmcqa={files['medmcqa']}", "--limit", "4", "--out", str(tmp_path / "r.json")],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.load(open(tmp_path / "r.json"))["medmcqa"]["n"] == 4
    reloaded, _, _ = load_model(str(out))
    idx = torch.randint(0, 300, (2, 12))
    model.eval()
    import memory
    for mem in memory.memory_layers(model).values():  # the paper recipe evaluates the memory in bf16
        assert mem.values.weight.dtype == torch.float32
        mem.to(torch.bfloat16)
    assert torch.equal(reloaded(idx), model(idx))


def test_lora_exports_and_leaves_base_untouched(tiny_model_dir, files, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import Qwen2ForCausalLM
    out = tmp_path / "lora"
    model = train.main(common(tiny_model_dir, files, out, "--method", "lora", "--max-steps", "3", "--lr", "1e-2",
                              "--export-peft", "--export-merged"))
    saved = load_file(os.path.join(out, "model.safetensors"))
    assert saved and all(k.endswith((".lora_A", ".lora_B")) for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if k.endswith("lora_B"))  # it trained
    base = Qwen2.from_pretrained(tiny_model_dir)
    for k, v in base.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    idx = torch.randint(0, 300, (2, 12))
    reloaded, _, _ = load_model(str(out))
    reloaded.eval()
    ours = reloaded(idx)
    merged = Qwen2.from_pretrained(str(out / "merged")).eval()
    torch.testing.assert_close(merged(idx), ours, atol=1e-5, rtol=1e-5)
    hf = Qwen2ForCausalLM.from_pretrained(tiny_model_dir).eval()
    pm = peft.PeftModel.from_pretrained(hf, str(out / "peft")).eval()
    torch.testing.assert_close(pm(idx).logits, ours, atol=1e-5, rtol=1e-5)


def test_full_saves_hub_dir_loaded_by_transformers(tiny_model_dir, files, tmp_path):
    from transformers import Qwen2ForCausalLM
    out = tmp_path / "full"
    model = train.main(common(tiny_model_dir, files, out, "--method", "full", "--recipe", "clean", "--max-steps", "2",
                              "--lr", "1e-3"))
    model.eval()
    idx = torch.randint(0, 300, (2, 12))
    hf = Qwen2ForCausalLM.from_pretrained(str(out / "hf")).eval()
    torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=1e-4)
    base = Qwen2.from_pretrained(tiny_model_dir)
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("method,recipe", [("lora", "paper"), ("smf", "paper"), ("smf", "clean"), ("full", "paper")])
def test_resume_is_bit_identical(method, recipe, retrofit_run, tiny_model_dir, files, tmp_path, monkeypatch):
    extra = ["--method", method, "--recipe", recipe, "--max-steps", "4", "--lr", "1e-2"]
    if method == "smf":
        extra += ["--memory-from", retrofit_run, "--top-t", "5"]
    train.main(common(tiny_model_dir, files, tmp_path / "a", *extra))
    with pytest.raises(train.StopRun):
        train.main(common(tiny_model_dir, files, tmp_path / "b", *extra, "--stop-at-step", "2"))
    # a resumed SMF run keeps the background statistics it started with (its stage-1 data may have changed since)
    monkeypatch.setattr(train, "background_statistics", lambda *a: pytest.fail("background recomputed on resume"))
    train.main(common(tiny_model_dir, files, tmp_path / "b", *extra, "--resume"))
    for name in ("model.safetensors", "checkpoint.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resume"
    timing = {"seconds", "tok_s", "mfu"}  # the clock's, not the run's
    strip = lambda log: [{k: v for k, v in r.items() if k not in timing} for r in log]  # noqa: E731
    assert strip(read_log(tmp_path / "a")) == strip(read_log(tmp_path / "b"))


def test_bad_input_gives_one_line_errors(tiny_model_dir, files, tmp_path, retrofit_run):
    r = call(train.cli, ["--method", "magic"])
    assert r.returncode != 0 and "invalid choice: 'magic'" in r.stderr
    r = call(train.cli, ["--method", "lora", "--model", tiny_model_dir, "--data", f"medmcqa={tmp_path}/nope.jsonl"])
    assert r.returncode != 0 and "file not found" in r.stderr and "nope.jsonl" in r.stderr
    # a memory built on another base model
    from tiny import write_checkpoint
    other = write_checkpoint(str(tmp_path / "other"), hidden=32, heads=2, kv_heads=1, intermediate=64)
    r = call(train.cli, common(other, files, tmp_path / "x", "--method", "smf", "--memory-from", retrofit_run))
    assert r.returncode != 0 and "differs from --model" in r.stderr
    assert [line for line in r.stderr.splitlines() if not line.startswith("data: ")] == \
        [r.stderr.strip().splitlines()[-1]], r.stderr  # one line (after the data's warnings), no traceback
    # a run directory with completed steps is not overwritten without --resume
    out = tmp_path / "y"
    os.makedirs(out)
    json.dump({}, open(out / "args.json", "w"))
    open(out / "checkpoint.safetensors", "w").close()
    r = call(train.cli, common(tiny_model_dir, files, out, "--method", "lora"))
    assert r.returncode != 0 and "already holds a run with completed steps: pass --resume" in r.stderr


def test_smf_paper_recipe_moves_rows_outside_the_selection(retrofit_run, tiny_model_dir, files, tmp_path):
    """--recipe paper (the default), through the CLI with --log-rows: per-micro-batch selection makes more than
    top-t rows change in a step of 2 micro-batches, and the dense AdamW keeps moving rows chosen earlier but not
    now (rows change outside the step's logged selection). The clean recipe never does either
    (test_smf_changes_only_selected_value_rows)."""
    out = tmp_path / "paper"
    args = common(tiny_model_dir, files, out, "--method", "smf", "--memory-from", retrofit_run, "--max-steps", "4",
                  "--top-t", "3", "--log-rows", "--lr", "1e-2", "--batch-size", "2", "--micro-batch", "1")  # 2 micro-batches of 1
    snapshots = [load_file(os.path.join(retrofit_run, "model.safetensors"))]
    for k in (1, 2, 3):
        with pytest.raises(train.StopRun):
            train.main(args + ["--stop-at-step", str(k)] + (["--resume"] if k > 1 else []))
        snapshots.append(load_file(os.path.join(out, "model.safetensors")))
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    sizes = [len(rows) for r in log for rows in r["selected"].values()]
    assert max(sizes) > 3 and max(sizes) <= 2 * 3  # two micro-batches chose different rows
    outside = more_than_t = False
    for step, (a, b) in enumerate(zip(snapshots[1:], snapshots[2:]), start=1):  # steps 2 and 3 (step 1: lr 0)
        for layer, rows in log[step]["selected"].items():
            k = f"model.layers.{layer}.memory.values.weight"
            changed = set((a[k] != b[k]).any(dim=1).nonzero().flatten().tolist())
            outside |= bool(changed - set(rows))
            more_than_t |= len(changed) > 3
            assert log[step]["rows"][layer] == len(changed)
    assert outside and more_than_t


def test_pretrain_from_random_init_then_finetune_on_text(tiny_model_dir, tmp_path):
    """--init random builds the model from config.json alone; --task text:PATH trains on plain text."""
    import shutil
    cfg_dir = tmp_path / "cfg"
    os.makedirs(cfg_dir)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_model_dir, name), cfg_dir / name)
    text = write_jsonl(str(tmp_path / "text.jsonl"), [{"text": f"the {i} apple is red"} for i in range(8)])
    out = tmp_path / "pre"
    train.main(["--method", "full", "--init", "random", "--model", str(cfg_dir), "--task", f"text:{text}",
                "--out", str(out), "--device", "cpu", "--batch-size", "4", "--max-steps", "15",
                "--warmup", "1", "--lr", "3e-3"])
    log = read_log(out)
    assert log[-1]["loss"] < log[0]["loss"] - 1.0
    reloaded, _, info = load_model(str(out / "hf"))
    assert info["method"] is None and reloaded.config.hidden_size == 64


def test_values_lr_scale_steps_the_memory_values_alone_at_a_higher_lr(tiny_model_dir, tmp_path):
    """--values-lr-scale 10 on full finetuning of a model with memory layers: every other tensor takes exactly the
    step it takes without it; the values' first AdamW step, lr * g / (sqrt(g^2) + eps), is 10 times as large (its
    size is the lr: the rounding of p - step is the only difference); a resumed run continues exactly (the values'
    moments found by name in their own param group)."""
    text = write_jsonl(str(tmp_path / "text.jsonl"), [{"text": f"the {i} apple is red"} for i in range(8)])
    flags = ["--method", "full", "--model", tiny_model_dir, "--task", f"text:{text}", "--device", "cpu", "--recipe",
             "clean", "--batch-size", "4", "--warmup", "1", "--lr", "1e-3", *MEM]
    runs = {}
    for scale in ("1", "10"):
        train.main(flags + ["--out", str(tmp_path / scale), "--max-steps", "1", "--values-lr-scale", scale])
        runs[scale] = load_file(str(tmp_path / scale / "model.safetensors"))
    start = Qwen2.from_pretrained(tiny_model_dir).state_dict()
    values = [k for k in runs["1"] if k.endswith(".memory.values.weight")]
    assert values and set(runs["1"]) == set(runs["10"])
    for k in runs["1"]:
        if k not in values:
            assert torch.equal(runs["1"][k], runs["10"][k]), k
    # the memory's fresh values (the same seed draws them in every run): a step at lr 0 leaves them as they are
    model = train.main(flags + ["--out", str(tmp_path / "0"), "--max-steps", "1", "--lr", "0"])
    fresh = {k: v for k, v in model.state_dict().items() if k in values}
    for k in values:
        moved1, moved10 = runs["1"][k] - fresh[k], runs["10"][k] - fresh[k]
        assert moved1.abs().max() > 0
        torch.testing.assert_close(moved10, 10 * moved1, rtol=1e-3, atol=1e-7)  # fp32 rounding of p (|p| < 1)
    assert not any(torch.equal(start[k], runs["1"][k]) for k in start if k in runs["1"] and "layers.0" in k)
    a = flags + ["--max-steps", "4", "--values-lr-scale", "10"]
    train.main(a + ["--out", str(tmp_path / "a")])
    with pytest.raises(train.StopRun):
        train.main(a + ["--out", str(tmp_path / "b"), "--stop-at-step", "2"])
    train.main(a + ["--out", str(tmp_path / "b"), "--resume"])
    for name in ("model.safetensors", "checkpoint.safetensors"):
        x, y = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), name


def test_hub_revision_is_recorded_from_snapshot_paths():
    snap = "/cache/hub/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/7ae557604adf67be50417f59c2c2f167def9a775"
    assert train.hub_revision(snap) == "7ae557604adf67be50417f59c2c2f167def9a775"
    assert train.hub_revision(snap + "/") == "7ae557604adf67be50417f59c2c2f167def9a775"
    assert train.hub_revision("/tmp/my-model") is None


def test_compiled_training_equals_eager(tiny_model_dir, files, tmp_path, optimizer_steps):
    """--compile (blocks without memory compiled, batches padded to multiples of 64) hands AdamW the gradients of
    eager mode (up to fp32 summation order; lr 0: the same weights at every step); SMF's memory blocks stay eager."""
    base = ["--method", "full", "--recipe", "clean", "--lr", "0", "--max-steps", "2", "--max-len", "64"]
    train.main(common(tiny_model_dir, files, tmp_path / "eager", *base))
    eager = list(optimizer_steps)
    optimizer_steps.clear()
    model = train.main(common(tiny_model_dir, files, tmp_path / "compiled", *base, "--compile"))
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None for b in model.model.layers)
    assert_same_gradients(eager, optimizer_steps)
    assert [r["loss"] for r in read_log(tmp_path / "eager")] == pytest.approx(
        [r["loss"] for r in read_log(tmp_path / "compiled")], rel=1e-5)


# --- micro-batches: as few per step as memory allows -------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "smf", "retrofit"])
def test_one_micro_batch_equals_four(method, retrofit_run, tiny_model_dir, files, tmp_path, optimizer_steps):
    """A step of 8 examples as 1 x 8 and as 4 x 2 hands its optimizer the same gradients (up to fp32 summation
    order), the same loss and, for the clean SMF, the same rows, selected once per step whatever the split. At lr 0
    every step's gradient is taken at the same weights, so each of the 3 steps is an exact comparison (LoRA
    without dropout, whose masks would be drawn per micro-batch; its lora_B gradients carry the comparison)."""
    extra = {"lora": ["--lora-dropout", "0"], "smf": ["--memory-from", retrofit_run, "--top-t", "5"],
             "retrofit": MEM}[method]
    base = ["--method", method, "--recipe", "clean", "--lr", "0", "--max-steps", "3", "--batch-size", "8", *extra]
    train.main(common(tiny_model_dir, files, tmp_path / "one", *base, "--micro-batch", "8"))
    one = list(optimizer_steps)
    optimizer_steps.clear()
    train.main(common(tiny_model_dir, files, tmp_path / "four", *base, "--micro-batch", "2"))
    assert_same_gradients(one, optimizer_steps)
    assert [r["tokens"] for r in read_log(tmp_path / "one")] == [r["tokens"] for r in read_log(tmp_path / "four")]
    for a, b in zip(read_log(tmp_path / "one"), read_log(tmp_path / "four")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   rel=1e-4)
    assert json.load(open(tmp_path / "one" / "config.json"))["micro_batch"] == 8


def test_micro_batch_auto(retrofit_run, tiny_model_dir, files, tmp_path, monkeypatch):
    """auto: the whole batch per forward on the CPU; 4 for the paper recipe's SMF (its selection and loss are per
    micro-batch of 4); a resumed run keeps the size recorded in config.json; a size that does not divide the
    batch is refused."""
    base = ["--max-steps", "2", "--batch-size", "8", "--micro-batch", "auto"]
    train.main(common(tiny_model_dir, files, tmp_path / "full", "--method", "full", "--recipe", "clean", *base))
    assert json.load(open(tmp_path / "full" / "config.json"))["micro_batch"] == 8
    assert len(read_log(tmp_path / "full")) == 2
    train.main(common(tiny_model_dir, files, tmp_path / "paper", "--method", "smf", "--memory-from", retrofit_run,
                      *base))
    assert json.load(open(tmp_path / "paper" / "config.json"))["micro_batch"] == 4
    # a resumed run takes the recorded size, whatever auto would choose now
    cfg = tmp_path / "full" / "config.json"
    json.dump({**json.load(open(cfg)), "micro_batch": 2}, open(cfg, "w"))
    args = train.parse_args(common(tiny_model_dir, files, tmp_path / "full", "--method", "full", *base, "--resume"))
    stage = train.Stage(out=str(tmp_path / "full"), model=None, examples=[], lr=0, epochs=1, max_steps=1,
                        adamw_params={}, trained=None, config={})
    loop = train.settings(train.Loop, vars(args))
    assert train.micro_batch(stage, loop, torch.device("cpu"), None, train.setup_ranks("cpu")[0]) == 2
    r = run_script("train.py", *common(tiny_model_dir, files, tmp_path / "x", "--method", "full", "--batch-size", "8",
                        "--micro-batch", "3"))
    assert r.returncode != 0 and "--micro-batch 3 must be a positive divisor of the batch per process (8)" in r.stderr


def test_paper_smf_batch_rule_is_checked_before_any_work(retrofit_run, tiny_model_dir, files, tmp_path):
    """A --batch-size the paper recipe's SMF cannot split into micro-batches of 4 is refused by --check-flags and,
    without it, before stage 1 or the background reads (no run directory is made)."""
    for extra in (["--check-flags"], []):
        r = call(train.cli, common(tiny_model_dir, files, tmp_path / "smf", "--method", "smf", "--memory-from",
                                   retrofit_run, "--batch-size", "2", "--micro-batch", "auto", *extra))
        assert r.returncode != 0 and "micro-batch of 4" in r.stderr and "--batch-size" in r.stderr, r.stderr
        assert not (tmp_path / "smf").exists()
    ok = call(train.cli, common(tiny_model_dir, files, tmp_path / "smf", "--method", "smf", "--memory-from",
                                retrofit_run, "--batch-size", "2", "--micro-batch", "auto", "--recipe", "clean",
                                "--check-flags"))
    assert ok.returncode == 0, ok.stderr  # the clean recipe selects once per step: any batch


def test_paper_micro_batch_is_split_across_ranks(retrofit_run, tiny_model_dir, files, tmp_path):
    """The paper recipe's SMF selects rows per micro-batch of 4 examples (its 4 per device): under 2 processes each
    rank takes 2 of them, so that a micro-batch still holds 4 across the ranks; a world that cannot split 4 is an
    error, as an explicit --micro-batch is its own choice."""
    args = train.parse_args(common(tiny_model_dir, files, tmp_path / "p", "--method", "smf", "--memory-from",
                                   retrofit_run, "--batch-size", "16", "--micro-batch", "auto"))
    smf = train.settings(train.SMFStep, vars(args), memories={}, background=None)
    stage = train.Stage(out=str(tmp_path / "p"), model=None, examples=[], lr=0, epochs=1, max_steps=1,
                        adamw_params={}, trained=None, config={}, smf=smf)
    loop = train.settings(train.Loop, vars(args))
    sizes = {w: train.micro_batch(stage, loop, torch.device("cpu"), None, Ranks(0, w)) for w in (1, 2, 4)}
    assert sizes == {1: 4, 2: 2, 4: 1}
    with pytest.raises(train.RunError, match="micro-batch of 4"):
        train.micro_batch(stage, loop, torch.device("cpu"), None, Ranks(0, 3))


