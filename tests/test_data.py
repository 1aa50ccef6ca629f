"""data.py: Hub and local loading in the Hub schemas, filtering, prompt strings, OASST1 flattening, loss masks,
shuffling and batching (no network: the Hub download is replaced by a local folder in the Hub layout), and the
tokenizer against Qwen2.5's own files."""

import os
import re

import pytest
import torch

import data
from tiny_data import write_jsonl, write_parquet
from data import Tokenizer
import unicodedata
from data import DEFAULT_SYSTEM

MEDMCQA = [
    {"id": "q1", "question": "Which vitamin prevents scurvy?", "opa": "Vitamin A", "opb": "Vitamin B12",
     "opc": "Vitamin C", "opd": "Vitamin D", "cop": 2, "choice_type": "single", "exp": "Ascorbic acid.",
     "subject_name": "Biochemistry", "topic_name": None},
    {"id": "q2", "question": "Pick all that apply", "opa": "x", "opb": "y", "opc": "z", "opd": "w", "cop": 0,
     "choice_type": "multi", "exp": None, "subject_name": "Anatomy", "topic_name": None},
    {"id": "q3", "question": "The heart has how many chambers?", "opa": "2", "opb": "3", "opc": "4", "opd": "5",
     "cop": 2, "choice_type": "single", "exp": "", "subject_name": "Anatomy", "topic_name": "Heart"},
]
TRIVIA = [
    {"question": "What is the capital of France?", "question_id": "t1",
     "answer": {"value": "Paris", "aliases": ["Paris", "City of Light"],
                "normalized_aliases": ["paris", "city of light"],
                "normalized_value": "paris"}},
    {"question": "Which animal is a dik-dik?", "question_id": "t2",
     "answer": {"value": "Antelope", "aliases": ["Antelopes"], "normalized_aliases": ["antelopes"],
                "normalized_value": "antelope"}},
]
WIKI = [{"text": ""}, {"text": " = Robert Boulter = \n"}, {"text": ""}, {"text": " He is an actor . \n"},
        {"text": "   \n"}, {"text": " In 2006 , he starred . \n"}]




@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer.from_pretrained(tiny_model_dir)


# --- loading ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_medmcqa_local_file_keeps_single_choice(tmp_path, fmt):
    path = (write_parquet if fmt == "parquet" else write_jsonl)(tmp_path / f"m.{fmt}", MEDMCQA)
    rows = data.load_rows("medmcqa", path)
    assert [r["id"] for r in rows] == ["q1", "q3"]
    assert rows[0]["opc"] == "Vitamin C" and rows[0]["cop"] == 2
    assert [r["id"] for r in data.load_rows("medmcqa", path, limit=1)] == ["q1"]
    assert [r["id"] for r in data.load_rows("medmcqa", path, single_only=False)] == ["q1", "q2", "q3"]


def test_medmcqa_without_choice_type_keeps_every_row_and_says_so_once(tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if k not in ("choice_type", "id", "exp")} for r in MEDMCQA]
    got = data.load_rows("medmcqa", write_jsonl(tmp_path / "m.jsonl", rows))
    assert len(got) == 3
    err = capsys.readouterr().err
    assert err.count("no choice_type column") == 1 and "m.jsonl" in err
    # the training text works without exp; the explanation part is simply absent
    assert data.medmcqa_train_text(got[0]).endswith("Answer: C. Vitamin C")


def test_triviaqa_parquet_keeps_nested_answer(tmp_path):
    rows = data.load_rows("triviaqa", write_parquet(tmp_path / "t.parquet", TRIVIA))
    assert rows[0]["answer"]["aliases"] == ["Paris", "City of Light"]
    assert data.triviaqa_aliases(rows[1]) == ["Antelopes"]  # aliases only (the paper): not value, not normalized_*


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "txt"])
def test_wikitext_keeps_nonempty_rows_stripped(tmp_path, fmt):
    if fmt == "txt":
        path = tmp_path / "wiki.test.raw"
        path.write_text("".join(r["text"] or "\n" for r in WIKI))
    else:
        path = (write_parquet if fmt == "parquet" else write_jsonl)(tmp_path / f"w.{fmt}", WIKI)
    rows = data.load_rows("wikitext", str(path))
    assert [r["text"] for r in rows] == ["= Robert Boulter =", "He is an actor .", "In 2006 , he starred ."]
    assert len(data.load_rows("wikitext", str(path), limit=2)) == 2


