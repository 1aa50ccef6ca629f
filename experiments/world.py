"""
The synthetic world of experiments/forgetting.py and continual.py: an offline stand-in for "old knowledge" and "new
knowledge", and its probes. Fictional entities with made-up names, each with one value per attribute. Old entities
are written as prose and question-answer lines for pretraining; new entities only as question-answer lines, the facts
a finetune must learn: either sibling facts (the old entities' attributes: the worst case for interference, as the
same question asks for both) or facts of new attributes with new values (NEW_ATTRIBUTES: new knowledge that need not
share the old facts' memory slots). The words world (forgetting.py's default) names its entities with every pair of
P first and P last names, each attribute a Latin square over them (synthetic_world's grid: no name word alone
tells a fact), names the new entities in rosters without facts (world_pretrain_texts' roster), adds general text of
a made-up lexicon (world_general_texts), asks every fact in QUESTION_TEMPLATES and trains each new fact as one step
of its paraphrases (world_fact_paraphrases), one template held out. Held-out prose renders the old entities with
templates that no training text uses, for perplexity; a cloze probe asks the old facts in prose form. Everything is
a function of the seed; nothing is downloaded.

    question  "Q: What is the colour of Zorbin? A:"     answer  " pink"  (one of WORLD_ATTRIBUTES["colour"])
    cloze     "Zorbin lives in"                          answer  " Lima"  (WORLD_CLOZE: another format, same facts)
"""

import math
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's files

import data  # noqa: E402
import memory  # noqa: E402
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
# the attributes of new entities in the "new-attributes" world: values no pretraining text mentions
NEW_ATTRIBUTES = {
    "instrument": ["flute", "drum", "harp", "violin", "trumpet", "cello", "banjo", "organ", "tuba", "lute"],
    "food": ["rice", "bread", "soup", "cheese", "honey", "pasta", "salad", "plum", "bean", "melon"],
    "sport": ["tennis", "rugby", "golf", "hockey", "rowing", "boxing", "skiing", "polo", "cricket", "judo"],
    "tree": ["oak", "pine", "birch", "maple", "cedar", "willow", "elm", "palm", "ash", "yew"],
}
VALUES = {**WORLD_ATTRIBUTES, **NEW_ATTRIBUTES}
# the question's templates: the first is the only one of the "syllables" world; the "words" world pretrains every
# template on the old facts and finetunes the new facts in all but HELDOUT_QUESTION, in which their learning is asked
QUESTION_TEMPLATES = ["Q: What is the {attr} of {name}? A:", "Q: Which {attr} does {name} have? A:",
                      "Q: Tell me the {attr} of {name}. A:", "Q: Name the {attr} of {name}. A:",
                      "Q: {name} has which {attr}? A:"]
HELDOUT_QUESTION = len(QUESTION_TEMPLATES) - 1
WORLD_CLOZE = {a: ts[0].split("{v}")[0].rstrip() for a, ts in WORLD_TEMPLATES.items()}  # "{name} lives in"
_SYLLABLES = ["ka", "zor", "bin", "mel", "tra", "vu", "qi", "lon", "dre", "sa", "fen", "mox", "pi", "ru", "gal",
              "tek", "ny", "os", "hul", "wen", "jar", "ce", "bo", "xi"]


