"""eval.py: each probe against a plain unbatched computation, the alias normalizer, run-directory loading,
--log-samples and the command line (no network: tiny models and tiny data files in the Hub schemas)."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import data
import eval as ev
import memory
from conftest import ROOT
from tiny_data import write_jsonl
from data import Tokenizer
from checkpoint import save_pretrained
from model import LORA_TARGETS, Qwen2, Qwen2Config, add_lora, looks_like_hub_id, lora_state_dict, resolve_model_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MEDMCQA = [
    {"question": "Which vitamin prevents scurvy?", "opa": "Vitamin A", "opb": "Vitamin B12", "opc": "Vitamin C",
     "opd": "Vitamin D", "cop": 2},
    {"question": "The heart has how many chambers?", "opa": "2", "opb": "3", "opc": "4", "opd": "5", "cop": 2},
    {"question": "Perplexity is the exponential of what?", "opa": "the mean negative log-likelihood per token",
     "opb": "accuracy", "opc": "the number of memory layers in a sparse finetuned model", "opd": "1", "cop": 0},
    {"question": "Which organ pumps blood?", "opa": "Liver", "opb": "Heart", "opc": "Lung", "opd": "Skin",
     "cop": 1},
    {"question": "Quick brown fox?", "opa": "jumps", "opb": "lazy dog", "opc": "fox", "opd": "brown", "cop": 3},
]
TRIVIA = [
    {"question": "What is the capital of France?", "answer": {"value": "Paris", "aliases": ["Paris"]}},
    {"question": "What does the fox jump over?", "answer": {"value": "the lazy dog", "aliases": ["Lazy dog"]}},
    {"question": "Which vitamin prevents scurvy?", "answer": {"value": "C", "aliases": ["Vitamin C"]}},
    {"question": "What is perplexity?", "answer": {"value": "exp", "aliases": ["exponential"]}},
    {"question": "Who made Qwen?", "answer": {"value": "Alibaba", "aliases": ["Alibaba Cloud"]}},
]
WIKI_TEXT = ("The quick brown fox jumps over the lazy dog . Memory layers store facts in rows ; sparse finetuning "
             "updates only a few of them . Perplexity is the exponential of the mean negative log-likelihood per "
             "token .")



@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok, info = ev.load_model(tiny_model_dir)
    return model, tok


@pytest.fixture(scope="module")
def rp_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint with a generation_config.json asking for repetition_penalty 1.5."""
    d = str(tmp_path_factory.mktemp("tiny_rp"))
    for f in os.listdir(tiny_model_dir):
        shutil.copy(os.path.join(tiny_model_dir, f), d)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"repetition_penalty": 1.5, "do_sample": True, "temperature": 0.7}, f)
    return d


# --- MedMCQA ------------------------------------------------------------------------------------------


def reference_score(model, tok, context, continuation):
    """One continuation alone: a plain forward of context + continuation, mean log p of the tokens after the
    context's own token count."""
    n_ctx = len(tok.encode(context))
    full = tok.encode(context + continuation)
    with torch.no_grad():
        logp = model(torch.tensor([full]))[0].log_softmax(-1)  # (T, vocab)
    return sum(logp[t - 1, full[t]].item() for t in range(n_ctx, len(full))) / (len(full) - n_ctx)


def test_medmcqa_scores_match_unbatched_scoring(tiny):
    model, tok = tiny
    samples = []
    result = ev.eval_medmcqa(model, tok, MEDMCQA, batch_size=2, samples=samples)  # 8 padded sequences a batch
    assert result["n"] == len(MEDMCQA) and len(samples) == len(MEDMCQA)
    n_correct = 0
    for row, s in zip(MEDMCQA, samples):
        context, continuations, target = data.medmcqa_eval_item(row)
        want = [reference_score(model, tok, context, x) for x in continuations]
        assert s["scores"] == pytest.approx(want, abs=1e-4)
        assert s["prediction"] == max(range(4), key=lambda j: want[j]) and s["target"] == target
        assert s["prompt"] == context and s["choices"] == continuations and s["correct"] == (s["prediction"] == target)
        n_correct += s["prediction"] == target
    assert result["acc"] == n_correct / len(MEDMCQA)


