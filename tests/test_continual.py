"""experiments/continual.py: the retention matrix's summaries (final accuracy, backward transfer, intervals) and the
lr rule against hand computations, and the --quick pipeline end to end (matplotlib unimportable: the tables still
print), each chain's links continuing from the previous one as train.py records it."""

import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import continual  # noqa: E402
from helpers import without_matplotlib  # noqa: E402


def test_retention_equals_a_hand_computation():
    R = [[0.1, 0.1, 0.1],   # before any stage
         [0.9, 0.1, 0.1],   # after stage 1: set 1 learned
         [0.7, 0.8, 0.1],   # after stage 2
         [0.5, 0.6, 0.9]]   # after stage 3
    r = continual.retention(R)
    assert r["final"] == pytest.approx((0.5 + 0.6 + 0.9) / 3, abs=1e-15)
    assert r["bwt"] == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2, abs=1e-15)  # -0.3
    assert continual.retention([[0.1], [0.7]]) == {"final": 0.7, "bwt": None}


def test_summary_over_seeds_and_the_lr_rule():
    def chain(seed, method, lr, diag, last):
        R = [[0.1, 0.1], [diag, 0.1], [last, diag]]
        return {"seed": seed, "method": method, "lr": lr, "R": R, "old": [0.9, 0.8, 0.7], "ppl": [2.0, 2.0, 4.0]}
    chains = [chain(0, "lora", 1e-3, 0.6, 0.5), chain(1, "lora", 1e-3, 0.8, 0.3),
              chain(0, "lora", 3e-3, 0.9, 0.4), chain(1, "lora", 3e-3, 0.7, 0.2),
              chain(0, "full", 1e-4, 0.5, 0.5), chain(1, "full", 1e-4, 0.7, 0.5)]
    s = continual.summarize(chains)
    rows = {(r["method"], r["lr"]): r for r in s["per_method"]}
    low = rows[("lora", 1e-3)]
    assert low["n"] == 2 and low["learned"][0] == pytest.approx(0.7, abs=1e-15)  # (0.6 + 0.8) / 2 on both sets
    assert low["bwt"][0] == pytest.approx(((0.5 - 0.6) + (0.3 - 0.8)) / 2, abs=1e-15)
    assert low["final"][0] == pytest.approx(((0.5 + 0.6) / 2 + (0.3 + 0.8) / 2) / 2, abs=1e-15)
    # the 95% t-interval of two values: t(0.975, 1) * std / sqrt(2)
    assert low["R"][1][0][1] == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2), rel=1e-12)
    assert low["ppl"][2][0] == pytest.approx(4.0, rel=1e-12)  # geometric mean
    # the rule: the smallest lr whose mean just-learned accuracy reaches the target, else the best one
    assert continual.choose_lrs(s, target=0.8) == {"lora": 3e-3, "full": 1e-4}  # lora 3e-3 reaches exactly 0.8
    assert continual.choose_lrs(s, target=0.7) == {"lora": 1e-3, "full": 1e-4}


@pytest.fixture(scope="module")
def continual_quick(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("continual"))
    argv = ["--quick", "--out", out, "--jobs", "2", "--memory", "retrofit", "--facts", "siblings"]
    return (out, *without_matplotlib(continual.main, argv))


def test_quick_chains_continue_link_by_link(continual_quick):
    out, res, printed = continual_quick
    k = continual.QUICK["k"]
    assert res["k"] == k and {c["method"] for c in res["chains"]} == set(continual.QUICK["lrs"])
    for c in res["chains"]:
        assert len(c["R"]) == k + 1 and all(len(row) == k for row in c["R"])
        assert all(0 <= a <= 1 for row in c["R"] for a in row) and len(c["old"]) == len(c["ppl"]) == k + 1
        seed_dir = os.path.join(out, f"seed{c['seed']}")
        links = [os.path.join(seed_dir, f"{c['method']}-lr{c['lr']:g}-stage{i + 1}") for i in range(k)]
        configs = [json.load(open(os.path.join(link, "config.json"))) for link in links]
        args = [json.load(open(os.path.join(link, "args.json"))) for link in links]
        for i in range(1, k):  # link i continues link i - 1, as train.py recorded it
            assert configs[i]["lineage"][-1]["run"] == links[i - 1]
            assert configs[i]["task"] == f"text:{os.path.join(seed_dir, 'world', f'set{i}.jsonl')}"
            if c["method"].startswith("smf"):
                assert args[i]["memory_from"] == links[i - 1]
                if c["method"].startswith("smf-lin"):  # Lin et al.: the background read once for the chain
                    assert args[i]["background_from"] == os.path.join(seed_dir, "background")
            elif c["method"] == "lora":
                assert args[i]["lora_from"] == links[i - 1]
            else:
                assert args[i]["model"] == os.path.join(links[i - 1], "hf")
        first = configs[0]["lineage"]
        assert first == ([{"run": os.path.join(seed_dir, "retrofit"), "method": "retrofit", "task": first[0]["task"]}]
                         if c["method"].startswith("smf") else [{"run": os.path.join(seed_dir, "pretrain"),
                                                                  "method": "full", "task": first[0]["task"]}]
                         if c["method"] == "full" else [])
    md = open(os.path.join(out, "results.md")).read()
    for text in (md, printed):
        assert text.startswith("--quick: a SMOKE TEST") and "No figure: matplotlib is not installed" in text
        for title in ("Average final accuracy, backward transfer", "Old-fact accuracy after each stage",
                      "Held-out perplexity after each stage", "Retention matrix of smf-clean"):
            assert title in text


def test_quick_figure(continual_quick, tmp_path):
    pytest.importorskip("matplotlib")
    out, res, _ = continual_quick
    png = tmp_path / "c.png"
    continual.figure(res["summary"], res["k"], str(png), "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
