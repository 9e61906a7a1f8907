"""A small labelled set of toxic caption phrases, for planting toxic captions in the synthetic web
and for training the tiny local Detoxify-format model the tests and the demo use.

Mild, clearly toxic English insults and threats, no slurs and no sexual content. Every phrase has a
label vector over Detoxify's six "original" labels (`LABELS`); `toxicity` is always 1.

The phrases are split in two: `TRAIN_PHRASES` teach the tiny model, and `HELDOUT_PHRASES` -- new
combinations of the same kind of words, never seen in training -- are what the synthetic web plants,
so the filter's effect in the demo measures generalisation rather than memorisation. Benign
decorations (`TRAIN_BENIGN` / `HELDOUT_BENIGN`) are attached to some clean captions in the same
positions and punctuation, so a model cannot learn "has an exclamation mark" instead of the words;
several share words with the threats ("i will ... you", "i am going to ...").
"""

from __future__ import annotations

import random

LABELS = ["toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"]

#          tox sev obs thr ins ida
_INSULT = (1, 0, 0, 0, 1, 0)
_THREAT = (1, 0, 0, 1, 0, 0)
_KILL = (1, 1, 0, 1, 0, 0)
_IDENTITY = (1, 0, 0, 0, 1, 1)
_CRAP = (1, 0, 1, 0, 1, 0)
_HATE = (1, 0, 0, 0, 0, 0)

TRAIN_PHRASES: list[tuple[str, tuple[int, ...]]] = [
    ("you stupid idiot", _INSULT),
    ("what a worthless pathetic loser", _INSULT),
    ("shut up, moron", _INSULT),
    ("i hate you, you disgusting creep", _INSULT),
    ("you are a dumb ugly fool", _INSULT),
    ("nobody likes you, you useless clown", _INSULT),
    ("get lost, you brainless jerk", _INSULT),
    ("what an ignorant imbecile", _INSULT),
    ("you miserable little worm", _INSULT),
    ("go away, you annoying pest", _INSULT),
    ("only a total idiot would post this garbage", _INSULT),
    ("i will hurt you", _THREAT),
    ("i am going to find you and beat you up", _THREAT),
    ("watch your back, i know where you live", _THREAT),
    ("i will kill you", _KILL),
    ("i hope you die", _KILL),
    ("go back to where you came from, your kind is vermin", _IDENTITY),
    ("people like you are filth and should be banned", _IDENTITY),
    ("what a piece of crap, loser", _CRAP),
    ("i hate you all", _HATE),
]

HELDOUT_PHRASES: list[tuple[str, tuple[int, ...]]] = [
    ("you pathetic moron", _INSULT),
    ("shut up, you worthless idiot", _INSULT),
    ("what a stupid ugly creep", _INSULT),
    ("i hate you, loser", _INSULT),
    ("you useless brainless fool", _INSULT),
    ("get lost, you disgusting worm", _INSULT),
    ("what a dumb ignorant clown", _INSULT),
    ("i am going to hurt you", _THREAT),
    ("i will find you and beat you up", _THREAT),
    ("your kind is filth and vermin", _IDENTITY),
    ("this is crap, you imbecile", _CRAP),
]

TRAIN_BENIGN = [
    "what a lovely picture",
    "i love this one",
    "you clever artist",
    "nice work",
    "what a beautiful colour",
    "i will share this with you",
    "great for kids",
    "so simple and clean",
    "thank you for sharing",
    "i am going to frame this",
    "you will like this",
    "made with care",
    "a wonderful gift idea",
    "clean modern design",
    "i like it a lot",
    "hello friend",
    "my talented sister made this",
    "painted by a local painter",
    "print it at home",
    "perfect for your wall",
    "you are going to love this",
    "i will find a place for it",
    "happy birthday",
    "free to use",
    "what a great idea",
    "shop now",
]

# New combinations of TRAIN_BENIGN's words, as HELDOUT_PHRASES are of TRAIN_PHRASES' words.
HELDOUT_BENIGN = [
    "what a wonderful design",
    "i like this, friend",
    "you talented painter",
    "i am going to print this for you",
    "nice and simple",
    "thank you, i love it",
    "a great gift for your sister",
]


def _decorate(rng: random.Random, description: str, phrase: str) -> str:
    form = rng.randrange(4)
    if form == 0:
        return f"{description}, {phrase}"
    if form == 1:
        return f"{phrase}! {description}"
    if form == 2:
        return f"{description} - {phrase}"
    return f"{phrase[0].upper()}{phrase[1:]}. {description}"


def toxic_caption(rng: random.Random, description: str, heldout: bool = True) -> str:
    """`description` with a toxic phrase attached (held-out phrases unless heldout=False)."""
    phrase, _ = rng.choice(HELDOUT_PHRASES if heldout else TRAIN_PHRASES)
    return _decorate(rng, description, phrase)


def labelled_toxic_caption(rng: random.Random, description: str, heldout: bool = True) -> tuple[str, list[float]]:
    """(toxic caption, its label vector over `LABELS`)."""
    phrase, labels = rng.choice(HELDOUT_PHRASES if heldout else TRAIN_PHRASES)
    return _decorate(rng, description, phrase), [float(v) for v in labels]


def benign_caption(rng: random.Random, description: str, heldout: bool = True) -> str:
    """`description` with a friendly phrase attached in the same places a toxic one goes."""
    return _decorate(rng, description, rng.choice(HELDOUT_BENIGN if heldout else TRAIN_BENIGN))


def training_set(
    rng: random.Random, clean_captions: list[str], n_toxic: int, benign_fraction: float = 0.3
) -> list[tuple[str, list[float]]]:
    """Shuffled (caption, labels over `LABELS`) pairs: every clean caption with all-zero labels
    (`benign_fraction` of them decorated with a TRAIN_BENIGN phrase), plus `n_toxic` toxic
    captions built from TRAIN_PHRASES around randomly chosen clean captions."""
    if not clean_captions:
        raise ValueError("training_set needs at least one clean caption")
    zeros = [0.0] * len(LABELS)
    out: list[tuple[str, list[float]]] = []
    for cap in clean_captions:
        if rng.random() < benign_fraction:
            cap = benign_caption(rng, cap, heldout=False)
        out.append((cap, list(zeros)))
    for _ in range(n_toxic):
        out.append(labelled_toxic_caption(rng, rng.choice(clean_captions), heldout=False))
    rng.shuffle(out)
    return out
