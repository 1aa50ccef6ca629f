"""
Datasets, prompts and tokenization: MedMCQA (the task), TriviaQA and WikiText (the forgetting probes), OASST1
(stage-1 data); the model's tokenizer with its chat template (Tokenizer); examples into batches (MicroBatches).

Rows come from the Hugging Face Hub (dataset repos, parquet files read with pyarrow, cached by huggingface_hub,
so `HF_HUB_OFFLINE=1` serves them from the cache) or from a local file in the Hub's column schema:

    name      Hub repo (config)                         default split  columns used (optional in brackets)
    medmcqa   openlifescienceai/medmcqa                 validation     question opa opb opc opd cop [choice_type exp id]
    triviaqa  mandarjoshi/trivia_qa (rc.nocontext)      validation     question answer{aliases}
    wikitext  Salesforce/wikitext (wikitext-103-v1)     test           text
    oasst1    OpenAssistant/oasst1                      train          message_id parent_id role text [lang rank
                                                                       deleted review_result]

(DATASETS below; any other name is read from a local file as it is.) A local file is a `.parquet`, a `.jsonl`
(one JSON object per line), or for WikiText any other text file (one row per line); a local directory is
searched like a Hub snapshot (`{config}/{split}-*.parquet`).

Prompt formats (as the paper's code, github.com/prakharg55/SMF-ICML, writes them; the exact strings are below):

    MedMCQA eval context   "Medical exam question:\\nQuestion: {question}\\nA. {opa}\\nB. {opb}\\nC. {opc}\\n"
                           "D. {opd}\\nAnswer:"
    MedMCQA continuations  " A. {opa}", " B. {opb}", " C. {opc}", " D. {opd}"
    MedMCQA training text  eval context + " {X}. {option}" + "\\nExplanation: {exp}" (the last part only when exp is
                           non-empty), i.e. the eval prompt followed by its correct continuation; loss on all tokens
    TriviaQA prompt        "Question: {question}\\nAnswer:"
    OASST1 replies         each English reply ranked 0 or 1 with 50+ characters, as raw text (the paper's)
    OASST1 chats           the model's chat template (Tokenizer.apply_chat_template); loss on the
                           assistant replies only (each reply's text and its closing <|im_end|>)

Tokenized examples are (ids, loss_mask) pairs; `collate` right-pads them into a batch whose `labels` hold the
token id where the loss applies and -100 elsewhere, aligned with `idx` (the caller shifts: logits[:, t] predicts
labels[:, t + 1], as in Hugging Face).
"""

import fnmatch
import functools
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from model import hub_download, read_json, resolve_model_dir

# -----------------------------------------------------------------------------
# Where each dataset lives

@dataclass(frozen=True)
class Dataset:
    repo: str                 # the Hub dataset repo
    folder: str               # its folder of parquet files = the dataset config
    split: str                # load_rows' default split
    required: tuple = ()      # columns every row must have
    optional: tuple = ()      # columns read when present


# The datasets load_rows knows by name (any other name needs a local file). A new one is one entry here.
DATASETS = {
    "medmcqa": Dataset("openlifescienceai/medmcqa", "data", "validation",
                       ("question", "opa", "opb", "opc", "opd", "cop"),
                       ("id", "choice_type", "exp", "subject_name", "topic_name")),
    "triviaqa": Dataset("mandarjoshi/trivia_qa", "rc.nocontext", "validation", ("question", "answer"),
                        ("question_id",)),
    "wikitext": Dataset("Salesforce/wikitext", "wikitext-103-v1", "test", ("text",)),
    "oasst1": Dataset("OpenAssistant/oasst1", "data", "train", ("message_id", "parent_id", "role", "text"),
                      ("lang", "deleted", "review_result", "message_tree_id", "rank")),
    # the paper code's other two probes (eval_tasks.py loads "hellaswag" and "gsm8k" "main"; these are their Hub
    # repos, hellaswag's parquet files expected under data/{split}-*.parquet)
    "hellaswag": Dataset("Rowan/hellaswag", "data", "validation", ("ctx", "endings", "label"),
                         ("ind", "activity_label", "source_id", "split", "split_type")),
    "gsm8k": Dataset("openai/gsm8k", "main", "test", ("question", "answer")),
}


