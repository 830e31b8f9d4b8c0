"""Pure scoring functions shared by the eval suites: normalization, number extraction, matching.

No model or tokenizer here, so every rule is unit-testable on hand-made outputs.
"""

from __future__ import annotations

import re
import string
import unicodedata

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
_CHAT_MARKUP = re.compile(r"<\|[a-z_]+\|>|</?s>")
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*[:=]?\s*", re.IGNORECASE)


def strip_markup(text: str) -> str:
    """Removes chat specials (`<|im_end|>`, `</s>`, ...) a decoder may have rendered."""
    return _CHAT_MARKUP.sub("", text)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: NFKC, lowercase, no punctuation / articles, single spaces.

    A leading "Answer:" / "The answer is" is dropped, so `"The answer is: Paris."` → `"paris"`.
    Commas between digits are removed first so `"1,024"` → `"1024"`.
    """
    text = unicodedata.normalize("NFKC", strip_markup(text)).strip()
    text = _ANSWER_PREFIX.sub("", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text).lower()
    text = "".join(" " if ch in string.punctuation and ch not in ".-" else ch for ch in text)
    text = re.sub(r"\.(?!\d)", " ", text)  # sentence dots go, decimal points stay
    text = re.sub(r"(?<=\w)-|-(?!\d)", " ", text)  # hyphens go, minus signs stay
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_numbers(text: str) -> list[str]:
    """All numbers in `text` in order, canonical (`"1,024"` → `"1024"`, `"3.50"` → `"3.5"`, `"+7"` → `"7"`)."""
    out = []
    for m in _NUMBER.finditer(strip_markup(text)):
        raw = m.group().rstrip(",").replace(",", "")
        out.append(_canonical_number(raw))
    return out


def _canonical_number(raw: str) -> str:
    neg = raw.startswith("-")
    raw = raw.lstrip("+-")
    if "." in raw:
        raw = raw.rstrip("0").rstrip(".")
    raw = raw.lstrip("0") or "0"
    if raw.startswith("."):
        raw = "0" + raw
    return ("-" if neg and raw != "0" else "") + raw


def extract_number(text: str, which: str = "first") -> str | None:
    """The first (or `which="last"`) number in `text`, canonical; None when there is none."""
    nums = extract_numbers(text)
    if not nums:
        return None
    return nums[0] if which == "first" else nums[-1]


def first_line(text: str) -> str:
    """The first non-empty line (models often keep talking after the answer)."""
    for line in strip_markup(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(prediction: str, reference: str) -> bool:
    """Normalized equality; numeric references also match the first number of the prediction.

    `exact_match("The answer is 42.", "42")` and `exact_match("Paris", "paris.")` are True.
    """
    ref = normalize_answer(reference)
    pred = normalize_answer(first_line(prediction))
    if pred == ref:
        return True
    ref_num = extract_numbers(reference)
    if len(ref_num) == 1 and _NUMBER.fullmatch(reference.strip().rstrip(".")):
        return extract_number(first_line(prediction)) == ref_num[0]
    return False


def regex_match(prediction: str, pattern: str) -> bool:
    """`re.search(pattern, prediction)` (case-insensitive, DOTALL) after dropping chat markup.

    An invalid pattern raises `ValueError` naming it (a broken benchmark, not a wrong answer).
    """
    try:
        rx = re.compile(pattern, re.IGNORECASE | re.DOTALL)
    except re.error as e:
        raise ValueError(f"bad regex reference {pattern!r}: {e}") from None
    return rx.search(strip_markup(prediction)) is not None


def contains_value(prediction: str, value: str) -> bool:
    """Whether `prediction` states `value` as a whole number/word (needle detection).

    Digits are compared after removing thousands separators and spaces between digits, so
    `"4,721"` and `"4 7 2 1"` count for `"4721"` but `"47210"` does not.
    """
    text = strip_markup(prediction)
    if value.isdigit():
        rx = re.compile(rf"(?<!\d){re.escape(value)}(?!\d)")
        no_commas = re.sub(r"(?<=\d),(?=\d)", "", text)
        return bool(rx.search(no_commas) or rx.search(re.sub(r"(?<=\d)\s(?=\d)", "", no_commas)))
    return re.search(rf"\b{re.escape(value)}\b", text, re.IGNORECASE) is not None
