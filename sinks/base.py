"""The sink contract: what capture (or a Kafka consumer) hands change events to.

Modelled on small sink APIs such as quixstreams': :meth:`Sink.setup` once, :meth:`Sink.add`
per event (kept in batches per destination), :meth:`Sink.flush` to make everything added so
far durable. A sink whose buffers are full raises :class:`~sinks.errors.SinkBackpressure`
from ``add``; the caller flushes and adds the event again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from cdc.events import ChangeEvent


class Sink(ABC):
    """Receives change events and makes them durable on :meth:`flush`."""

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Prepare destinations (open tables, read watermarks). Called once before ``add``."""

    @abstractmethod
    def add(self, event: ChangeEvent) -> None:
        """Buffer one event. Raises SinkBackpressure when the buffers are full."""

    @abstractmethod
    def flush(self) -> dict[str, Any]:
        """Make every buffered event durable; returns metrics of what was written."""

    @abstractmethod
    def flush_due(self) -> bool:
        """Whether a batch limit (rows, bytes or age) has been reached."""

    @property
    @abstractmethod
    def pending_rows(self) -> int:
        """Events added but not yet flushed."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources. Does not flush."""
