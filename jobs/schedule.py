"""``cdc jobs schedule``: run the maintenance jobs on intervals or cron expressions.

The timing is APScheduler's (3.x): interval and cron triggers, no overlapping runs of one
job (``max_instances=1``), missed runs coalesced into one. This module only turns a config
file into scheduled calls of the job functions, logs every run with its metrics, and stops
cleanly: :func:`run_schedule` returns once ``stop`` is set and the running jobs have
finished (every job commits atomically, so stopping between runs loses nothing).

Config file (TOML)::

    lake = "/data/lake"                # or --lake / CDC_LAKE__PATH
    max_concurrent_jobs = 1            # jobs run one at a time unless raised

    [[jobs]]
    job = "merge"
    every = "5m"

    [[jobs]]
    job = "compact"
    cron = "*/30 * * * *"              # crontab syntax, UTC unless timezone = "..."
    target_size = "128MiB"

    [[jobs]]
    job = "vacuum"
    cron = "0 3 * * *"
    retain = "7d"
"""

from __future__ import annotations

import logging
import threading
import time
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs.common import parse_duration, parse_size
from jobs.compact import DEFAULT_MIN_FILES, DEFAULT_TARGET_SIZE, compact
from jobs.errors import JobError, TerminalJobError
from jobs.maintenance import checkpoint, vacuum
from jobs.merge import merge
from jobs.retention import retention

__all__ = ["ScheduleConfig", "load_schedule", "run_schedule"]

log = logging.getLogger(__name__)


class _JobBase(BaseModel, ABC):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="Label in the logs (default: the job).")
    every: str | None = Field(default=None, description="Interval, e.g. '5m', '1h', '1d'.")
    cron: str | None = Field(default=None, description="Crontab expression, 5 fields.")
    timezone: str = Field(default="UTC", description="Time zone of the cron expression.")
    tables: list[str] | None = Field(default=None, description="schema.table names; all if unset.")

    @model_validator(mode="after")
    def _one_trigger(self) -> _JobBase:
        if (self.every is None) == (self.cron is None):
            raise ValueError(
                "give exactly one of 'every' (e.g. '15m') or 'cron' (e.g. '0 3 * * *')"
            )
        if self.every is not None and parse_duration(self.every) <= timedelta(0):
            raise ValueError("'every' must be positive")
        if self.cron is not None:
            CronTrigger.from_crontab(self.cron, timezone=self.timezone)  # raises ValueError
        return self

    def trigger(self) -> BaseTrigger:
        if self.cron is not None:
            return CronTrigger.from_crontab(self.cron, timezone=self.timezone)
        assert self.every is not None
        return IntervalTrigger(seconds=parse_duration(self.every).total_seconds())

    def label(self) -> str:
        return self.name or str(getattr(self, "job", "job"))

    @abstractmethod
    def run(self, lake: str, storage_options: dict[str, str] | None) -> dict[str, Any]:
        """Run the job once on ``lake``; returns its metrics."""


class MergeJob(_JobBase):
    job: Literal["merge"]

    def run(self, lake: str, storage_options: dict[str, str] | None) -> dict[str, Any]:
        return merge(lake, tables=self.tables, storage_options=storage_options)


class CompactJob(_JobBase):
    job: Literal["compact"]
    target_size: str | int = DEFAULT_TARGET_SIZE
    min_files: int = Field(default=DEFAULT_MIN_FILES, ge=1)
    z_order: bool = False
    which: Literal["changes", "current", "both"] = "both"

    @field_validator("target_size")
    @classmethod
    def _size(cls, value: str | int) -> str | int:
        parse_size(value)
        return value

    def run(self, lake: str, storage_options: dict[str, str] | None) -> dict[str, Any]:
        return compact(
            lake,
            tables=self.tables,
            target_size=parse_size(self.target_size),
            min_files=self.min_files,
            z_order=self.z_order,
            which=self.which,
            storage_options=storage_options,
        )


class VacuumJob(_JobBase):
    job: Literal["vacuum"]
    retain: str = "7d"
    force: bool = False

    @field_validator("retain")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    def run(self, lake: str, storage_options: dict[str, str] | None) -> dict[str, Any]:
        return vacuum(
            lake,
            retain=parse_duration(self.retain),
            tables=self.tables,
            enforce_retention_duration=not self.force,
            storage_options=storage_options,
        )


class CheckpointJob(_JobBase):
    job: Literal["checkpoint"]
    cleanup: bool = True

    def run(self, lake: str, storage_options: dict[str, str] | None) -> dict[str, Any]:
        return checkpoint(
            lake, tables=self.tables, cleanup=self.cleanup, storage_options=storage_options
        )


class RetentionJob(_JobBase):
    job: Literal["retention"]
    keep: str

    @field_validator("keep")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    def run(self, lake: str, storage_options: dict[str, str] | None) -> dict[str, Any]:
        return retention(
            lake,
            keep=parse_duration(self.keep),
            tables=self.tables,
            storage_options=storage_options,
        )


JobConfig = Annotated[
    MergeJob | CompactJob | VacuumJob | CheckpointJob | RetentionJob, Field(discriminator="job")
]


