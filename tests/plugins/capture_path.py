"""``capture_path``: run a test on the compiled columnar capture path and on the pure one.

The compiled path is both extensions: the pgoutput decoder and the snapshot's COPY drain
(:mod:`cdc.postgres.copy_drain`). Tests that exercise either take it with ``pytest.mark.usefixtures("capture_path")``;
each then runs twice, ``[compiled]`` and ``[python]``. The choice goes through
``CDC_PURE_PYTHON`` (read when a stream starts, see :mod:`cdc.postgres.protocol.compiled`),
so it holds in-process and in ``cdc`` subprocesses alike. A missing extension fails the
``[compiled]`` runs instead of skipping them: CI must build it.
"""

from __future__ import annotations

from typing import Literal

import pytest

from cdc.postgres import copy_drain
from cdc.postgres.protocol import compiled

CapturePath = Literal["compiled", "python"]


@pytest.fixture(params=["compiled", "python"])
def capture_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> CapturePath:
    path: CapturePath = request.param
    if path == "compiled":
        if not (compiled.AVAILABLE and copy_drain.AVAILABLE):
            pytest.fail(
                "the compiled pgoutput decoder or COPY drain is not built: run `pip install "
                "-e .` with a C compiler, or `python setup.py build_ext --inplace` "
                "(docs/development.md)"
            )
        monkeypatch.delenv("CDC_PURE_PYTHON", raising=False)
        assert compiled.enabled()
    else:
        monkeypatch.setenv("CDC_PURE_PYTHON", "1")
        assert not compiled.enabled()
    return path
