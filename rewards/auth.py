"""The reward service's authentication: one bearer token, shared by server and clients.

The token lives in a file (``unigrpo serve reward NAME --token-file F``; the client's
``token_file=``), one word, surrounding whitespace ignored. Clients send
``Authorization: Bearer <token>``; the server compares it in constant time.
"""

from __future__ import annotations

import hmac
from pathlib import Path

__all__ = ["read_token_file", "bearer_header", "bearer_matches"]


def read_token_file(path: str | Path) -> str:
    """The token in ``path``; ``ValueError`` if the file is unreadable, empty or not one word."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read the token file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"the token file {path} is not UTF-8 text") from exc
    if not token:
        raise ValueError(f"the token file {path} is empty")
    if any(c.isspace() for c in token):
        raise ValueError(f"the token in {path} must be one word (no spaces or line breaks inside)")
    return token


def bearer_header(token: str) -> dict[str, str]:
    """The request header that carries ``token``."""
    return {"authorization": f"Bearer {token}"}


def bearer_matches(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>`` (constant-time comparison)."""
    scheme, _, value = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())
