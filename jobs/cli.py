"""``cdc jobs ...``: the maintenance jobs on the command line.

Thin: each command parses its options, calls one function of the ``jobs`` package and prints
its metrics as JSON on stdout. Errors propagate to :func:`cdc.cli.main`, which turns them
into a message and an exit code (1 terminal, 75 transient), so the one-shot commands fit
cron, systemd timers or an orchestrator as they are.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

jobs_app = typer.Typer(
    name="jobs",
    help=(
        "Maintenance of the lake's Delta tables: compact small files, merge changes into "
        "current-state tables, vacuum, checkpoint, retention, and a scheduler for all of "
        "them. Safe to run beside `cdc run`."
    ),
    no_args_is_help=True,
)
console = Console()
errors = Console(stderr=True)

LakeOption = Annotated[
    str | None,
    typer.Option(
        "--lake", help="Lake root: a directory or an object-store URI (or CDC_LAKE__PATH)."
    ),
]
TableOption = Annotated[
    list[str] | None,
    typer.Option("--table", help="Only this table (schema.table); repeat for several."),
]


def _lake(lake: str | None) -> tuple[str, dict[str, str] | None]:
    from cdc.core.settings import load_settings

    settings = load_settings(**{"lake.path": lake})
    return settings.lake.path, settings.lake.storage_options or None


def _duration(value: str) -> Any:
    from jobs.common import parse_duration

    try:
        return parse_duration(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def _print(metrics: dict[str, Any]) -> None:
    console.print_json(data=metrics, default=str)


@jobs_app.command()
def compact(
    lake: LakeOption = None,
    table: TableOption = None,
    target_size: Annotated[
        str, typer.Option(help="Size the rewritten files aim for, e.g. 128MiB.")
    ] = "128MiB",
    min_files: Annotated[
        int, typer.Option(help="Compact a partition once it has this many smaller files.")
    ] = 8,
    z_order: Annotated[
        bool, typer.Option("--z-order", help="Cluster rows by the table's key while rewriting.")
    ] = False,
    which: Annotated[
        str, typer.Option(help="changes, current (the merged tables) or both.")
    ] = "both",
) -> None:
    """Bin-pack the small files of each partition that needs it.

    Prints files and bytes before and after, per table and in total, and the duration.
    Compacted files stay on storage until `cdc jobs vacuum`.
    """
    from jobs.common import parse_size
    from jobs.compact import compact as run

    if which not in ("changes", "current", "both"):
        raise typer.BadParameter("--which must be changes, current or both")
    try:
        size = parse_size(target_size)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    root, options = _lake(lake)
    _print(
        run(
            root,
            tables=table,
            target_size=size,
            min_files=min_files,
            z_order=z_order,
            which=which,  # type: ignore[arg-type]
            storage_options=options,
        )
    )


@jobs_app.command()
def merge(lake: LakeOption = None, table: TableOption = None) -> None:
    """Fold the changes after the last merge into <schema>.<table>/current.

    Afterwards the current-state view reads the merged table plus only the newer changes.
    Keyless tables are skipped (the metrics say why).
    """
    from jobs.merge import merge as run

    root, options = _lake(lake)
    _print(run(root, tables=table, storage_options=options))


@jobs_app.command()
def vacuum(
    retain: Annotated[
        str, typer.Option(help="Keep files needed by versions this recent, e.g. 7d, 36h.")
    ],
    lake: LakeOption = None,
    table: TableOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count, delete nothing.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Allow --retain below the table's minimum (7 days by default)."
        ),
    ] = False,
) -> None:
    """Delete data files that no table version within --retain references.

    Readers of versions older than --retain (long queries, time travel) fail afterwards.
    """
    from jobs.maintenance import vacuum as run

    root, options = _lake(lake)
    _print(
        run(
            root,
            retain=_duration(retain),
            tables=table,
            dry_run=dry_run,
            enforce_retention_duration=not force,
            storage_options=options,
        )
    )


@jobs_app.command()
def checkpoint(
    lake: LakeOption = None,
    table: TableOption = None,
    cleanup: Annotated[
        bool, typer.Option(help="Also remove log entries older than the log retention.")
    ] = True,
) -> None:
    """Write a checkpoint of each Delta log that has new commits, and clean up the log."""
    from jobs.maintenance import checkpoint as run

    root, options = _lake(lake)
    _print(run(root, tables=table, cleanup=cleanup, storage_options=options))


@jobs_app.command()
def retention(
    keep: Annotated[str, typer.Option(help="Keep this much changelog history, e.g. 90d.")],
    lake: LakeOption = None,
    table: TableOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report, drop nothing.")] = False,
) -> None:
    """Drop changelog partitions older than --keep; never changes not yet merged.

    The cut-off stops at the first partition holding changes after the merge watermark
    (the metrics say so); tables never merged, and keyless tables, keep everything. The
    current-state tables are never dropped.
    """
    from jobs.retention import retention as run

    root, options = _lake(lake)
    _print(run(root, keep=_duration(keep), tables=table, dry_run=dry_run, storage_options=options))


@jobs_app.command()
def schedule(
    config: Annotated[Path, typer.Option("--config", help="Schedule file (TOML).")],
    lake: LakeOption = None,
) -> None:
    """Run the jobs of a schedule file on their intervals or cron expressions.

    Logs every run with its metrics. SIGTERM or Ctrl-C stops it after the running jobs
    finish; a second one exits at once (safe: every job commits atomically).
    """
    from cdc.core.settings import load_settings
    from jobs.schedule import load_schedule, run_schedule

    plan = load_schedule(config)
    # The environment (CDC_LAKE__...) wins over the schedule file, as for every command.
    env = load_settings().lake
    root = lake or plan.lake or env.path
    options = env.storage_options or None
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        errors.print(f"[yellow]{signal.Signals(signum).name}: stopping after running jobs...[/]")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    _print(run_schedule(plan, lake=root, stop=stop, storage_options=options))
