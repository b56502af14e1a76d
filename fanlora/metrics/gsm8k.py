"""GSM8K: the final number of an answer, and accuracy against the gold "#### N" line.

Models write answers many ways ("The answer is $1,234.", "#### -7", "= 3.50 dollars"); the rule here is
the common one: if the text has a "####" marker, the number after it; otherwise the last number in the text.
Thousands separators, currency signs and trailing units are ignored; "3.50" equals "3.5" (numbers are
compared as exact decimals, so 0.1 + 0.2 style float noise cannot creep in).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")


def _to_decimal(token: str) -> Decimal | None:
    cleaned = token.replace(",", "").replace("$", "").replace(" ", "")
    try:
        return Decimal(cleaned).normalize()
    except InvalidOperation:
        return None


def extract(text: str) -> Decimal | None:
    """The final answer of ``text`` as an exact decimal, or None when it has no number."""
    if "####" in text:
        text = text.split("####")[-1]
        found = _NUMBER.findall(text)
        return _to_decimal(found[0]) if found else None
    found = _NUMBER.findall(text)
    return _to_decimal(found[-1]) if found else None


def correct(prediction: str, gold_answer: str) -> bool:
    """Whether the prediction's final number equals the gold solution's "#### N"."""
    gold = extract(gold_answer)
    if gold is None:
        raise ValueError(f"gold answer without a number: {gold_answer[-60:]!r}")
    pred = extract(prediction)
    return pred is not None and pred == gold