def test_hub_download_is_a_dataset_snapshot_of_the_split(tmp_path, monkeypatch):
    """The Hub path: snapshot_download(repo, repo_type="dataset", allow_patterns=[folder/split-*.parquet]),
    then every shard of the split, in order."""
    import huggingface_hub
    snap = tmp_path / "snapshot"
    (snap / "rc.nocontext").mkdir(parents=True)
    write_parquet(snap / "rc.nocontext" / "validation-00000-of-00002.parquet", TRIVIA[:1])
    write_parquet(snap / "rc.nocontext" / "validation-00001-of-00002.parquet", TRIVIA[1:])
    write_parquet(snap / "rc.nocontext" / "train-00000-of-00001.parquet", TRIVIA[:1])
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    rows = data.load_rows("triviaqa")
    assert [r["question_id"] for r in rows] == ["t1", "t2"]
    assert calls[0][0] == "mandarjoshi/trivia_qa"
    assert calls[0][1]["repo_type"] == "dataset"
    assert calls[0][1]["allow_patterns"] == ["rc.nocontext/validation-*.parquet"]
    # a folder in the Hub layout works as a local path too
    assert len(data.load_rows("triviaqa", str(snap), split="train")) == 1
    # a split the snapshot lacks, and a Hub that cannot be reached, are clear errors
    with pytest.raises(FileNotFoundError, match="no file matches rc.nocontext/test"):
        data.load_rows("triviaqa", split="test")

    def offline(repo_id, **kw):
        raise OSError("offline and not in the cache\nsecond line of huggingface_hub's text")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="could not fetch OpenAssistant/oasst1 data/train") as e:
        data.load_rows("oasst1")
    assert "\n" not in str(e.value) and str(e.value).endswith(  # one line, saying what to give instead
        "offline, give a local file in its columns: --data oasst1=FILE or train.py --retrofit-task text:FILE")
    for name in ("medmcqa", "hellaswag"):
        with pytest.raises(FileNotFoundError, match=f"--data {name}=FILE$"):
            data.load_rows(name)


def test_loading_errors_name_the_path_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file: .*nope.jsonl"):
        data.load_rows("medmcqa", str(tmp_path / "nope.jsonl"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "opa": "a"}])
    with pytest.raises(ValueError, match=r"bad.jsonl: row 0 lacks column\(s\) opb, opc, opd, cop"):
        data.load_rows("medmcqa", bad)
    bad = write_parquet(tmp_path / "bad.parquet", [{"query": "q"}])
    with pytest.raises(ValueError, match="bad.parquet: row 0 lacks column.*question"):
        data.load_rows("triviaqa", bad)
    only_multi = write_jsonl(tmp_path / "multi.jsonl", MEDMCQA[1:2])
    with pytest.raises(ValueError, match="multi.jsonl: no medmcqa rows left after filtering"):
        data.load_rows("medmcqa", only_multi)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no rows"):
        data.load_rows("wikitext", str(empty))
    with pytest.raises(ValueError, match="limit must be at least 1"):
        data.load_rows("wikitext", str(empty), limit=0)
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="garbled.jsonl: line 2 is not JSON"):
        data.load_rows("wikitext", str(garbled))
    with pytest.raises(ValueError, match="unsupported file type"):
        data.load_rows("medmcqa", _touch(tmp_path / "m.csv"))
    with pytest.raises(ValueError, match="unknown dataset 'mmlu'"):
        data.load_rows("mmlu")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        data.load_rows("wikitext", _touch(tmp_path / "broken.parquet"))


