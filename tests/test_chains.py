"""Chains of runs (continual learning): an smf run continued from an smf run trains only the rows it selects in the
continued memory (every other tensor and row bit-identical to the previous run's), takes its background reads from
the chain's stage-1 data and records its lineage; LoRA (--lora-from) and full finetuning (--model RUN/hf) continue
from the previous run's weights exactly (at lr 0 a link ends where the previous one ended); eval.py loads a link as
any run."""

import functools
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import data
import train
from checkpoint import load_model
from tiny_data import write_jsonl
from helpers import MEM, read_log, train_argv


common = functools.partial(train_argv, batch_size=4, max_len=128)  # train.py flags on the tiny fixtures


def config(run):
    return json.load(open(os.path.join(run, "config.json")))


@pytest.fixture(scope="module")
def smf_chain(tiny_model_dir, files, tmp_path_factory, request):
    """retrofit -> smf on MedMCQA -> smf on a text file, each link recording the stage-1 data its background
    reads came from."""
    d = tmp_path_factory.mktemp("chain")
    text = write_jsonl(str(d / "facts.jsonl"), [{"text": f"Fact {i}: the kiwi helps the liver {i} times."}
                                                for i in range(12)])
    seen = []
    mp = pytest.MonkeyPatch()
    real = data.background_examples
    mp.setattr(data, "background_examples", lambda stage1, *a: seen.append(dict(stage1)) or real(stage1, *a))
    request.addfinalizer(mp.undo)
    runs = {k: str(d / k) for k in ("retrofit", "smf1", "smf2")}
    train.main(common(tiny_model_dir, files, runs["retrofit"], "--method", "retrofit", "--max-steps", "3", *MEM))
    smf = ["--method", "smf", "--recipe", "clean", "--top-t", "5", "--lr", "1e-2", "--background-batches", "4",
           "--max-steps", "3", "--log-rows"]
    train.main(common(tiny_model_dir, files, runs["smf1"], *smf, "--memory-from", runs["retrofit"]))
    train.main(common(tiny_model_dir, files, runs["smf2"], *smf, "--memory-from", runs["smf1"], "--task",
                      f"text:{text}", "--seed", "1"))
    return runs, seen, text


def test_smf_continues_an_smf_run_and_trains_only_its_selected_rows(smf_chain):
    runs, _, _ = smf_chain
    before, after = load_file(os.path.join(runs["smf1"], "model.safetensors")), \
        load_file(os.path.join(runs["smf2"], "model.safetensors"))
    assert set(before) == set(after)
    log = read_log(runs["smf2"])
    for k in before:
        if not k.endswith(".memory.values.weight"):
            assert torch.equal(before[k], after[k]), k  # keys, query, alpha: as the previous link left them
            continue
        layer = k.split(".")[2]
        chosen = sorted({r for rec in log for r in rec["selected"][layer]})
        others = torch.ones(before[k].shape[0], dtype=torch.bool)
        others[chosen] = False
        assert torch.equal(before[k][others], after[k][others]), k  # every row not selected: bit-identical
        assert not torch.equal(before[k][chosen], after[k][chosen])  # the selected ones moved


def test_a_chain_records_its_lineage_and_keeps_its_stage1_background(smf_chain):
    runs, seen, text = smf_chain
    stage1 = config(runs["retrofit"])["stage1_data"]
    c1, c2 = config(runs["smf1"]), config(runs["smf2"])
    assert c1["lineage"] == [{"run": runs["retrofit"], "method": "retrofit", "task": "oasst1"}]
    assert c2["lineage"] == c1["lineage"] + [{"run": runs["smf1"], "method": "smf", "task": "medmcqa"}]
    assert c2["task"] == f"text:{text}" and c2["memory_from"] == runs["smf1"]
    assert c1["stage1_data"] == c2["stage1_data"] == stage1
    assert seen == [stage1, stage1]  # both links read their background on the retrofit's OASST1, not on MedMCQA
    # eval.py loads a link as any run: its memory is the link's own
    model, _, info = load_model(runs["smf2"], device="cpu")
    assert info["method"] == "smf"
    saved = load_file(os.path.join(runs["smf2"], "model.safetensors"))
    own = model.state_dict()
    assert all(torch.equal(own[k].float(), v.float()) for k, v in saved.items())


