"""The ``cdc`` command line. Commands stay thin: they parse options, call one library
function and print its result. Errors become a message and an exit code here, and only here.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cdc.cli.logs import configure_logging
from cdc.core.errors import TerminalError, TransientError
from cdc.core.secrets import mask_text
from jobs.cli import jobs_app

if TYPE_CHECKING:
    from rich.progress import Progress

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


class RichSnapshotProgress:
    """Draws one progress bar per table while the initial snapshot copies it.

    The display runs only from the first table to the end of the snapshot: its refresh
    thread redraws every bar ten times a second, which costs capture a share of a core
    (a quarter of one with 300 tables) if it is left running while streaming."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.tasks: dict[str, Any] = {}

    def table_started(self, name: str, estimated_rows: int | None) -> None:
        if self.progress is None:
            self.progress = _snapshot_progress()
            self.progress.start()
        self.tasks[name] = self.progress.add_task(f"snapshot {name}", total=estimated_rows)

    def rows_copied(self, name: str, rows: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.tasks[name], rows)

    def table_done(self, name: str, rows: int) -> None:
        if self.progress is not None:
            self.progress.update(self.tasks[name], total=rows, completed=rows)

    def snapshot_finished(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@contextlib.contextmanager
def _startup_imports() -> Iterator[None]:
    """Imports a long-running command's modules with the cyclic garbage collector off, then
    freezes what they created.

    Importing pyarrow, psycopg, pydantic and ours allocates hundreds of thousands of objects,
    which set off a collection every few hundred: measured, 0.06-0.09 s of a 0.5 s start-up
    on one core, time the initial snapshot's COPY waits for. Frozen (``gc.freeze``), the
    modules' objects are also left out of every later full collection. They live for the
    whole process anyway.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


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


MetricsPortOption = Annotated[
    int | None,
    typer.Option(
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (or CDC_OPS__METRICS_PORT)."
    ),
]
HeartbeatOption = Annotated[
    float | None,
    typer.Option(
        help="Emit a heartbeat message through the slot's database this often (seconds), so "
        "the slot advances while the published tables are quiet; off by default."
    ),
]
OnSlotLostOption = Annotated[
    str | None,
    typer.Option(
        help="When PostgreSQL invalidates the slot: 'stop' (default) with an error, or "
        "'resnapshot': drop it, create a new one and copy every table again."
    ),
]


def _serve_metrics(settings: Any) -> Any:
    """The process's metrics, served when a port is set (else None)."""
    if settings.ops.metrics_port is None:
        return None
    from cdc.metrics import Metrics, serve_metrics

    metrics = Metrics()
    server = serve_metrics(metrics, settings.ops.metrics_port, host=settings.ops.metrics_host)
    errors.print(f"metrics at http://{settings.ops.metrics_host}:{server.server_port}/metrics")
    return metrics


def _split(values: str | None) -> list[str] | None:
    return [v.strip() for v in values.split(",") if v.strip()] if values else None


def _snapshot_progress() -> Progress:
    """The progress bars of an initial snapshot, on stderr."""
    # Imported here: only `run` and `capture` draw them (rich.progress takes 10-30 ms).
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
    metrics_port: MetricsPortOption = None,
    heartbeat_seconds: HeartbeatOption = None,
    on_slot_lost: OnSlotLostOption = None,
) -> None:
    """Stream PostgreSQL changes into Delta tables (capture and sink in one process).

    Creates the publication and the replication slot if they are missing (running it again
    is safe), copies the existing rows once, then streams every change. Ctrl-C or SIGTERM
    flushes what is pending and exits; a restart resumes with nothing lost or duplicated.

    The slot keeps WAL on the server until the pipeline confirms it: drop the slot of a
    pipeline you retire, or the server's disk fills up.
    """
    with _startup_imports():
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
            "ops.metrics_port": metrics_port,
            "ops.heartbeat_seconds": heartbeat_seconds,
            "ops.on_slot_lost": on_slot_lost,
        },
    )
    stop = _stop_on_signals()
    prometheus = _serve_metrics(settings)
    progress = RichSnapshotProgress()
    try:
        metrics = run_embedded(settings, stop=stop, progress=progress, metrics=prometheus)
    finally:
        progress.snapshot_finished()
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
    metrics_port: MetricsPortOption = None,
    heartbeat_seconds: HeartbeatOption = None,
    on_slot_lost: OnSlotLostOption = None,
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
    with _startup_imports():
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
            "ops.metrics_port": metrics_port,
            "ops.heartbeat_seconds": heartbeat_seconds,
            "ops.on_slot_lost": on_slot_lost,
        },
    )
    settings.kafka_bootstrap()  # a missing --kafka is reported before PostgreSQL is touched
    stop = _stop_on_signals()
    prometheus = _serve_metrics(settings)
    progress = RichSnapshotProgress()
    try:
        metrics = run_capture(settings, stop=stop, progress=progress, metrics=prometheus)
    finally:
        progress.snapshot_finished()
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
    metrics_port: MetricsPortOption = None,
) -> None:
    """Write change events from Kafka to the lake, as one worker of a consumer group.

    Start several with the same --group to share the partitions. Writes are exactly-once:
    each Delta commit records the Kafka offsets it covers, and a worker starts each
    partition after the offset recorded in Delta. Messages that cannot be decoded, or do
    not fit their schema, go to the dead-letter topic <prefix>.__dlq and to the _dlq Delta
    table. Reads topics written by Debezium too. Ctrl-C or SIGTERM flushes and leaves the
    group.
    """
    with _startup_imports():
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
            "ops.metrics_port": metrics_port,
        },
    )
    settings.kafka_bootstrap()
    prometheus = _serve_metrics(settings)
    on_flush = None
    if prometheus is not None:
        from cdc.metrics import kafka_lag_collector

        prometheus.extra_collectors.append(kafka_lag_collector(settings))

        def on_flush(result: dict[str, Any]) -> None:
            prometheus.flushed(result, seconds=result["duration_s"])

    metrics = run_sink(settings, stop=_stop_on_signals(), on_flush=on_flush)
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
def status(
    source: SourceOption = None,
    lake: LakeOption = None,
    kafka: KafkaOption = None,
    name: NameOption = None,
    max_lag: Annotated[
        int | None,
        typer.Option(help="Exit 1 when the slot lags more than this many bytes."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    config: ConfigOption = None,
) -> None:
    """Show where a pipeline stands: its slot, each table's freshness, Kafka lag, snapshot.

    The slot: active or not, confirmed_flush_lsn, restart_lsn, lag_bytes (WAL not yet
    confirmed), retained WAL, wal_status and safe_wal_size. Per table: the newest source
    commit landed in the lake and its age, the LSN watermark, rows, files and the changes
    not yet merged by `cdc jobs merge`. With --kafka: the sink group's lag per partition
    and the dead-letter count. Exits 1 when the slot is missing, lost or inactive, or lags
    more than --max-lag, so cron jobs and health checks can use it.
    """
    from cdc.core.settings import load_settings
    from cdc.status import pipeline_status

    settings = load_settings(
        config, **{"source.dsn": source, "lake.path": lake, "kafka.bootstrap": kafka, "name": name}
    )
    report = pipeline_status(settings, kafka=bool(settings.kafka.bootstrap), max_lag=max_lag)
    if json_output:
        console.print_json(data=report.to_dict())
    else:
        _print_status(report.to_dict())
    if not report.healthy:
        raise typer.Exit(EXIT_TERMINAL)


def _print_status(data: dict[str, Any]) -> None:
    console.print(f"[bold]pipeline[/] {data['pipeline']}  source {data['source']}")
    slot = data["slot"]
    if slot is not None:
        facts = Table(
            "slot",
            "active",
            "confirmed_flush_lsn",
            "restart_lsn",
            "lag_bytes",
            "retained",
            "wal_status",
            "safe_wal_size",
            header_style="bold",
        )
        facts.add_row(
            *(
                str(slot[k])
                for k in (
                    "name",
                    "active",
                    "confirmed_flush_lsn",
                    "restart_lsn",
                    "lag_bytes",
                    "retained_bytes",
                    "wal_status",
                    "safe_wal_size",
                )
            )
        )
        console.print(facts)
    tables = Table(
        "table", "newest commit", "age s", "lsn", "rows", "files", "unmerged", header_style="bold"
    )
    for t in data["tables"]:
        tables.add_row(
            *(
                str(t[k])
                for k in (
                    "table",
                    "newest_commit_at",
                    "age_seconds",
                    "lsn_watermark",
                    "rows",
                    "files",
                    "unmerged_changes",
                )
            )
        )
    console.print(tables)
    if data["kafka"] is not None:
        k = data["kafka"]
        console.print(f"kafka group {k['group']}: lag {k['lag']}, dead letters {k['dlq_messages']}")
    if data["snapshot"] is not None:
        console.print(f"snapshot: {data['snapshot']['state']}")
    for problem in data["problems"]:
        console.print(f"[red]problem:[/] {problem}")
    if not data["problems"]:
        console.print("[green]healthy[/]")


slot_app = typer.Typer(help="List and drop replication slots.", no_args_is_help=True)
app.add_typer(slot_app, name="slot")


@slot_app.command("list")
def slot_list(
    source: SourceOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """List the server's replication slots with their lag and WAL status."""
    from cdc.core.settings import load_settings
    from cdc.postgres.slots import list_slots

    settings = load_settings(config, **{"source.dsn": source})
    with _source_connection(settings) as conn:
        slots = [s.to_dict() for s in list_slots(conn)]
    if json_output:
        console.print_json(data=slots)
        return
    table = Table(
        "slot",
        "plugin",
        "database",
        "active",
        "lag_bytes",
        "retained",
        "wal_status",
        header_style="bold",
    )
    for s in slots:
        table.add_row(
            *(
                str(s[k])
                for k in (
                    "name",
                    "plugin",
                    "database",
                    "active",
                    "lag_bytes",
                    "retained_bytes",
                    "wal_status",
                )
            )
        )
    console.print(table)


@slot_app.command("drop")
def slot_drop(
    slot: Annotated[str, typer.Argument(help="The slot's name.")],
    source: SourceOption = None,
    force: Annotated[
        bool, typer.Option(help="Drop it even while a pipeline streams from it.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Drop a replication slot, so the server stops keeping WAL for it.

    Refuses an active slot (a pipeline is streaming from it) unless --force, which ends
    that connection first. The pipeline that used it cannot resume: it stops with a
    lost-slot error, or copies its tables again with --on-slot-lost resnapshot.
    """
    from cdc.core.settings import load_settings
    from cdc.postgres.slots import drop_inactive_slot

    settings = load_settings(config, **{"source.dsn": source})
    with _source_connection(settings) as conn:
        drop_inactive_slot(conn, slot, force=force)
    console.print(f"dropped slot {slot}")


@app.command()
def snapshot(
    tables: Annotated[
        str, typer.Option(help="Comma-separated tables (schema.table) to copy again.")
    ],
    source: SourceOption = None,
    name: NameOption = None,
    config: ConfigOption = None,
) -> None:
    """Copy tables again into a running pipeline, while it keeps streaming.

    Sends a signal (a logical message) through the source database; the running pipeline
    named --name reads it from its slot and re-copies each table with an incremental
    snapshot: its rows land as snapshot reads (op 'r') in the changelog, in order with the
    streamed changes. Returns at once; the copy happens in the pipeline.
    """
    from cdc.core.lsn import format_lsn
    from cdc.core.settings import load_settings
    from cdc.operations import signal_snapshot

    settings = load_settings(config, **{"source.dsn": source, "name": name})
    wanted = _split(tables) or []
    if not wanted:
        raise typer.BadParameter("--tables needs at least one table")
    with _source_connection(settings) as conn:
        lsn = signal_snapshot(conn, pipeline=settings.name, tables=wanted)
    console.print(
        f"asked pipeline {settings.name} to copy {', '.join(wanted)} (signal at {format_lsn(lsn)})"
    )


def _source_connection(settings: Any) -> Any:
    import psycopg

    from cdc.postgres.errors import SourceConnectionError

    try:
        return psycopg.connect(settings.source_dsn(), autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as e:
        raise SourceConnectionError(f"cannot connect to the source: {e}") from e


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


@app.callback()
def _options(
    log_format: Annotated[
        str | None,
        typer.Option(
            "--log-format",
            help="'rich' (default) or 'json': one JSON object per line, with table, LSN and "
            "counts as fields, for log shippers (or CDC_OPS__LOG_FORMAT).",
        ),
    ] = None,
) -> None:
    """Options that apply to every command."""
    import os

    chosen = log_format or os.environ.get("CDC_OPS__LOG_FORMAT") or "rich"
    if chosen not in ("rich", "json"):
        raise typer.BadParameter("--log-format must be 'rich' or 'json'")
    configure_logging("json" if chosen == "json" else "rich", console=errors)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cdc`` script: runs a command, turns errors into exit codes.

    Error messages pass through :func:`cdc.core.secrets.mask_text`: no password reaches
    the terminal even when a driver quotes a connection string.
    """
    configure_logging("rich", console=errors)
    try:
        app(args=argv, standalone_mode=True)
    except TransientError as e:
        errors.print(f"[red]error (temporary, retry may help):[/] {escape(mask_text(str(e)))}")
        sys.exit(EXIT_TRANSIENT)
    except TerminalError as e:
        errors.print(f"[red]error:[/] {escape(mask_text(str(e)))}")
        sys.exit(EXIT_TERMINAL)
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)