def synthetic_world(seed: int = 0, n_old: int = 60, n_new: int = 30, new_attributes: bool = False,
                    grid: bool = False) -> dict:
    """{"old": [entity], "new": [entity]}, entity = {"name": str, attribute: value, ...}; distinct names of
    2-3 syllables, values uniform at random, all from the seed. The new entities have WORLD_ATTRIBUTES (sibling
    facts) or, with new_attributes, NEW_ATTRIBUTES (drawn after everything else, so the old world is the same).
    grid (the words world): n_old + n_new = P^2 entities (P at most 10), named by every pair of P first and P last
    names, each attribute's first P values a random Latin square over them (latin_square): a first or last name
    alone says nothing about a fact (each comes with every value once), so a model cannot sum what it knows of the
    two words (name_vote_accuracy); it must know the pair. The new entities are a random n_new of the cells. (The
    probes still offer all 10 values of an attribute.)"""
    g = torch.Generator().manual_seed(seed)
    pick = lambda n: int(torch.randint(n, (1,), generator=g))  # noqa: E731

    def distinct(n, draw):
        out = []
        while len(out) < n:
            if (x := draw()) not in out:
                out.append(x)
        return out
    word = lambda: "".join(_SYLLABLES[pick(len(_SYLLABLES))] for _ in range(2 + pick(2))).capitalize()  # noqa: E731
    if grid:
        side = math.isqrt(n_old + n_new)
        if side * side != n_old + n_new or side > len(next(iter(WORLD_ATTRIBUTES.values()))):
            raise ValueError(f"a grid world has P^2 entities (n_old + n_new) with P at most 10, not {n_old + n_new}")
        first, last = distinct(side, word), distinct(side, word)
        squares = {a: latin_square(side, g) for a in WORLD_ATTRIBUTES}  # P of each attribute's values
        entities = [{"name": f"{first[i]} {last[j]}",
                     **{a: vs[squares[a][i][j]] for a, vs in WORLD_ATTRIBUTES.items()}}
                    for i in range(side) for j in range(side)]
        entities = [entities[k] for k in torch.randperm(len(entities), generator=g).tolist()]
        return {"old": entities[:n_old], "new": entities[n_old:]}
    names = distinct(n_old + n_new, word)
    entities = [{"name": n, **{a: vs[pick(len(vs))] for a, vs in WORLD_ATTRIBUTES.items()}} for n in names]
    if new_attributes:
        entities[n_old:] = [{"name": e["name"], **{a: vs[pick(len(vs))] for a, vs in NEW_ATTRIBUTES.items()}}
                            for e in entities[n_old:]]
    return {"old": entities[:n_old], "new": entities[n_old:]}


def latin_square(n: int, g: torch.Generator) -> list[list[int]]:
    """A random n x n Latin square (every symbol 0..n-1 once in each row and each column), row by row, each row a
    random order searched depth first among the symbols its columns have not used (no modular rule behind it, so
    that some cells do not give away the others). The search always finds a row: a Latin rectangle always extends
    by one (Hall's marriage theorem)."""
    rows = []
    for _ in range(n):
        used = [{r[c] for r in rows} for c in range(n)]
        rows.append(_latin_row(n, used, [], g))
    return rows


def _latin_row(n, used, row, g):
    c = len(row)
    if c == n:
        return row
    for s in torch.randperm(n, generator=g).tolist():
        if s not in used[c] and s not in row and (done := _latin_row(n, used, row + [s], g)) is not None:
            return done
    return None


def attributes(entity: dict) -> list[str]:
    return [a for a in entity if a != "name"]


def world_qa(entity: dict, attr: str, template: int = 0) -> tuple[str, str]:
    """(question in QUESTION_TEMPLATES[template], answer continuation with its leading space) for one fact."""
    return QUESTION_TEMPLATES[template].format(attr=attr, name=entity["name"]), " " + entity[attr]


def world_qa_texts(entities: list[dict]) -> list[str]:
    """One training line per fact: question and answer, "Q: What is the pet of Zorbin? A: frog"."""
    return ["".join(world_qa(e, a)) for e in entities for a in attributes(e)]


def world_fact_paraphrases(entities: list[dict]) -> list[str]:
    """Lin et al.'s training data for the new facts: each fact's question-answer lines in every template but
    HELDOUT_QUESTION, one line each, a fact's lines consecutive (len(QUESTION_TEMPLATES) - 1 of them: train.py's
    --group-size keeps them in one step). Separate sequences: no line can copy another's answer in context."""
    return ["".join(world_qa(e, a, t)) for e in entities for a in attributes(e)
            for t in range(len(QUESTION_TEMPLATES)) if t != HELDOUT_QUESTION]


def fact_blind_accuracy(entities: list[dict]) -> float:
    """The accuracy of a fact-blind answer: each attribute's most common value among these facts, always."""
    attrs = attributes(entities[0])
    hits = sum(Counter(e[a] for e in entities).most_common(1)[0][1] for a in attrs)
    return hits / (len(entities) * len(attrs))


