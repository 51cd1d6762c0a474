"""A small writing-system detector built on Unicode block ranges.

It finds the script that most letters of a text belong to, so the keyword judge
can decline to judge text in a script it has no phrases for. It cannot tell
apart languages that share a script (English from Polish, Chinese from
Cantonese). The judge checks the query's language code for that reason, which
catches a query in an uncovered language but not an answer in one.
"""

from __future__ import annotations

import bisect
import collections
import unicodedata

# (first code point, last code point, script), sorted by first code point.
_BLOCKS: tuple[tuple[int, int, str], ...] = (
    (0x0041, 0x005A, "Latin"),
    (0x0061, 0x007A, "Latin"),
    (0x00C0, 0x024F, "Latin"),
    (0x0370, 0x03FF, "Greek"),
    (0x0400, 0x052F, "Cyrillic"),
    (0x0530, 0x058F, "Armenian"),
    (0x0590, 0x05FF, "Hebrew"),
    (0x0600, 0x06FF, "Arabic"),
    (0x0700, 0x074F, "Syriac"),
    (0x0750, 0x077F, "Arabic"),
    (0x0780, 0x07BF, "Thaana"),
    (0x08A0, 0x08FF, "Arabic"),
    (0x0900, 0x097F, "Devanagari"),
    (0x0980, 0x09FF, "Bengali"),
    (0x0A00, 0x0A7F, "Gurmukhi"),
    (0x0A80, 0x0AFF, "Gujarati"),
    (0x0B00, 0x0B7F, "Oriya"),
    (0x0B80, 0x0BFF, "Tamil"),
    (0x0C00, 0x0C7F, "Telugu"),
    (0x0C80, 0x0CFF, "Kannada"),
    (0x0D00, 0x0D7F, "Malayalam"),
    (0x0D80, 0x0DFF, "Sinhala"),
    (0x0E00, 0x0E7F, "Thai"),
    (0x0E80, 0x0EFF, "Lao"),
    (0x0F00, 0x0FFF, "Tibetan"),
    (0x1000, 0x109F, "Myanmar"),
    (0x10A0, 0x10FF, "Georgian"),
    (0x1100, 0x11FF, "Hangul"),
    (0x1200, 0x139F, "Ethiopic"),
    (0x13A0, 0x13FF, "Cherokee"),
    (0x1780, 0x17FF, "Khmer"),
    (0x1800, 0x18AF, "Mongolian"),
    (0x1E00, 0x1EFF, "Latin"),
    (0x1F00, 0x1FFF, "Greek"),
    (0x2D30, 0x2D7F, "Tifinagh"),
    (0x3040, 0x30FF, "Kana"),
    (0x3130, 0x318F, "Hangul"),
    (0x31F0, 0x31FF, "Kana"),
    (0x3400, 0x4DBF, "Han"),
    (0x4E00, 0x9FFF, "Han"),
    (0xA960, 0xA97F, "Hangul"),
    (0xAC00, 0xD7AF, "Hangul"),
    (0xD7B0, 0xD7FF, "Hangul"),
    (0xF900, 0xFAFF, "Han"),
    (0xFB50, 0xFDFF, "Arabic"),
    (0xFE70, 0xFEFF, "Arabic"),
    (0xFF21, 0xFF3A, "Latin"),
    (0xFF41, 0xFF5A, "Latin"),
    (0xFF66, 0xFF9F, "Kana"),
    (0x20000, 0x3134F, "Han"),
)
_STARTS = [block[0] for block in _BLOCKS]


def char_script(char: str) -> str | None:
    """Return the script of one letter or combining mark, "Other" outside known blocks.

    Returns None for digits, punctuation, spaces, symbols and emoji, which
    belong to no particular language.
    """
    if not unicodedata.category(char).startswith(("L", "M")):
        return None
    code = ord(char)
    index = bisect.bisect_right(_STARTS, code) - 1
    if index >= 0 and code <= _BLOCKS[index][1]:
        return _BLOCKS[index][2]
    return "Other"


def script_counts(text: str) -> collections.Counter[str]:
    """Count the letters and marks of `text` per script."""
    counts: collections.Counter[str] = collections.Counter()
    for char in text:
        script = char_script(char)
        if script is not None:
            counts[script] += 1
    return counts


def dominant_script(text: str) -> str | None:
    """Return the script with the most letters in `text`, or None if it has no letters.

    Japanese mixes Han and Kana, so when Kana is present the two are counted
    together as "Kana" (Japanese). Ties go to the script seen first.
    """
    counts = script_counts(text)
    if not counts:
        return None
    if counts["Kana"]:
        counts["Kana"] += counts.pop("Han", 0)
    return max(counts, key=counts.__getitem__)