# --- WikiText -----------------------------------------------------------------------------------------


def test_windows_score_every_token_with_context_exactly_once():
    for n, L, stride in [(1, 8, 4), (7, 8, 4), (8, 8, 4), (9, 8, 4), (100, 8, 4), (100, 1024, 512), (2049, 1024, 512),
                         (50, 10, 10), (50, 10, 3)]:
        scored = []
        for begin, end, n_new in ev.windows(n, L, stride):
            assert end - begin <= L and 1 <= n_new <= end - begin
            scored += [t for t in range(end - n_new, end) if t > begin]  # a window's first token has no context
        if stride < L:  # overlapping windows: every token but the text's first, once
            assert scored == list(range(1, n)), (n, L, stride)
        else:  # disjoint windows: all but each window's first token
            assert scored == [t for t in range(n) if t % stride], (n, L, stride)


def reference_wikitext(model, ids, max_length, stride):
    """The sliding-window recipe as a plain loop: each window alone, full forward, only new tokens scored."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        n_new = end - prev_end
        x = ids[begin:end]
        with torch.no_grad():
            logp = model(torch.tensor([x]))[0].log_softmax(-1)
        for t in range(len(x) - n_new, len(x)):
            if t > 0:  # the window's first token has nothing before it in the window
                nll -= logp[t - 1, x[t]].item()
                count += 1
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("max_length,stride,batch_size", [(48, 16, 3), (40, 40, 2), (4096, 512, 4)])
def test_wikitext_perplexity_matches_a_plain_loop(tiny, max_length, stride, batch_size):
    model, tok = tiny
    rows = [{"text": WIKI_TEXT}, {"text": "= Heading ="}, {"text": WIKI_TEXT.upper()}]
    ids = tok.encode("\n\n".join(r["text"] for r in rows))
    assert len(ids) > 2 * max_length or max_length > len(ids)
    samples = []
    got = ev.eval_wikitext(model, tok, rows, batch_size, samples, max_length=max_length, stride=stride)
    want_ppl, want_tokens = reference_wikitext(model, ids, max_length, stride)
    assert got["tokens"] == want_tokens == (len(ids) - 1 if stride < max_length else len(ids) - len(samples))
    assert got["ppl"] == pytest.approx(want_ppl, rel=1e-5)
    assert sum(s["scored_tokens"] for s in samples) == want_tokens
    assert math.exp(sum(s["nll"] for s in samples) / want_tokens) == pytest.approx(want_ppl, rel=1e-5)
    if max_length > len(ids):  # one window: the ordinary mean NLL of a single forward
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(model(torch.tensor([ids]))[0, :-1], torch.tensor(ids[1:]))
        assert got["ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-5)


# --- TriviaQA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("The Beatles!", "beatles"),
    ("  An  apple a day  ", "apple day"),
    ("Theatre and Anthem", "theatre and anthem"),  # articles only as whole words
    ("Jean-Paul Sartre", "jean-paul sartre"),  # hyphens kept
    ("St. Louis, Missouri", "st. louis missouri"),  # dots kept, commas dropped
    ("O'Brien (the elder)", "o brien elder"),
    ("1,000\tyards\nlong", "1 000 yards long"),
    ("Café Zürich", "caf z rich"),  # non-ASCII letters are outside [a-z0-9 .-]
    ("ÉCOLE", "cole"),
    ("\U0001f40e", ""),  # an emoji alias normalizes to nothing
    ("THE", ""),
])
def test_normalize_answer(text, want):
    assert ev.normalize_answer(text) == want


def test_triviaqa_correct_is_alias_substring_after_normalization():
    assert ev.triviaqa_correct("Paris, the capital of France.", ["Paris"])
    assert ev.triviaqa_correct("It is the Lazy-Dog", ["lazy-dog"])
    assert not ev.triviaqa_correct("lazy dog", ["lazy-dog"])
    assert not ev.triviaqa_correct("Horses run", ["\U0001f40e", "The"])  # empty normalized aliases never match
    assert not ev.triviaqa_correct("", ["Paris"])


def unbatched_answers(model, tok, prompts, repetition_penalty, max_new_tokens=32):
    out = []
    for p in prompts:
        idx = torch.tensor([tok.encode(p)])
        new = model.generate(idx, max_new_tokens, eos_token_id=tok.stop_ids,
                             repetition_penalty=repetition_penalty)[0, idx.size(1):].tolist()
        cut = next((k for k, t in enumerate(new) if t in tok.stop_ids), len(new))
        out.append(tok.decode(new[:cut], skip_special_tokens=True).strip())
    return out


@pytest.mark.parametrize("rp", [1.0, 1.3])
def test_triviaqa_predictions_match_unbatched_generate(tiny, rp):
    model, tok = tiny
    prompts = [data.triviaqa_prompt(r) for r in TRIVIA]
    want = unbatched_answers(model, tok, prompts, rp)
    # make the first question answered by its own reference prediction, so accuracy is known in advance
    rows = [dict(r) for r in TRIVIA]
    rows[0] = {**rows[0], "answer": {"value": want[0] or "x", "aliases": [want[0] or "x"]}}
    expected = [ev.normalize_answer(want[0]) != ""] + [
        any(a and a in ev.normalize_answer(w) for a in map(ev.normalize_answer, data.triviaqa_aliases(r)))
        for r, w in zip(rows[1:], want[1:])]
    samples = []
    result = ev.eval_triviaqa(model, tok, rows, batch_size=3, samples=samples, repetition_penalty=rp)
    assert [s["prediction"] for s in samples] == want
    assert [s["correct"] for s in samples] == expected
    assert result == {"acc": sum(expected) / len(rows), "n": len(rows)}
    assert samples[1]["target"] == ["Lazy dog"] and samples[1]["prompt"] == prompts[1]  # aliases only, not value


# --- run directories ----------------------------------------------------------------------------------


def logits_of(model, tok):
    idx = torch.tensor([tok.encode("Question: What is the capital of France?\nAnswer: Paris")])
    with torch.no_grad():
        return model(idx)


def write_run(run_dir, config, state):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(run_dir, "model.safetensors"))
    return str(run_dir)


def test_lora_run_dir_rebuilds_the_trained_model(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": list(LORA_TARGETS)}
    trained = add_lora(Qwen2.from_pretrained(tiny_model_dir, dtype="float32"), **lora).eval()
    with torch.no_grad():
        for k, p in trained.named_parameters():
            if k.endswith("lora_B"):
                p.normal_(0, 0.1)  # as if trained: the adapters now change the output
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    base_logits = logits_of(Qwen2.from_pretrained(tiny_model_dir, dtype="float32"), tok)
    want = logits_of(trained, tok)
    assert (want - base_logits).abs().max() > 1e-2
    cfg = {"method": "lora", "base_model": tiny_model_dir, "base_revision": None, "memory": None, "lora": lora,
           "finished": True}
    run = write_run(tmp_path / "lora_run", cfg, lora_state_dict(trained))
    model, tok2, info = ev.load_model(run)
    assert info["method"] == "lora" and info["base_model"] == tiny_model_dir and not model.training
    assert torch.allclose(logits_of(model, tok2), want, atol=1e-6)

    # the key set and every shape are checked; the message names the tensor
    state = lora_state_dict(trained)
    missing = {k: v for k, v in state.items() if k != "model.layers.0.self_attn.q_proj.lora_A"}
    with pytest.raises(ValueError, match=r"missing tensor model.layers.0.self_attn.q_proj.lora_A"):
        ev.load_model(write_run(tmp_path / "missing", cfg, missing))
    with pytest.raises(ValueError, match=r"unexpected tensor model.layers.0.extra"):
        ev.load_model(write_run(tmp_path / "extra", cfg, {**state, "model.layers.0.extra": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.self_attn.q_proj.lora_A has shape \(4, 64\), "
                                         r"expected \(8, 64\)"):
        ev.load_model(write_run(tmp_path / "rank", {**cfg, "lora": {**lora, "r": 8}}, state))
    with pytest.raises(ValueError, match="has not finished"):
        ev.load_model(write_run(tmp_path / "unfinished", {**cfg, "finished": False}, state))
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        ev.load_model(write_run(tmp_path / "dora", {**cfg, "method": "dora"}, state))
    os.remove(os.path.join(tmp_path / "dora", "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="run directory without weights"):
        ev.load_model(str(tmp_path / "dora"))


@pytest.mark.parametrize("mode", ["additive", "replacement"])
def test_memory_run_dir_rebuilds_the_trained_model(tiny_model_dir, tmp_path, mode):
    torch.manual_seed(0)
    mcfg = memory.MemoryConfig(layers=[1, 2], n_keys=8, heads=2, topk=4, k_dim=16, mode=mode)
    trained = Qwen2.from_pretrained(tiny_model_dir, dtype="float32")
    memory.add_memory(trained, mcfg)
    with torch.no_grad():
        for mem in memory.memory_layers(trained).values():
            mem.values.weight.normal_(0, 1.0)  # as if trained
            if mem.alpha is not None:
                mem.alpha.fill_(0.5)
    trained.eval()
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    want = logits_of(trained, tok)
    base = logits_of(Qwen2.from_pretrained(tiny_model_dir, dtype="float32"), tok)
    assert (want - base).abs().max() > 1e-2
    cfg = {"method": "smf", "base_model": tiny_model_dir, "memory": mcfg.to_dict(), "lora": None}
    run = write_run(tmp_path / "smf", cfg, memory.memory_state_dict(trained))
    model, _, info = ev.load_model(run)
    assert info["method"] == "smf"
    assert sorted(memory.memory_layers(model)) == [1, 2]
    assert all(p.dtype == torch.float32 for p in memory.memory_layers(model)[1].parameters())
    assert torch.allclose(logits_of(model, tok), want, atol=1e-6)
    # the paper recipe's memory (precision bf16) is evaluated in bf16, as its code evaluates the whole model
    paper = write_run(tmp_path / "smf-paper", {**cfg, "memory": {**mcfg.to_dict(), "precision": "bf16"}},
                      memory.memory_state_dict(trained))
    model, _, _ = ev.load_model(paper)
    assert all(p.dtype == torch.bfloat16 for mem in memory.memory_layers(model).values() for p in mem.parameters())
    assert model.lm_head.weight.dtype == torch.float32  # the base keeps the requested dtype
    with pytest.raises(ValueError, match=r"tensor model.layers.1.memory.keys has shape \(2, 2, 8, 8\), "
                                         r"expected \(2, 2, 12, 8\)"):
        ev.load_model(write_run(tmp_path / "bigger", {**cfg, "memory": {**mcfg.to_dict(), "n_keys": 12}},
                                memory.memory_state_dict(trained)))


def test_full_run_dir_loads_every_tensor(tiny_model_dir, tmp_path):
    trained = Qwen2.from_pretrained(tiny_model_dir, dtype="float32")
    with torch.no_grad():
        trained.model.norm.weight.mul_(1.5)
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    state = {k: v for k, v in trained.state_dict().items() if k in trained.hub_state_shapes()}
    run = write_run(tmp_path / "full", {"method": "full", "base_model": tiny_model_dir}, state)
    model, _, _ = ev.load_model(run)
    assert torch.allclose(logits_of(model, tok), logits_of(trained, tok), atol=1e-6)
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match="missing tensor model.norm.weight"):
        ev.load_model(write_run(tmp_path / "full_bad", {"method": "full", "base_model": tiny_model_dir}, state))


def test_load_model_reads_the_generation_configs_repetition_penalty(tiny_model_dir, rp_model_dir):
    assert ev.load_model(rp_model_dir)[2]["repetition_penalty"] == 1.5
    assert ev.load_model(tiny_model_dir)[2]["repetition_penalty"] == 1.0  # no repetition_penalty in its file
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        ev.load_model("/nonexistent/model")


# --- command line -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_data")
    return {"medmcqa": write_jsonl(d / "medmcqa.jsonl", MEDMCQA),
            "wikitext": write_jsonl(d / "wikitext.jsonl", [{"text": ""}, {"text": WIKI_TEXT}, {"text": " x "}]),
            "triviaqa": write_jsonl(d / "triviaqa.jsonl", TRIVIA)}


def test_cli_end_to_end(rp_model_dir, data_files, tmp_path):
    out, log = tmp_path / "results.json", tmp_path / "samples.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--model", rp_model_dir, "--limit", "4",
           "--out", str(out), "--log-samples", str(log), "--batch-size", "2", "--quiet"]
    cmd += [a for t, p in data_files.items() for a in ("--data", f"{t}={p}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["meta"]["repetition_penalty"] == 1.5  # from generation_config.json, as HF generate applies it
    assert results["medmcqa"]["n"] == 4 and results["triviaqa"]["n"] == 4
    for task in ("medmcqa", "wikitext", "triviaqa"):
        assert task in proc.stdout  # the printed table
    # the same numbers in process
    model, tok, _ = ev.load_model(rp_model_dir)
    rows = ev.load_task_rows(["medmcqa", "wikitext", "triviaqa"], 4, data_files)
    want = ev.run_tasks(model, tok, rows, batch_size=2, repetition_penalty=1.5)
    assert results["medmcqa"]["acc"] == want["medmcqa"]["acc"]
    assert results["wikitext"]["tokens"] == want["wikitext"]["tokens"]
    assert results["wikitext"]["ppl"] == pytest.approx(want["wikitext"]["ppl"], rel=1e-6)
    assert results["triviaqa"]["acc"] == want["triviaqa"]["acc"]
    # --log-samples: one line per question (per window for WikiText)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    by_task = {t: [x for x in lines if x["task"] == t] for t in ("medmcqa", "wikitext", "triviaqa")}
    assert [x["index"] for x in by_task["medmcqa"]] == [0, 1, 2, 3]
    assert by_task["medmcqa"][1]["target"] == 2 and len(by_task["medmcqa"][1]["scores"]) == 4
    assert sum(x["correct"] for x in by_task["medmcqa"]) == round(4 * results["medmcqa"]["acc"])
    assert by_task["triviaqa"][0]["prompt"] == "Question: What is the capital of France?\nAnswer:"
    first = by_task["triviaqa"][0]
    assert first["prediction"] == unbatched_answers(model, tok, [first["prompt"]], 1.5)[0]
    assert sum(x["scored_tokens"] for x in by_task["wikitext"]) == results["wikitext"]["tokens"]


def test_cli_errors_are_one_line_and_nonzero(tiny_model_dir, data_files, tmp_path, capsys):
    def run(*args):
        with pytest.raises(SystemExit) as e:
            ev.main(["--model", tiny_model_dir, "--quiet", *args])
        return e.value.code, capsys.readouterr().err

    code, err = run("--tasks", "medmcqa,mmlu")
    assert code == 2 and "unknown task 'mmlu'" in err
    code, err = run("--tasks", "medmcqa", "--data", "medmcqa=" + str(tmp_path / "missing.jsonl"))
    assert code == 2 and "--data medmcqa: file not found: " + str(tmp_path / "missing.jsonl") in err
    assert err.count("\n") == 1 and "--help" in err  # one line and a hint, no usage
    code, err = run("--tasks", "triviaqa", "--data", "triviaqa=" + data_files["medmcqa"])
    assert code.startswith("error: ") and "lacks column(s) answer" in code and "\n" not in code
    code, err = run("--data", "squad=x.jsonl")
    assert code == 2 and "unknown dataset 'squad'" in err
    code, err = run("--tasks", "wikitext", "--data", "wikitext=" + data_files["wikitext"], "--limit", "0")
    assert code == 2 and "--limit must be at least 1" in err
    # and as a process: a non-zero exit with the message on stderr
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", str(tmp_path / "nope"),
                           "--tasks", "wikitext", "--data", "wikitext=" + data_files["wikitext"]],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: model directory not found")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_keeps_the_finished_tasks_when_the_last_one_fails(tiny_model_dir, data_files, tmp_path, capsys):
    """--out and --log-samples are written as each task finishes: a failure in the last task (here a WikiText
    text of one token, which has nothing to score) keeps the tasks before it, and the error is one line."""
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "x"}])
    assert len(Tokenizer.from_pretrained(tiny_model_dir).encode("x")) < 2
    out, log = tmp_path / "results.json", tmp_path / "samples.jsonl"
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", tiny_model_dir, "--quiet", "--tasks", "medmcqa,triviaqa,wikitext", "--limit", "3",
                 "--data", "medmcqa=" + data_files["medmcqa"], "--data", "triviaqa=" + data_files["triviaqa"],
                 "--data", f"wikitext={short}", "--out", str(out), "--log-samples", str(log)])
    assert e.value.code == (f"error: wikitext: wikitext: the text has fewer than 2 tokens; finished: medmcqa, "
                            f"triviaqa, in {out} and {log}")
    results = json.loads(out.read_text())
    assert sorted(results) == ["medmcqa", "meta", "triviaqa"]
    assert results["medmcqa"]["n"] == results["triviaqa"]["n"] == 3 and results["meta"]["limit"] == 3
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["task"] for x in lines] == ["medmcqa"] * 3 + ["triviaqa"] * 3
    assert capsys.readouterr().out == ""  # the table is printed once every task has finished


def test_cli_bad_row_is_a_one_line_error_before_the_model_loads(data_files, tmp_path):
    rows = [dict(r) for r in TRIVIA]
    rows[2] = {**rows[2], "answer": {"value": "C", "aliases": [""]}}
    bad = write_jsonl(tmp_path / "trivia.jsonl", rows)
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit) as e:  # the model does not exist either: rows are checked first
        ev.main(["--model", str(tmp_path / "no-model"), "--tasks", "medmcqa,triviaqa", "--quiet",
                 "--data", "medmcqa=" + data_files["medmcqa"], "--data", f"triviaqa={bad}", "--out", str(out)])
    assert e.value.code.startswith(f"error: {bad}: row 2: answer.aliases: no answer aliases")
    assert "\n" not in e.value.code and not out.exists()


def test_local_looking_model_path_is_not_found_without_asking_the_hub(data_files, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_network(repo_id, **kw):
        raise AssertionError(f"asked the Hub for {repo_id}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs")
    for name in ["runs/typo", "./typo", "../typo", "~/typo", "a/b/c", "typo", str(tmp_path / "typo")]:
        with pytest.raises(SystemExit) as e:
            ev.main(["--model", name, "--tasks", "wikitext", "--data", "wikitext=" + data_files["wikitext"]])
        assert e.value.code == f"error: model directory not found: {name}"
    with pytest.raises(FileNotFoundError, match="model directory not found: runs/typo"):  # a run's base model
        resolve_model_dir("runs/typo", revision="0123abcd")
    assert looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and not looks_like_hub_id("runs/typo")
    os.makedirs("Qwen")  # a local folder of that name makes it a local path
    assert not looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct")
    for limit in ("0", "-3"):
        with pytest.raises(SystemExit) as e:
            ev.main(["--tasks", "wikitext", "--data", "wikitext=" + data_files["wikitext"], "--limit", limit])
        assert e.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last == f"error: --limit must be at least 1, got {limit} (see eval.py --help)"


def test_load_model_takes_dtype_and_device_as_names_or_torch_objects(tiny_model_dir):
    """As tests and experiments call it (strings, None) and as train.py does (torch.device, torch.dtype)."""
    for dtype, device, want in [(None, None, torch.float32), ("bf16", "cpu", torch.bfloat16),
                                (torch.float16, torch.device("cpu"), torch.float16)]:
        model, _, info = ev.load_model(tiny_model_dir, dtype=dtype, device=device)
        assert model.lm_head.weight.dtype == want and model.lm_head.weight.device.type == "cpu"
        assert info["dtype"] == str(want).removeprefix("torch.") and info["device"] == "cpu"
    with pytest.raises(ValueError, match="dtype 'int8'"):
        ev.load_model(tiny_model_dir, dtype="int8")


# --- real rows and the real Qwen2.5 tokenizer ----------------------------------------------------------


@pytest.fixture(scope="module")
def real_tokenizer_model(tmp_path_factory):
    """A tiny random Qwen2 with Qwen2.5's vocabulary (151,936) and its real tokenizer files."""
    from conftest import SHARED
    src = os.path.join(SHARED, "qwen2.5-0.5b-instruct")
    if not os.path.isdir(src):
        pytest.skip("../shared/data is not present")
    d = str(tmp_path_factory.mktemp("qwen_vocab_tiny"))
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, torch_dtype="float32")
    save_pretrained(Qwen2(cfg).init_weights(), d)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(src, f), d)
    return d


