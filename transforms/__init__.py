"""Declarative per-table rules from the pipeline config: masks, column drops and renames,
row filters, computed columns, skipped operations and routes (see docs/transforms.md).

Pure: no IO. :class:`Transforms` compiles ``[[transforms.rules]]`` once per table shape into
one DuckDB query over Arrow batches; capture (:mod:`cdc.pipeline`, through
:class:`sinks.transformed.TransformingSink`) and the Kafka sink workers apply it.
"""

from transforms.errors import TransformConfigError, TransformError, TransformEvaluationError
from transforms.masks import Mask, mask_text, parse_mask
from transforms.rules import Rule, TablePlan, Transforms

__all__ = [
    "Mask",
    "Rule",
    "TablePlan",
    "TransformConfigError",
    "TransformError",
    "TransformEvaluationError",
    "Transforms",
    "mask_text",
    "parse_mask",
]