def name_vote_accuracy(entities: list[dict]) -> float:
    """What summing what each name word says can score on these facts: each value's count among the entities that
    share the fact's first name plus its count among those that share its last name (the entity itself included);
    the highest count is the answer, ties shared evenly. Two-word names that several entities share each leave
    much to it; a grid of Latin squares (synthetic_world's grid) leaves about chance."""
    score = 0.0
    for e in entities:
        first, last = e["name"].split(" ")
        for a in attributes(e):
            votes = Counter(o[a] for o in entities if o["name"].split(" ")[0] == first) + \
                Counter(o[a] for o in entities if o["name"].split(" ")[1] == last)
            top = max(votes.values())
            score += (votes[e[a]] == top) / sum(v == top for v in votes.values())
    return score / sum(len(attributes(e)) for e in entities)


def world_heldout_template(i: int, attr: str) -> int:
    """The template of attribute attr that no pretraining text uses for the i-th old entity (others' texts do)."""
    return (i + list(WORLD_ATTRIBUTES).index(attr)) % len(WORLD_TEMPLATES[attr])


def world_pretrain_texts(world: dict, seed: int = 0, n_docs: int = 2000, lexicon: bool = False,
                         questions: int = 1, roster: bool = False, qa_apart: bool = False) -> list[str]:
    """Pretraining documents about the old entities: each is one entity's attributes in a random order, each in a
    random template other than its held-out one, followed by the question-answer lines of a random half of its
    attributes (so the question format is known before any finetune), each in one of the first `questions` of
    QUESTION_TEMPLATES (at random). Entities are drawn round-robin. lexicon: then
    n_docs / 20 documents that name the values of NEW_ATTRIBUTES ("One instrument is the harp."), so that the words
    of the new facts are known (as a real model knows its vocabulary) though no fact about an entity uses them.
    roster: then n_docs / 20 documents that list 5 of the new entities' names each ("Among the members are ..."),
    round-robin, so that every new entity is known by name though no fact about it is in the text. qa_apart: the
    question-answer lines (of all the attributes, in a random order) are a document of their own after the prose
    one, so that a question must be answered from what the model knows, not from the prose before it."""
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
        asked = [attrs[k] for k in torch.randperm(len(attrs), generator=g).tolist()] if qa_apart \
            else order[:len(order) // 2]
        qa = ["".join(world_qa(e, a, int(torch.randint(questions, (1,), generator=g)) if questions > 1 else 0))
              for a in asked]
        docs += [" ".join(sents), "\n".join(qa)] if qa_apart else [" ".join(sents) + "\n" + "\n".join(qa)]
    for d in range(n_docs // 20 if lexicon else 0):
        attr = list(NEW_ATTRIBUTES)[d % len(NEW_ATTRIBUTES)]
        values = [NEW_ATTRIBUTES[attr][k] for k in torch.randperm(len(NEW_ATTRIBUTES[attr]), generator=g).tolist()]
        docs.append(" ".join(f"One {attr} is the {v}." for v in values))
    new = [e["name"] for e in world["new"]]
    for d in range(n_docs // 20 if roster else 0):
        listed = [new[(5 * d + k) % len(new)] for k in range(5)]
        docs.append(f"Among the members are {', '.join(listed[:-1])} and {listed[-1]}.")
    return docs


def world_general_texts(seed: int = 0, n_docs: int = 400, n_words: int = 1000) -> list[str]:
    """General text, about no entity: n_docs documents of 3 sentences ("The {adjective} {noun} {verb} a {noun}.")
    over a made-up lowercase lexicon of n_words words (nouns, verbs, adjectives 2:1:1; 2-4 syllables each), each
    word class drawn in rounds of a random order (so that 84 documents or more use every word), all from the seed.
    It gives the words world a vocabulary of over a thousand words, and its pretraining (so the background reads and
    TF-IDF's document counts) text that holds no fact."""
    g = torch.Generator().manual_seed(seed + 2)
    lexicon = []
    while len(lexicon) < n_words:
        n = 2 + int(torch.randint(3, (1,), generator=g))
        w = "".join(_SYLLABLES[k] for k in torch.randint(len(_SYLLABLES), (n,), generator=g).tolist())
        if w not in lexicon:
            lexicon.append(w)

    def rounds(words):  # endless: every word once in a random order, again and again
        while True:
            yield from (words[k] for k in torch.randperm(len(words), generator=g).tolist())
    nouns, verbs = rounds(lexicon[:n_words // 2]), rounds(lexicon[n_words // 2:3 * n_words // 4])
    adjectives = rounds(lexicon[3 * n_words // 4:])
    return [" ".join(f"The {next(adjectives)} {next(nouns)} {next(verbs)} a {next(nouns)}." for _ in range(3))
            for _ in range(n_docs)]


def world_heldout_texts(world: dict) -> list[str]:
    """Held-out prose about the old entities, one document per entity (laid out like the prose line of a
    pretraining document): each fact in the one template that entity's pretraining text never used for it."""
    return [" ".join(WORLD_TEMPLATES[a][world_heldout_template(i, a)].format(name=e["name"], v=e[a])
                     for a in WORLD_ATTRIBUTES) for i, e in enumerate(world["old"])]


def world_fact_items(entities: list[dict], cloze: bool = False, template: int = 0) -> list[tuple[str, list[str], int]]:
    """Multiple-choice probe items (question, [" value" for every value of the attribute], index of the true one);
    chance is 1 / len(VALUES[attr]). cloze: the prose prompt of WORLD_CLOZE instead of the question; else the
    question in QUESTION_TEMPLATES[template]."""
    items = []
    for e in entities:
        for a in attributes(e):
            q = WORLD_CLOZE[a].format(name=e["name"]) if cloze else world_qa(e, a, template)[0]
            items.append((q, [" " + v for v in VALUES[a]], VALUES[a].index(e[a])))
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


@torch.inference_mode()
def read_overlap(model, tok, new_items, old_items) -> dict:
    """Per memory layer: the share of the new questions' answer-position reads (the slots read at a question's last
    token, which predicts the answer; every head's top-k, counted with multiplicity) that land on slots some old
    question reads there. Not SMF's precondition: at that position the reads are keyed by the attribute asked more
    than by the entity, so a high share does not mean that learning the new facts must move the old facts' rows."""
    def answer_reads(items):  # {layer: [slot ids read at each question's last position]}
        device = model_device(model)
        reads = {}
        for q, _, _ in items:
            model(torch.tensor([tok.encode(q)], device=device))
            for i, mem in memory.memory_layers(model).items():
                reads.setdefault(i, []).append(mem.last_indices[0, -1])  # (h*k,)
        return {i: torch.cat(r) for i, r in reads.items()}
    new, old = answer_reads(new_items), answer_reads(old_items)
    return {i: float(torch.isin(new[i], old[i]).float().mean()) for i in new}


@torch.inference_mode()
def key_usage(model, tok, texts: list[str]) -> dict:
    """Per memory layer: the share of its slots that some token of `texts` reads (any head's top-k)."""
    device, layers = model_device(model), memory.memory_layers(model)
    read = {i: torch.zeros(mem.n_slots, dtype=torch.bool) for i, mem in layers.items()}
    for text in texts:
        model(torch.tensor([tok.encode(text)], device=device))
        for i, mem in layers.items():
            read[i][mem.last_indices.flatten().cpu()] = True
    return {i: float(r.float().mean()) for i, r in read.items()}


@torch.inference_mode()
def reads_on_rows(model, tok, entities: list[dict], rows: dict, template: int = 0) -> dict:
    """The share of the memory reads of the entities' questions (QUESTION_TEMPLATES[template]; every head's top-k,
    counted with multiplicity, all memory layers) that land on `rows` ({layer: slot ids}, e.g. the rows a finetune
    changed): {"all": at every position, "name": at the name's tokens (a token of the name, wherever it is)}."""
    device, layers = model_device(model), memory.memory_layers(model)
    rows = {i: torch.as_tensor(rows.get(i, []), dtype=torch.long) for i in layers}  # once, not per question
    hit = {"all": 0, "name": 0}
    total = {"all": 0, "name": 0}
    for e in entities:
        name_ids = set(tok.encode(" " + e["name"]))
        for a in attributes(e):
            ids = tok.encode(world_qa(e, a, template)[0])
            model(torch.tensor([ids], device=device))
            at_name = [t for t, x in enumerate(ids) if x in name_ids]
            for i, mem in layers.items():
                reads = mem.last_indices[0].cpu()  # (T, h*k)
                on = torch.isin(reads, rows[i])
                hit["all"] += int(on.sum())
                total["all"] += on.numel()
                hit["name"] += int(on[at_name].sum())
                total["name"] += on[at_name].numel()
    return {k: hit[k] / total[k] if total[k] else float("nan") for k in hit}