def test_bad_rows_stop_with_file_row_and_field(tmp_path):
    """The one row check (data.row_problem) runs in load_rows, so train.py and eval.py stop on the same rows with
    a one-line error naming the file, the row (from 0) and the field; nothing is skipped silently."""
    def rows_with(i, **change):
        rows = [dict(r) for r in MEDMCQA]
        rows[i].update(change)
        return rows

    for fmt, write in (("jsonl", write_jsonl), ("parquet", write_parquet)):
        path = write(tmp_path / f"null.{fmt}", rows_with(2, opd=None))
        with pytest.raises(ValueError, match=rf"^{re.escape(path)}: row 2: opd must be a string, got None$"):
            data.load_rows("medmcqa", path)
    path = write_jsonl(tmp_path / "cop.jsonl", rows_with(2, cop=4))
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: row 2: cop must be 0\.\.3 .*got 4$"):
        data.load_rows("medmcqa", path)
    path = write_jsonl(tmp_path / "question.jsonl", rows_with(0, question=["a list"]))
    with pytest.raises(ValueError, match=r"question.jsonl: row 0: question must be a string"):
        data.load_rows("medmcqa", path)
    # rows that filtering (row 1 is multi-choice) or the limit leave out are never read, so never an error
    assert len(data.load_rows("medmcqa", write_jsonl(tmp_path / "multi.jsonl", rows_with(1, opa=None)))) == 2
    assert len(data.load_rows("medmcqa", write_jsonl(tmp_path / "late.jsonl", rows_with(2, cop=-1)), limit=1)) == 1

    def trivia_with(answer):
        return [TRIVIA[0], {**TRIVIA[1], "answer": answer}]

    for answer, problem in [({"value": "x", "aliases": ["", None]}, r"answer\.aliases: no answer aliases"),
                            ({"value": "x", "aliases": []}, r"answer\.aliases: no answer aliases"),
                            ({"value": "x"}, r"answer\.aliases must be a list of strings, got None"),
                            (None, "answer must be an object with aliases, got None")]:
        path = write_jsonl(tmp_path / "t.jsonl", trivia_with(answer))
        with pytest.raises(ValueError, match=rf"^{re.escape(path)}: row 1: {problem}"):
            data.load_rows("triviaqa", path)
    assert data.triviaqa_aliases(trivia_with({"value": "x", "aliases": ["", "Paris", "Paris"]})[1]) == ["Paris"]
    # rows given directly (not from load_rows) go through the same check when a prompt is built: the training
    # text of a row with a null option is an error, not "D. None"
    with pytest.raises(ValueError, match=r"medmcqa row 'q1': opd must be a string, got None"):
        data.medmcqa_train_text({**MEDMCQA[0], "opd": None})


