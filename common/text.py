"""Small helpers for the text fedrad prints (counts with the right grammatical number)."""
from __future__ import annotations


def plural(n: int, singular: str, many: str | None = None) -> str:
    """``"1 round trip"``, ``"2 round trips"``: ``n`` and the noun in the number ``n`` takes."""
    return f"{n} {singular if n == 1 else many or singular + 's'}"


def verb(n: int, one: str, many: str) -> str:
    """The verb form agreeing with ``n`` subjects ("stage differs", "age, stage differ")."""
    return one if n == 1 else many