def test_probes_on_real_rows_with_the_real_tokenizer(real_tokenizer_model, shared_data):
    model, tok, info = ev.load_model(real_tokenizer_model)
    assert info["repetition_penalty"] == 1.1  # Qwen2.5-Instruct's generation_config.json
    assert tok.stop_ids == [151645, 151643]
    d = os.path.join(shared_data, "eval")
    med = data.load_rows("medmcqa", os.path.join(d, "medmcqa_validation.jsonl"), limit=200)
    # with this tokenizer the context's tokens are a prefix of context + continuation, and the first scored
    # token is " A" / " B" / " C" / " D" (REFERENCE.md section 4)
    letter_ids = [tok.encode(f" {x}")[0] for x in "ABCD"]
    for row in med:
        context, conts, _ = data.medmcqa_eval_item(row)
        c = tok.encode(context)
        for j, x in enumerate(conts):
            full = tok.encode(context + x)
            assert full[:len(c)] == c and full[len(c)] == letter_ids[j]
    samples = []
    r = ev.eval_medmcqa(model, tok, med[:8], batch_size=4, samples=samples)
    assert r["n"] == 8 and all(s["scores"][0] < 0 for s in samples)

    wiki = data.load_rows("wikitext", os.path.join(d, "wikitext-103-v1_test.jsonl"), limit=8)
    words = sum(len(x["text"].split()) for x in wiki)
    w = ev.eval_wikitext(model, tok, wiki, batch_size=2)
    assert 1.0 < w["tokens"] / words < 1.6, (w["tokens"], words)  # a plausible tokens-per-word ratio
    assert abs(math.log(w["ppl"]) - math.log(151936)) < 0.1  # near-uniform random model: ppl ~ vocab size

    tqa = data.load_rows("triviaqa", os.path.join(d, "triviaqa_sample.jsonl"), limit=8)
    samples = []
    t = ev.eval_triviaqa(model, tok, tqa, batch_size=4, samples=samples, repetition_penalty=1.1, max_new_tokens=4)
    assert t["n"] == 8 and all(isinstance(s["prediction"], str) for s in samples)
    assert samples[0]["prompt"] == "Question: " + tqa[0]["question"] + "\nAnswer:"
    assert "Onion" in samples[0]["target"]


