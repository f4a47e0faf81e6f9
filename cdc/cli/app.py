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
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cdc.core.errors import TerminalError, TransientError
from jobs.cli import jobs_app

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
app.add_typer(jobs_app, name="jobs")

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
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Pipeline config file (TOML, the sections of the CDC_* variables, \\[transforms] "
        "included; or CDC_CONFIG). Options win over the environment, which wins over it.",
        show_default=False,
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


TablesOption = Annotated[
    str | None,
    typer.Option(help="Comma-separated tables (schema.table) to capture; default all."),
]
NameOption = Annotated[
    str | None,
    typer.Option(help="Pipeline name: names the slot and publication (default 'cdc')."),
]
SnapshotOption = Annotated[
    str | None,
    typer.Option(help="'initial' copies existing rows first; 'never' streams only."),
]


def _split(values: str | None) -> list[str] | None:
    return [v.strip() for v in values.split(",") if v.strip()] if values else None


def _snapshot_progress() -> Progress:
    """The progress bars of an initial snapshot, on stderr."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=errors,
        transient=False,
    )


@app.command()
def run(
    source: SourceOption = None,
    lake: LakeOption = None,
    tables: TablesOption = None,
    name: NameOption = None,
    snapshot: SnapshotOption = None,
    flush_seconds: Annotated[
        float | None, typer.Option(help="Commit to Delta at least this often (default 0.5).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Stream PostgreSQL changes into Delta tables (capture and sink in one process).

    Creates the publication and the replication slot if they are missing (running it again
    is safe), copies the existing rows once, then streams every change. Ctrl-C or SIGTERM
    flushes what is pending and exits; a restart resumes with nothing lost or duplicated.

    The slot keeps WAL on the server until the pipeline confirms it: drop the slot of a
    pipeline you retire, or the server's disk fills up.
    """
    from cdc.core.settings import load_settings
    from cdc.pipeline import run_embedded

    settings = load_settings(
        config,
        **{
            "source.dsn": source,
            "lake.path": lake,
            "source.tables": _split(tables),
            "name": name,
            "snapshot": snapshot,
            "batch.max_seconds": flush_seconds,
        },
    )
    stop = _stop_on_signals()
    with _snapshot_progress() as progress:
        metrics = run_embedded(settings, stop=stop, progress=_RichSnapshotProgress(progress))
    console.print_json(data=metrics)


KafkaOption = Annotated[
    str | None,
    typer.Option(
        "--kafka",
        help="Kafka bootstrap servers, host:port[,host:port] (or CDC_KAFKA__BOOTSTRAP).",
        show_default=False,
    ),
]
TopicPrefixOption = Annotated[
    str | None,
    typer.Option(help="Topics are <prefix>.<schema>.<table>; default the pipeline name."),
]


@app.command()
def capture(
    source: SourceOption = None,
    kafka: KafkaOption = None,
    tables: TablesOption = None,
    topic_prefix: TopicPrefixOption = None,
    name: NameOption = None,
    format: Annotated[
        str | None,
        typer.Option("--format", help="'json' (the Debezium envelope) or 'json-with-schema'."),
    ] = None,
    snapshot: SnapshotOption = None,
    partitions: Annotated[
        int | None, typer.Option(help="Partitions of the topics capture creates (default 3).")
    ] = None,
    flush_seconds: Annotated[
        float | None,
        typer.Option(help="Wait for Kafka's acknowledgements at least this often (default 0.5)."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Stream PostgreSQL changes into Kafka topics, one per table, for `cdc sink` workers.

    Set-up and snapshot are those of `cdc run`. Events are Debezium change-event envelopes
    keyed by the primary key; every delete is followed by a tombstone; table schemas are
    registered in the compacted topic <prefix>.__schemas. PostgreSQL is told a change is
    flushed only after Kafka acknowledged it. Producer properties (SASL, SSL...) come from
    CDC_KAFKA__CLIENT and CDC_KAFKA__PRODUCER (JSON objects).

    The slot keeps WAL on the server until capture confirms it: drop the slot of a
    pipeline you retire, or the server's disk fills up.
    """
    from cdc.core.settings import load_settings
    from cdc.pipeline import run_capture

    settings = load_settings(
        config,
        **{
            "source.dsn": source,
            "kafka.bootstrap": kafka,
            "source.tables": _split(tables),
            "kafka.topic_prefix": topic_prefix,
            "name": name,
            "kafka.format": format,
            "snapshot": snapshot,
            "kafka.partitions": partitions,
            "batch.max_seconds": flush_seconds,
        },
    )
    settings.kafka_bootstrap()  # a missing --kafka is reported before PostgreSQL is touched
    stop = _stop_on_signals()
    with _snapshot_progress() as progress:
        metrics = run_capture(settings, stop=stop, progress=_RichSnapshotProgress(progress))
    console.print_json(data=metrics)


@app.command()
def sink(
    kafka: KafkaOption = None,
    lake: LakeOption = None,
    group: Annotated[
        str | None,
        typer.Option(help="Consumer group; workers in one group share the partitions."),
    ] = None,
    topic_prefix: TopicPrefixOption = None,
    topics: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated topics to read (^regex allowed); default every table "
            "topic of the prefix."
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Pipeline name: the id of the offsets kept in Delta (default 'cdc')."),
    ] = None,
    flush_seconds: Annotated[
        float | None, typer.Option(help="Commit to Delta at least this often (default 0.5).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Write change events from Kafka to the lake, as one worker of a consumer group.

    Start several with the same --group to share the partitions. Writes are exactly-once:
    each Delta commit records the Kafka offsets it covers, and a worker starts each
    partition after the offset recorded in Delta. Messages that cannot be decoded, or do
    not fit their schema, go to the dead-letter topic <prefix>.__dlq and to the _dlq Delta
    table. Reads topics written by Debezium too. Ctrl-C or SIGTERM flushes and leaves the
    group.
    """
    from cdc.core.settings import load_settings
    from sinks.kafka_worker import run_sink

    settings = load_settings(
        config,
        **{
            "kafka.bootstrap": kafka,
            "lake.path": lake,
            "kafka.group": group,
            "kafka.topic_prefix": topic_prefix,
            "kafka.topics": _split(topics),
            "name": name,
            "batch.max_seconds": flush_seconds,
        },
    )
    settings.kafka_bootstrap()
    metrics = run_sink(settings, stop=_stop_on_signals())
    console.print_json(data=metrics)


@app.command()
def query(
    sql: Annotated[
        str, typer.Argument(help="SQL over the views, e.g. SELECT * FROM public.orders")
    ],
    lake: LakeOption = None,
    limit: Annotated[int, typer.Option(help="Print at most this many rows.")] = 1000,
    config: ConfigOption = None,
) -> None:
    """Run SQL in DuckDB over the lake's views and print the result as a table.

    Each captured table has two views: <schema>.<table> (the current state: latest row per
    key, deleted rows removed) and <schema>.<table>_changes (every change, with the _cdc_*
    metadata columns).
    """
    from catalog.lake import Lake
    from cdc.core.settings import load_settings

    settings = load_settings(config, **{"lake.path": lake})
    with Lake(settings.lake.path, storage_options=settings.lake.storage_options or None) as lk:
        result = lk.query(sql, limit=limit + 1)
    table = Table(*result.column_names, header_style="bold")
    for row in result.slice(0, limit).to_pylist():
        table.add_row(*("NULL" if v is None else str(v) for v in row.values()))
    console.print(table)
    if result.num_rows > limit:
        console.print(f"[dim](first {limit} rows shown)[/]")


@app.command()
def tables(lake: LakeOption = None, config: ConfigOption = None) -> None:
    """List the captured tables in the lake with their keys, size and Delta version."""
    from catalog.lake import Lake
    from cdc.core.settings import load_settings

    settings = load_settings(config, **{"lake.path": lake})
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


def _describe_rules(rules: list[dict[str, Any]]) -> str:
    """``rules[0] (tables crm.*): mask email=hash; drop notes`` per rule, one a line."""
    lines = []
    for rule in rules:
        parts = [f"{k} {v}" for k, v in rule.items() if k not in ("index", "tables")]
        lines.append(
            f"rules[{rule.get('index')}] ({', '.join(rule.get('tables', []))}): " + "; ".join(parts)
        )
    return escape("\n".join(lines)) or "-"


@app.command()
def schemas(
    table: Annotated[str | None, typer.Argument(help="schema.table; default every table.")] = None,
    lake: LakeOption = None,
    config: ConfigOption = None,
) -> None:
    """List every recorded version of each table's schema (columns, types, key).

    A new version is recorded whenever PostgreSQL's table shape changes mid-stream (a column
    added, dropped, renamed or retyped), or the table's transform rules change;
    docs/schema-changes.md describes how the lake follows each kind of change. The rules
    column shows the transform rules (docs/transforms.md) that shaped a version.
    """
    from catalog.schema_registry import SchemaRegistry
    from cdc.core import pgtypes
    from cdc.core.settings import load_settings

    settings = load_settings(config, **{"lake.path": lake})
    registry = SchemaRegistry(
        settings.lake.path, storage_options=settings.lake.storage_options or None
    )
    out = Table(
        "table", "version", "schema id", "registered", "columns", "rules", header_style="bold"
    )
    for name in [table] if table else registry.tables():
        for v in registry.versions(name):
            columns = ", ".join(
                f"{c.name} {pgtypes.type_name(c.type_oid)}{' (key)' if c.is_key else ''}"
                for c in v.schema.columns
            )
            out.add_row(
                name,
                str(v.version),
                str(v.schema_id),
                f"{v.registered_at:%Y-%m-%d %H:%M:%S}",
                columns,
                _describe_rules(v.schema.transform_rules),
            )
    console.print(out)


@app.command()
def check(
    source: SourceOption = None,
    tables: Annotated[
        str | None,
        typer.Option(help="Comma-separated tables (schema.table) to check; default all."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Check a source database for what would stop or degrade capture, and say how to fix it.

    Reports the server's wal_level and free replication slots, the role's REPLICATION
    attribute, and per table: tables whose UPDATE and DELETE would fail once published (no
    primary key and no usable replica identity), tables keyed by every column, unlogged
    tables and generated columns. Exits 1 when there is an error.
    """
    import psycopg

    from cdc.core.settings import load_settings
    from cdc.postgres.check import check_source
    from cdc.postgres.errors import postgres_error

    settings = load_settings(config, **{"source.dsn": source})
    dsn = settings.source_dsn()
    try:
        with psycopg.connect(dsn) as conn:
            findings = check_source(conn, tables=_split(tables))
    except psycopg.Error as e:
        raise postgres_error(e, doing="checking the source", dsn=dsn) from e
    colors = {"error": "red", "warning": "yellow", "info": "blue"}
    table = Table("level", "subject", "problem", "fix", header_style="bold")
    for f in findings:
        table.add_row(f"[{colors[f.level]}]{f.level}[/]", f.subject, f.problem, f.fix)
    console.print(table if findings else "[green]no problems found[/]")
    if any(f.level == "error" for f in findings):
        raise typer.Exit(EXIT_TERMINAL)


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
    from cdc.cli.demo import run_demo

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
    except TransientError as e:
        errors.print(f"[red]error (temporary, retry may help):[/] {escape(str(e))}")
        sys.exit(EXIT_TRANSIENT)
    except TerminalError as e:
        errors.print(f"[red]error:[/] {escape(str(e))}")
        sys.exit(EXIT_TERMINAL)
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)
