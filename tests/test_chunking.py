"""Clause and sentence pieces for speech: a table of hard cases, and properties on random text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_service.chunking import MAX_CHARS, Chunker, Mode


def pieces(text: str, mode: Mode, split: int = 0) -> list[str]:
    """The pieces of `text` fed whole (split 0) or `split` characters at a time."""
    chunker = Chunker(mode)
    out: list[str] = []
    step = split or len(text) or 1
    for at in range(0, len(text), step):
        out += chunker.feed(text[at : at + step])
    rest = chunker.flush()
    return out + ([rest] if rest else [])


SENTENCES = [
    ("Hello there. How are you? Fine!", ["Hello there. ", "How are you? ", "Fine!"]),
    ("Dr. Smith arrived. He sat.", ["Dr. Smith arrived. ", "He sat."]),
    ("Use e.g. salt or i.e. any. Done.", ["Use e.g. salt or i.e. any. ", "Done."]),
    ("Pi is 3.14 today. Yes.", ["Pi is 3.14 today. ", "Yes."]),
    ("It costs $1.50, or 1,000 yen. OK.", ["It costs $1.50, or 1,000 yen. ", "OK."]),
    ("Wait... what? Yes… really.", ["Wait... what? ", "Yes… really."]),
    ('He said "Go." Then left.', ['He said "Go." ', "Then left."]),
    ("(See the map.) It helps.", ["(See the map.) ", "It helps."]),
    ("See example.com or a.b@c.org now. Bye.", ["See example.com or a.b@c.org now. ", "Bye."]),
    ("Steps:\n1. Boil water.\n2. Add tea.\n", ["Steps:\n", "1. Boil water.\n", "2. Add tea.\n"]),
    ("J. R. R. Tolkien wrote it. Indeed.", ["J. R. R. Tolkien wrote it. ", "Indeed."]),
    ("你好。今天天气很好！你呢？", ["你好。", "今天天气很好！", "你呢？"]),
    ("「好。」他说。", ["「好。」", "他说。"]),
    ("Great news 🎉. More soon 🚀!", ["Great news 🎉. ", "More soon 🚀!"]),
    ("Call `os.path.join(a, b)` here. Then.", ["Call `os.path.join(a, b)` here. ", "Then."]),
    ("Really?! Yes.", ["Really?! ", "Yes."]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), SENTENCES)
@pytest.mark.parametrize("split", [0, 1, 3])
def test_sentence_boundaries(text: str, expected: list[str], split: int) -> None:
    assert pieces(text, "sentence", split) == expected


CLAUSES = [
    (
        "Well, if you ask me, the answer is simple; take the train: it is fast.",
        ["Well, if you ask me, ", "the answer is simple; ", "take the train: ", "it is fast."],
    ),
    ("Yes, sure. No, thanks.", ["Yes, sure. ", "No, thanks."]),  # a clause needs words
    ("Red, green and blue, all three.", ["Red, green and blue, ", "all three."]),
]


@pytest.mark.parametrize(("text", "expected"), CLAUSES)
@pytest.mark.parametrize("split", [0, 2])
def test_clause_boundaries(text: str, expected: list[str], split: int) -> None:
    assert pieces(text, "clause", split) == expected


def test_the_first_sentence_piece_may_stop_at_a_clause_to_be_heard_sooner() -> None:
    text = "Of course I can help you, here is what to do. First, relax."
    assert pieces(text, "sentence") == [
        "Of course I can help you, ",
        "here is what to do. ",
        "First, relax.",
    ]


def test_a_reply_with_no_punctuation_is_cut_at_a_space_past_the_bound() -> None:
    text = " ".join(["word"] * 120)
    got = pieces(text, "sentence", split=5)
    assert "".join(got) == text
    assert all(len(p) <= MAX_CHARS + 10 for p in got)
    assert len(got) >= 3 and all(p.endswith(" ") for p in got[:-1])


def test_nothing_is_held_back_that_ended() -> None:
    chunker = Chunker("sentence")
    assert chunker.feed("One. Two") == ["One. "]
    assert chunker.feed(".") == []  # a dot may yet be 2.5 or "Two." ending a quote
    assert chunker.feed(" ") == ["Two. "]
    assert chunker.flush() == ""


texts = st.text(alphabet=st.sampled_from(list("abc XYZ.,;:!?…\n\"')(`。！？3🎉")), max_size=400)


@settings(max_examples=300, deadline=None)
@given(
    text=texts,
    cuts=st.lists(st.integers(0, 400), max_size=30),
    mode=st.sampled_from(["clause", "sentence"]),
)
def test_pieces_concatenate_to_the_reply_for_any_split(
    text: str, cuts: list[int], mode: Mode
) -> None:
    points = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    chunker = Chunker(mode)
    out: list[str] = []
    for chunk in chunks:
        out += chunker.feed(chunk)
    rest = chunker.flush()
    assert "".join(out) + rest == text
    assert all(out), "no piece is empty"
