"""How long a columnar read keeps gathering rows before it hands them on
(cdc.postgres.streaming.gathering_wait)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.postgres import streaming
from cdc.postgres.streaming import gathering_wait


def _total_gathering(tables: int) -> float:
    """Seconds a read gathers when every wait it is given passes without a frame ending
    it early (the longest it can hold rows back)."""
    gathered = 0.0
    while (wait := gathering_wait(gathered, tables=tables)) > 0:
        gathered += wait
    return gathered


def test_rows_of_few_tables_wait_briefly_for_more() -> None:
    assert gathering_wait(0.0, tables=1) == streaming.COALESCE_SECONDS
    assert _total_gathering(1) == pytest.approx(streaming.COALESCE_BUDGET)
    assert gathering_wait(streaming.COALESCE_BUDGET, tables=1) == 0.0


def test_rows_of_many_tables_gather_longer_up_to_the_cap() -> None:
    # 100 tables: 1 ms each, waiting out pauses of a quarter of that.
    assert gathering_wait(0.0, tables=100) == pytest.approx(0.1 / 4)
    assert _total_gathering(100) == pytest.approx(0.1)
    # However many tables, a read holds rows back for at most the cap.
    assert _total_gathering(300) == pytest.approx(streaming.COALESCE_MAX_BUDGET)
    assert _total_gathering(100_000) == pytest.approx(streaming.COALESCE_MAX_BUDGET)


@given(
    gathered=st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    tables=st.integers(min_value=0, max_value=10_000),
)
def test_a_wait_never_outlasts_the_budget_left(gathered: float, tables: int) -> None:
    wait = gathering_wait(gathered, tables=tables)
    budget = max(streaming.COALESCE_BUDGET, min(streaming.COALESCE_MAX_BUDGET, tables / 1000))
    assert 0.0 <= wait <= max(0.0, budget - gathered) + 1e-12
    assert wait <= max(streaming.COALESCE_SECONDS, budget / 4) + 1e-12
    # More tables never shorten the wait.
    assert gathering_wait(gathered, tables=tables + 1) >= wait
