"""Capture's position in the lake: the embedded pipeline's :class:`~sinks.base.PositionStore`."""

from __future__ import annotations

import orjson

from catalog import lake_layout as layout
from catalog.errors import TransientCatalogError
from cdc.core.position import CapturePosition
from sinks.errors import TerminalSinkError, TransientSinkError


class LakePositionStore:
    """Keeps the durable part of a :class:`CapturePosition` in the lake, in
    ``_cdc/pipelines/<name>.json`` (written atomically)."""

    def __init__(
        self, root: str, pipeline: str, *, storage_options: dict[str, str] | None = None
    ) -> None:
        self.path = layout.join(
            layout.normalize_root(root), layout.INTERNAL_DIR, "pipelines", f"{pipeline}.json"
        )
        self._fs, self._fs_path = layout.filesystem(self.path, storage_options)

    def load(self) -> CapturePosition | None:
        """The saved position, or None if there is none.

        Raises:
            TransientSinkError: the store could not be read (retry).
            TerminalSinkError: the file is not a position this version can read.
        """
        try:
            with self._fs.open_input_stream(self._fs_path) as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TransientSinkError(f"cannot read the pipeline state {self.path}: {e}") from e
        try:
            return CapturePosition.from_dict(orjson.loads(raw))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise TerminalSinkError(
                f"the pipeline state {self.path} is damaged ({e}); restore it from a backup, "
                "or delete it and the pipeline's lake tables and slot to start over"
            ) from e

    def save(self, position: CapturePosition) -> None:
        """Write ``position`` atomically.

        Raises:
            TransientSinkError: the write failed; the previous state is intact (retry).
        """
        try:
            layout.write_atomically(self._fs, self._fs_path, orjson.dumps(position.to_dict()))
        except TransientCatalogError as e:
            raise TransientSinkError(f"cannot save the pipeline state {self.path}: {e}") from e
