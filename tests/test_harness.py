"""eval.py --harness: lm-evaluation-harness tasks through eval.HarnessLM, offline on local task YAMLs. A
loglikelihood task and a generation task score exactly as our own probes on the same rows (HellaSwag, GSM8K), on
the base model and on a LoRA run; loglikelihood_rolling equals a plain computation over the harness's rolling
windows; the greedy flag, stop strings and a refused sampling request. Skipped without lm-eval (CI installs it:
requirements-harness.txt)."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only, before `datasets` reads its settings
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

import data  # noqa: E402
import eval as ev  # noqa: E402
import train  # noqa: E402
from tiny_data import HELLASWAG  # noqa: E402

GSM8K = [{"question": "Janet has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7"},
         {"question": "A robe takes 2 bolts of blue fiber and half that much white. How many bolts?",
          "answer": "2 + 1 = 3\n#### 3"},
         {"question": "What is 10 minus 12?", "answer": "#### -2"}]

TASKS = {
    "local_hellaswag.yaml": """task: local_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: @hellaswag@
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{ctx}}"
doc_to_target: "{{label}}"
doc_to_choice: "{{endings}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "local_gsm8k.yaml": """task: local_gsm8k
dataset_path: json
dataset_kwargs:
  data_files:
    test: @gsm8k@
test_split: test
output_type: generate_until
doc_to_text: "Question: {{question}}\\nLet's think step by step.\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: 16
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "utils.py": """import json
import os

import data
import eval as ev


def process_results(doc, results):  # our probe's check, on the harness's (unstripped) generation
    with open(os.environ["HARNESS_GENERATIONS"], "a") as f:  # what the harness generated, for the test
        f.write(json.dumps({"question": doc["question"], "text": results[0]}) + "\\n")
    return {"acc": float(ev.gsm8k_correct(results[0].strip(), data.gsm8k_gold(doc)))}
""",
}


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("harness_tasks")
    files = {"hellaswag": d / "hellaswag.jsonl", "gsm8k": d / "gsm8k.jsonl"}
    files["hellaswag"].write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    files["gsm8k"].write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    for name, text in TASKS.items():
        for k, v in files.items():
            text = text.replace(f"@{k}@", str(v))
        (d / name).write_text(text)
    return str(d), {k: str(v) for k, v in files.items()}


def harness_vs_probes(model_dir, local_tasks, tmp_path, monkeypatch):
    include, files = local_tasks
    out, generations = tmp_path / "eval.json", tmp_path / "generations.jsonl"
    monkeypatch.setenv("HARNESS_GENERATIONS", str(generations))
    ev.main(["--model", model_dir, "--harness", "local_hellaswag,local_gsm8k", "--harness-include", include,
             "--out", str(out), "--device", "cpu", "--quiet", "--batch-size", "2"])
    got = json.loads(out.read_text())
    model, tok, info = ev.load_model(model_dir, device="cpu")
    want_h = ev.eval_hellaswag(model, tok, data.load_rows("hellaswag", files["hellaswag"]), batch_size=2)
    samples = []
    want_g = ev.eval_gsm8k(model, tok, data.load_rows("gsm8k", files["gsm8k"]), batch_size=2, max_new_tokens=16,
                           repetition_penalty=info["repetition_penalty"], samples=samples)
    said = {g["question"]: g["text"] for g in map(json.loads, generations.read_text().splitlines())}
    assert [said[r["question"]].strip() for r in GSM8K] == [s["prediction"] for s in samples]  # the same tokens
    assert any(s["prediction"] for s in samples)
    assert set(got) == {"harness", "meta"}  # the harness alone: --tasks was not given
    results = got["harness"]["results"]
    assert results["local_hellaswag"]["acc,none"] == want_h["acc"]
    assert results["local_gsm8k"]["acc,none"] == want_g["acc"]
    assert got["meta"]["harness"] == "local_hellaswag,local_gsm8k" and got["meta"]["harness_chat_template"] is False
    return got


def test_harness_tasks_score_as_our_probes(tiny_model_dir, local_tasks, tmp_path, monkeypatch):
    harness_vs_probes(tiny_model_dir, local_tasks, tmp_path, monkeypatch)


def test_harness_on_a_lora_run(tiny_model_dir, files, local_tasks, tmp_path, monkeypatch):
    run = tmp_path / "lora"
    train.main(["--method", "lora", "--model", tiny_model_dir, "--data", f"medmcqa={files['medmcqa']}", "--out",
                str(run), "--device", "cpu", "--batch-size", "4", "--max-steps", "2", "--lr", "1e-2",
                "--max-len", "128"])
    got = harness_vs_probes(str(run), local_tasks, tmp_path, monkeypatch)
    assert got["meta"]["method"] == "lora"


