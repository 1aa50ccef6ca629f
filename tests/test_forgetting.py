"""experiments/forgetting.py end to end at the --quick scale in its default setting (a memory pretrained with the
model, new facts of new attributes; one seed, 20-30 s on 2 CPU cores; tests/test_continual.py runs the
retrofit setting) with matplotlib made unimportable (as in CI: the tables must still print), its summaries against
hand-computed values, the figure where matplotlib is installed, plus the synthetic world's invariants
(experiments/world.py) that make its measurements mean something, and the read overlap against a hand count."""

import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import world  # noqa: E402
from helpers import read_log, without_matplotlib  # noqa: E402

METHODS = ["smf-clean", "smf-paper", "smf-lin-t16", "lora", "full"]  # --quick's rows with a pretrained memory
SMF = ["smf-clean", "smf-paper", "smf-lin-t16"]


def test_world_is_deterministic_and_splits_old_from_new():
    a, b = world.synthetic_world(3, 20, 10), world.synthetic_world(3, 20, 10)
    assert a == b and a != world.synthetic_world(4, 20, 10)
    names_old = {e["name"] for e in a["old"]}
    names_new = {e["name"] for e in a["new"]}
    assert len(names_old) == 20 and len(names_new) == 10 and not names_old & names_new
    pretrain = world.world_pretrain_texts(a, 3, 200)
    assert pretrain == world.world_pretrain_texts(a, 3, 200)
    text = "\n".join(pretrain)
    assert not any(n in text for n in names_new)  # new facts never appear in pretraining
    # held-out prose: every sentence is absent from the pretraining text, yet each template is used there
    for doc in world.world_heldout_texts(a):
        for sent in doc.split(". "):
            assert sent.rstrip(".") + "." not in text
    for i, e in enumerate(a["old"]):
        for attr in world.WORLD_ATTRIBUTES:
            h = world.world_heldout_template(i, attr)
            template = world.WORLD_TEMPLATES[attr][h]
            assert template.format(name=e["name"], v=e[attr]) not in text


def test_new_attributes_world_keeps_the_old_world_and_names_its_words_only_in_a_lexicon():
    siblings, w = world.synthetic_world(3, 20, 10), world.synthetic_world(3, 20, 10, new_attributes=True)
    assert w["old"] == siblings["old"] and [e["name"] for e in w["new"]] == [e["name"] for e in siblings["new"]]
    assert all(world.attributes(e) == list(world.NEW_ATTRIBUTES) for e in w["new"])
    plain, texts = world.world_pretrain_texts(w, 3, 200), world.world_pretrain_texts(w, 3, 200, lexicon=True)
    assert texts[:200] == plain and len(texts) == 210
    for doc in texts[200:]:  # the lexicon: values of the new attributes, no entity
        assert doc.startswith("One ") and not any(e["name"] in doc for e in w["old"] + w["new"])
    items = world.world_fact_items(w["new"])
    assert items[0][0] == f"Q: What is the instrument of {w['new'][0]['name']}? A:"
    assert items[0][1][items[0][2]] == " " + w["new"][0]["instrument"] and len(items[0][1]) == 10
    cloze = world.world_fact_items(w["old"][:1], cloze=True)  # the old facts as prose: "Zorbin lives in"
    assert [q for q, _, _ in cloze] == [world.WORLD_CLOZE[a].format(name=w["old"][0]["name"])
                                         for a in world.WORLD_ATTRIBUTES]
    assert cloze[0][0] == f"{w['old'][0]['name']} lives in"


def test_read_overlap_counts_answer_position_reads_against_a_hand_count():
    """A stand-in model whose one memory reads, at a question's last position, slots fixed per question: the share of
    the new questions' reads (with multiplicity) among the slots the old questions read there."""
    table = {1: [1, 2], 2: [2, 3], 3: [3, 4], 4: [5, 1]}  # question -> slots read at its last position

    class Model(torch.nn.Module):  # what read_overlap uses: model.model.layers[i].memory.last_indices, lm_head
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(1, 1)
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
            self.model.layers[0].memory = None
            self.model.layers[1].memory = torch.nn.Module()

        def forward(self, idx):  # (1, T=2): position 0 reads slot 9, never counted
            self.model.layers[1].memory.last_indices = torch.tensor([[[9, 9], table[idx[0, -1].item()]]])

    class Tok:
        def encode(self, q):
            return [0, int(q)]
    got = world.read_overlap(Model(), Tok(), [("3", [], 0), ("4", [], 0)], [("1", [], 0), ("2", [], 0)])
    assert got == {1: 2 / 4}  # new reads 3, 4, 5, 1 against old {1, 2, 3}: two of four