@functools.lru_cache(maxsize=None)  # each notice once a process (a file read twice is noted once)
def warn(msg: str):
    print(f"data: {msg}", file=sys.stderr)


def hub_files(name: str, split: str, config: str | None = None, revision: str | None = None) -> list[str]:
    """Download (or find in the cache) the parquet files of one split; return their local paths, sorted."""
    repo, folder = DATASETS[name].repo, config or DATASETS[name].folder
    pattern = f"{folder}/{split}-*.parquet"
    instead = f"--data {name}=FILE" + (" or train.py --retrofit-task text:FILE" if name == "oasst1" else "")
    root = hub_download(repo, f"{repo} {pattern}", f"give a local file in its columns: {instead}", repo_type="dataset",
                        revision=revision, allow_patterns=[pattern])
    files = split_files(root, folder, split)
    if not files:
        raise FileNotFoundError(f"{repo}: no file matches {pattern} (is the split or config name right?)")
    return files


def split_files(root: str, folder: str, split: str) -> list[str]:
    """`{root}/{folder}/{split}-*.parquet`, the Hub's layout of a parquet dataset."""
    d = os.path.join(root, folder)
    if not os.path.isdir(d):
        return []
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if fnmatch.fnmatch(f, f"{split}-*.parquet")]


# -----------------------------------------------------------------------------
# Reading rows


def read_parquet(path: str, columns: list[str] | None) -> list[dict]:
    """The rows of a parquet file, only the named columns that it has (None: all)."""
    import pyarrow.parquet as pq
    try:
        have = pq.read_schema(path).names
        return pq.read_table(path, columns=[c for c in columns or have if c in have]).to_pylist()
    except Exception as e:
        raise ValueError(f"{path}: not a readable parquet file: {e}") from e


def read_jsonl(path: str) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i} is not JSON: {e}") from e
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {i} is not a JSON object")
                rows.append(row)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    return rows


