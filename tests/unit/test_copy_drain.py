"""Which libpq the compiled COPY drain calls: read from the process's memory map.

The drain itself runs against a real server in tests/integration/test_snapshot_reader.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cdc.postgres import copy_drain

MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 1234   /usr/bin/python3.11
7f0000000000-7f0000001000 rw-p 00000000 00:00 0
7f0000001000-7f0000002000 r-xp 00000000 fd:01 42     /venv/site-packages/psycopg_binary.libs/libpq-e9b5c9ac.so.5.18
7f0000002000-7f0000003000 r--p 00001000 fd:01 42     /venv/site-packages/psycopg_binary.libs/libpq-e9b5c9ac.so.5.18
7f0000003000-7f0000004000 r-xp 00000000 fd:01 77     /opt/my libs/libpqwalreceiver.so
7f0000004000-7f0000005000 r-xp 00000000 fd:01 78     /usr/lib/x86_64-linux-gnu/libpthread.so.0
7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0      [stack]
"""


def test_mapped_libpqs_are_read_from_the_memory_map(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    assert copy_drain._mapped_libpqs(maps) == {
        "/venv/site-packages/psycopg_binary.libs/libpq-e9b5c9ac.so.5.18",
        "/opt/my libs/libpqwalreceiver.so",  # a path with a space stays whole
    }
    assert copy_drain._mapped_libpqs(tmp_path / "missing") == set()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_psycopgs_libpq_is_found_in_this_process() -> None:
    import psycopg  # noqa: F401  (loads libpq)

    functions = copy_drain._libpq_functions()
    assert functions is not None and len(functions) == 4 and all(functions)
