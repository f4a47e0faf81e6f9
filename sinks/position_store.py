"""Capture's position in the lake: the embedded pipeline's :class:`~sinks.base.PositionStore`."""

from __future__ import annotations

import orjson

from catalog import lake_layout as layout
from cdc.core.position import CapturePosition


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
        try:
            with self._fs.open_input_stream(self._fs_path) as f:
                return CapturePosition.from_dict(orjson.loads(f.read()))
        except FileNotFoundError:
            return None

    def save(self, position: CapturePosition) -> None:
        layout.write_atomically(self._fs, self._fs_path, orjson.dumps(position.to_dict()))