def test_fact_items_have_the_true_value_among_candidates():
    w = world.synthetic_world(0, 5, 5)
    items = world.world_fact_items(w["new"])
    assert len(items) == 5 * len(world.WORLD_ATTRIBUTES)
    for (q, cands, target), (e, attr) in zip(items, [(e, a) for e in w["new"] for a in world.WORLD_ATTRIBUTES]):
        assert q == f"Q: What is the {attr} of {e['name']}? A:" and cands[target] == " " + e[attr]
        assert q + cands[target] in world.world_qa_texts(w["new"])


# -----------------------------------------------------------------------------
# The summaries (the rule in forgetting.py's docstring) on hand-made numbers


def test_t_quantiles_against_the_student_t_distribution():
    import forgetting
    for df, t in enumerate(forgetting.T975, start=1):  # P(|T| <= t) = 0.95, integrated numerically
        x = torch.linspace(-t, t, 400001, dtype=torch.float64)
        p = torch.trapezoid(torch.distributions.StudentT(float(df)).log_prob(x).exp(), x).item()
        assert abs(p - 0.95) < 2e-4, (df, t, p)


def test_interval_is_the_t_interval():
    import forgetting
    xs = [0.5, 0.7, 0.6, 0.9, 0.8]
    mean, half, n = forgetting.interval(xs)
    std = torch.tensor(xs, dtype=torch.float64).std().item()  # n - 1
    assert n == 5 and math.isclose(mean, 0.7) and math.isclose(half, 2.776 * std / math.sqrt(5))
    assert forgetting.interval([0.3]) == (0.3, None, 1) and forgetting.interval([]) == (None, None, 0)


def test_first_crossing_interpolates_at_the_lowest_lr_that_gets_there():
    import forgetting
    curve = [(0.1, 0.9, 0.0), (0.3, 0.8, 1.0), (0.7, 0.4, 2.0), (0.5, 0.1, 5.0), (0.95, 0.0, 9.0)]
    assert forgetting.first_crossing(curve, 0.5) == pytest.approx((0.6, 1.5))  # halfway from 0.3 to 0.7
    assert forgetting.first_crossing(curve, 0.7) == pytest.approx((0.4, 2.0))  # a point exactly on the level
    # 0.9: the curve falls back below 0.7 (a blown-up run) and first reaches 0.9 between 0.5 and 0.95
    assert forgetting.first_crossing(curve, 0.9) == pytest.approx((0.1 - 0.1 * 0.4 / 0.45, 5 + 4 * 0.4 / 0.45))
    assert forgetting.first_crossing(curve, 0.99) is None
    assert forgetting.first_crossing([(0.6, 0.5, 0.0)], 0.5) == (0.5, 0.0)


def fake_rows(seeds, shift):
    """Base and retrofit at new 0.1 / old 0.9 / ppl e; smf-clean reaches new 0.9 at lr 2 with old 0.5 + shift[s];
    full reaches it at lr 2 with old 0.3, except in seed 2 where it stops at 0.8. Cloze accuracy is 1 - new."""
    rows = []
    for s in seeds:
        for m in ("base", "retrofit"):
            rows.append({"seed": s, "method": m, "lr": 0.0, "new_acc": 0.1, "old_acc": 0.9, "cloze_acc": 0.9,
                         "heldout_ppl": math.e})
        for lr, new, old in ((1.0, 0.5, 0.7 + shift[s]), (2.0, 0.9, 0.5 + shift[s])):
            rows.append({"seed": s, "method": "smf-clean", "lr": lr, "new_acc": new, "old_acc": old,
                         "cloze_acc": 1 - new, "heldout_ppl": math.e ** 2})
        for lr, new, old in ((1.0, 0.5, 0.5), (2.0, 0.9 if s != 2 else 0.8, 0.3)):
            rows.append({"seed": s, "method": "full", "lr": lr, "new_acc": new, "old_acc": old,
                         "cloze_acc": 1 - new, "heldout_ppl": math.e ** 3})
    return rows