def test_background_task_overrides_the_chain(smf_chain, tiny_model_dir, files, tmp_path, monkeypatch):
    runs, _, text = smf_chain
    seen = []
    real = data.background_examples
    monkeypatch.setattr(data, "background_examples", lambda stage1, *a: seen.append(dict(stage1)) or real(stage1, *a))
    train.main(common(tiny_model_dir, files, tmp_path / "x", "--method", "smf", "--recipe", "clean", "--top-t", "5",
                      "--background-batches", "4", "--max-steps", "1", "--memory-from", runs["smf2"],
                      "--background-task", f"text:{text}"))
    assert seen[0]["task"] == f"text:{text}"
    assert config(str(tmp_path / "x"))["stage1_data"] == config(runs["retrofit"])["stage1_data"]  # still carried


def test_lora_chain_continues_from_the_previous_adapters(tiny_model_dir, files, tmp_path):
    first, second = tmp_path / "lora1", tmp_path / "lora2"
    train.main(common(tiny_model_dir, files, first, "--method", "lora", "--lora-r", "4", "--lora-alpha", "8",
                      "--max-steps", "3", "--lr", "1e-2"))
    # lr 0: the link ends exactly where it started, which must be the previous link's adapters (not fresh ones)
    train.main(common(tiny_model_dir, files, second, "--method", "lora", "--lora-from", str(first), "--max-steps",
                      "1", "--lr", "0"))
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in a.items())  # trained: not the zero init
    c = config(str(second))
    assert c["lora"]["r"] == 4 and c["lora"]["alpha"] == 8  # the adapters' shape is the previous run's
    assert c["lineage"] == [{"run": str(first), "method": "lora", "task": "medmcqa"}]
    with pytest.raises(SystemExit):  # a shape that contradicts the previous adapters is refused
        train.parse_args(common(tiny_model_dir, files, tmp_path / "x", "--method", "lora", "--lora-from", str(first),
                                "--lora-r", "8"))


def test_full_chain_continues_from_the_hf_export(tiny_model_dir, files, tmp_path):
    first, second = tmp_path / "full1", tmp_path / "full2"
    train.main(common(tiny_model_dir, files, first, "--method", "full", "--recipe", "clean", "--max-steps", "2",
                      "--lr", "1e-3"))
    train.main(common(str(first / "hf"), files, second, "--method", "full", "--recipe", "clean", "--max-steps", "1",
                      "--lr", "0"))
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in base)  # the first link did train
    assert config(str(second))["lineage"] == [{"run": str(first), "method": "full", "task": "medmcqa"}]
    model, _, _ = load_model(str(second), device="cpu")  # eval.py loads the link as any full run
    assert torch.equal(model.state_dict()["model.norm.weight"], b["model.norm.weight"])


def test_memory_from_refuses_a_run_of_another_method(tiny_model_dir, files, tmp_path):
    lora = tmp_path / "lora"
    train.main(common(tiny_model_dir, files, lora, "--method", "lora", "--max-steps", "1"))
    with pytest.raises(train.RunError, match="a lora run, not a retrofit or smf or full run"):
        train.main(common(tiny_model_dir, files, tmp_path / "x", "--method", "smf", "--memory-from", str(lora)))


# -----------------------------------------------------------------------------
# A model pretrained with its memory (Lin et al. 2025's setting): full --memory-layers, then every method from it

REPLACEMENT = ["--n-keys", "8", "--mem-heads", "2", "--mem-topk", "4", "--mem-k-dim", "16", "--memory-layers", "2",
               "--memory-mode", "replacement"]