def adapter(tiny_model_dir, **kw):
    from lm_eval.api.model import LM
    model, tok, _ = ev.load_model(tiny_model_dir, device="cpu")
    return type("HarnessModel", (ev.HarnessLM, LM), {})(model, tok, **kw), model, tok


def request(kind, *args):
    from lm_eval.api.instance import Instance
    return Instance(kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_rolling_scores_every_token_once_with_the_most_context(tiny_model_dir):
    lm, model, tok = adapter(tiny_model_dir, batch_size=3, max_length=8)
    text = "Memory layers store facts in rows; sparse finetuning updates only a few of them."
    toks = tok.encode(text)
    assert len(toks) > 20
    L = 8

    def logp(inp, targets):  # summed log p of the last len(targets) positions of one plain forward
        with torch.no_grad():
            lp = model(torch.tensor([inp]))[0].log_softmax(-1)
        return sum(lp[len(inp) - len(targets) + k, t].item() for k, t in enumerate(targets))

    want = logp([lm.prefix] + toks[:L - 1], toks[:L])  # the first window: after the eos token
    for start in range(L, len(toks), L):  # then chunks of L tokens, each with L tokens of context
        end = min(start + L, len(toks))
        want += logp(toks[end - 1 - L:end - 1], toks[start:end])
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", text), request("loglikelihood_rolling", "x")])
    assert got[0] == pytest.approx(want, rel=1e-5)  # fp32 summation order
    assert len(got) == 2


def test_loglikelihood_greedy_flag_and_empty_context(tiny_model_dir):
    lm, model, tok = adapter(tiny_model_dir)
    context = "The quick brown fox"
    with torch.no_grad():
        best = int(model(torch.tensor([tok.encode(context)]))[0, -1].argmax())
    other = (best + 1) % model.config.vocab_size
    greedy, not_greedy = tok.decode([best]), tok.decode([other])
    if tok.encode(context + greedy)[len(tok.encode(context)):] != [best]:
        pytest.skip("the greedy token does not re-tokenize alone after the context")
    got = lm.loglikelihood([request("loglikelihood", context, greedy), request("loglikelihood", context, not_greedy),
                            request("loglikelihood", "", " fox")])
    assert got[0][1] is True and got[1][1] is False and got[0][0] > got[1][0]
    assert got[2][0] < 0  # an empty context is the eos token


def test_generate_until_cuts_at_the_first_stop_string_and_refuses_sampling(tiny_model_dir, monkeypatch):
    lm, _, _ = adapter(tiny_model_dir)
    seen = []
    monkeypatch.setattr(ev, "generate_answers", lambda m, t, prompts, bs, n, rp, **kw: seen.append(n) or
                        [f" 7 apples.\n\nQuestion: {p}" for p in prompts])
    got = lm.generate_until([request("generate_until", "a", {"until": ["Question:", "\n\n"], "max_gen_toks": 9}),
                             request("generate_until", "b", {"until": "pears"})])
    assert got == [" 7 apples.", " 7 apples.\n\nQuestion: b"] and sorted(seen) == [9, 256]
    with pytest.raises(ValueError, match="decodes greedily"):
        lm.generate_until([request("generate_until", "a", {"do_sample": True, "temperature": 0.7})])


def test_harness_errors_are_one_line(tiny_model_dir, local_tasks, capsys):
    include, _ = local_tasks
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", tiny_model_dir, "--harness", "no_such_task", "--harness-include", include, "--device",
                 "cpu"])
    assert "unknown task 'no_such_task'" in str(e.value) and "\n" not in str(e.value)


def test_harness_data_out_of_reach_is_one_line(tiny_model_dir, local_tasks, monkeypatch):
    """lm-eval fetching a task's data with no network (here: its evaluation raising what datasets raises offline)
    ends in one line naming the tasks, not a traceback."""
    import lm_eval
    include, _ = local_tasks

    def offline(**kw):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)\nmore lines")
    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", tiny_model_dir, "--harness", "local_gsm8k", "--harness-include", include, "--device",
                 "cpu"])
    assert e.value.code == "error: --harness local_gsm8k: Couldn't reach 'allenai/ai2_arc' on the Hub " \
                           "(LocalEntryNotFoundError)"