def test_summarize_matches_hand_computed_values():
    import forgetting
    seeds, shift = [0, 1, 2, 3], {0: 0.0, 1: 0.02, 2: -0.02, 3: 0.04}
    s = forgetting.summarize(fake_rows(seeds, shift), [0.7, 0.9])
    matched = {(r["method"], r["level"]): r for r in s["matched"]}
    # new 0.7 lies halfway between lr 1 (new 0.5) and lr 2 (new 0.9): old halfway, log ppl from 2 to 2 (smf)
    m = matched[("smf-clean", 0.7)]
    assert m["old_acc"][0] == pytest.approx(0.6 + sum(shift.values()) / 4) and m["old_acc"][2] == 4
    assert m["heldout_ppl"][0] == pytest.approx(math.e ** 2) and m["seeds"] == 4
    assert m["cloze_acc"][:2] == pytest.approx((0.3, 0.0))  # 1 - new, interpolated at new 0.7
    # full at 0.7: 0.4 in seeds 0, 1, 3; in seed 2 two thirds of the way from (0.5, 0.5) to (0.8, 0.3)
    assert matched[("full", 0.7)]["old_acc"][0] == pytest.approx((3 * 0.4 + 0.5 - 0.2 * 2 / 3) / 4)
    f9 = matched[("full", 0.9)]
    assert f9["old_acc"][0] == pytest.approx(0.3) and f9["old_acc"][2] == 3  # seed 2 never reaches 0.9
    diff = {(d["a"], d["b"], d["level"]): d for d in s["differ"] if d["measure"] == "old_acc"}
    cloze = [d for d in s["differ"] if d["measure"] == "cloze_acc" and d["level"] == 0.9]
    assert [(d["n"], d["diff"]) for d in cloze] == [(3, pytest.approx(0.0))]  # both at new 0.9: cloze 0.1 each
    d = diff[("smf-clean", "full", 0.9)]  # paired over seeds 0, 1, 3: 0.2 + shift
    ref = forgetting.interval([0.2 + shift[k] for k in (0, 1, 3)])
    assert (d["n"], d["diff"], d["half"]) == (3, pytest.approx(ref[0]), pytest.approx(ref[1])) and d["exceeds"]
    per_lr = {(r["method"], r["lr"]): r for r in s["per_lr"]}
    assert per_lr[("full", 2.0)]["new_acc"][0] == pytest.approx((0.9 * 3 + 0.8) / 4)
    assert per_lr[("full", 2.0)]["heldout_ppl"][:2] == pytest.approx((math.e ** 3, math.e ** 3))
    assert per_lr[("base", 0.0)]["n"] == 4


def test_differences_within_the_spread_are_not_called():
    import forgetting
    seeds, shift = [0, 1, 3], {0: -0.3, 1: 0.3, 3: -0.25}  # smf-clean - full at 0.9: -0.1, 0.5, -0.05
    s = forgetting.summarize(fake_rows(seeds, shift), [0.9])
    d = [d for d in s["differ"] if (d["a"], d["b"], d["measure"]) == ("smf-clean", "full", "old_acc")][0]
    assert d["n"] == 3 and not d["exceeds"]
    s = forgetting.summarize(fake_rows([0, 1], {0: 0.0, 1: 0.0}), [0.9])  # identical differences, 2 seeds: too few
    assert not [d for d in s["differ"] if (d["a"], d["b"]) == ("smf-clean", "full")][0]["exceeds"]


# -----------------------------------------------------------------------------
# End to end, --quick


@pytest.fixture(scope="module")
def forgetting_quick(tmp_path_factory):
    """forgetting.main at the --quick scale with matplotlib unimportable (as where it is not installed)."""
    import forgetting
    out = str(tmp_path_factory.mktemp("forgetting"))
    return (out, *without_matplotlib(forgetting.main, ["--world", "syllables", "--quick", "--out", out, "--jobs", "2"]))


def run_files(out, seed, name):
    """(config.json, args.json, log.jsonl records) of the run out/seed<seed>/name."""
    run = os.path.join(out, f"seed{seed}", name)
    log = read_log(run)
    return json.load(open(os.path.join(run, "config.json"))), json.load(open(os.path.join(run, "args.json"))), log