class ScheduleConfig(BaseModel):
    """The schedule file: which jobs run when, on which lake."""

    model_config = ConfigDict(extra="forbid")

    lake: str | None = None
    storage_options: dict[str, str] = Field(default_factory=dict)
    max_concurrent_jobs: int = Field(
        default=1,
        ge=1,
        description=(
            "Jobs running at once. 1 (the default) serialises them, so a merge never "
            "conflicts with a compaction of the same merged table."
        ),
    )
    jobs: list[JobConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_labels(self) -> ScheduleConfig:
        labels = [job.label() for job in self.jobs]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(
                f"jobs {duplicates} appear more than once: give each a distinct 'name'"
            )
        return self


def load_schedule(path: str | Path) -> ScheduleConfig:
    """Read and validate a schedule file (TOML; see the module docstring).

    Raises:
        TerminalJobError: the file is missing, not TOML, or not a valid schedule; the
            message names the file and the offending entry.

    Example:
        >>> load_schedule("jobs.toml").jobs[0].job  # doctest: +SKIP
        'merge'
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise TerminalJobError(f"cannot read the schedule {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise TerminalJobError(f"the schedule {path} is not valid TOML: {e}") from e
    try:
        return ScheduleConfig.model_validate(data)
    except (ValidationError, ValueError) as e:
        raise TerminalJobError(f"invalid schedule {path}: {e}") from e


def run_schedule(
    config: ScheduleConfig,
    *,
    lake: str,
    stop: threading.Event,
    storage_options: dict[str, str] | None = None,
    on_run: Callable[[str, dict[str, Any] | None, BaseException | None], None] | None = None,
) -> dict[str, Any]:
    """Run ``config``'s jobs on their triggers until ``stop`` is set; returns run counts.

    Every run is logged (``jobs.schedule`` logger) with its metrics as JSON, or with its
    error. A failing run does not stop the schedule: transient errors (a commit conflict)
    are expected to pass, terminal ones are logged at ERROR on every run until fixed.
    ``on_run(label, metrics, error)`` is called after each run (tests, metrics exporters).
    ``storage_options`` (the environment's ``CDC_LAKE__STORAGE_OPTIONS`` in the CLI) are
    merged over the schedule file's ``storage_options``, key by key.

    Returns ``{"runs": {label: n}, "failures": {label: n}, "duration_s": s}``.

    Hazards:
        * Stopping waits for the jobs that are running to finish (a compaction of a big
          partition can take minutes); a second SIGTERM/Ctrl-C in the CLI exits at once,
          which is safe too, as every job commits atomically.
        * The schedule lives in memory: runs missed while the process is down are not
          caught up (coalesced into one run at most ``misfire_grace_time`` late).

    Example:
        >>> stop = threading.Event()  # set from a signal handler
        >>> run_schedule(load_schedule("jobs.toml"), lake="./lake", stop=stop)  # doctest: +SKIP
        {'runs': {'merge': 12, 'compact': 2}, 'failures': {}, 'duration_s': 3600.2}
    """
    started = time.monotonic()
    runs: dict[str, int] = {}
    failures: dict[str, int] = {}
    lock = threading.Lock()
    options = {**config.storage_options, **(storage_options or {})} or None

    def execute(job: _JobBase) -> None:
        label = job.label()
        t0 = time.monotonic()
        metrics: dict[str, Any] | None = None
        error: BaseException | None = None
        try:
            metrics = job.run(lake, options)
            log.info("job %s finished in %.2fs: %s", label, time.monotonic() - t0, _json(metrics))
        except JobError as e:
            error = e
            level = logging.ERROR if isinstance(e, TerminalJobError) else logging.WARNING
            log.log(level, "job %s failed after %.2fs: %s", label, time.monotonic() - t0, e)
        except Exception as e:
            # Catch-all on purpose: this is the scheduler's thread boundary. A bug in one job
            # must not end the schedule; it is logged with its traceback, counted as a
            # failure and handed to on_run, so it is reported rather than hidden.
            error = e
            log.exception("job %s crashed", label)
        with lock:
            runs[label] = runs.get(label, 0) + 1
            if error is not None:
                failures[label] = failures.get(label, 0) + 1
        if on_run is not None:
            on_run(label, metrics, error)

    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(max_workers=config.max_concurrent_jobs)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 60},
        timezone="UTC",
    )

    def missed(event: JobExecutionEvent) -> None:
        log.warning("job %s missed its run at %s", event.job_id, event.scheduled_run_time)

    scheduler.add_listener(missed, EVENT_JOB_MISSED)
    for job in config.jobs:
        trigger = job.trigger()
        scheduler.add_job(execute, trigger, args=[job], id=job.label(), name=job.label())
        log.info("scheduled %s: %s", job.label(), trigger)
    scheduler.start()
    try:
        stop.wait()
    finally:
        log.info("stopping: waiting for running jobs to finish")
        scheduler.shutdown(wait=True)
    return {"runs": runs, "failures": failures, "duration_s": round(time.monotonic() - started, 2)}


def _json(metrics: dict[str, Any]) -> str:
    return orjson.dumps(metrics, default=str).decode()
