"""Errors raised by :mod:`transforms`.

:class:`TransformConfigError` is a rule that cannot work (an unknown mask, SQL that does
not parse or bind, a column the table does not have); its message names the rule and the
config file. :class:`TransformEvaluationError` is a rule that failed on data (an
``add_columns`` expression that divides by zero, a cast that does not fit). Both are
terminal: retrying the same rule on the same rows fails the same way. Neither message
carries row values, so a masked value cannot leak through an error or a log line.
"""

from __future__ import annotations

from cdc.core.errors import CdcError, ConfigError, TerminalError


class TransformError(CdcError):
    """Root of every error raised by the ``transforms`` package."""


class TransformConfigError(TransformError, ConfigError):
    """A rule is invalid, or does not fit a table it applies to."""


class TransformEvaluationError(TransformError, TerminalError):
    """A rule's SQL failed on a batch of rows."""
