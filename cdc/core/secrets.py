"""Keeping secrets out of what the tool shows: DSNs with their password masked, and a log
filter that masks every secret the process was given.

Secrets are the source DSN's password and the values of client properties whose name says
they are secret (``sasl.password``, ``ssl.key.password``, ``*secret*``, ``*token*``...).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import unquote

__all__ = [
    "MASK",
    "SecretFilter",
    "dsn_password",
    "forget_secrets",
    "is_secret_property",
    "known_secrets",
    "mask_dsn",
    "mask_text",
    "register_secrets",
]

MASK = "***"

# URI form: scheme://user:password@host... ; the password ends at the last '@' before the host.
_URI_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?P<tail>@)", re.I
)
# key=value form: password=secret or password='sec ret'
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|[^\s]+)", re.I)
# URI query parameter: ?password=secret
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<pw>[^&\s]+)", re.I)

_SECRET_WORDS = ("password", "secret", "token", "credential", "private.key", "key.pem", "hash_key")


#: Every secret of the settings loaded in this process (see :func:`register_secrets`).
_KNOWN: set[str] = set()


def register_secrets(*secrets: str | None) -> None:
    """Remember secret values so that :class:`SecretFilter` and :func:`mask_text` mask them.

    Values shorter than 3 characters are ignored: masking them would garble ordinary words.
    """
    _KNOWN.update(s for s in secrets if s and len(s) >= 3)


def forget_secrets() -> None:
    """Forget every registered secret: for tests, and for a process that loads settings of
    another pipeline."""
    _KNOWN.clear()


def known_secrets() -> frozenset[str]:
    return frozenset(_KNOWN)


def mask_dsn(dsn: str) -> str:
    """``dsn`` with its password replaced by ``***`` (URI and key=value forms).

    >>> mask_dsn("postgresql://app:s3cr%40t@db:5432/shop")
    'postgresql://app:***@db:5432/shop'
    >>> mask_dsn("host=db user=app password='a b' dbname=shop")
    'host=db user=app password=*** dbname=shop'
    """
    masked = _URI_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['tail']}", dsn)
    masked = _QUERY_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", masked)
    return _KV_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", masked)


def dsn_password(dsn: str) -> str | None:
    """The password written in ``dsn``, if any (for :class:`SecretFilter`).

    >>> dsn_password("postgresql://app:s3cr%40t@db/shop")
    's3cr@t'
    """
    m = _URI_PASSWORD.search(dsn) or _QUERY_PASSWORD.search(dsn)
    if m and m["pw"]:
        return unquote(m["pw"])
    m = _KV_PASSWORD.search(dsn)
    if m:
        pw = m["pw"]
        return pw[1:-1].replace("\\'", "'").replace("\\\\", "\\") if pw.startswith("'") else pw
    return None


def is_secret_property(name: str) -> bool:
    """Whether a client property's value is a secret.

    >>> is_secret_property("sasl.password"), is_secret_property("sasl.mechanism")
    (True, False)
    """
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every DSN password, every registered secret and every one of
    ``secrets`` masked."""
    text = mask_dsn(text)
    for secret in (*_KNOWN, *secrets):
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return text


class SecretFilter(logging.Filter):
    """Masks secrets in every log record it sees (message, arguments and exception text):
    DSN passwords, the registered secrets (:func:`register_secrets`) and its own.

    Install it on the handlers (``handler.addFilter``) so that records of every logger,
    third-party ones included, pass through it.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: set[str] = {s for s in secrets if s and len(s) >= 3}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_text(message, self.secrets)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = mask_text(text, self.secrets)
            record.exc_info = None
        return True