def test_triviaqa_decoding_follows_the_paper(tiny, monkeypatch):
    """As the paper's Hugging Face generate: eos = <|im_end|> alone; an <|endoftext|> mid-answer is dropped by
    skip_special_tokens, not a stop; everything after eos is padding."""
    model, tok = tiny
    eot, eos = tok.token_to_id("<|endoftext|>"), tok.eos_id
    a, b = tok.encode(" Paris"), tok.encode(" France")

    def fake_generate(idx, max_new_tokens, **kw):
        assert kw["eos_token_id"] == [eos]
        new = torch.tensor([a + [eot] + b + [eos] + a] * idx.shape[0])
        return torch.cat([idx, new], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    assert ev.generate_answers(model, tok, ["Question: x\nAnswer:", "Question: y?\nAnswer:"]) == ["Paris France"] * 2


def test_cli_compile_decodes_triviaqa_with_the_compiled_step(tiny_model_dir, data_files, tmp_path, monkeypatch):
    """eval.py --compile reaches model.generate(compiled=True) for TriviaQA (whose tokens equal eager decoding:
    tests/test_model.py); here generate runs eagerly so that nothing compiles."""
    seen = []
    eager = Qwen2.generate

    def generate(self, *a, compiled=False, **kw):
        seen.append(compiled)
        return eager(self, *a, **kw)
    monkeypatch.setattr(Qwen2, "generate", generate)
    out = tmp_path / "r.json"
    ev.main(["--model", tiny_model_dir, "--tasks", "triviaqa", "--data", f"triviaqa={data_files['triviaqa']}",
             "--limit", "3", "--batch-size", "2", "--compile", "--quiet", "--out", str(out)])
    assert seen == [True, True] and json.loads(out.read_text())["meta"]["compile"] is True


# -----------------------------------------------------------------------------
# eval.py --prompt: talk to any model eval.py loads


def run_prompt(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *args], capture_output=True,
                          text=True, timeout=120, env=env)