@pytest.fixture(scope="module")
def memory_model(tiny_model_dir, files, tmp_path_factory):
    """A tiny Qwen2 trained from scratch with a replacement memory in layer 2 (train.py --method full --init random
    --memory-layers 2), and an smf run from it at lr 0 (its background read on the pretraining text)."""
    d = tmp_path_factory.mktemp("memory_model")
    text = write_jsonl(str(d / "facts.jsonl"), [{"text": f"Fact {i}: the kiwi helps the liver {i} times."}
                                                for i in range(12)])
    runs = {k: str(d / k) for k in ("pre", "smf")}
    train.main(common(tiny_model_dir, files, runs["pre"], "--method", "full", "--init", "random", "--recipe", "clean",
                      "--task", f"text:{text}", "--max-steps", "3", "--lr", "1e-2", *REPLACEMENT))
    train.main(common(os.path.join(runs["pre"], "hf"), files, runs["smf"], "--method", "smf", "--recipe", "clean",
                      "--memory-from", runs["pre"], "--task", f"text:{text}", "--optimizer", "sgd", "--rank", "tfidf",
                      "--top-t", "4", "--background-batches", "6", "--max-steps", "1", "--lr", "0"))
    return runs, text


def test_a_model_pretrained_with_its_memory_keeps_it_in_its_run_and_not_in_its_export(memory_model):
    runs, text = memory_model
    c = config(runs["pre"])
    assert c["memory"]["layers"] == [2] and c["memory"]["mode"] == "replacement" and c["memory"]["alpha_init"] is None
    assert c["stage1_data"]["task"] == f"text:{text}"  # an smf run's background: the pretraining text
    saved = load_file(os.path.join(runs["pre"], "model.safetensors"))
    assert "model.layers.2.memory.values.weight" in saved and not any("layers.2.mlp" in k for k in saved)
    hf = load_file(os.path.join(runs["pre"], "hf", "model.safetensors"))  # a plain Qwen2: no memory, layer 2's
    assert not any(".memory." in k for k in hf)  # MLP all zeros (it adds nothing)
    assert all(not v.any() for k, v in hf.items() if "layers.2.mlp" in k)
    assert all(torch.equal(hf[k], v) for k, v in saved.items() if k in hf)  # every other tensor as trained
    pre, _, _ = load_model(runs["pre"], device="cpu")  # eval.py loads it with its memory, in fp32
    assert pre.model.layers[2].mlp is None and pre.model.layers[2].memory.values.weight.dtype == torch.float32


def test_smf_lora_and_full_continue_a_model_pretrained_with_its_memory_exactly(memory_model, tiny_model_dir, files,
                                                                              tmp_path):
    """At lr 0 every method's run is the pretrained memory model itself: the same logits, bit for bit (smf from
    --model PRE/hf --memory-from PRE; full and LoRA the same, full training the memory, LoRA keeping it frozen in its
    own file), and a second link continues the first (full: --model LINK/hf --memory-from LINK)."""
    runs, text = memory_model
    hf = os.path.join(runs["pre"], "hf")
    ft = ["--recipe", "clean", "--task", f"text:{text}", "--max-steps", "1", "--lr", "0"]
    train.main(common(hf, files, tmp_path / "full", "--method", "full", "--memory-from", runs["pre"], *ft))
    train.main(common(os.path.join(tmp_path, "full", "hf"), files, tmp_path / "full2", "--method", "full",
                      "--memory-from", tmp_path / "full", *ft))
    train.main(common(hf, files, tmp_path / "lora", "--method", "lora", "--memory-from", runs["pre"], "--lora-r", "2",
                      *ft))
    idx = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    pre, _, _ = load_model(runs["pre"], device="cpu")
    want = pre(idx)
    for run in (runs["smf"], tmp_path / "full", tmp_path / "full2", tmp_path / "lora"):
        model, _, _ = load_model(str(run), device="cpu")
        assert torch.equal(model(idx), want), run
    assert "model.layers.2.memory.values.weight" in load_file(str(tmp_path / "lora" / "model.safetensors"))
    assert [e["run"] for e in config(str(tmp_path / "full2"))["lineage"]] == [runs["pre"], str(tmp_path / "full")]
    with pytest.raises(train.RunError, match="its memory was trained with the weights of"):  # another base
        train.main(common(tiny_model_dir, files, tmp_path / "x", "--method", "smf", "--memory-from", runs["pre"], *ft))


