"""Clause and sentence boundaries for text-to-speech: text in as the engine streams it, pieces out.

A `Chunker` takes a reply's chunks as they come (`feed`) and hands back the pieces that are
complete: whole sentences (`sentence`), or clauses too (`clause`), ready for a speech engine.
Concatenating every piece and the rest (`flush`, at the end of the reply or when it stops)
gives back exactly the text fed in; no piece is empty.

Where a piece ends:
- after `.`, `!`, `?` (with the closing quotes and brackets that follow them) and the space
  after it; after `。`, `！`, `？` at once, with no space needed;
- not after an abbreviation ("Dr.", "e.g.", "etc."), an initial ("J."), a list number at the
  start of a line ("1."), nor inside a number ("3.14"), a URL or an address ("example.com",
  "a.b@c.org": no space follows the dot), an ellipsis ("...", "…") or a `code span`;
- at a line break, once the piece holds a word;
- in `clause` mode also after `,`, `;` and `:` with a space, once the piece has
  `CLAUSE_WORDS` words (a lone "Yes," is not worth its own piece);
- in both modes, the first piece of a reply may end at a clause boundary once it has
  `FIRST_WORDS` words: a short first piece is heard sooner;
- and wherever a piece grows past `MAX_CHARS` with no boundary at all, at the last space.

Each `feed` looks only at the new text for punctuation (one regex search), so the cost per
chunk stays a small constant (`bench/voice.py`: under 1 us a token). A sentence segmenter
library does not fit a stream: pysbd 0.3.4, re-run on the text held as each token arrives,
cost about 78 us a token here, and gives back its sentences without the spaces between them.
"""

from __future__ import annotations

import re
from typing import Literal

Mode = Literal["clause", "sentence"]

MAX_CHARS = 200
CLAUSE_WORDS = 3
FIRST_WORDS = 4
ABBREVIATIONS = frozenset(
    {
        "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e",
        "cf", "approx", "no", "vol", "fig", "inc", "ltd", "co", "corp", "dept", "est",
        "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
        "a.m", "p.m", "u.s", "u.k", "ph.d",
    }
)  # fmt: skip
_CANDIDATE = re.compile(r"[.!?…。！？,;:\n`]")
_CLOSERS = "\"'”’»)]}」』）】"
_CJK_ENDS = "。！？"
_WORD = re.compile(r"\S+")


class Chunker:
    """Pieces of one reply, as they complete."""

    def __init__(self, mode: Mode) -> None:
        self._clauses = mode == "clause"
        self._text = ""  # fed, not yet handed out
        self._scan = 0  # where the next search for punctuation starts
        self._in_code = False
        self._first = True

    def feed(self, text: str) -> list[str]:
        """Add the next chunk of the reply; return the pieces it completed, in order."""
        self._text += text
        pieces: list[str] = []
        while (end := self._boundary()) is not None:
            piece, self._text = self._text[:end], self._text[end:]
            self._scan = 0
            self._first = False
            pieces.append(piece)
        return pieces

    def flush(self) -> str:
        """The rest of the reply (it ended, or stopped): possibly empty."""
        rest, self._text, self._scan = self._text, "", 0
        return rest

    def _boundary(self) -> int | None:
        """The end of the first complete piece in the text held, or None."""
        text = self._text
        while (found := _CANDIDATE.search(text, self._scan)) is not None:
            at = found.start()
            mark = text[at]
            if mark == "`":
                self._in_code = not self._in_code
                self._scan = at + 1
                continue
            if self._in_code:
                self._scan = at + 1
                continue
            end = self._judge(text, at, mark)
            if end is None:
                return None  # cannot tell yet: wait for more text
            if end > 0:
                return end
            self._scan = at + 1
        self._scan = len(text)
        if len(text) > MAX_CHARS:
            space = text.rfind(" ", 0, len(text))
            if space > 0:
                return space + 1
        return None

    def _judge(self, text: str, at: int, mark: str) -> int | None:
        """Where a piece ends for the mark at `at`: an index, 0 for no boundary, None when
        the text after it has not come yet."""
        if mark == "\n":
            return at + 1 if text[:at].strip() else 0
        after = at + 1
        if mark in _CJK_ENDS:
            while after < len(text) and text[after] in _CLOSERS:
                after += 1
            return after if after < len(text) else None
        if mark in ",;:":
            words = len(_WORD.findall(text, 0, at))
            wanted = FIRST_WORDS if self._first and not self._clauses else CLAUSE_WORDS
            if not (self._clauses or self._first) or words < wanted:
                return 0
            return self._space_after(text, after)
        # . ! ? …
        if mark == "…" or text.startswith("..", at) or (at > 0 and text[at - 1] == "."):
            return 0  # an ellipsis does not end a sentence
        if mark == "." and self._not_an_end(text, at):
            return 0
        while after < len(text) and text[after] in _CLOSERS:
            after += 1
        return self._space_after(text, after)

    @staticmethod
    def _space_after(text: str, at: int) -> int | None:
        """The piece ends after the whitespace at `at`; 0 if none is there."""
        if at >= len(text):
            return None
        if not text[at].isspace():
            return 0
        while at < len(text) and text[at] in " \t":
            at += 1
        if at < len(text) and text[at] in "\r\n":
            at += 1  # the line ends here too: it goes with the piece it ends
        return at

    @staticmethod
    def _not_an_end(text: str, at: int) -> bool:
        """A dot that ends a word, not a sentence: an abbreviation, an initial, a list number."""
        start = at
        while start > 0 and not text[start - 1].isspace() and text[start - 1] not in "(\"'":
            start -= 1
        word = text[start:at]
        if not word:
            return False
        if word.lower() in ABBREVIATIONS:
            return True
        if len(word) == 1 and word.isalpha() and word.isupper():
            return True  # an initial: J. R. R. Tolkien
        line_start = start == 0 or text[start - 1] == "\n"
        return word.isdigit() and line_start  # a numbered list's "1."