def test_quick_pipeline_writes_every_method_and_summary_without_matplotlib(forgetting_quick):
    import forgetting
    out, returned, printed = forgetting_quick
    res = json.load(open(os.path.join(out, "results.json")))
    md = open(os.path.join(out, "results.md")).read()
    seeds, levels = forgetting.SCALES["quick"]["seeds"], res["levels"]
    assert res["seeds"] == seeds == returned["seeds"] and levels == [0.3, 0.5, 0.7]
    # every run of every seed went through train.py and was measured; the memory model also without its memory
    runs = {(r["seed"], r["method"]) for r in res["runs"]}
    starts = ["base", "no-memory"]
    assert runs == {(s, m) for s in seeds for m in [*starts, *METHODS]}
    for r in res["runs"]:
        assert 0 <= r["new_acc"] <= 1 and 0 <= r["old_acc"] <= 1 and 0 <= r["cloze_acc"] <= 1
        assert r["heldout_ppl"] > 1 and (r["trainable"] > 0) == (r["method"] != "no-memory")
        if r["method"] in METHODS:
            run = os.path.join(out, f"seed{r['seed']}", f"{r['method']}-lr{r['lr']:g}")
            assert json.load(open(os.path.join(run, "config.json")))["finished"]
        assert f"| {r['seed']} | {r['method']} |" in md
    # the summaries: a point per method and lr over every seed, a matched row per method and level, a paired
    # difference per pair of methods and level
    s = res["summary"]
    assert {(r["method"], r["n"]) for r in s["per_lr"]} == {(m, len(seeds)) for m in [*starts, *METHODS]}
    for r in s["per_lr"]:
        rs = [x for x in res["runs"] if x["method"] == r["method"]]
        assert r["new_acc"][0] == pytest.approx(sum(x["new_acc"] for x in rs) / len(rs))
        assert r["n"] > 1 or r["old_acc"][1] is None  # one seed: a mean, no interval (hand-checked above)
    assert sorted((r["method"], r["level"]) for r in s["matched"]) == sorted((m, x) for m in METHODS for x in levels)
    assert len(s["differ"]) == 2 * len(levels) * len(METHODS) * (len(METHODS) - 1) // 2  # old facts and cloze
    for d in s["differ"]:
        assert d["n"] <= len(seeds) and isinstance(d["exceeds"], bool)
    rows = {r["method"]: r for r in res["runs"] if r["seed"] == seeds[0]}
    # SMF changed some memory rows (that SMF leaves the base and all else untouched is tested in test_train.py)
    for m in SMF:
        assert "memory rows" in rows[m]["changed"] and not rows[m]["changed"].startswith("0 of")
    assert rows["full"]["trainable"] == rows["base"]["trainable"]  # every weight, the memory's too
    assert rows["lora"]["trainable"] < rows["base"]["trainable"] // 4  # the adapters alone (its file holds the memory)
    # it says it is a smoke test; without matplotlib it says so and still prints every table
    for text in (md, printed):
        assert text.startswith("--quick: a SMOKE TEST") and "not expected to learn" in text
        assert "No figure: matplotlib is not installed" in text
        for title in ("Old-fact accuracy at matched", "Old facts asked as prose", "Held-out perplexity at matched",
                      "Paired differences", "Every point of the figure"):
            assert title in text
        for m in METHODS:  # each row's recipe (optimizer, ranking) and the read overlap of every seed
            assert f"| {m} | {forgetting.RECIPES[m].format(**res['scale'])} |" in text
        for seed in seeds:
            share = res["overlap"][str(seed)]["1"]
            assert 0 <= share <= 1 and f"| {seed} | layer 1: {share:.3f} |" in text
    assert "SGD, TF-IDF ranking" in forgetting.RECIPES["smf-lin-t16"]
    assert res["figure"] is None and not os.path.exists(os.path.join(out, "forgetting.png"))
    assert res["wall_seconds"] > 0 and res["cpu_seconds"] > 0


def test_figure_is_written_where_matplotlib_is_installed(forgetting_quick, tmp_path):
    pytest.importorskip("matplotlib")
    import forgetting
    out, _, _ = forgetting_quick
    res = json.load(open(os.path.join(out, "results.json")))
    path = str(tmp_path / "f.png")
    forgetting.figure(res, path, "test")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10000


def test_no_runtime_file_imports_matplotlib():
    for name in ("model.py", "memory.py", "data.py", "eval.py", "train.py", "checkpoint.py"):
        path = os.path.join(ROOT, name)
        if os.path.exists(path):
            assert "matplotlib" not in open(path).read(), name
    import forgetting
    src = open(forgetting.__file__).read()
    assert src.count("import matplotlib") == src.count("    import matplotlib")  # only inside a function


