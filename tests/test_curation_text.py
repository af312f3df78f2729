"""Curation's one word rule (`phi_jax.curation.core.text`): known answers, lm-eval's janitor as the
reference, and the rooms that count words (dedup shingles, decontamination, synthesis gates, the
Orca-2 leak check) all splitting "don't" the same way."""

from __future__ import annotations

import random
import string

import pytest

from phi_jax.curation.core.text import normalize, word_spans, words
from phi_jax.curation.dedup import shingles
from phi_jax.curation.instruct.strategies import LeakCheck
from phi_jax.curation.synthesis import output_gates

KNOWN = [
    ("don't", ["dont"]),                                  # an apostrophe joins the halves
    ("Don't PANIC!", ["dont", "panic"]),
    ("don’t", ["don’t"]),                                 # a typographic apostrophe is not ASCII: kept
    ("e.g. i.e.", ["eg", "ie"]),                          # abbreviations are one word
    ("42 3.14 1,000 -7", ["42", "314", "1000", "7"]),     # digits stay, their punctuation goes
    ("snake_case camelCase x.append(y) __init__", ["snakecase", "camelcase", "xappendy", "init"]),
    ("well-known -- ...", ["wellknown"]),                 # a token of punctuation only vanishes
    ("Été ÉTÉ straße 中文 café", ["Été", "ÉtÉ", "straße", "中文", "café"]),  # only ASCII is lowercased
    ("a\u00a0b\u3000c\td\ne", ["a", "b", "c", "d", "e"]),  # any Unicode whitespace separates
    ("", []),
]


@pytest.mark.parametrize("text, expected", KNOWN)
def test_words_known_answers(text, expected):
    assert words(text) == expected
    assert normalize(text) == " ".join(expected)
    assert [words(text[a:b]) for a, b in word_spans(text)] == [[w] for w in expected]


def test_the_rule_is_lm_evals_janitor_on_random_text():
    janitor = pytest.importorskip("lm_eval.decontamination.janitor")
    rng = random.Random(0)
    alphabet = string.printable + "\x00\x1c\x85\u00a0\u3000\u2028éßÉ√中'’"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80))) for _ in range(300)]
    reference = janitor.Janitor()
    for text in texts:
        assert words(text) == reference.normalize_string(text).split(), repr(text)
        spans = word_spans(text)
        assert [text[a:b].translate(str.maketrans("", "", string.punctuation)).lower() for a, b in spans] \
            == [w.lower() for w in words(text)]


def test_every_room_splits_dont_the_same_way():
    text = "Don't stop, e.g. x_1 = Été; don't."
    expected = ["dont", "stop", "eg", "x1", "Été", "dont"]
    assert words(text) == expected
    # dedup: the word 2-grams of a text are the 2-grams of its words
    grams = shingles.ngram_hashes([normalize(text)], 2)
    again = shingles.ngram_hashes([" ".join(expected)], 2)
    assert list(grams.hashes) == list(again.hashes) and len(grams.hashes) == len(expected) - 1
    # synthesis gates: openings and distinct-n count the same words
    assert output_gates.words is words
    records = [{"id": str(i), "text": t, "meta": {}} for i, t in enumerate(
        ["Don't stop, e.g. now: alpha beta gamma", "dont STOP eg now -- delta epsilon zeta",
         "do not stop now"])]
    decisions = output_gates.decide(records, output_gates.GateConfig(opening_words=4, against=()))
    assert [d.flags for d in decisions.values()] == [("repeated_opening",), ("repeated_opening",), ()]
    # the leak check: a quote that differs only in apostrophes and case is still a quote
    prompt = "You don't guess: you reason step by step, e.g. about x_1, and you check every result twice."
    quote = prompt.replace("don't", "DONT").replace("e.g.", "eg").replace("x_1", "x1")
    assert LeakCheck([prompt]).leaks(quote)
    assert not LeakCheck([prompt]).leaks(" ".join(words(prompt)[:12]))   # 12 words: below 13