def test_non_utf8_files_name_the_line(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: line 3 is not UTF-8 text \(byte 0xe9 at column 14"):
        data.load_rows("wikitext", str(bad))
    raw = tmp_path / "wiki.test.raw"
    raw.write_bytes("= Title =\n".encode() * 3000 + b"caf\xe9\n")  # past the first read buffer
    with pytest.raises(ValueError, match=rf"^{re.escape(str(raw))}: line 3001 is not UTF-8 text"):
        data.load_rows("wikitext", str(raw))


def _touch(path):
    path.write_text("x")
    return str(path)


# --- prompts ----------------------------------------------------------------------------------------


def test_prompt_strings_are_exact():
    context, conts, target = data.medmcqa_eval_item(MEDMCQA[0])
    assert context == ("Medical exam question:\nQuestion: Which vitamin prevents scurvy?\nA. Vitamin A\n"
                       "B. Vitamin B12\nC. Vitamin C\nD. Vitamin D\nAnswer:")
    assert conts == [" A. Vitamin A", " B. Vitamin B12", " C. Vitamin C", " D. Vitamin D"] and target == 2
    assert data.medmcqa_train_text(MEDMCQA[0]) == context + " C. Vitamin C\nExplanation: Ascorbic acid."
    assert data.medmcqa_train_text(MEDMCQA[2]).endswith("\nAnswer: C. 4")  # empty exp: no explanation line
    assert data.triviaqa_prompt(TRIVIA[0]) == "Question: What is the capital of France?\nAnswer:"
    with pytest.raises(ValueError, match="cop must be 0..3"):
        data.medmcqa_eval_item({**MEDMCQA[0], "cop": -1})
    with pytest.raises(ValueError, match="no answer aliases"):
        data.triviaqa_aliases({"question": "q", "answer": {"value": "", "aliases": []}})


def oasst_rows():
    def m(mid, parent, role, text, lang="en", **kw):
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "lang": lang,
                "deleted": False, "review_result": True, **kw}
    return [
        m("p1", None, "prompter", "Hi?"),
        m("a1", "p1", "assistant", "Hello!"),
        m("a2", "p1", "assistant", "Hey."),
        m("p2", "a1", "prompter", "How are you?"),
        m("a3", "p2", "assistant", "Fine."),
        m("a4", "p2", "assistant", "Deleted reply.", deleted=True),
        m("a5", "p2", "assistant", "Rejected reply.", review_result=False),
        m("p3", None, "prompter", "Hola?", lang="es"),
        m("a6", "p3", "assistant", "Hola."),  # the reply says en, its prompt es: the chain is not all English
        m("a7", "missing", "assistant", "Orphan."),  # its parent is not in the rows
    ]


def test_oasst1_conversations_are_each_reply_with_its_chain():
    convs = data.oasst1_conversations(oasst_rows())
    assert convs == [
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hey."}],
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."}],
    ]
    every_lang = data.oasst1_conversations(oasst_rows(), lang=None)
    assert len(every_lang) == 4 and every_lang[-1][0]["content"] == "Hola?"


def test_oasst1_loads_from_parquet(tmp_path):
    path = write_parquet(tmp_path / "o.parquet", oasst_rows())
    assert len(data.oasst1_conversations(data.load_rows("oasst1", path))) == 3


# --- tokenization, shuffling, batching ---------------------------------------------------------------


def test_encode_text_is_plain_tokens_with_full_loss(tok):
    ids, mask = data.encode_text(tok, "The quick brown fox", max_len=1000)
    assert ids == tok.encode("The quick brown fox") and mask == [1] * len(ids)
    ids3, mask3 = data.encode_text(tok, "The quick brown fox", max_len=3)
    assert ids3 == ids[:3] and mask3 == [1, 1, 1]


def test_encode_chat_loss_only_on_assistant_replies(tok):
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]
    ids, mask = data.encode_chat(tok, messages, max_len=1000)
    assert ids == tok.encode(tok.apply_chat_template(messages))  # the exact tokens of the whole template
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<|im_end|>Because.<|im_end|>"
    # the masked-in tokens form exactly two runs (the two replies), each ending on <|im_end|>
    im_end = tok.token_to_id("<|im_end|>")
    runs = [j for j in range(len(mask)) if mask[j] and (j + 1 == len(mask) or not mask[j + 1])]
    assert len(runs) == 2 and all(ids[j] == im_end for j in runs)
    short_ids, short_mask = data.encode_chat(tok, messages, max_len=10)
    assert short_ids == ids[:10] and short_mask == mask[:10]


def test_epoch_order_is_a_deterministic_permutation():
    a = data.epoch_order(50, seed=1, epoch=0)
    assert sorted(a) == list(range(50))
    assert a == data.epoch_order(50, seed=1, epoch=0)
    assert a != data.epoch_order(50, seed=1, epoch=1)
    assert a != data.epoch_order(50, seed=2, epoch=0)


def test_micro_batches_never_span_two_epochs():
    """10 examples, steps of 4 in micro-batches of 2: 2 steps per epoch (the remainder of 2 is skipped), each step
    the next 4 of its epoch's shuffle, step 2 the first of epoch 1."""
    examples = [([100 + i, 1, 2][:2 + i % 2], [1, 1, 1][:2 + i % 2]) for i in range(10)]
    stream = data.MicroBatches(examples, batch_size=4, micro=2, seed=3, pad_id=0, device="cpu")
    assert stream.per_epoch == 2

    def firsts(s):  # each example of step s by its first token
        got = [b["idx"][:, 0].tolist() for b, _ in stream.step(s)]
        assert [len(g) for g in got] == [2, 2]
        return [t - 100 for g in got for t in g]
    for s in range(5):
        epoch, i = divmod(s, 2)
        assert firsts(s) == data.epoch_order(10, 3, epoch)[4 * i:4 * i + 4]
    # the loss tokens of each micro-batch: every loss position but each example's first (it predicts nothing)
    assert [n for _, n in stream.step(0)] == [sum(len(examples[j][0]) - 1 for j in data.epoch_order(10, 3, 0)[k:k + 2])
                                             for k in (0, 2)]


