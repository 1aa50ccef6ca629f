"""
The synthetic world of experiments/forgetting.py: an offline stand-in for "old knowledge" and "new knowledge",
and its two probes. Fictional entities with made-up names, each with one value per attribute. Old entities are
written as prose and question-answer lines for pretraining; new entities only as question-answer lines, the facts
a finetune must learn. Held-out prose renders the old entities with templates that no training text uses, for
perplexity. Everything is a function of the seed; nothing is downloaded.

    question  "Q: What is the colour of Zorbin? A:"     answer  " teal"  (one of WORLD_ATTRIBUTES["colour"])
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's files

import data  # noqa: E402
from eval import model_device, score_continuations, token_logprobs  # noqa: E402


WORLD_ATTRIBUTES = {
    "city": ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Rome", "Quito", "Dakar", "Hanoi"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"],
    "profession": ["baker", "doctor", "pilot", "farmer", "teacher", "painter", "sailor", "lawyer", "singer",
                   "miner"],
    "pet": ["cat", "dog", "horse", "parrot", "rabbit", "turtle", "goat", "snake", "mouse", "frog"],
}
WORLD_TEMPLATES = {  # every template is training text for some entities; world_heldout_template says which not
    "city": ["{name} lives in {v}.", "{name} has a home in {v}.", "The city of {name} is {v}.",
             "{name} moved to {v} long ago.", "You can find {name} in {v}.", "{name} was raised in {v}."],
    "colour": ["The favourite colour of {name} is {v}.", "{name} likes the colour {v}.",
               "{name} always wears {v}.", "{name} painted the door {v}.", "Most things {name} owns are {v}.",
               "{name} loves anything {v}."],
    "profession": ["{name} works as a {v}.", "{name} is a {v} by trade.", "The job of {name} is {v}.",
                   "{name} trained to be a {v}.", "Everyone knows {name} the {v}.", "{name} earns a living as a {v}."],
    "pet": ["{name} has a pet {v}.", "{name} keeps a {v} at home.", "The pet of {name} is a {v}.",
            "{name} walks a {v} every day.", "A {v} sleeps next to {name}.", "{name} feeds the {v} each morning."],
}
WORLD_QUESTION = "Q: What is the {attr} of {name}? A:"
_SYLLABLES = ["ka", "zor", "bin", "mel", "tra", "vu", "qi", "lon", "dre", "sa", "fen", "mox", "pi", "ru", "gal",
              "tek", "ny", "os", "hul", "wen", "jar", "ce", "bo", "xi"]


def synthetic_world(seed: int = 0, n_old: int = 60, n_new: int = 30) -> dict:
    """{"old": [entity], "new": [entity]}, entity = {"name": str, attribute: value, ...}; distinct names of
    2-3 syllables, values uniform at random, all from the seed."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda n: int(torch.randint(n, (1,), generator=g))  # noqa: E731
    names = []
    while len(names) < n_old + n_new:
        name = "".join(_SYLLABLES[pick(len(_SYLLABLES))] for _ in range(2 + pick(2))).capitalize()
        if name not in names:
            names.append(name)
    entities = [{"name": n, **{a: vs[pick(len(vs))] for a, vs in WORLD_ATTRIBUTES.items()}} for n in names]
    return {"old": entities[:n_old], "new": entities[n_old:]}


def world_qa(entity: dict, attr: str) -> tuple[str, str]:
    """(question, answer continuation with its leading space) for one fact."""
    return WORLD_QUESTION.format(attr=attr, name=entity["name"]), " " + entity[attr]


def world_qa_texts(entities: list[dict]) -> list[str]:
    """One training line per fact: question and answer, "Q: What is the pet of Zorbin? A: frog"."""
    return ["".join(world_qa(e, a)) for e in entities for a in WORLD_ATTRIBUTES]


def world_heldout_template(i: int, attr: str) -> int:
    """The template of attribute attr that no pretraining text uses for the i-th old entity (others' texts do)."""
    return (i + list(WORLD_ATTRIBUTES).index(attr)) % len(WORLD_TEMPLATES[attr])


