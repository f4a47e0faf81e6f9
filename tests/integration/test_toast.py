"""Unchanged TOASTed values: never a placeholder or a NULL in the current state."""

from __future__ import annotations

import psycopg
import pytest

from catalog.lake import Lake
from tests.plugins.lake import assert_lake_matches_postgres, running_pipeline, wait_caught_up

# Each test runs on the compiled columnar capture path and on the pure one.
pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("capture_path")]

# ~130 KB of md5 hex: stored out of line (TOASTed) even after pglz compression.
BIG = "(SELECT string_agg(md5(random()::text || g), '') FROM generate_series(1, 4000) g)"


@pytest.mark.parametrize("identity", ["DEFAULT", "FULL"])
def test_unchanged_toast_values_survive_updates_of_other_columns(
    pg_dsn: str, pg_conn: psycopg.Connection, lake_dir: str, identity: str
) -> None:
    pg_conn.execute(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text, blob bytea, hits int)"
    )
    pg_conn.execute(f"ALTER TABLE docs REPLICA IDENTITY {identity}")
    pg_conn.execute(
        f"INSERT INTO docs SELECT g, 'doc ' || g, {BIG}, NULL, 0 FROM generate_series(1, 3) g"
    )
    with running_pipeline(pg_dsn, lake_dir) as pipeline:
        pg_conn.execute(
            f"INSERT INTO docs VALUES (4, 'streamed', {BIG}, convert_to({BIG}, 'UTF8'), 0)"
        )
        for _ in range(3):  # several updates that leave the big columns alone
            pg_conn.execute("UPDATE docs SET hits = hits + 1")
        pg_conn.execute("UPDATE docs SET title = 'renamed' WHERE id = 2")
        pg_conn.execute(f"UPDATE docs SET body = {BIG} WHERE id = 3")  # a real change
        pg_conn.execute("UPDATE docs SET body = NULL, hits = 100 WHERE id = 1")  # a real NULL
        pg_conn.execute("UPDATE docs SET hits = 101 WHERE id = 1")
        # A key change that leaves the TOASTed value alone.
        pg_conn.execute("UPDATE docs SET id = 40 WHERE id = 4")
        pg_conn.execute("UPDATE docs SET hits = 7 WHERE id = 40")
        wait_caught_up(pipeline, pg_dsn)

    size = pg_conn.execute("SELECT min(length(body)) FROM docs WHERE body IS NOT NULL").fetchone()
    assert size and size[0] > 100_000
    assert_lake_matches_postgres(
        pg_dsn, lake_dir, "public.docs", ["id", "title", "body", "blob", "hits"], ["id"]
    )
    with Lake(lake_dir) as lk:
        marked = lk.sql(
            "SELECT count(*) FROM public.docs_changes WHERE len(_cdc_unchanged_toast) > 0"
        ).fetchone()
    # Under DEFAULT the changelog marks the unchanged columns; under FULL the old row
    # carries them, so nothing needs marking.
    assert marked is not None
    assert (marked[0] > 0) == (identity == "DEFAULT")