def test_micro_batches_keep_groups_together_and_shuffle_them():
    """12 examples in groups of 3, steps of 6: each step holds two whole groups, each in its own order; the epoch
    shuffles the groups (epoch_order over the 4 groups); group 1 is the examples' own shuffle, as before."""
    examples = [([100 + i, 1], [1, 1]) for i in range(12)]
    stream = data.MicroBatches(examples, batch_size=6, micro=3, seed=5, pad_id=0, device="cpu", group=3)
    for s in range(4):
        epoch, i = divmod(s, 2)
        groups = data.epoch_order(4, 5, epoch)[2 * i:2 * i + 2]
        got = [t - 100 for b, _ in stream.step(s) for t in b["idx"][:, 0].tolist()]
        assert got == [3 * g + j for g in groups for j in range(3)]
    assert data.MicroBatches(examples, 6, 3, 5, 0, "cpu").order(0) == data.epoch_order(12, 5, 0)
    with pytest.raises(ValueError, match=r"--group-size 5: .*\(12\)"):  # 12 examples are not groups of 5
        data.MicroBatches(examples, 10, 10, 5, 0, "cpu", group=5)


def test_training_examples_drop_those_with_nothing_to_predict(tok, tmp_path, capsys):
    """A one-token text has a loss mask on its first token only, which predicts nothing: dropped, and said."""
    one = next(w for w in ("a", "the", "x") if len(tok.encode(w)) == 1)
    path = tmp_path / "t.txt"
    path.write_text(f"{one}\nthe patient has a fever and a cough\n")
    got = data.training_examples(f"text:{path}", tok, 64, 0)
    assert [ids for ids, _ in got] == [tok.encode("the patient has a fever and a cough")]
    assert "dropped 1 of 2 examples with no token to predict" in capsys.readouterr().err


def test_collate_right_pads_and_masks_labels():
    batch = data.collate([([5, 6, 7], [0, 1, 1]), ([8], [1])], pad_id=0)
    assert batch["idx"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(v.dtype == torch.long for v in batch.values())
    with pytest.raises(ValueError, match="example 0: 2 ids but 1 loss_mask"):
        data.collate([([1, 2], [1])], pad_id=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_matches_torch_pad_sequence(side):
    seqs = [[5, 6, 7], [8], [], [9, 10]]
    ids, mask = data.pad(seqs, pad_id=3, side=side)
    want = torch.nn.utils.rnn.pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], batch_first=True,
                                           padding_value=3, padding_side=side)
    assert torch.equal(ids, want) and ids.dtype == mask.dtype == torch.long
    ones = [torch.ones(len(s), dtype=torch.long) for s in seqs]
    assert torch.equal(mask, torch.nn.utils.rnn.pad_sequence(ones, batch_first=True, padding_side=side))
    assert ids[mask.bool()].tolist() == [t for s in seqs for t in s]  # the real tokens, in order
    with pytest.raises(ValueError, match="side must be 'right' or 'left'"):
        data.pad(seqs, 0, side="center")


# --- the real rows in ../shared/data/eval --------------------------------------------------------------


def test_real_eval_rows_parse(shared_data, capsys):
    d = os.path.join(shared_data, "eval")
    med = data.load_rows("medmcqa", os.path.join(d, "medmcqa_validation.jsonl"))
    assert len(med) == 4183  # no choice_type column: every row kept, and said once
    assert capsys.readouterr().err.count("no choice_type") == 1
    items = [data.medmcqa_eval_item(r) for r in med]
    assert {t for _, _, t in items} == {0, 1, 2, 3}
    tqa = data.load_rows("triviaqa", os.path.join(d, "triviaqa_sample.jsonl"))
    assert len(tqa) == 3000
    aliases = [data.triviaqa_aliases(r) for r in tqa]  # no normalized_aliases in this file; no error
    assert all(r["answer"]["value"] in a for r, a in zip(tqa, aliases))
    wiki = data.load_rows("wikitext", os.path.join(d, "wikitext-103-v1_test.jsonl"), limit=1000)
    assert len(wiki) == 1000 and wiki[0]["text"] == "= Robert Boulter ="
    raw = data.load_rows("wikitext", os.path.join(d, "wikitext-2-raw-v1_test.raw"), limit=3)
    assert raw[0]["text"] == "= Robert Boulter =" and "Menier" in raw[1]["text"]