def world_pretrain_texts(world: dict, seed: int = 0, n_docs: int = 2000) -> list[str]:
    """Pretraining documents about the old entities: each is one entity's attributes in a random order, each in a
    random template other than its held-out one, followed by the question-answer lines of a random half of its
    attributes (so the question format is known before any finetune). Entities are drawn round-robin."""
    g = torch.Generator().manual_seed(seed + 1)
    attrs = list(WORLD_ATTRIBUTES)
    docs = []
    for d in range(n_docs):
        i = d % len(world["old"])
        e = world["old"][i]
        order = [attrs[k] for k in torch.randperm(len(attrs), generator=g).tolist()]
        sents = []
        for a in order:
            allowed = [t for k, t in enumerate(WORLD_TEMPLATES[a]) if k != world_heldout_template(i, a)]
            sents.append(allowed[int(torch.randint(len(allowed), (1,), generator=g))].format(name=e["name"], v=e[a]))
        qa = ["".join(world_qa(e, a)) for a in order[:len(order) // 2]]
        docs.append(" ".join(sents) + "\n" + "\n".join(qa))
    return docs


def world_heldout_texts(world: dict) -> list[str]:
    """Held-out prose about the old entities, one document per entity (laid out like the prose line of a
    pretraining document): each fact in the one template that entity's pretraining text never used for it."""
    return [" ".join(WORLD_TEMPLATES[a][world_heldout_template(i, a)].format(name=e["name"], v=e[a])
                     for a in WORLD_ATTRIBUTES) for i, e in enumerate(world["old"])]


def world_fact_items(entities: list[dict]) -> list[tuple[str, list[str], int]]:
    """Multiple-choice probe items (question, [" value" for every value of the attribute], index of the true one);
    chance is 1 / len(WORLD_ATTRIBUTES[attr])."""
    items = []
    for e in entities:
        for a, values in WORLD_ATTRIBUTES.items():
            q, _ = world_qa(e, a)
            items.append((q, [" " + v for v in values], values.index(e[a])))
    return items


# -----------------------------------------------------------------------------
# Probes


def eval_world_facts(model, tok, items, batch_size: int = 64, samples: list | None = None) -> dict:
    """Accuracy over data.world_fact_items(...) [(question, candidates, target)]: the prediction is the candidate
    with the highest mean token log-probability after the question (score_continuations, as for MedMCQA).
    "chance" is the mean of 1 / len(candidates)."""
    pairs = [(q, c) for q, cands, _ in items for c in cands]
    scores = score_continuations(model, tok, pairs, batch_size)
    correct, k = 0, 0
    for i, (q, cands, target) in enumerate(items):
        s = scores[k:k + len(cands)]
        k += len(cands)
        pred = max(range(len(cands)), key=lambda j: s[j])
        correct += pred == target
        if samples is not None:
            samples.append({"task": "world_facts", "index": i, "prompt": q, "prediction": cands[pred].strip(),
                            "target": cands[target].strip(), "correct": pred == target})
    return {"acc": correct / len(items), "n": len(items),
            "chance": sum(1 / len(c) for _, c, _ in items) / len(items)}


@torch.inference_mode()
def eval_documents_ppl(model, tok, texts: list[str], batch_size: int = 32) -> dict:
    """Token perplexity over separate short documents, each scored from its own start (no document is context for
    another; a document's first token has no context and is not scored). For the synthetic world's held-out prose,
    whose documents are shorter than the model's context."""
    device = model_device(model)
    pad = tok.pad_id if tok.pad_id is not None else 0
    seqs = [s for s in tok.encode_batch(texts) if len(s) >= 2]
    nll, n = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        batch = seqs[i:i + batch_size]
        idx, mask = data.pad(batch, pad)
        h = model.hidden_states(idx.to(device), mask.to(device))  # (B, T, C)
        rows = [b for b, s in enumerate(batch) for _ in range(len(s) - 1)]
        cols = [t for s in batch for t in range(len(s) - 1)]  # hidden state at t predicts token t + 1
        targets = torch.tensor([x for s in batch for x in s[1:]], device=device)
        nll -= token_logprobs(model, h[rows, cols], targets).sum().item()
        n += len(targets)
    return {"ppl": math.exp(nll / n), "tokens": n}