def read_text_lines(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [{"text": line} for line in f.read().split("\n")]
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def not_utf8(path: str) -> ValueError:
    """The error for a text file that is not UTF-8, naming its first undecodable line (counted from 1)."""
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return ValueError(f"{path}: line {i} is not UTF-8 text (byte {line[e.start]:#04x} at column "
                                  f"{e.start + 1}); re-encode the file as UTF-8")
    return ValueError(f"{path}: not UTF-8 text")


def read_file(name: str, path: str, columns: list[str]) -> list[dict]:
    """The rows of one local file: .parquet, .jsonl, or for WikiText any other text file (one row per line)."""
    if path.endswith(".parquet"):
        return read_parquet(path, columns)
    if path.endswith(".jsonl"):
        return read_jsonl(path)
    if name == "wikitext":
        return read_text_lines(path)
    raise ValueError(f"{path}: unsupported file type for {name} (use .parquet or .jsonl)")


def row_problem(name: str, row: dict) -> str | None:
    """
    What makes a row unusable for training or eval, naming the field, or None. The one check of row values that
    load_rows, train.py and eval.py all go through (load_rows for every row it returns, the prompt builders below
    for rows given directly):
        medmcqa   question and the four options opa..opd are strings (a null option would train on "D. None");
                  cop is 0..3 (the test split has -1: no answers)
        triviaqa  question is a string; answer.aliases is a list of strings with at least one non-empty one
        hellaswag ctx is a string; endings a list of 4 strings; label 0..3 (the Hub's is a string; the test split
                  has "": no answers)
        gsm8k     question is a string; answer a string with the final answer after "####"
    """
    def not_str(field):
        v = row.get(field)
        return None if isinstance(v, str) else f"{field} must be a string, got {short(v)}"

    if name == "medmcqa":
        for field in ("question", "opa", "opb", "opc", "opd"):
            if (problem := not_str(field)) is not None:
                return problem
        if row.get("cop") not in (0, 1, 2, 3):
            return f"cop must be 0..3 (the test split has no answers), got {short(row.get('cop'))}"
    elif name == "triviaqa":
        if (problem := not_str("question")) is not None:
            return problem
        answer = row.get("answer")
        if not isinstance(answer, dict):
            return f"answer must be an object with aliases, got {short(answer)}"
        aliases = answer.get("aliases")
        if not isinstance(aliases, list) or not all(a is None or isinstance(a, str) for a in aliases):
            return f"answer.aliases must be a list of strings, got {short(aliases)}"
        if not any(aliases):
            return f"answer.aliases: no answer aliases once empty ones are dropped, got {short(aliases)}"
    elif name == "hellaswag":
        if (problem := not_str("ctx")) is not None:
            return problem
        endings = row.get("endings")
        if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
            return f"endings must be a list of 4 strings, got {short(endings)}"
        if str(row.get("label")) not in ("0", "1", "2", "3"):
            return f"label must be 0..3 (the test split has no answers), got {short(row.get('label'))}"
    elif name == "gsm8k":
        for field in ("question", "answer"):
            if (problem := not_str(field)) is not None:
                return problem
        if "####" not in row["answer"]:
            return f"answer has no final answer after '####', got {short(row['answer'])}"
    return None


def parse_data_flags(items: list[str], names) -> dict:
    """--data NAME=PATH flags (train.py's and eval.py's) -> {name: absolute path}, NAME one of `names`; a
    ValueError naming the bad flag."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--data expects NAME=PATH, got {item!r}")
        if name not in names:
            raise ValueError(f"--data: unknown dataset {name!r} here (choose from {', '.join(names)})")
        if not os.path.exists(path):
            raise ValueError(f"--data {name}: file not found: {path}")
        out[name] = os.path.abspath(path)
    return out


def check_task(task: str, known: str) -> str:
    """A --task value: the known task's name, or text:PATH with PATH made absolute; a ValueError otherwise."""
    if not task.startswith("text:"):
        if task != known:
            raise ValueError(f"unknown task {task!r} (expected {known} or text:PATH)")
        return task
    if not os.path.exists(task[5:]):
        raise ValueError(f"file not found: {task[5:]}")
    return "text:" + os.path.abspath(task[5:])


def short(value, n: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= n else r[:n] + "..."


def check_row(name: str, row: dict) -> dict:
    """row, or a ValueError naming the row (its id or question) and the field, for rows not read by load_rows."""
    problem = row_problem(name, row)
    if problem is not None:
        key = row.get("id") or row.get("question_id") or row.get("question")
        raise ValueError(f"{name} row {short(key)}: {problem}")
    return row


def load_rows(name: str, path: str | None = None, split: str | None = None, limit: int | None = None, *,
              config: str | None = None, single_only: bool = True) -> list[dict]:
    """
    The rows of one dataset split as dicts with the Hub's column names; the first `limit` after filtering.
    path: a local .parquet / .jsonl (WikiText: also plain text) file or a folder in the Hub layout; None = the Hub.
    split: default DATASETS[name].split; config: the Hub folder (e.g. "wikitext-2-raw-v1"), default as in DATASETS.
    A name DATASETS does not know is read from its local path as it is: every column, no filtering, no checks.
    Filtering: MedMCQA keeps choice_type == "single" when single_only (the paper's train and eval sets; a file
    without choice_type keeps every row and says so); WikiText keeps the non-empty rows, stripped (the probe
    joins the first N with "\\n\\n"); OASST1 and TriviaQA keep every row (OASST1's `limit` counts message rows:
    prefer slicing the result of oasst1_conversations).
    Validation stops, it never skips: every row must have the required columns, and every row returned must pass
    row_problem; the ValueError names the file, the row (counted from 0 in that file's rows; a .jsonl's blank
    lines are not rows) and the field. A bad row that filtering or `limit` leaves out is not an error.
    """
    if name not in DATASETS and path is None:
        raise ValueError(f"unknown dataset {name!r}: give a local file (known on the Hub: {', '.join(DATASETS)})")
    if limit is not None and limit < 1:
        raise ValueError(f"{name}: limit must be at least 1, got {limit}")
    ds = DATASETS.get(name, Dataset("", "", split or "", (), ()))
    split = split or ds.split
    columns = list(ds.required + ds.optional) if name in DATASETS else None
    source = path or f"{ds.repo} split {split}"
    if path is None:
        files = hub_files(name, split, config)
    elif os.path.isdir(path):
        files = split_files(path, config or ds.folder, split)
        if not files:
            raise FileNotFoundError(f"{path}: no {config or ds.folder}/{split}-*.parquet in this folder")
    elif not os.path.exists(path):
        raise FileNotFoundError(f"{name}: no such file: {path}")
    else:
        files = [path]
    rows = [(f, i, r) for f in files for i, r in enumerate(read_file(name, f, columns))]  # (file, row number, row)
    if not rows:
        raise ValueError(f"{source}: no rows")
    for f, i, row in rows:
        missing = [c for c in ds.required if c not in row]
        if missing:
            raise ValueError(f"{f}: row {i} lacks column(s) {', '.join(missing)} "
                             f"(needed for {name}: {', '.join(ds.required)})")
    if name == "medmcqa" and single_only:
        if all("choice_type" in r for _, _, r in rows):
            rows = [(f, i, r) for f, i, r in rows if r["choice_type"] == "single"]
        else:
            warn(f"{source}: no choice_type column; keeping every row (cannot keep only single-answer questions)")
    if name == "wikitext":
        rows = [(f, i, {"text": r["text"].strip()}) for f, i, r in rows
                if r["text"] is not None and r["text"].strip()]
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise ValueError(f"{source}: no {name} rows left after filtering")
    for f, i, row in rows:
        problem = row_problem(name, row)
        if problem is not None:
            raise ValueError(f"{f}: row {i}: {problem}")
    return [r for _, _, r in rows]


# -----------------------------------------------------------------------------
# Prompts

LETTERS = "ABCD"


def medmcqa_context(row) -> str:
    return (f"Medical exam question:\nQuestion: {row['question']}\nA. {row['opa']}\nB. {row['opb']}\n"
            f"C. {row['opc']}\nD. {row['opd']}\nAnswer:")


def medmcqa_eval_item(row) -> tuple[str, list[str], int]:
    """(context, [" A. {opa}", " B. {opb}", " C. {opc}", " D. {opd}"], index of the correct continuation)."""
    check_row("medmcqa", row)
    options = [row["opa"], row["opb"], row["opc"], row["opd"]]
    return medmcqa_context(row), [f" {x}. {o}" for x, o in zip(LETTERS, options)], int(row["cop"])


def medmcqa_train_text(row) -> str:
    """The eval context, the correct continuation, then "\\nExplanation: {exp}" when the row has one."""
    context, continuations, target = medmcqa_eval_item(row)
    text = context + continuations[target]
    exp = (row.get("exp") or "").strip()
    return text + f"\nExplanation: {exp}" if exp else text


def hellaswag_item(row) -> tuple[str, list[str], int]:
    """(ctx, [" " + ending for the 4 endings], label), as the paper's eval_tasks.py scores them (ctx as given)."""
    check_row("hellaswag", row)
    return row["ctx"], [" " + e for e in row["endings"]], int(row["label"])


def gsm8k_prompt(row) -> str:
    check_row("gsm8k", row)
    return f"Question: {row['question']}\nLet's think step by step.\nAnswer:"


def gsm8k_gold(row) -> str:
    """The final answer: what follows the last "####", stripped, commas removed (a string, compared as one)."""
    return row["answer"].split("####")[-1].strip().replace(",", "")


def triviaqa_prompt(row) -> str:
    return f"Question: {row['question']}\nAnswer:"


def triviaqa_aliases(row) -> list[str]:
    """answer.aliases, deduplicated, as written (the probe normalizes them), as the paper's code reads them:
    answer.value is not added, and normalized_aliases is not used (the probe normalizes in its own way)."""
    check_row("triviaqa", row)
    return list(dict.fromkeys(a for a in row["answer"]["aliases"] if a))


def oasst1_conversations(rows, lang: str | None = "en") -> list[list[dict]]:
    """
    Flatten OASST1 message trees: one conversation per assistant reply, made of that reply and its chain of
    ancestors back to the tree's root prompt, as [{"role": "user"|"assistant", "content": text}, ...] (alternating,
    starting with the user). Taken: replies whose whole chain is present in `rows`, not deleted, not rejected by
    review (review_result False), with lang == `lang` for every message (lang None: any language). So a tree
    with several replies per prompt gives several conversations that share their beginning.
    """
    def usable(r):
        return (not r.get("deleted")) and r.get("review_result") is not False and bool(r.get("text"))

    if lang is not None and not all("lang" in r for r in rows):
        warn(f"OASST1 rows without a lang column; keeping every language (asked for {lang!r})")
        lang = None
    by_id = {r["message_id"]: r for r in rows if usable(r) and (lang is None or r["lang"] == lang)}
    conversations = []
    for r in rows:
        if r["role"] != "assistant" or r["message_id"] not in by_id:
            continue
        chain, m = [], r
        while m is not None:
            chain.append(m)
            if m["parent_id"] is None:
                break
            m = by_id.get(m["parent_id"])
            if m is None:  # an ancestor was filtered out or is absent
                chain = None
                break
        if chain is None:
            continue
        chain.reverse()
        roles = [m["role"] for m in chain]
        if roles != ["prompter", "assistant"] * (len(chain) // 2):
            continue
        conversations.append([{"role": "user" if m["role"] == "prompter" else "assistant", "content": m["text"]}
                              for m in chain])
    return conversations


def oasst1_replies(rows, min_chars: int = 50, source: str = "OASST1") -> list[str]:
    """
    The paper code's stage-1 text (its `oasst1` preset): the text alone of every English assistant reply
    ranked 0 or 1 among its siblings with at least min_chars characters, in the file's order. No prompt turns,
    no chat template; deleted or review-rejected rows are kept, as in the paper's filter.
    """
    if rows and not all("lang" in r and "rank" in r for r in rows):
        raise ValueError(f"{source}: OASST1 rows need the lang and rank columns for the paper's reply filter")
    return [r["text"] for r in rows if r["lang"] == "en" and r["role"] == "assistant"
            and r["rank"] in (0, 1) and len(r["text"] or "") >= min_chars]


def seeded_subset(n: int, size: int | None, seed: int) -> list[int]:
    """
    Indices of a random subset of range(n) as the paper's code draws it with Hugging Face datasets
    (`ds.shuffle(seed).select(range(size))`, i.e. numpy's default_rng(seed).permutation(n)[:size]), and all of
    range(n) in order when size is None or not smaller than n (its `_limit` leaves the set untouched then).
    """
    if size is None or size >= n:
        return list(range(n))
    return np.random.default_rng(seed).permutation(n)[:size].tolist()


# -----------------------------------------------------------------------------
# The tokenizer: Qwen2.5's (tokenizer.json, or vocab.json + merges.txt) with its ChatML template, and a small BPE
# trainer for the synthetic experiments' models

# Qwen2's pre-tokenizer: contractions, words, single digits, punctuation runs, newlines, spaces
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the model's own chat format: the Jinja chat template of its
    tokenizer_config.json (or chat_template.jinja), rendered as transformers renders it; Qwen2.5's ChatML where the
    folder has none (the tiny tokenizers this project trains)."""

    def __init__(self, tok, config: dict):
        self.tok = tok
        self.config = config
        self._template = None  # the chat template, compiled on first use

        def token_id(field):
            t = config.get(field)
            t = t.get("content") if isinstance(t, dict) else t
            return None if t is None else tok.token_to_id(t)

        self.eos_id = token_id("eos_token")
        self.pad_id = token_id("pad_token")
        self.special_ids = {tok.token_to_id(t.content) for t in tok.get_added_tokens_decoder().values() if t.special}

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        path = resolve_model_dir(name_or_path)
        cfg_path = os.path.join(path, "tokenizer_config.json")
        config = {}
        if os.path.exists(cfg_path):
            config = read_json(cfg_path)
        if os.path.exists(os.path.join(path, "chat_template.jinja")):  # transformers 5 writes the template there
            with open(os.path.join(path, "chat_template.jinja"), encoding="utf-8") as f:
                config = {**config, "chat_template": f.read()}
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            tok = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        elif os.path.exists(os.path.join(path, "vocab.json")) and os.path.exists(os.path.join(path, "merges.txt")):
            tok = build_bpe_tokenizer(path, config)
        else:
            raise FileNotFoundError(f"no tokenizer.json (nor vocab.json + merges.txt) in {path}")
        return cls(tok, config)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a reply: eos, and <|endoftext|> where the vocabulary has it (as generation_config says)."""
        ids = [self.eos_id, self.token_to_id("<|endoftext|>")]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the model's chat template writes it (no tools); text, not ids."""
        template = self.config.get("chat_template")
        if template is None:  # Qwen2.5's template, written out: a default system turn unless one is given
            text = "" if messages and messages[0]["role"] == "system" else \
                f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
            text += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if self._template is None:
            self._template = compile_chat_template(template)
        special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in self.config.items()
                   if k.endswith("_token")}  # bos_token, eos_token, ... as the template may use them
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


def compile_chat_template(template: str):
    """A Jinja chat template compiled as transformers compiles it (a sandbox, trim_blocks and lstrip_blocks, its
    tojson and raise_exception), so that the prompt is the one the model was trained with."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen's, so Tokenizer reads them alike


def train_bpe_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 1024) -> int:
    """Train a byte-level BPE on texts; write tokenizer.json and a tokenizer_config.json with Qwen's special tokens
    (eos <|im_end|>, pad <|endoftext|>). Returns the vocabulary size, specials included."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(BPE_SPECIALS), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(BPE_SPECIALS)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in BPE_SPECIALS}
    cfg = {"added_tokens_decoder": added, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "bos_token": None, "model_max_length": 4096, "tokenizer_class": "Qwen2Tokenizer"}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return tok.get_vocab_size()


def build_bpe_tokenizer(path: str, config: dict):
    """The byte-level BPE that tokenizer.json describes, built from vocab.json + merges.txt + added tokens."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    vocab = read_json(os.path.join(path, "vocab.json"))
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().split("\n") if line and not line.startswith("#version")]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for i, t in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
        added = AddedToken(t["content"], single_word=t.get("single_word", False), lstrip=t.get("lstrip", False),
                           rstrip=t.get("rstrip", False), normalized=t.get("normalized", False),
                           special=t.get("special", False))
        tok.add_special_tokens([added]) if t.get("special", False) else tok.add_tokens([added])
        if tok.token_to_id(t["content"]) != int(i):
            raise ValueError(f"tokenizer_config.json: added token {t['content']!r} got id "
                             f"{tok.token_to_id(t['content'])}, expected {i}")
    return tok


# -----------------------------------------------------------------------------
# Tokenization and batching


def encode_text(tok, text: str, max_len: int) -> tuple[list[int], list[int]]:
    """Plain text, no special tokens added; loss on every token; the first max_len tokens."""
    ids = tok.encode(text)[:max_len]
    return ids, [1] * len(ids)


def encode_chat(tok, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """
    The chat template of the whole conversation, tokenized at once (so the ids are exactly what the model sees);
    loss_mask is 1 on the tokens of each assistant reply and the eos token closing it (<|im_end|> in ChatML; found
    by the characters each token starts at), 0 on system and user turns and on the "<|im_start|>assistant\\n"
    headers. The first max_len tokens (a long conversation may lose its last reply, and then has no loss token).
    """
    text = tok.apply_chat_template(messages)
    eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
    spans = []  # character ranges [a, b) the loss is on
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
            if not text.startswith(head + m["content"]):
                raise ValueError("apply_chat_template is not a prefix-stable concatenation of turns")
            end = len(head) + len(m["content"])
            spans.append((len(head), end + len(eos) * text.startswith(eos, end)))
    enc = tok.tok.encode(text, add_special_tokens=False)
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc.offsets]
    return enc.ids[:max_len], mask[:max_len]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n), the same for the same (seed, epoch), different across epochs."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def pad(seqs: list[list[int]], pad_id: int, side: str = "right",
        multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The one padding function: token id lists -> ids (B, T) filled with pad_id, and attention_mask (B, T), 1 on the
    real tokens; T is the longest length rounded up to `multiple` (a few shapes for a compiled model). side "right"
    for training and scoring (real tokens from position 0), "left" for generation (every row ends with a real
    token). Both are LongTensors on the CPU.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    T = -(-max(len(s) for s in seqs) // multiple) * multiple
    if side == "right":
        ids = [list(s) + [pad_id] * (T - len(s)) for s in seqs]
        mask = [[1] * len(s) + [0] * (T - len(s)) for s in seqs]
    else:
        ids = [[pad_id] * (T - len(s)) + list(s) for s in seqs]
        mask = [[0] * (T - len(s)) + [1] * len(s) for s in seqs]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)  # built in Python: two ops


def collate(examples, pad_id: int, multiple: int = 1) -> dict:
    """[(ids, loss_mask), ...] -> right-padded LongTensors idx, attention_mask, labels (B, T), T a multiple of
    `multiple`."""
    for b, (ids, loss_mask) in enumerate(examples):
        if len(ids) != len(loss_mask):
            raise ValueError(f"example {b}: {len(ids)} ids but {len(loss_mask)} loss_mask entries")
    idx, attention_mask = pad([ids for ids, _ in examples], pad_id, multiple=multiple)
    labels, _ = pad([[t if m else -100 for t, m in zip(ids, loss_mask)] for ids, loss_mask in examples], -100,
                    multiple=multiple)
    return {"idx": idx, "attention_mask": attention_mask, "labels": labels}


def training_examples(task: str, tok, max_len: int, seed: int, limit: int | None = None, path: str | None = None,
                      oasst1_format: str = "chat") -> list[tuple[list[int], list[int]]]:
    """Tokenized examples [(ids, loss_mask)] of a seeded random `limit` of the task's examples (seeded_subset, as
    the paper's code draws its subsets): medmcqa text, text:PATH (a text file or a .jsonl of {"text": ...}) or
    OASST1 replies (loss on every token), or OASST1 chats (loss on the assistant replies). Examples with no token
    to predict are dropped, as the paper's code drops sequences of one token. path: a local file for the task."""
    if task.startswith("text:"):
        try:
            items = [r["text"] for r in load_rows("wikitext", path=task[5:])]
        except ValueError as e:
            if "rows left" not in str(e) and "no rows" not in str(e):
                raise
            raise ValueError(f"{task}: no text in {task[5:]} (no non-empty line, or no non-empty \"text\")") from e
    else:
        rows = load_rows(task, path=path, split="train")
        if task == "medmcqa":
            items = rows
        elif oasst1_format == "replies":
            items = oasst1_replies(rows, source=path or "OASST1")
        else:
            items = oasst1_conversations(rows)
        if not items and task == "oasst1":  # the filter, not the length, left nothing
            kept = ("English assistant replies ranked 0 or 1 with 50+ characters (--oasst1-format replies)"
                    if oasst1_format == "replies" else "English conversations with an assistant reply (--oasst1-format "
                    "chat)")
            raise ValueError(f"oasst1: no example in {path or 'OASST1'} passes the filter: it keeps {kept}")
    if limit is not None and len(items) < limit:
        warn(f"{task}: only {len(items)} examples available (limit {limit}); using all of them")
    items = [items[i] for i in seeded_subset(len(items), limit, seed)]
    if task == "medmcqa":
        items = [medmcqa_train_text(r) for r in items]
    if task == "oasst1" and oasst1_format == "chat":
        examples = [encode_chat(tok, c, max_len) for c in items]
    else:
        examples = [encode_text(tok, t, max_len) for t in items]
    kept = [e for e in examples if any(e[1][1:])]  # e.g. a reply truncated away leaves nothing to learn
    if not kept:
        raise ValueError(f"{task}: no usable training example in {path or task} ({len(examples)} found, none with "
                         f"a token to predict within max_len {max_len})")
    if len(kept) < len(examples):
        warn(f"{task}: dropped {len(examples) - len(kept)} of {len(examples)} examples with no token to predict "
             f"within max_len {max_len}")
    return kept


def background_examples(stage1: dict, tok, max_len: int, seed: int, subset: int, n: int) -> list:
    """The n single examples whose memory reads make SMF's background, from the stage-1 data (a retrofit's
    config.json "stage1_data": task, path, oasst1_format): the first n of a seeded random `subset` of it (the
    paper's), or of a seeded shuffle of all of it (subset 0)."""
    examples = training_examples(stage1["task"], tok, max_len, seed, subset or None, stage1["path"],
                                 stage1["oasst1_format"])
    if not subset:
        examples = [examples[j] for j in epoch_order(len(examples), seed, epoch=10**6)]
    return examples[:n]


def at_least_a_batch(examples: list, batch_size: int, what: str) -> list:
    """The examples, if there are enough for one optimizer step; else a ValueError naming the problem."""
    if len(examples) < batch_size:
        raise ValueError(f"{what}: {len(examples)} usable training examples, fewer than one --batch-size "
                         f"({batch_size}): lower --batch-size or give more data")
    return examples


def check_groups(n_examples: int, batch_size: int, group: int):
    """A ValueError unless groups of `group` consecutive examples fill the data and each step whole (--group-size)."""
    if batch_size % group or n_examples % group:
        raise ValueError(f"--group-size {group}: the batch size ({batch_size}) and the number of training "
                         f"examples ({n_examples}) must both be multiples of it")


class MicroBatches:
    """
    The endless stream of optimizer steps over `examples`, epoch by epoch in a seeded shuffle. Step s of an epoch
    holds `batch_size` examples (all ranks together; an epoch's remainder of fewer is skipped, so a step never
    spans two epochs), split into micro-batches of `micro` examples on each rank: micro-batch j of the step holds
    its examples j * micro * world, ..., and rank r takes the r-th `micro` of them. However it is split, a step
    trains on the same examples. group: consecutive examples in groups of this size stay together, in their order
    (the shuffle moves whole groups; a step holds whole groups): e.g. one fact and its paraphrases per step.
    """

    def __init__(self, examples, batch_size: int, micro: int, seed: int, pad_id: int, device, rank: int = 0,
                 world: int = 1, multiple: int = 1, group: int = 1):
        if batch_size % (micro * world):
            raise ValueError(f"batch size {batch_size} is not a multiple of micro-batch {micro} x {world} ranks")
        check_groups(len(examples), batch_size, group)
        if len(examples) < batch_size and world > 1:
            raise ValueError(f"{len(examples)} training examples are fewer than one batch across ranks ({batch_size})")
        self.ex, self.batch_size, self.micro, self.seed, self.pad_id = examples, batch_size, micro, seed, pad_id
        self.device, self.rank, self.world, self.multiple = device, rank, world, multiple  # multiple: padded lengths
        self.group = group
        self.accum = batch_size // (micro * world)  # micro-batches per step
        self.per_epoch = max(1, len(examples) // batch_size)  # optimizer steps per epoch

    @functools.lru_cache(maxsize=2)  # one shuffle per epoch, not one per step
    def order(self, epoch):
        groups = epoch_order(len(self.ex) // self.group, self.seed, epoch)  # group 1: the examples' own shuffle
        return [g * self.group + j for g in groups for j in range(self.group)]

    def step_ids(self, s) -> list:
        """The examples of optimizer step s, all ranks together."""
        epoch, i = divmod(s, self.per_epoch)
        return self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

    def lengths(self, s) -> list[int]:
        """The token count of each example of step s, all ranks together (padding excluded)."""
        return [len(self.ex[j][0]) for j in self.step_ids(s)]

    def step(self, s) -> list:
        """[(this rank's micro-batch on the device, its loss tokens across all ranks)] of optimizer step s."""
        ids = self.step_ids(s)
        size = self.micro * self.world  # one micro-batch, all ranks
        return [self.micro_batch(ids[j:j + size]) for j in range(0, len(ids), size)]

    def micro_batch(self, ids):
        n_loss = sum(sum(self.ex[j][1][1:]) for j in ids)  # loss tokens across all ranks (predicting token 1..)
        mine = ids[self.rank * self.micro:(self.rank + 1) * self.micro]
        batch = collate([self.ex[j] for j in mine], self.pad_id, self.multiple)
        packed = torch.stack(list(batch.values()))  # (3, B, T): one host -> device copy
        if torch.device(self.device).type == "cuda":  # from pinned memory: the copy runs while the host goes on
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        return dict(zip(batch, packed.to(self.device))), n_loss
