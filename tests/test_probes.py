"""HellaSwag and GSM8K (eval.PROBES, off by default) against re-implementations of the paper's eval_tasks.py
functions written here (one question at a time, its continuation_score and its answer check), on the tiny model;
GSM8K's answer extraction at its edges; real GSM8K rows (../shared/data); HellaSwag rows in the Hub's schema."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import eval as ev
import train

HELLASWAG = [  # Rowan/hellaswag's columns; label is a string on the Hub
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "endings": ["is using wrap to wrap a pair of skis.",
                                                         "is ripping level tiles off.",
                                                         "is holding a rubik's cube.",
                                                         "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx": "A lady walks to a barbell. She bends down and",
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
                 "stands and lifts the weight over her head."], "label": "3"},
    {"ind": 106, "activity_label": "Canoeing", "ctx": "Two women in a child are shown in a canoe while a man "
     "pulls the canoe while standing in the water, with other individuals visible in the background. the child "
     "and a different man", "endings": ["are then shown paddling down a river in a boat while a woman talks.",
                                        "are driving the canoe, they go down the river flowing side to side.",
                                        "sit in a canoe while the man paddles.",
                                        "walking go down the rapids, while the man in his helicopter almost falls "
                                        "and goes out of canoehood."], "label": "2"},
    {"ind": 114, "activity_label": "High jump", "ctx": "A boy is running down a track. the boy", "endings": [
        "runs into a car.", "gets in a mat.", "lifts his body above the height of a pole.",
        "stands on his hands and springs."], "label": "2"},
    {"ind": 7, "activity_label": "Fox", "ctx": "The quick brown fox", "endings": ["jumps over the lazy dog.",
                                                                                "is a vitamin.", "sleeps.", "A."],
     "label": "0"},
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok, _ = ev.load_model(tiny_model_dir)
    return model, tok


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
