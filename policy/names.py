"""Look-alike names (UTS #39): invisible and bidi control characters, mixed scripts, mixed digit systems.

Python's unicodedata has no Script property, so the scripts come from a compact table of the ranges
that matter for names (the letters of the scripts most used, and those that imitate Latin: Greek,
Cyrillic, Armenian, Cherokee), with the first word of the character's name as the fallback for the
others ("TIFINAGH LETTER YA" -> TIFINAGH). It is an approximation of the Unicode Script property
(Script_Extensions are not modelled), exact for the letters of those ranges, which is what a
confusable made of Latin look-alikes is built from.
"""

from __future__ import annotations

import bisect
import unicodedata

from policy.errors import PolicyError

# (first, last, script): letter ranges; everything that is not a letter (digits, punctuation, symbols,
# spaces, combining marks) is Common or Inherited and does not count as a script.
_RANGES = sorted([
    (0x0041, 0x005A, "Latin"), (0x0061, 0x007A, "Latin"), (0x00AA, 0x00AA, "Latin"), (0x00BA, 0x00BA, "Latin"),
    (0x00C0, 0x024F, "Latin"), (0x0250, 0x02AF, "Latin"), (0x1D00, 0x1DBF, "Latin"), (0x1E00, 0x1EFF, "Latin"),
    (0x2C60, 0x2C7F, "Latin"), (0xA720, 0xA7FF, "Latin"), (0xAB30, 0xAB6F, "Latin"), (0xFB00, 0xFB06, "Latin"),
    (0xFF21, 0xFF3A, "Latin"), (0xFF41, 0xFF5A, "Latin"),
    (0x0370, 0x03FF, "Greek"), (0x1F00, 0x1FFF, "Greek"),
    (0x0400, 0x052F, "Cyrillic"), (0x1C80, 0x1C8F, "Cyrillic"), (0x2DE0, 0x2DFF, "Cyrillic"), (0xA640, 0xA69F, "Cyrillic"),
    (0x0530, 0x058F, "Armenian"), (0xFB13, 0xFB17, "Armenian"),
    (0x0590, 0x05FF, "Hebrew"), (0xFB1D, 0xFB4F, "Hebrew"),
    (0x0600, 0x06FF, "Arabic"), (0x0750, 0x077F, "Arabic"), (0x08A0, 0x08FF, "Arabic"), (0xFB50, 0xFDFF, "Arabic"),
    (0xFE70, 0xFEFF, "Arabic"),
    (0x0900, 0x097F, "Devanagari"), (0x0980, 0x09FF, "Bengali"), (0x0E00, 0x0E7F, "Thai"),
    (0x10A0, 0x10FF, "Georgian"), (0x1C90, 0x1CBF, "Georgian"), (0x2D00, 0x2D2F, "Georgian"),
    (0x13A0, 0x13FF, "Cherokee"), (0xAB70, 0xABBF, "Cherokee"),
    (0x1100, 0x11FF, "Hangul"), (0x3130, 0x318F, "Hangul"), (0xAC00, 0xD7AF, "Hangul"),
    (0x3040, 0x309F, "Hiragana"), (0x30A0, 0x30FF, "Katakana"), (0x31F0, 0x31FF, "Katakana"), (0xFF66, 0xFF9F, "Katakana"),
    (0x3100, 0x312F, "Bopomofo"), (0x31A0, 0x31BF, "Bopomofo"),
    (0x2E80, 0x2FDF, "Han"), (0x3005, 0x3007, "Han"), (0x3021, 0x3029, "Han"), (0x3038, 0x303B, "Han"),
    (0x3400, 0x4DBF, "Han"), (0x4E00, 0x9FFF, "Han"), (0xF900, 0xFAFF, "Han"), (0x20000, 0x3FFFF, "Han"),
])
_STARTS = [r[0] for r in _RANGES]
# UTS #39 "Highly Restrictive": one script, or Latin with one of the writing systems that mix it with Han.
_ALLOWED_MIXES = (
    frozenset({"Latin", "Han", "Hiragana", "Katakana"}),  # Japanese
    frozenset({"Latin", "Han", "Bopomofo"}),  # Chinese
    frozenset({"Latin", "Han", "Hangul"}),  # Korean
)
# Default_Ignorable_Code_Point characters that are not of category Cf (fillers, joiners, selectors).
_IGNORABLE = frozenset([0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x3164, 0xFFA0, *range(0x180B, 0x1810), *range(0xFE00, 0xFE10),
                        *range(0xE0100, 0xE01F0)])
_BIDI = frozenset([0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def script_of(ch: str) -> str | None:
    """The script of a letter; None for what belongs to no script (digits, punctuation, marks, spaces)."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    cp = ord(ch)
    i = bisect.bisect_right(_STARTS, cp) - 1
    if i >= 0 and _RANGES[i][0] <= cp <= _RANGES[i][1]:
        return _RANGES[i][2]
    name = unicodedata.name(ch, "")
    return name.split()[0].title() if name else "Unknown"


def _cp(ch: str) -> str:
    return f"U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')}"


def check_name_text(field: str, value: str) -> None:
    """Refuse a name that can pass for another: a bidi or invisible character, letters of scripts that
    do not belong together, or digits of two numbering systems (PolicyError naming the character)."""
    scripts: set[str] = set()
    zeros: dict[int, str] = {}
    for ch in value:
        cp, cat = ord(ch), unicodedata.category(ch)
        if cp in _BIDI:
            raise PolicyError(field, "bidi-control", f"{_cp(ch)} (a bidirectional control) is not allowed in a name")
        if cat in ("Cf", "Co", "Cn", "Cs", "Zl", "Zp") or cp in _IGNORABLE or (cat == "Zs" and ch != " "):
            raise PolicyError(field, "invisible", f"{_cp(ch)} (invisible or non-standard) is not allowed in a name")
        if cat == "Nd":
            zero = cp - unicodedata.decimal(ch)
            zeros.setdefault(zero, ch)
            if len(zeros) > 1:
                a, b = sorted(zeros.values())
                raise PolicyError(field, "mixed-digits", f"digits of two numbering systems ({_cp(a)}, {_cp(b)})")
        s = script_of(ch)
        if s is not None:
            scripts.add(s)
    if len(scripts) > 1 and not any(scripts <= mix for mix in _ALLOWED_MIXES):
        raise PolicyError(field, "mixed-script", f"letters of several scripts ({', '.join(sorted(scripts))}) can "
                                                 "imitate another name (UTS #39)")
