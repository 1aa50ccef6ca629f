"""experiments/forgetting.py end to end at the --quick scale (about 40 s on 2 CPU cores), plus the synthetic
world's invariants (data.py) that make its measurements mean something."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import data  # noqa: E402

METHODS = ["smf-clean", "smf-sgd", "smf-paper", "lora", "full"]
SMF = ["smf-clean", "smf-sgd", "smf-paper"]


def test_world_is_deterministic_and_splits_old_from_new():
    a, b = data.synthetic_world(3, 20, 10), data.synthetic_world(3, 20, 10)
    assert a == b and a != data.synthetic_world(4, 20, 10)
    names_old = {e["name"] for e in a["old"]}
    names_new = {e["name"] for e in a["new"]}
    assert len(names_old) == 20 and len(names_new) == 10 and not names_old & names_new
    pretrain = data.world_pretrain_texts(a, 3, 200)
    assert pretrain == data.world_pretrain_texts(a, 3, 200)
    text = "\n".join(pretrain)
    assert not any(n in text for n in names_new)  # new facts never appear in pretraining
    # held-out prose: every sentence is absent from the pretraining text, yet each template is used there
    for doc in data.world_heldout_texts(a):
        for sent in doc.split(". "):
            assert sent.rstrip(".") + "." not in text
    for i, e in enumerate(a["old"]):
        for attr in data.WORLD_ATTRIBUTES:
            h = data.world_heldout_template(i, attr)
            template = data.WORLD_TEMPLATES[attr][h]
            assert template.format(name=e["name"], v=e[attr]) not in text


def test_fact_items_have_the_true_value_among_candidates():
    world = data.synthetic_world(0, 5, 5)
    items = data.world_fact_items(world["new"])
    assert len(items) == 5 * len(data.WORLD_ATTRIBUTES)
    for (q, cands, target), (e, attr) in zip(items, [(e, a) for e in world["new"] for a in data.WORLD_ATTRIBUTES]):
        assert q == f"Q: What is the {attr} of {e['name']}? A:" and cands[target] == " " + e[attr]
        assert q + cands[target] in data.world_qa_texts(world["new"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    import forgetting
    out = str(tmp_path_factory.mktemp("forgetting"))
    summary = forgetting.main(["--quick", "--out", out, "--seed", "0"])
    return out, summary


def run_files(out, name):
    """(config.json, args.json, log.jsonl records) of the run out/name."""
    run = os.path.join(out, name)
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    return json.load(open(os.path.join(run, "config.json"))), json.load(open(os.path.join(run, "args.json"))), log


def test_quick_pipeline_writes_every_method(quick_run):
    out, summary = quick_run
    res = json.load(open(os.path.join(out, "results.json")))
    md = open(os.path.join(out, "results.md")).read()
    assert [r["method"] for r in res["summary"]] == ["base", "retrofit", *METHODS] == [r["method"] for r in summary]
    assert {r["method"] for r in res["sweep"]} == {"base", "retrofit", *METHODS}
    for r in res["sweep"]:
        assert 0 <= r["new_acc"] <= 1 and 0 <= r["old_acc"] <= 1 and r["heldout_ppl"] > 1 and r["trainable"] > 0
        assert f"| {r['method']} |" in md
    # every finetune went through train.py and wrote a finished run
    for r in res["sweep"][2:]:
        run = os.path.join(out, f"{r['method']}-lr{r['lr']:g}")
        assert json.load(open(os.path.join(run, "config.json")))["finished"]
    rows = {r["method"]: r for r in res["summary"]}
    # SMF changed some memory rows (that SMF leaves the base and all else untouched is tested in test_train.py)
    for m in SMF:
        assert "memory rows" in rows[m]["changed"] and not rows[m]["changed"].startswith("0 of")
    assert rows["retrofit"]["changed"].startswith("0 of")  # stage 1 leaves the base weights bit-identical
    assert rows["full"]["trainable"] == rows["base"]["trainable"]
    assert md.startswith("--quick: a SMOKE TEST") and "not expected to learn" in md


def test_quick_pipeline_runs_each_variant_with_its_recipe(quick_run):
    import forgetting
    out, _ = quick_run
    res = json.load(open(os.path.join(out, "results.json")))
    scale = forgetting.SCALES["quick"]
    runs = {r["method"]: f"{r['method']}-lr{r['lr']:g}" for r in res["sweep"][2:]}
    assert sorted(runs) == sorted(METHODS)
    # the shared base and memory: fp32, clean recipe; the retrofit no longer takes background reads
    for name in ("pretrain", "retrofit"):
        cfg, _, _ = run_files(out, name)
        assert cfg["finished"] and cfg["recipe"]["name"] == "clean", name
    assert json.load(open(os.path.join(out, "retrofit", "config.json")))["memory"]["precision"] == "fp32"
    assert not os.path.exists(os.path.join(out, "retrofit", "background.safetensors"))
    recipes = {"smf-clean": ("clean", "adamw"), "smf-sgd": ("clean", "sgd"), "smf-paper": ("paper", "dense_adamw"),
               "lora": ("clean", None), "full": ("clean", None)}
    for method, (recipe, optimizer) in recipes.items():
        cfg, args, log = run_files(out, runs[method])
        assert cfg["finished"] and cfg["recipe"]["name"] == recipe, method
        assert args["grad_accum"] == scale["ft_accum"] > 1  # the paper's per-micro-batch choices act
        # the paper recipe's warmup runs its first step at lr 0; the clean one starts above 0
        assert (log[0]["lr"] == 0) == (recipe == "paper") and log[1]["lr"] > 0, method
        if method in SMF:  # stage 2 took its background reads from the retrofit's stage-1 data
            assert cfg["recipe"]["optimizer"] == optimizer and args["background_batches"] == scale["background"]
            assert cfg["memory_from"] == os.path.join(out, "retrofit")
            assert os.path.exists(os.path.join(out, runs[method], "background.safetensors"))
    paper, _, _ = run_files(out, runs["smf-paper"])
    assert paper["memory"]["precision"] == "bf16" and paper["recipe"]["select_per_micro_batch"]
    assert paper["recipe"]["count_pad_reads"] and paper["recipe"]["sum_micro_batch_means"]
    clean, _, _ = run_files(out, runs["smf-clean"])
    assert clean["memory"]["precision"] == "fp32" and not clean["recipe"]["select_per_micro_batch"]
    # the clean recipe changes at most top-t rows per layer per step
    _, _, log = run_files(out, runs["smf-clean"])
    assert all(n <= scale["top_t"] for r in log for n in r["rows"].values()) and sum(log[-1]["rows"].values()) > 0


def test_base_model_learned_the_old_world(quick_run):
    out, _ = quick_run
    res = json.load(open(os.path.join(out, "results.json")))
    base = res["sweep"][0]
    assert base["method"] == "base"
    # chance is 0.10 (10 values per attribute): the base must know the old facts, and not the new ones
    assert base["old_acc"] >= 0.6, base
    assert base["new_acc"] <= 0.4, base
