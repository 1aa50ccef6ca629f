"""Tiny dataset files in the Hub's column schemas (MedMCQA, OASST1), for offline training tests."""

import json
import random

FRUITS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "grape"]
ORGANS = ["heart", "liver", "lung", "kidney", "brain", "skin", "bone", "blood"]


def medmcqa_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        opts = rng.sample(ORGANS, 4)
        cop = rng.randrange(4)
        rows.append({"id": f"q{i}", "question": f"Which organ does the {FRUITS[i % len(FRUITS)]} help?",
                     "opa": opts[0], "opb": opts[1], "opc": opts[2], "opd": opts[3], "cop": cop,
                     "choice_type": "single" if i % 5 else "multi", "exp": f"The {opts[cop]} is right.",
                     "subject_name": "Anatomy", "topic_name": None})
    return rows


def oasst1_rows(n_trees: int, seed: int = 0):
    """Message trees: a prompter root, an assistant reply, sometimes a follow-up turn; some non-English. Every
    other first reply is long enough (50+ characters) for the paper's reply filter; ranks 0, 1 and 2 occur."""
    rng = random.Random(seed)
    rows = []
    for t in range(n_trees):
        lang = "en" if t % 4 else "de"
        root = f"t{t}-m0"
        rows.append({"message_id": root, "parent_id": None, "message_tree_id": f"t{t}", "role": "prompter",
                     "text": f"Tell me about the {rng.choice(FRUITS)}.", "lang": lang, "deleted": False,
                     "review_result": True, "rank": None, "synthetic": False})
        rows.append({"message_id": f"t{t}-m1", "parent_id": root, "message_tree_id": f"t{t}", "role": "assistant",
                     "text": f"The {rng.choice(FRUITS)} is good for the {rng.choice(ORGANS)}."
                             + (" It keeps well in a cool place for a week." if t % 2 else ""), "lang": lang,
                     "deleted": False, "review_result": True, "rank": t % 3, "synthetic": False})
        if t % 3 == 0:
            rows.append({"message_id": f"t{t}-m2", "parent_id": f"t{t}-m1", "message_tree_id": f"t{t}",
                         "role": "prompter", "text": "Why?", "lang": lang, "deleted": False,
                         "review_result": True, "rank": None, "synthetic": False})
            rows.append({"message_id": f"t{t}-m3", "parent_id": f"t{t}-m2", "message_tree_id": f"t{t}",
                         "role": "assistant", "text": f"Because the {rng.choice(ORGANS)} needs it.",
                         "lang": lang, "deleted": False, "review_result": True, "rank": 0, "synthetic": False})
    return rows


def write_jsonl(path: str, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write_parquet(path: str, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def wikitext_rows(n: int, seed: int = 0):
    """WikiText-style rows ({"text"}), some empty, as the Hub's files have them."""
    rng = random.Random(seed)
    return [{"text": "" if i % 3 == 0 else f" The {rng.choice(FRUITS)} and the {rng.choice(ORGANS)} . \n"}
            for i in range(n)]


def triviaqa_rows(n: int, seed: int = 0):
    """TriviaQA rc.nocontext-style rows: a question and its answer's value and aliases."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        organ = rng.choice(ORGANS)
        rows.append({"question": f"Which organ does the {FRUITS[i % len(FRUITS)]} help?",
                     "answer": {"value": organ, "aliases": [organ, organ.title()]}})
    return rows


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
