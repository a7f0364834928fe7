"""JSON and configuration data from outside the process, read within bounds.

Every place that parses JSON it did not write itself — a trajectory file's header, a reward
request's safetensors header and metadata, a reward server's answer, a config file, a run
folder's ``config.json`` — goes through :func:`loads`, and every tree of values read from YAML
through :func:`check_tree`. The same input then fails the same way everywhere: a
:class:`BoundedJSONError` (a ``ValueError``) with a one-line message, never a ``RecursionError``,
an ``OverflowError`` or an answer that takes minutes.

The bounds:

* nesting at most :data:`MAX_DEPTH` levels deep (a 100,000-deep ``[[[[...`` stops the parser at
  Python's recursion limit, which is reported as such; a parsed value is then walked without
  recursion, in time proportional to its number of values);
* integers of at most ``sys.get_int_max_str_digits()`` digits (4,300 by default; Python's own
  limit, reported in the same error);
* finite numbers only: JSON's non-standard ``NaN`` / ``Infinity`` and numbers that overflow a
  float (``1e400``) are refused; the project's own writers spell a non-finite value as a string;
* for trees read from YAML, at most :data:`MAX_NODES` values counted with repetition, so an
  alias bomb (``a: &a [x, x]``, ``b: &b [*a, *a]``, ...) that would expand to millions of values
  is refused after reading :data:`MAX_NODES`, not expanded.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_NODES", "BoundedJSONError", "loads", "check_tree", "shorten"]

#: The deepest nesting of arrays and objects accepted (the project's own files nest 4 deep).
MAX_DEPTH = 100
#: The most values a tree read from YAML may hold, counted with repetition (aliases expanded).
MAX_NODES = 100_000
#: The longest value text an error message quotes (longer ones are cut, saying by how much).
MAX_QUOTED = 200


class BoundedJSONError(ValueError):
    """JSON (or a YAML tree) that breaks a bound or is not JSON at all."""


def shorten(text: str, limit: int = MAX_QUOTED) -> str:
    """``text`` on one line, cut to ``limit`` characters with a note of how many were left out."""
    line = " ".join(str(text).split())
    if len(line) <= limit:
        return line
    return f"{line[:limit]}… ({len(line) - limit} more characters)"


def _refuse_constant(name: str) -> Any:
    raise BoundedJSONError(f"{name} is not a JSON number (finite numbers only)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BoundedJSONError(f"the number {shorten(text, 40)} is too large for a float (finite numbers only)")
    return value


def loads(data: str | bytes | bytearray, *, what: str = "the JSON", max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON ``data`` (UTF-8 if bytes) within the module's bounds; :class:`BoundedJSONError`
    naming ``what`` if it breaks one or is not JSON."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BoundedJSONError(f"{what} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    try:
        value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except BoundedJSONError as exc:
        raise BoundedJSONError(f"{what}: {exc}") from None
    except RecursionError:
        raise BoundedJSONError(f"{what} nests deeper than Python's parser goes; at most {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise BoundedJSONError(f"{what} is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:  # an integer over Python's digit limit, and the like
        raise BoundedJSONError(f"{what} is not acceptable JSON: {_reason(exc)}") from None
    if _deeper_than(value, max_depth):
        raise BoundedJSONError(f"{what} nests more than {max_depth} levels deep")
    return value


def _deeper_than(root: Any, max_depth: int) -> bool:
    """Whether ``root`` nests more than ``max_depth`` levels: one level of containers at a time."""
    level = [root] if type(root) in (dict, list) else []
    for _ in range(max_depth):
        if not level:
            return False
        level = [
            child
            for node in level
            for child in (node.values() if type(node) is dict else node)
            if type(child) in (dict, list)
        ]
    return bool(level)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "integer string conversion" in text:
        return "an integer with more digits than Python converts (sys.get_int_max_str_digits())"
    return shorten(f"{type(exc).__name__}: {text}")


def check_tree(
    value: Any, *, what: str = "the data", max_depth: int = MAX_DEPTH, max_nodes: int | None = MAX_NODES
) -> None:
    """Check a tree of dicts, lists and plain values (read from YAML or JSON) against the bounds:
    its depth, its size counted with repetition (YAML aliases expanded), and finite floats only.
    Iterative: a deep or aliased tree costs at most ``max_nodes`` visits. A stack entry's trail is
    ``(parent's trail, key)``, spelled out on error only."""
    if isinstance(value, float) and not math.isfinite(value):
        raise BoundedJSONError(f"{what} is {value}; finite numbers only")
    if not isinstance(value, (dict, list, tuple)):
        return
    stack: list[tuple[Any, int, Any]] = [(value, 1, None)]
    visited = 0
    while stack:
        node, depth, trail = stack.pop()
        if depth > max_depth:
            raise BoundedJSONError(f"{what} nests more than {max_depth} levels deep (at {_path(trail)})")
        children = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in children:
            visited += 1
            if max_nodes is not None and visited > max_nodes:
                raise BoundedJSONError(
                    f"{what} holds more than {max_nodes} values (counting each YAML alias as what it repeats)"
                )
            if isinstance(child, (dict, list, tuple)):
                stack.append((child, depth + 1, (trail, key)))
            elif isinstance(child, float) and not math.isfinite(child):
                raise BoundedJSONError(f"{what} at {_path((trail, key))} is {child}; finite numbers only")


def _path(trail: Any) -> str:
    keys = []
    while trail is not None:
        trail, key = trail
        keys.append(key)
    text = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in reversed(keys)).lstrip(".")
    return shorten(text or "the top", 80)