def test_hub_path_works_offline_from_the_hub_cache(tmp_path):
    """The real huggingface_hub code path with HF_HUB_OFFLINE=1: files already in the cache (laid out as
    huggingface_hub caches a dataset repo) are found without any network call."""
    import subprocess
    import sys
    from conftest import ROOT
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--openlifescienceai--medmcqa"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "data").mkdir(parents=True)
    write_parquet(repo / "snapshots" / commit / "data" / "validation-00000-of-00001.parquet", MEDMCQA)
    code = "import data; print([r['id'] for r in data.load_rows('medmcqa')])"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['q1', 'q3']"
    # a dataset that is not in the cache: a clear error, not a hang
    code = "import data; data.load_rows('wikitext')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0 and "FileNotFoundError: could not fetch Salesforce/wikitext" in proc.stderr


def test_collate_pads_to_a_multiple_for_compiled_models():
    batch = data.collate([([5, 6, 7], [1, 1, 1]), ([8] * 70, [1] * 70)], pad_id=0, multiple=64)
    assert batch["idx"].shape == (2, 128) and batch["attention_mask"].sum().item() == 73
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert data.collate([([5, 6, 7], [1, 1, 1])], pad_id=0)["idx"].shape == (1, 3)


def paper_medmcqa_text(example):
    """smf_rebuild/datasets.py's MedMCQA to_text (github.com/prakharg55/SMF-ICML), written out for comparison."""
    options = [example["opa"], example["opb"], example["opc"], example["opd"]]
    idx = int(example["cop"])
    explanation = (example.get("exp") or "").strip()
    text = ("Medical exam question:\n" f"Question: {example['question']}\n" f"A. {options[0]}\n" f"B. {options[1]}\n"
            f"C. {options[2]}\n" f"D. {options[3]}\n" f"Answer: {'ABCD'[idx]}. {options[idx]}")
    return text + f"\nExplanation: {explanation}" if explanation else text


@pytest.mark.parametrize("exp", ["  Ascorbic acid.\n ", "\tAscorbic acid.", " \n\t ", "", None])
def test_medmcqa_training_text_strips_the_explanation_as_the_paper(exp):
    row = {**MEDMCQA[0], "exp": exp}
    assert data.medmcqa_train_text(row) == paper_medmcqa_text(row)
    assert data.medmcqa_train_text(row).endswith(("\nExplanation: Ascorbic acid.", "Answer: C. Vitamin C"))


def test_empty_data_is_named_for_what_it_lacks(tok, tmp_path):
    """An empty text:FILE says the file has no text (not "no wikitext rows"); OASST1 rows none of which pass the
    filter say which filter (not "none with a token to predict")."""
    from tiny_data import oasst1_rows
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match=re.escape(f"text:{empty}: no text in {empty}")):
        data.training_examples(f"text:{empty}", tok, 64, 0)
    rows = oasst1_rows(5)
    for r in rows:
        r["lang"] = "de"
    german = write_jsonl(str(tmp_path / "de.jsonl"), rows)
    for fmt, kept in (("replies", "English assistant replies ranked 0 or 1"), ("chat", "English conversations")):
        with pytest.raises(ValueError, match=f"oasst1: no example in {re.escape(german)} passes the filter: it keeps "
                                             f"{kept}"):
            data.training_examples("oasst1", tok, 64, 0, path=german, oasst1_format=fmt)


# -----------------------------------------------------------------------------
# The tokenizer: Qwen2.5's files, ChatML, the BPE trainer


os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "Hello world",
    "What is 2+2?",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\n\n\nthree newlines\r\nand CRLF\n",
    "tabs\tand\t\tmixed \t whitespace\n \n",
    "numbers 1234567890 3.14159 -42 1e-6 1,000,000",
    "contractions: I'm, you're, he's, it'd, we'll, they've, DON'T, I'M",
    "unicode: naïve café, Größe, Ελληνικά, русский, 日本語のテキスト, 中文分词, 한국어",
    "emoji 🙂🚀👍🏽 and symbols ©®™ ≤≥ ∑∫ →",
    "NFC-sensitive: cafe\u0301 vs caf\u00e9, A\u030a vs \u00c5, \u1e9b\u0323",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|>",
    "Question: Which vitamin deficiency causes scurvy?\nA. Vitamin A\nB. Vitamin B12\nC. Vitamin C\nD. Vitamin D\n",
    "http://example.com/path?query=1&b=2 user@example.org",
    "!!!??? ... --- ___ '''\"\"\"",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke.\nA short one."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
    [{"role": "user", "content": "日本語で答えて: 2+2?"}],
]


