"""The ``cdc`` command line. Commands stay thin: they parse options, call one library
function and print its result. Errors become a message and an exit code here, and only here.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from catalog.errors import CatalogError, TransientCatalogError
from cdc.errors import CdcError, TransientCdcError
from sinks.errors import SinkError, TransientSinkError

app = typer.Typer(
    name="cdc",
    help=(
        "Capture PostgreSQL row changes through logical replication into Delta Lake "
        "tables, and query them with DuckDB."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

#: Exit codes: a retry may help (EX_TEMPFAIL), or it will not.
EXIT_TERMINAL = 1
EXIT_TRANSIENT = 75

SourceOption = Annotated[
    str | None,
    typer.Option(
        "--source",
        help="PostgreSQL DSN, e.g. postgresql://user:pw@host/db (or CDC_SOURCE__DSN).",
        show_default=False,
    ),
]
LakeOption = Annotated[
    str | None,
    typer.Option(
        "--lake", help="Lake root: a directory or an object-store URI (or CDC_LAKE__PATH)."
    ),
]


class _RichSnapshotProgress:
    """Draws one progress bar per table while the initial snapshot copies it."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def table_started(self, name: str, estimated_rows: int | None) -> None:
        self.tasks[name] = self.progress.add_task(f"snapshot {name}", total=estimated_rows)

    def rows_copied(self, name: str, rows: int) -> None:
        self.progress.advance(self.tasks[name], rows)

    def table_done(self, name: str, rows: int) -> None:
        self.progress.update(self.tasks[name], total=rows, completed=rows)


def _stop_on_signals() -> threading.Event:
    """SIGINT and SIGTERM ask the pipeline to flush what it holds and exit."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        errors.print(f"[yellow]{signal.Signals(signum).name}: flushing and stopping...[/]")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


@app.command()
def run(
    source: SourceOption = None,
    lake: LakeOption = None,
    tables: Annotated[
        str | None,
        typer.Option(help="Comma-separated tables (schema.table) to capture; default all."),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Pipeline name: names the slot and publication (default 'cdc')."),
    ] = None,
    snapshot: Annotated[
        str | None,
        typer.Option(help="'initial' copies existing rows first; 'never' streams only."),
    ] = None,
    flush_seconds: Annotated[
        float | None, typer.Option(help="Commit to Delta at least this often (default 1).")
    ] = None,
) -> None:
    """Stream PostgreSQL changes into Delta tables (capture and sink in one process).

    Creates the publication and the replication slot if they are missing (running it again
    is safe), copies the existing rows once, then streams every change. Ctrl-C or SIGTERM
    flushes what is pending and exits; a restart resumes with nothing lost or duplicated.

    The slot keeps WAL on the server until the pipeline confirms it: drop the slot of a
    pipeline you retire, or the server's disk fills up.
    """
    from cdc.config import load_settings
    from cdc.pipeline import run_embedded

    settings = load_settings(
        **{
            "source.dsn": source,
            "lake.path": lake,
            "source.tables": [t.strip() for t in tables.split(",") if t.strip()]
            if tables
            else None,
            "name": name,
            "snapshot": snapshot,
            "batch.max_seconds": flush_seconds,
        }
    )
    stop = _stop_on_signals()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=errors,
        transient=False,
    ) as progress:
        metrics = run_embedded(settings, stop=stop, progress=_RichSnapshotProgress(progress))
    console.print_json(data=metrics)


@app.command()
def query(
    sql: Annotated[
        str, typer.Argument(help="SQL over the views, e.g. SELECT * FROM public.orders")
    ],
    lake: LakeOption = None,
    limit: Annotated[int, typer.Option(help="Print at most this many rows.")] = 1000,
) -> None:
    """Run SQL in DuckDB over the lake's views and print the result as a table.

    Each captured table has two views: <schema>.<table> (the current state: latest row per
    key, deleted rows removed) and <schema>.<table>_changes (every change, with the _cdc_*
    metadata columns).
    """
    from catalog.lake import Lake
    from cdc.config import load_settings

    settings = load_settings(**{"lake.path": lake})
    with Lake(settings.lake.path, storage_options=settings.lake.storage_options or None) as lk:
        result = lk.query(sql, limit=limit + 1)
    table = Table(*result.column_names, header_style="bold")
    for row in result.slice(0, limit).to_pylist():
        table.add_row(*("NULL" if v is None else str(v) for v in row.values()))
    console.print(table)
    if result.num_rows > limit:
        console.print(f"[dim](first {limit} rows shown)[/]")


@app.command()
def tables(lake: LakeOption = None) -> None:
    """List the captured tables in the lake with their keys, size and Delta version."""
    from catalog.lake import Lake
    from cdc.config import load_settings

    settings = load_settings(**{"lake.path": lake})
    with Lake(settings.lake.path, storage_options=settings.lake.storage_options or None) as lk:
        infos = lk.tables()
    table = Table("table", "key", "rows (changes)", "files", "version", "last commit")
    for info in infos:
        table.add_row(
            info.qualified_name,
            ", ".join(info.key_columns) or "(none)",
            str(info.num_rows),
            str(info.num_files),
            str(info.delta_version),
            str(info.last_commit_at or ""),
        )
    console.print(table)


@app.command()
def demo(
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            help="Use this existing PostgreSQL (wal_level=logical) instead of starting one.",
        ),
    ] = None,
    lake: Annotated[
        Path | None,
        typer.Option(help="Where to write the lake (default: a new temporary directory)."),
    ] = None,
    seconds: Annotated[float, typer.Option(help="How long the workload runs.")] = 15.0,
) -> None:
    """Start a throwaway PostgreSQL, stream a retail workload into Delta, and query it.

    Needs PostgreSQL's server binaries (initdb, pg_ctl) unless --source is given. The
    server is stopped and removed on exit, Ctrl-C included; the lake is kept so you can
    query it afterwards with `cdc query --lake PATH "SQL"`.
    """
    from cdc.demo import run_demo

    logging.getLogger("cdc").setLevel(logging.WARNING)  # the demo prints its own story
    run_demo(source=source, lake=str(lake) if lake else None, seconds=seconds, console=console)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cdc`` script: runs a command, turns errors into exit codes."""
    # Through rich, so log lines and the live snapshot progress bar do not garble each other.
    logging.basicConfig(
        level=logging.INFO,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=errors, show_path=False)],
    )
    logging.getLogger("deltalake").setLevel(logging.WARNING)
    try:
        app(args=argv, standalone_mode=True)
    except (TransientCdcError, TransientSinkError, TransientCatalogError) as e:
        errors.print(f"[red]error (temporary, retry may help):[/] {e}")
        sys.exit(EXIT_TRANSIENT)
    except (CdcError, SinkError, CatalogError) as e:
        errors.print(f"[red]error:[/] {e}")
        sys.exit(EXIT_TERMINAL)
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)