def greedy_reply(model, tok, prompt, n, repetition_penalty=1.0):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    idx = torch.tensor([tok.encode(text)])
    new = model.generate(idx, n, eos_token_id=tok.stop_ids, repetition_penalty=repetition_penalty)
    return tok.decode([t for t in new[0, idx.size(1):].tolist() if t not in tok.stop_ids]).strip()


def test_prompt_help():
    r = run_prompt("--help")
    assert r.returncode == 0 and "--max-new-tokens" in r.stdout and "--prompt" in r.stdout


def test_prompt_talks_to_a_local_model(tiny_model_dir):
    r = run_prompt("--model", tiny_model_dir, "--prompt", "hi", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    model, tok, info = ev.load_model(tiny_model_dir)  # what it prints is what greedy generation makes
    assert r.stdout.strip() == greedy_reply(model, tok, "hi", 5, info["repetition_penalty"])


def test_prompt_bad_model_dir_is_one_line_error(tmp_path):
    r = run_prompt("--model", str(tmp_path / "nowhere"), "--prompt", "hi", "--max-new-tokens", "1")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"error: model directory not found: {tmp_path / 'nowhere'}"]


def test_prompt_talks_to_a_run_directory(tiny_model_dir, tmp_path):
    """A train.py run directory is rebuilt (base + its trained tensors) as for the probes, whatever the method."""
    torch.manual_seed(0)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": list(LORA_TARGETS)}
    trained = add_lora(Qwen2.from_pretrained(tiny_model_dir, dtype="float32"), **lora).eval()
    with torch.no_grad():
        for k, p in trained.named_parameters():
            if k.endswith("lora_B"):
                p.normal_(0, 0.1)
    cfg = {"method": "lora", "base_model": tiny_model_dir, "base_revision": None, "memory": None, "lora": lora,
           "finished": True}
    run = write_run(tmp_path / "runs" / "tiny-lora", cfg, lora_state_dict(trained))
    r = run_prompt("--model", run, "--prompt", "hi", "--max-new-tokens", "5", "--no-repetition-penalty")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == greedy_reply(trained, Tokenizer.from_pretrained(tiny_model_dir), "hi", 5)


def test_cli_refuses_what_it_cannot_do_before_loading_anything(tiny_model_dir, tmp_path, capsys):
    """An empty --harness, a missing --harness-include folder, a folder that is no model: one line, exit 2; Ctrl-C
    is one line too."""
    empty = tmp_path / "runs" / "nothing"
    empty.mkdir(parents=True)
    for argv, needle in ((["--harness", ""], "--harness: give at least one lm-evaluation-harness task"),
                         (["--harness", "arc_easy", "--harness-include", str(tmp_path / "nope")],
                          f"--harness-include {tmp_path / 'nope'}: no such folder"),
                         (["--model", str(empty)], "holds neither a model (config.json) nor a train.py run")):
        if "--harness-include" in argv and importlib.util.find_spec("lm_eval") is None:
            continue
        with pytest.raises(SystemExit) as e:
            ev.main(["--model", tiny_model_dir, *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err

    def interrupted(argv):
        raise KeyboardInterrupt
    ev_main = ev.main
    try:
        ev.main = interrupted
        assert ev.cli([]) == "interrupted: the tasks finished so far are in --out; continue with --resume"
    finally:
        ev.main = ev_main