@pytest.fixture(scope="module")
def qwen_dir():
    from conftest import SHARED
    path = os.path.join(SHARED, "qwen2.5-0.5b-instruct")
    if not os.path.isfile(os.path.join(path, "vocab.json")):
        pytest.skip("../shared/data/qwen2.5-0.5b-instruct is not present")
    return path


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    assert not os.path.exists(os.path.join(qwen_dir, "tokenizer.json"))  # so this tests the BPE we build
    return Tokenizer.from_pretrained(qwen_dir)


@pytest.fixture(scope="module")
def hf_qwen(qwen_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(qwen_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_real_tokenizer_matches_transformers(text, qwen, hf_qwen):
    ids = qwen.encode(text)
    assert ids == hf_qwen.encode(text, add_special_tokens=False)
    assert qwen.decode(ids) == hf_qwen.decode(ids)
    assert qwen.decode(ids) == unicodedata.normalize("NFC", text)  # round trip, up to NFC normalization


def test_real_tokenizer_batch_and_nfc(qwen):
    assert qwen.encode_batch(TEXTS) == [qwen.encode(t) for t in TEXTS]
    decomposed = "cafe\u0301"
    assert qwen.encode(decomposed) == qwen.encode(unicodedata.normalize("NFC", decomposed))
    assert qwen.decode(qwen.encode(decomposed)) == "caf\u00e9"
    assert qwen.encode("2024") == [qwen.token_to_id(d) for d in "2024"]  # one digit per token


def test_real_tokenizer_special_ids(qwen):
    assert qwen.token_to_id("<|endoftext|>") == 151643
    assert qwen.token_to_id("<|im_start|>") == 151644
    assert qwen.token_to_id("<|im_end|>") == 151645
    assert (qwen.eos_id, qwen.pad_id, qwen.stop_ids) == (151645, 151643, [151645, 151643])
    assert qwen.vocab_size == 151665
    assert qwen.encode("<|im_start|>user<|im_end|>") == [151644, 872, 151645]
    ids = qwen.encode("a<|im_end|>b")
    assert qwen.decode(ids, skip_special_tokens=True) == "ab"


def test_default_chat_prompt_ids(qwen):
    text = qwen.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    ids = qwen.encode(text)
    assert len(ids) == 36
    assert ids[:8] == [151644, 8948, 198, 2610, 525, 1207, 16948, 11]
    assert ids[-3:] == [151644, 77091, 198]  # <|im_start|> assistant \n


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(i, generation_prompt, qwen, hf_qwen):
    messages = CONVERSATIONS[i]
    got = qwen.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    want = hf_qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert got == want
    assert qwen.encode(got) == hf_qwen.encode(want, add_special_tokens=False)


# --- the tiny fixture's tokenizer.json ------------------------------------------------------------


def test_tiny_tokenizer_matches_transformers(tiny_model_dir):
    """tokenizer.json read as written. (transformers 5's Qwen2Tokenizer class would swap in Qwen2's NFC and
    split regex whatever the file says; the real Qwen2.5 tokenizer.json has exactly those, the tiny one not.)"""
    from transformers import PreTrainedTokenizerFast
    ours = Tokenizer.from_pretrained(tiny_model_dir)
    ref = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tiny_model_dir, "tokenizer.json"),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids) == text
    assert ours.eos_id == ours.token_to_id("<|im_end|>") == ref.eos_token_id
    assert ours.pad_id == ours.token_to_id("<|endoftext|>") == ref.pad_token_id
    assert ours.stop_ids == [ours.eos_id, ours.pad_id]
    ids = ours.encode("<|im_start|>system\nhi<|im_end|>\n")
    assert ids[0] == ours.token_to_id("<|im_start|>") and ours.token_to_id("<|im_end|>") in ids
    assert ours.decode(ids, skip_special_tokens=True) == "system\nhi\n"


def test_missing_tokenizer_files_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))
