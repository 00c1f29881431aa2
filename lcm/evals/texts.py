"""Long local texts that exist on every CPython install, so evals need no download.

- code: the source of the standard library's ``typing`` module (~120k characters of Python).
- prose: the Python reference documentation topics shipped in ``pydoc_data`` (~460k characters of English).
"""

from __future__ import annotations

import inspect
from pathlib import Path


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; one-line errors for a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty")
    return text


def stdlib_code() -> str:
    import typing

    return inspect.getsource(typing)


def stdlib_prose() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions strip pydoc_data
        raise FileNotFoundError("this Python has no pydoc_data; pass a haystack text file instead") from err
    return "\n\n".join(topics[name] for name in sorted(topics))


BUILTIN = {"code": stdlib_code, "prose": stdlib_prose}


def text_from(spec: str, default: str) -> str:
    """A built-in text by name (``code``: ``typing.py``; ``prose``: the reference docs), ``default``'s for ``""``,
    else a UTF-8 file (:func:`read_text`)."""
    name = spec or default
    return BUILTIN[name]() if name in BUILTIN else read_text(name)