def test_quick_pipeline_runs_each_variant_with_its_recipe(forgetting_quick):
    import forgetting
    out, res, _ = forgetting_quick
    scale = forgetting.SCALES["quick"]
    for seed in res["seeds"]:
        runs = {r["method"]: f"{r['method']}-lr{r['lr']:g}" for r in res["runs"]
                if r["seed"] == seed and r["method"] in METHODS}
        assert sorted(runs) == sorted(METHODS)
        # the memory model: pretrained from scratch with one replacement memory, fp32, clean recipe
        cfg, args, _ = run_files(out, seed, "pretrain")
        pretrain = os.path.join(out, f"seed{seed}", "pretrain")
        assert cfg["finished"] and cfg["recipe"]["name"] == "clean" and args["seed"] == seed
        assert cfg["memory"]["mode"] == "replacement" and cfg["memory"]["layers"] == [scale["pre_layer"]]
        assert cfg["memory"]["alpha_init"] is None and cfg["memory"]["precision"] == "fp32"
        assert not os.path.exists(os.path.join(out, f"seed{seed}", "retrofit"))
        background = os.path.join(out, f"seed{seed}", "background")
        _, bg_args, _ = run_files(out, seed, "background")  # Lin et al.'s background, read once per seed
        assert bg_args["background_batches"] == scale["lin_background"] and bg_args["lr"] == 0
        recipes = {"smf-clean": ("clean", "adamw", "kl"), "smf-paper": ("paper", "dense_adamw", "kl"),
                   "smf-lin-t16": ("clean", "sgd", "tfidf"), "lora": ("clean", None, None),
                   "full": ("clean", None, None)}
        for method, (recipe, optimizer, rank) in recipes.items():
            cfg, args, log = run_files(out, seed, runs[method])
            assert cfg["finished"] and cfg["recipe"]["name"] == recipe and args["seed"] == seed, method
            assert args["micro_batch"] == scale["ft_batch"] < args["batch_size"]  # the paper's per-micro-batch choices act
            # the paper recipe's warmup runs its first step at lr 0; the clean one starts above 0
            assert (log[0]["lr"] == 0) == (recipe == "paper") and log[1]["lr"] > 0, method
            assert args["memory_from"] == pretrain and args["model"] == os.path.join(pretrain, "hf")  # every method
            if method in SMF:
                assert cfg["recipe"]["optimizer"] == optimizer and args["rank"] == rank
                if method == "smf-lin-t16":
                    assert args["background_from"] == background and args["top_t"] == 16
                else:
                    assert args["background_batches"] == scale["background"] and args["background_from"] is None
        paper, _, _ = run_files(out, seed, runs["smf-paper"])
        assert paper["memory"]["precision"] == "bf16" and paper["recipe"]["select_per_micro_batch"]
        assert paper["recipe"]["count_pad_reads"] and paper["recipe"]["sum_micro_batch_means"]
        clean, _, log = run_files(out, seed, runs["smf-clean"])
        assert clean["memory"]["precision"] == "fp32" and not clean["recipe"]["select_per_micro_batch"]
        # the clean recipe changes at most top-t rows per layer per step
        assert all(n <= scale["top_t"] for r in log for n in r["rows"].values()) and sum(log[-1]["rows"].values()) > 0


def test_a_full_run_publishes_its_tables_and_figure_where_the_readme_links(tmp_path, monkeypatch, capsys):
    """write_results: results.md in --out names the figure where it lies; a published run (a full run) also writes
    experiments/results/<name>.md headed by its command, with the figure copied to experiments/<name>.png and linked
    relatively (no path of the machine that ran it)."""
    import forgetting
    root = tmp_path / "repo"
    (root / "experiments" / "results").mkdir(parents=True)
    monkeypatch.setattr(forgetting, "ROOT", str(root))
    out = tmp_path / "out"
    out.mkdir()
    fig = out / "f.png"
    command = "python experiments/forgetting.py --memory retrofit --facts siblings"
    forgetting.write_results(str(out), {}, "| table |\n", lambda: fig.write_bytes(b"\x89PNG..."), str(fig),
                             "\nEvery run\n", publish="forgetting-retrofit-siblings", command=command)
    published = (root / "experiments" / "results" / "forgetting-retrofit-siblings.md").read_text()
    assert published.startswith(f"# `{command}`: every table of the final run")
    assert "| table |\n\nFigure: [`../forgetting-retrofit-siblings.png`](../forgetting-retrofit-siblings.png)\n" \
           "\nEvery run\n" in published and str(tmp_path) not in published
    assert (root / "experiments" / "forgetting-retrofit-siblings.png").read_bytes() == b"\x89PNG..."
    assert (out / "results.md").read_text() == f"| table |\n\nFigure: {fig}\n\nEvery run\n"
    forgetting.write_results(str(out), {}, "| t |\n", lambda: None, str(fig))  # not published: nothing there
    assert sorted(os.listdir(root / "experiments" / "results")) == ["forgetting-retrofit-siblings.md"]


def test_a_run_finished_after_its_script_died_is_not_run_again(tmp_path):
    """forgetting.train skips a finished run; one that finished without its timing file (its script killed between
    the two) counts the training loop's wall time from config.json instead of failing or training again."""
    import forgetting
    run = tmp_path / "smf-clean-lr1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"finished": True, "cost": {"wall_seconds": 3.5}}))
    assert forgetting.train(str(tmp_path), "smf-clean-lr1", ["--no-such-flag"]) == 3.5  # train.py never started
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "smf-clean-lr1.time").write_text(json.dumps({"seconds": 7.0}))
    assert forgetting.train(str(tmp_path), "smf-clean-lr1", ["--no-such-flag"]) == 7.0


