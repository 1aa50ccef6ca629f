"""eval.py: each probe against a plain unbatched computation (HellaSwag and GSM8K against the paper's eval_tasks.py
functions re-implemented one question at a time), the alias normalizer, --log-samples, --prompt and the command
line (no network: tiny models and tiny data files in the Hub schemas). Rebuilding a run: test_checkpoint.py."""

import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import data
import eval as ev
from conftest import ROOT
from helpers import trained_lora, write_run
from tiny_data import HELLASWAG, write_jsonl
from data import Tokenizer
from checkpoint import save_pretrained
from model import LORA_TARGETS, Qwen2, Qwen2Config, looks_like_hub_id, lora_state_dict, resolve_model_dir
import re
import numpy as np
import torch.nn.functional as F
import train

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
    assert code == 2 and "--limit must be a finite number >= 1, got 0" in err  # the range declared beside the flag
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


def test_cli_bad_row_is_a_one_line_error_before_the_model_loads(tiny_model_dir, data_files, tmp_path, monkeypatch):
    rows = [dict(r) for r in TRIVIA]
    rows[2] = {**rows[2], "answer": {"value": "C", "aliases": [""]}}
    bad = write_jsonl(tmp_path / "trivia.jsonl", rows)
    out = tmp_path / "results.json"
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: pytest.fail("the model loaded before the rows were checked"))
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", tiny_model_dir, "--tasks", "medmcqa,triviaqa", "--quiet",
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
        assert last == f"error: --limit must be a finite number >= 1, got {limit} (see eval.py --help)"


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
    """`python eval.py ARGS` run in this process (eval.cli; a process costs seconds to start): its exit status, what
    it printed and what it wrote to stderr (the message it exits with last)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = ev.cli(list(args))
        except SystemExit as e:
            status = e.code
    if isinstance(status, str):
        print(status, file=err)
    return subprocess.CompletedProcess(args, 1 if isinstance(status, str) else status or 0, out.getvalue(),
                                       err.getvalue())


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


OWN_TEMPLATE = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\nYou are "
                "Tiny, a test model<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_prompt_and_exports_use_the_models_own_chat_template(tiny_model_dir, tmp_path):
    """A model folder whose tokenizer_config.json has its own chat template (its own default system prompt, as
    SmolLM2's): --prompt writes the message with it, and a full run's hf/ export carries it."""
    import train
    own = tmp_path / "own"
    shutil.copytree(tiny_model_dir, own)
    cfg = json.load(open(own / "tokenizer_config.json"))
    json.dump({**cfg, "chat_template": OWN_TEMPLATE}, open(own / "tokenizer_config.json", "w"))
    text = Tokenizer.from_pretrained(own).apply_chat_template([{"role": "user", "content": "hi"}], True)
    assert text == "<|im_start|>system\nYou are Tiny, a test model<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    said = run_prompt("--model", str(own), "--prompt", "hi", "--max-new-tokens", "6", "--no-repetition-penalty")
    raw = run_prompt("--model", str(own), "--prompt", text, "--raw", "--max-new-tokens", "6", "--no-repetition-penalty")
    assert said.returncode == 0 and said.stdout == raw.stdout  # the prompt is the folder's template, not Qwen's
    medmcqa = data_file(tmp_path)
    train.main(["--method", "full", "--recipe", "clean", "--model", str(own), "--data", f"medmcqa={medmcqa}",
                "--out", str(tmp_path / "full"), "--device", "cpu", "--batch-size", "2", "--max-len", "64",
                "--max-steps", "1"])
    assert Tokenizer.from_pretrained(tmp_path / "full" / "hf").apply_chat_template(
        [{"role": "user", "content": "hi"}], True) == text


def data_file(tmp_path):
    from tiny_data import medmcqa_rows, write_parquet
    return write_parquet(str(tmp_path / "medmcqa.parquet"), medmcqa_rows(16))


def test_prompt_bad_model_dir_is_one_line_error(tmp_path):
    r = run_prompt("--model", str(tmp_path / "nowhere"), "--prompt", "hi", "--max-new-tokens", "1")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"error: model directory not found: {tmp_path / 'nowhere'}"]


def test_prompt_talks_to_a_run_directory(tiny_model_dir, tmp_path):
    """A train.py run directory is rebuilt (base + its trained tensors) as for the probes, whatever the method."""
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": list(LORA_TARGETS)}
    trained = trained_lora(tiny_model_dir, lora)  # the adapters change the output
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


# -----------------------------------------------------------------------------
# HellaSwag and GSM8K (off by default) against the paper's eval_tasks.py functions re-implemented one question at a time


def paper_continuation_score(model, tok, context, continuation):
    """eval_tasks.py's continuation_score(normalize=False): labels are the joint tokenization with its first
    len(context tokens) masked; the score is -loss * the number of scored tokens (-inf if there are none)."""
    ctx_ids = tok.encode(context)
    full = torch.tensor([tok.encode(context + continuation)])
    labels = full.clone()
    labels[:, :len(ctx_ids)] = -100
    n = int((labels != -100).sum())
    if n == 0:
        return float("-inf")
    with torch.no_grad():
        logits = model(full)  # (1, T, V)
    loss = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)  # HF's shifted mean
    return float(-loss * n)


def paper_hellaswag(model, tok, rows):
    preds = []
    for row in rows:
        scores = [paper_continuation_score(model, tok, row["ctx"], " " + e) for e in row["endings"]]
        preds.append(int(np.argmax(scores)))
    return preds, sum(p == int(r["label"]) for p, r in zip(preds, rows)) / len(rows)


def test_hellaswag_equals_the_papers_function(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "hellaswag.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    rows = data.load_rows("hellaswag", str(path))
    want_preds, want_acc = paper_hellaswag(model, tok, rows)
    samples = []
    got = ev.eval_hellaswag(model, tok, rows, batch_size=2, samples=samples)  # 8 padded sequences a batch
    assert [s["prediction"] for s in samples] == want_preds
    assert got == {"acc": want_acc, "n": len(rows)}
    for row, s in zip(rows, samples):  # the summed log-probabilities, up to fp32 summation order
        want = [paper_continuation_score(model, tok, row["ctx"], " " + e) for e in row["endings"]]
        assert s["scores"] == pytest.approx(want, rel=1e-5)
        assert s["target"] == int(row["label"]) and s["choices"] == [" " + e for e in row["endings"]]


def test_hellaswag_rows_are_checked(tmp_path):
    bad = dict(HELLASWAG[0], label="")  # the test split: no answer
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(HELLASWAG[1]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"h.jsonl: row 1: label must be 0..3"):
        data.load_rows("hellaswag", str(path))
    with pytest.raises(ValueError, match="endings must be a list of 4 strings"):
        data.hellaswag_item(dict(HELLASWAG[0], endings=["a", "b"]))


def paper_gsm8k_correct(response, answer):
    """eval_tasks.py's eval_gsm8k check, as written there."""
    pred_numbers = re.findall(r"[-+]?\d[\d,]*\.?\d*", response.replace(",", ""))
    gold = answer.split("####")[-1].strip().replace(",", "")
    return bool(pred_numbers) and pred_numbers[-1] == gold


@pytest.mark.parametrize("response, answer, want", [
    ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18", "... #### 18", True),
    ("She makes $18.", "#### 18", False),          # the paper's regex keeps the sentence's final "." : "18."
    ("It is 18 dollars", "#### 18", True),
    ("the change is -3", "#### -3", True),          # negative numbers
    ("the change is -3", "#### 3", False),
    ("+7 more", "#### 7", False),                   # a sign is part of the number
    ("3.5 apples", "#### 3.5", True),               # decimals
    ("3.50 apples", "#### 3.5", False),             # compared as strings
    ("1,234 dollars", "#### 1,234", True),          # commas removed on both sides
    ("1,234,567", "#### 1234567", True),
    ("no number here", "#### 5", False),            # no number: wrong
    ("first 18 then 20", "#### 18", False),         # the last number counts
    ("", "#### 0", False),
])
def test_gsm8k_answer_extraction(response, answer, want):
    row = {"question": "q", "answer": answer}
    assert ev.gsm8k_correct(response, data.gsm8k_gold(row)) is want
    assert paper_gsm8k_correct(response, answer) is want


def paper_gsm8k_predictions(model, tok, rows, rp, max_new_tokens):
    """eval_tasks.py's generate_answer, one prompt at a time: greedy, eos <|im_end|>, decoded without special
    tokens, stripped."""
    out = []
    for row in rows:
        idx = torch.tensor([tok.encode(f"Question: {row['question']}\nLet's think step by step.\nAnswer:")])
        new = model.generate(idx, max_new_tokens, eos_token_id=[tok.eos_id],
                             repetition_penalty=rp)[0, idx.size(1):].tolist()
        cut = next((k for k, t in enumerate(new) if t == tok.eos_id), len(new))
        out.append(tok.decode(new[:cut], skip_special_tokens=True).strip())
    return out


def test_gsm8k_equals_the_papers_function_on_real_rows(tiny, shared_data):
    model, tok = tiny
    rows = data.load_rows("gsm8k", os.path.join(shared_data, "eval", "gsm8k_main_test.jsonl"))
    assert len(rows) == 1319 and data.gsm8k_gold(rows[0]) == "18"
    rows = rows[:6]
    want = paper_gsm8k_predictions(model, tok, rows, 1.1, max_new_tokens=24)
    numbers = [re.findall(r"[-+]?\d[\d,]*\.?\d*", w.replace(",", "")) for w in want]
    rows = [dict(r) for r in rows]
    if any(numbers):  # one answer made right by its own prediction, so that accuracy is known in advance
        k = next(i for i, n in enumerate(numbers) if n)
        rows[k]["answer"] = rows[k]["answer"].split("####")[0] + "#### " + numbers[k][-1]
    expected = [paper_gsm8k_correct(w, r["answer"]) for w, r in zip(want, rows)]
    samples = []
    got = ev.eval_gsm8k(model, tok, rows, batch_size=4, samples=samples, repetition_penalty=1.1, max_new_tokens=24)
    assert [s["prediction"] for s in samples] == want
    assert [s["correct"] for s in samples] == expected and got == {"acc": sum(expected) / len(rows), "n": len(rows)}
    assert samples[0]["prompt"].startswith("Question: Janet") and samples[0]["prompt"].endswith(
        "\nLet's think step by step.\nAnswer:")


def test_gsm8k_scores_what_the_model_says(tiny, monkeypatch):
    """The pipeline end to end on decoded answers it is given: eos ends the answer, the last number counts."""
    model, tok = tiny
    said = tok.encode(" 9 * 2 = 1,234") + [tok.eos_id] + tok.encode(" 5")

    def fake_generate(idx, max_new_tokens, **kw):
        assert max_new_tokens == 256 and kw["eos_token_id"] == [tok.eos_id]
        return torch.cat([idx, torch.tensor([said] * idx.shape[0])], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    rows = [{"question": "a?", "answer": "x\n#### 1,234"}, {"question": "b?", "answer": "#### 5"}]
    assert ev.eval_gsm8k(model, tok, rows) == {"acc": 0.5, "n": 2}


def test_new_probes_are_off_by_default_and_reachable(tiny_model_dir, tmp_path):
    assert ev.default_tasks() == ["medmcqa", "wikitext", "triviaqa"]
    assert ev.PROBES["gsm8k"].generates and not ev.PROBES["hellaswag"].generates
    args = train.parse_args(["--method", "lora", "--model", tiny_model_dir, "--eval-tasks", "hellaswag,gsm8k",
                             "--out", str(tmp_path / "r")])
    assert args.eval_tasks == "hellaswag,gsm8k"
    path = tmp_path / "h.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    out = tmp_path / "eval.json"
    ev.main(["--model", tiny_model_dir, "--tasks", "hellaswag", "--data", f"hellaswag={path}", "--out", str(out),
             "--device", "cpu", "--quiet"])
    got = json.loads(out.read_text())
    assert got["hellaswag"]["n"] == len(HELLASWAG) and not math.isnan(got["hellaswag"]["acc"])
