"""How an error is told to a user: one line.

    raise ValueError(f"{path}: cannot be read ({first_line(e, with_type=True)})") from None
"""
from __future__ import annotations

# torch's weights_only refusal is a paragraph around the one line that says what was refused;
# its boilerplate (which suggests weights_only=False) is never the line to show
_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def first_line(e: BaseException, limit: int = 200, with_type: bool = False) -> str:
    """The first non-empty line of ``e``'s message that says something (at most ``limit``
    characters), or the exception's type name when it has no message; ``with_type``
    prefixes ``Type: `` to a message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(_BOILERPLATE)] or lines
    if not said:
        return type(e).__name__
    return f"{type(e).__name__}: {said[0][:limit]}" if with_type else said[0][:limit]