def test_each_row_trains_with_its_own_recipe():
    """The train.py command of every row, read by train.py's own parser: its recipe, optimizer, ranking and top-t
    (the top-t 64 row is not the top-t 16 one; Lin et al.'s rows take the seed's one background, the others read
    their own; the background run's own count is pinned by the quick pipeline's test)."""
    import forgetting
    import train
    scale = forgetting.SCALES["full"]
    want = {"smf-clean": ("clean", None, "kl", scale["top_t"]), "smf-sgd": ("clean", "sgd", "kl", scale["top_t"]),
            "smf-paper": ("paper", None, "kl", scale["top_t"]), "smf-lin-t16": ("clean", "sgd", "tfidf", 16),
            "smf-lin-t32": ("clean", "sgd", "tfidf", 32), "smf-lin-t64": ("clean", "sgd", "tfidf", 64),
            "lora": ("clean", None, None, None),
            "full": ("clean", None, None, None)}
    assert sorted(want) == sorted(forgetting.METHODS)
    for method in forgetting.METHODS:  # every row of the full run, not only --quick's
        argv = [str(a) for a in forgetting.finetune_flags(method, 0.1, scale, "t.jsonl", "base", "mem", "bg")]
        a = train.parser().parse_args(argv)
        recipe, optimizer, rank, top_t = want[method]
        assert a.recipe == recipe and a.optimizer == optimizer, method
        if rank is not None:
            assert (a.rank, a.top_t) == (rank, top_t), method
            lin = method.startswith("smf-lin")
            assert (a.background_from == "bg") == lin and (a.background_batches == scale["background"]) != lin


def test_a_curve_that_starts_at_a_level_reaches_it_at_its_start_and_smf_starts_at_its_retrofit():
    import forgetting
    assert forgetting.first_crossing([(0.6, 0.5, 0.0), (0.9, 0.1, 1.0)], 0.5) == (0.5, 0.0)  # not interpolated
    rows = fake_rows([0], {0: 0.0})
    rows = [{**r, "new_acc": 0.2, "old_acc": 0.8} if r["method"] == "retrofit" else r for r in rows]
    c = forgetting.curves(rows)
    assert c["smf-clean"][0][0][:2] == (0.2, 0.8)  # SMF from the retrofit it continues
    assert c["full"][0][0][:2] == (0.1, 0.9)  # the others from the base