def test_background_from_takes_an_earlier_links_reads_without_reading(memory_model, files, tmp_path, monkeypatch):
    runs, text = memory_model
    monkeypatch.setattr(data, "background_examples", lambda *a: pytest.fail("read the background again"))
    flags = ["--method", "smf", "--recipe", "clean", "--memory-from", runs["smf"], "--task", f"text:{text}",
             "--optimizer", "sgd", "--rank", "tfidf", "--top-t", "4", "--max-steps", "2", "--lr", "1"]
    hf = os.path.join(runs["pre"], "hf")
    train.main(common(hf, files, tmp_path / "smf2", *flags, "--background-from", runs["smf"]))
    a = load_file(os.path.join(runs["smf"], "background.safetensors"))
    b = load_file(str(tmp_path / "smf2" / "background.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for reading in (["--background-batches", "8"], ["--background-subset", "0"], ["--background-task", f"text:{text}"]):
        with pytest.raises(SystemExit):  # the reads are taken as they are: a flag about reading them is refused
            train.parse_args(common(hf, files, tmp_path / "x", *flags, "--background-from", runs["smf"], *reading))
    with pytest.raises(train.RunError, match="a full run, not a smf run"):
        train.main(common(hf, files, tmp_path / "y", *flags, "--background-from", runs["pre"]))


def test_an_interrupted_smf_link_resumes_after_its_memory_moved(retrofit_run, tiny_model_dir, files, tmp_path):
    """An smf run stopped mid-way resumes from its --memory-from run's new place (the same weights); other weights
    put at that path are refused."""
    import shutil
    from helpers import steps
    memory_dir, link = tmp_path / "retrofit", tmp_path / "smf"
    shutil.copytree(retrofit_run, memory_dir)
    flags = ["--method", "smf", "--recipe", "clean", "--max-steps", "3", "--top-t", "4", "--background-batches", "2"]
    with pytest.raises(train.StopRun):
        train.main(common(tiny_model_dir, files, link, *flags, "--memory-from", memory_dir, "--stop-at-step", "1"))
    moved = tmp_path / "elsewhere" / "retrofit"
    shutil.move(memory_dir, moved)
    train.main(common(tiny_model_dir, files, tmp_path / "other", "--method", "retrofit", "--max-steps", "2", *MEM,
                      "--lr", "3e-3"))
    shutil.copytree(tmp_path / "other", memory_dir)  # another memory where the first one was
    with pytest.raises(train.RunError, match="holds other weights"):
        train.main(common(tiny_model_dir, files, link, *flags, "--memory-from", memory_dir, "--resume"))
    train.main(common(tiny_model_dir, files, link, *flags, "--memory-from", moved, "--resume"))
    assert steps(link) == [1, 2, 3]


def test_memory_from_a_retrofit_on_other_base_weights_is_refused(retrofit_run, memory_model, files, tmp_path):
    """--memory-from a retrofit trained on other weights of the same shape: refused, naming the fingerprints; a full
    run that trained its memory with the model is accepted with its own hf/ as --model."""
    from tiny import write_checkpoint
    other = write_checkpoint(str(tmp_path / "other"), seed=7)
    with pytest.raises(train.RunError, match="it was trained on other base weights than --model"):
        train.main(common(other, files, tmp_path / "smf", "--method", "smf", "--recipe", "clean", "--memory-from",
                          retrofit_run, "--max-steps", "1", "--background-batches", "2"))
    assert not (tmp_path / "smf" / "args.json").exists()
    runs, text = memory_model
    assert config(runs["smf"])["memory_from"] == os.path.abspath(runs["pre"])  # the fixture's link: accepted
    assert config(runs["smf"])["finished"] is True
