"""One exception type for every user-facing problem.

A :class:`BackdoorLabError` names what is wrong and how to fix it; the CLI prints its
message without a traceback and exits with code 2.
"""

from __future__ import annotations


class BackdoorLabError(ValueError):
    """Bad input: an unknown name, a missing file, a wrong shape, an out-of-range value."""


def format_validation_error(exc: Exception, prefix: str = "") -> str:
    """Turn a pydantic ``ValidationError`` into one line per bad key (``prefix.key: message``)."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    lines = []
    for err in errors():
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, BackdoorLabError):  # raised by a component's own check: its message says it all
            lines.append(str(inner))
            continue
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
        key = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key"
        value = err.get("input")
        shown = "" if err.get("type") in ("missing", "extra_forbidden") else f" (got {value!r})"
        lines.append(f"{key}: {msg}{shown}")
    return "; ".join(lines)