def test_a_job_dies_with_its_script(tiny_model_dir, files, tmp_path):
    """forgetting.train's train.py job, its script killed with kill -9 mid-run: the job ends too (PR_SET_PDEATHSIG),
    its run's lock freed, nothing left training."""
    import fcntl
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "out"
    code = ("import sys; sys.path.insert(0, 'experiments'); import forgetting; "
            f"forgetting.train({str(out)!r}, 'job', ['--method', 'lora', '--model', {tiny_model_dir!r}, '--data', "
            f"'medmcqa={files['medmcqa']}', '--recipe', 'clean', '--max-steps', '100000', '--batch-size', '2', "
            "'--max-len', '64'])")
    script = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    log = out / "job" / "log.jsonl"
    deadline = time.time() + 300  # a loaded machine starts it slowly
    while not (log.exists() and log.read_text().count("\n") >= 2):  # the job is training
        assert script.poll() is None and time.time() < deadline, "the job did not start"
        time.sleep(0.05)
    script.send_signal(signal.SIGKILL)
    script.wait()
    deadline = time.time() + 30
    while True:
        with open(out / "job" / ".lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                assert time.time() < deadline, "train.py outlived its killed script"
                time.sleep(0.05)


# -----------------------------------------------------------------------------
# --world words: every word one token, new attributes of known entities, a held-out question template


def test_words_world_asks_facts_of_named_entities_in_a_held_out_template():
    w = world.synthetic_world(5, 12, 4, grid=True)  # a 4 x 4 grid: 16 entities, 4 values per attribute
    ents = w["old"] + w["new"]
    names = [tuple(e["name"].split(" ")) for e in ents]
    first, last = sorted({n[0] for n in names}), sorted({n[1] for n in names})
    assert sorted(names) == [(f, la) for f in first for la in last]  # every pair of 4 first and 4 last names
    for a, values in world.WORLD_ATTRIBUTES.items():  # a Latin square: no name word alone tells a fact
        for part, words in ((0, first), (1, last)):
            for word in words:
                assert sorted(e[a] for e, n in zip(ents, names) if n[part] == word) == sorted(values[:4])
    assert all(world.attributes(e) == list(world.WORLD_ATTRIBUTES) for e in w["new"])  # attributes it can read out
    with pytest.raises(ValueError, match="P\\^2 entities"):
        world.synthetic_world(0, 12, 5, grid=True)
    docs = world.world_pretrain_texts(w, 5, 120, questions=len(world.QUESTION_TEMPLATES), roster=True, qa_apart=True)
    pretrain = "\n".join(docs)
    for e in w["new"]:  # the name is known, from rosters alone: none of its facts is in the text
        assert f" {e['name']}" in pretrain
        assert all(d.startswith("Among the members are ") for d in docs if e["name"] in d)
    for t in range(len(world.QUESTION_TEMPLATES)):  # every template is a known question format (old facts)
        assert any(world.world_qa(e, a, t)[0] in pretrain for e in w["old"] for a in world.WORLD_ATTRIBUTES)
    for doc in docs:  # qa_apart: no question shares a document with the prose it could copy its answer from
        assert all(line.startswith("Q: ") for line in doc.split("\n")) or "Q: " not in doc
    lines = world.world_fact_paraphrases(w["new"])
    k = len(world.QUESTION_TEMPLATES) - 1  # one fact's lines, consecutive: every template but the held-out one
    assert lines == ["".join(world.world_qa(e, a, t)) for e in w["new"] for a in world.WORLD_ATTRIBUTES
                     for t in range(k)]
    held = [q for q, _, _ in world.world_fact_items(w["new"], template=world.HELDOUT_QUESTION)]
    assert not any(q in "\n".join(lines) for q in held)  # learning is asked in a template no finetune trains
    values = [v for vs in world.VALUES.values() for v in vs]
    assert len(values) == len(set(values))  # no value is another attribute's: a one-token answer is the whole one


def test_latin_square_and_general_text():
    square = world.latin_square(10, torch.Generator().manual_seed(0))
    assert all(sorted(row) == list(range(10)) for row in square)
    assert all(sorted(col) == list(range(10)) for col in zip(*square))
    general = world.world_general_texts(3, 84)  # enough documents for every word of the lexicon
    words = {w.strip(".") for d in general for w in d.split(" ")}
    assert len(words) == 1000 + 2  # the lexicon, "The" and "a"
    assert general == world.world_general_texts(3, 84) and general != world.world_general_texts(4, 84)


def test_fact_blind_accuracy_is_the_most_common_value_of_each_attribute():
    facts = [{"name": "A", "food": "rice", "tree": "oak"}, {"name": "B", "food": "rice", "tree": "elm"},
             {"name": "C", "food": "soup", "tree": "yew"}, {"name": "D", "food": "rice", "tree": "elm"}]
    assert world.fact_blind_accuracy(facts) == (3 + 2) / 8


def test_name_vote_accuracy_counts_what_each_name_word_says():
    facts = [{"name": "A X", "pet": "cat"}, {"name": "A Y", "pet": "dog"}, {"name": "B X", "pet": "cat"},
             {"name": "B Y", "pet": "cat"}]
    # A X: A's cat, dog + X's cat, cat -> cat 3, dog 1: right. A Y: A's cat, dog + Y's dog, cat -> a tie: 1/2.
    # B X: B's cat, cat + X's cat, cat -> right. B Y: B's cat, cat + Y's dog, cat -> cat 3, dog 1: right
    assert world.name_vote_accuracy(facts) == (1 + 0.5 + 1 + 1) / 4
    grid = world.synthetic_world(0, 48, 16, grid=True)
    assert world.name_vote_accuracy(grid["old"] + grid["new"]) == 1 / 8  # every value ties in a full Latin grid


def test_words_world_makes_every_word_one_token(tmp_path):
    import forgetting
    from data import train_bpe_tokenizer
    w = world.synthetic_world(0, 12, 4, grid=True)
    texts = world.world_pretrain_texts(w, 0, 150, questions=5, roster=True, qa_apart=True) + \
        world.world_fact_paraphrases(w["new"]) + world.world_general_texts(0, 20, 60)
    train_bpe_tokenizer(texts, str(tmp_path / "words"), 4096)
    forgetting.check_one_token_per_word(str(tmp_path / "words" / "tokenizer.json"), texts)  # passes
    train_bpe_tokenizer(texts, str(tmp_path / "small"), 300)
    with pytest.raises(RuntimeError, match="are several tokens"):
        forgetting.check_one_token_per_word(str(tmp_path / "small" / "tokenizer.json"), texts)


def test_key_usage_and_reads_on_rows_equal_a_hand_count(tiny_model_dir, tmp_path):
    from data import Tokenizer, train_bpe_tokenizer
    from memory import MemoryConfig, add_memory, memory_layers
    from model import Qwen2
    model = Qwen2.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    add_memory(model, MemoryConfig(n_keys=8, heads=2, topk=2, k_dim=16, layers=[1, 2]))
    ents = [{"name": "Zorbin", "food": "rice"}, {"name": "Kamel", "food": "soup"}]
    # a words-world tokenizer (every word one token) small enough for the tiny model's embedding
    corpus = ["".join(world.world_qa(e, "food")) for e in ents] * 3
    assert train_bpe_tokenizer(corpus, str(tmp_path / "tok"), 340) <= model.config.vocab_size
    tok = Tokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok.encode(" Zorbin")) == 1
    texts = ["Zorbin lives in Lima.", "Kamel eats rice."]
    reads = {i: [] for i in memory_layers(model)}
    for t in texts:
        model(torch.tensor([tok.encode(t)]))
        for i, m in memory_layers(model).items():
            reads[i] += m.last_indices.flatten().tolist()
    assert world.key_usage(model, tok, texts) == {i: len(set(r)) / 64 for i, r in reads.items()}
    everything = {i: list(range(64)) for i in reads}
    assert world.reads_on_rows(model, tok, ents, everything) == {"all": 1.0, "name": 1.0}
    assert world.reads_on_rows(model, tok, ents, {}) == {"all": 0.0, "name": 0.0}
    rows = {1: [3, 5, 7]}
    hit = total = hit_name = total_name = 0
    for e in ents:
        ids = tok.encode(world.world_qa(e, "food")[0])
        name = tok.encode(" " + e["name"])
        model(torch.tensor([ids]))
        for i, m in memory_layers(model).items():
            for t, slots in enumerate(m.last_indices[0].tolist()):
                on = sum(s in rows.get(i, []) for s in slots)
                hit, total = hit + on, total + len(slots)
                if [ids[t]] == name:
                    hit_name, total_name = hit_name + on, total_name + len(slots)
    got = world.reads_on_rows(model, tok, ents, rows)
    assert got["all"] == hit / total
    assert total_name and got["name"] == hit_name / total_name


