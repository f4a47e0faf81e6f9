"""Log output: rich lines for people, or one JSON object per line for log shippers.

Either way every record passes a :class:`~cdc.core.secrets.SecretFilter`, so the source
password and secret client properties never reach the output.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from rich.console import Console
from rich.logging import RichHandler

from cdc.core.secrets import SecretFilter

#: Attributes every LogRecord has; anything else was passed with ``extra=`` and becomes a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

#: Masks DSN passwords and the secrets of every settings object loaded so far.
secret_filter = SecretFilter()


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra fields}``, one line per record.

    Fields passed with ``extra=`` (``table``, ``lsn``, ``rows``...) are kept as they are, so
    a shipper can index them.
    """

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exception"] = record.exc_text
        return orjson.dumps(data, default=str).decode()


def configure_logging(log_format: Literal["rich", "json"], *, console: Console) -> None:
    """Route every logger through one handler with the secret filter, in ``log_format``."""
    handler: logging.Handler
    if log_format == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        # Through rich, so log lines and the live snapshot progress bar do not garble each other.
        handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.addFilter(secret_filter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("deltalake").setLevel(logging.WARNING)