def test_sweep_check_flags_a_sweep_whose_best_is_its_top_lr():
    import forgetting
    pt = lambda m, lr, acc: {"method": m, "lr": lr, "new_acc": (acc, None)}  # noqa: E731
    per_lr = [pt("lora", 1e-3, 0.2), pt("lora", 3e-3, 0.6), pt("lora", 1e-2, 0.5),
              pt("full", 1e-4, 0.2), pt("full", 3e-4, 0.4), pt("full", 1e-3, 0.7)]
    text = forgetting.sweep_check(per_lr)
    assert "- full: its best mean new-fact accuracy (0.700) is at its top lr 0.001" in text and "lora" not in text
    assert "below its top lr" in forgetting.sweep_check(per_lr[:3])
    assert "no sweep has 2 lrs" in forgetting.sweep_check(per_lr[:1])


def test_words_world_refuses_another_memory_or_facts(capsys):
    import forgetting
    with pytest.raises(SystemExit) as e:
        forgetting.parse_args(["--world", "words", "--memory", "retrofit"])
    assert e.value.code == 2 and "--world words goes with --facts roster" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        forgetting.parse_args(["--world", "syllables", "--facts", "roster"])
    words = forgetting.parse_args(["--world", "words"])
    assert (words.levels, words.facts) == ([0.3, 0.4, 0.5], "roster")


def test_words_quick_runs_lin_et_al_batches_and_measures_reads(tmp_path):
    """--world words --quick, Lin et al.'s rows alone: each finetune step is one fact's 4 paraphrases (separate
    sequences), the memory is pretrained with its values at 10 times the lr and read with its query normalised, and
    the run's measures are written."""
    import forgetting
    out = str(tmp_path / "words")
    res, _ = without_matplotlib(forgetting.main, ["--world", "words", "--quick", "--out", out, "--methods",
                                                  "smf-lin-t32"])
    base = next(r for r in res["runs"] if r["method"] == "base")
    assert 0 < base["key_usage"][1] <= 1 and 0 < base["blind"] < 1
    run = next(r for r in res["runs"] if r["method"] == "smf-lin-t32")
    assert 0 <= run["old_reads_changed"] <= 1 and "new_seen_acc" in run
    cfg, args, log = run_files(out, 0, "smf-lin-t32-lr10")
    assert (args["batch_size"], args["group_size"], args["rank"], args["top_t"]) == (4, 4, "tfidf", 32)
    assert cfg["memory"]["query_norm"] == "layer" and cfg["memory"]["n_keys"] == 16
    assert json.load(open(os.path.join(out, "seed0", "pretrain", "args.json")))["values_lr_scale"] == 10
    lines = [json.loads(line)["text"] for line in open(os.path.join(out, "seed0", "world", "new_facts.jsonl"))]
    assert len(log) == len(lines) // 4 * forgetting.WORDS["quick"]["ft_epochs"]  # one fact per step
