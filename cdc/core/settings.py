"""Settings, read from command-line options, ``CDC_*`` environment variables, ``.env`` and
a pipeline config file.

Nested settings use ``SECTION__KEY`` names: ``CDC_SOURCE__DSN``, ``CDC_LAKE__PATH``,
``CDC_BATCH__MAX_ROWS``... The config file (``--config FILE`` or ``CDC_CONFIG``) is TOML with
the same sections (``[source]``, ``[lake]``, ``[batch]``, ``[kafka]``, ``[transforms]``...).
Command-line options win over the environment, which wins over the file.
"""

from __future__ import annotations

import os
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cdc.core.errors import ConfigError
from cdc.core.secrets import dsn_password, is_secret_property, register_secrets

# PostgreSQL folds unquoted names to lower case and limits names to 63 bytes; slot names
# allow only lower-case letters, digits and underscores.
_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")


class SourceSettings(BaseModel):
    """The PostgreSQL database to capture."""

    dsn: SecretStr | None = Field(
        default=None,
        description="libpq connection string or URI; the user needs the REPLICATION attribute.",
    )
    tables: list[str] | None = Field(
        default=None,
        description="Tables to capture as schema.table (schema defaults to public); all when unset.",
    )
    slot: str | None = Field(
        default=None, description="Replication slot; defaults to the pipeline name."
    )
    publication: str | None = Field(
        default=None, description="Publication; defaults to the pipeline name."
    )
    spill_dir: str | None = Field(
        default=None,
        description="Where transactions streamed before their commit (PostgreSQL 14+) wait "
        "on disk until it; default the system temporary directory ($TMPDIR). Needs room for "
        "the largest transaction; a tmpfs would hold it in memory.",
    )


class LakeSettings(BaseModel):
    """Where the Delta tables live."""

    path: str = Field(default="./lake", description="Local path or s3://, gs://, az:// URI.")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="Passed to deltalake for object stores."
    )


class BatchSettings(BaseModel):
    """When the sink commits: whichever limit is reached first.

    Each table is committed on its own schedule: when its oldest buffered row has waited
    ``max_seconds``, or it holds its share of ``max_rows`` / ``max_bytes`` (the limit divided
    among the tables with rows buffered). So ``max_seconds`` bounds how stale the lake can
    be, and also how many small files streaming creates (``cdc jobs compact`` merges them
    later). ``max_rows`` and ``max_bytes`` also cap the memory of all the buffers together.
    """

    max_rows: int = Field(default=100_000, gt=0)
    max_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # Half a second keeps a change's p99 from commit to the current view under a second
    # (benchmarks/freshness.py); at 1 s it is about 1.1 s. The cost is about 120 small files
    # a minute per busy table, which `cdc jobs compact` folds together.
    max_seconds: float = Field(default=0.5, gt=0)
    # Tables committed at once by one flush (delta-rs releases the GIL while it writes and
    # commits). None: 4 on a local disk, 16 on an object store (see sinks.delta_changelog).
    commit_threads: int | None = Field(default=None, ge=1)


#: A librdkafka property value, passed through to the client unchanged.
KafkaProperty = str | int | float | bool

# Kafka topic names: letters, digits, '.', '_' and '-', at most 249 characters.
_TOPIC_PREFIX = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class KafkaSettings(BaseModel):
    """Kafka mode: ``cdc capture`` produces change events, ``cdc sink`` workers consume them.

    The property dictionaries are librdkafka configuration passed through unchanged, so any
    client option works, SASL and SSL included, e.g.
    ``CDC_KAFKA__CLIENT='{"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", ...}'``.
    """

    bootstrap: str | None = Field(
        default=None, description="bootstrap.servers: host:port[,host:port...]."
    )
    topic_prefix: str | None = Field(
        default=None,
        description="Topics are <prefix>.<schema>.<table>; defaults to the pipeline name.",
    )
    format: Literal["json", "json-with-schema"] = Field(
        default="json",
        description="json: the Debezium envelope; json-with-schema: wrapped with its Kafka "
        "Connect schema, as JsonConverter writes with schemas.enable=true.",
    )
    partitions: int = Field(default=3, gt=0, description="Partitions of topics capture creates.")
    replication_factor: int = Field(
        default=-1, description="Replication factor of created topics; -1: the broker default."
    )
    tombstones: bool = Field(
        default=True, description="Follow every delete with a tombstone (null value, same key)."
    )
    group: str | None = Field(
        default=None, description="Consumer group of the sink workers; default <name>-sink."
    )
    topics: list[str] | None = Field(
        default=None,
        description="Topics the sink reads (a name starting with ^ is a regex); default every "
        "table topic of the prefix.",
    )
    dlq_topic: str | None = Field(
        default=None, description="Dead-letter topic of the sink; default <prefix>.__dlq."
    )
    client: dict[str, KafkaProperty] = Field(
        default_factory=dict,
        description="librdkafka properties for every client (security settings go here).",
    )
    producer: dict[str, KafkaProperty] = Field(
        default_factory=dict, description="librdkafka properties for producers only."
    )
    consumer: dict[str, KafkaProperty] = Field(
        default_factory=dict, description="librdkafka properties for consumers only."
    )

    @field_validator("topic_prefix")
    @classmethod
    def _valid_prefix(cls, value: str | None) -> str | None:
        if value is not None and not _TOPIC_PREFIX.match(value):
            raise ValueError(
                "must be 1-200 letters, digits, '.', '_' or '-' (it starts topic names)"
            )
        return value


#: Debezium's ``skipped.operations`` letters: c insert, u update, d delete, t truncate.
SkippableOp = Literal["c", "u", "d", "t"]


class TransformRuleSettings(BaseModel):
    """One ``[[transforms.rules]]`` entry; see docs/transforms.md. Checked further (mask
    names, SQL, column names) by :func:`transforms.compile_rules` at start-up."""

    model_config = ConfigDict(extra="forbid")

    tables: list[str] = Field(min_length=1, description="schema.table names; * globs allowed.")
    mask: dict[str, str] = Field(
        default_factory=dict,
        description="column -> hash | keep_last:N | redact | null | truncate:N.",
    )
    drop_columns: list[str] = Field(default_factory=list)
    rename_columns: dict[str, str] = Field(default_factory=dict)
    filter: str | None = Field(
        default=None, description="SQL boolean expression over the source row (before masks)."
    )
    skip_operations: list[SkippableOp] = Field(default_factory=list)
    route: str | None = Field(default=None, description="Target schema.table.")
    add_columns: dict[str, str] = Field(
        default_factory=dict, description="column -> SQL expression."
    )


class TransformSettings(BaseModel):
    """Per-table rules applied in capture before anything is written (``[transforms]``)."""

    model_config = ConfigDict(extra="forbid")

    hash_key: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 key of the hash mask (CDC_TRANSFORMS__HASH_KEY); never logged.",
    )
    rules: list[TransformRuleSettings] = Field(default_factory=list)


#: The config file being loaded, for :meth:`Settings.settings_customise_sources`.
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("cdc_config_file", default=None)


class OpsSettings(BaseModel):
    """Operating a running pipeline: metrics, heartbeats, the slot guard and log format
    (``CDC_OPS__METRICS_PORT``, ``CDC_OPS__HEARTBEAT_SECONDS``...)."""

    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics on this port at /metrics; off when unset.",
    )
    metrics_host: str = Field(default="0.0.0.0", description="Address the metrics server binds.")
    heartbeat_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Emit a non-transactional logical message through the slot's database "
        "this often, so the slot advances while the published tables are quiet, and "
        "measure end-to-end latency with it; off when unset.",
    )
    lag_warn_bytes: int = Field(
        default=1024**3,
        gt=0,
        description="Warn (log and cdc_slot_lag_warning) when the slot's lag passes this many bytes.",
    )
    slot_check_seconds: float = Field(
        default=15.0, gt=0, description="How often a running pipeline reads its slot's state."
    )
    on_slot_lost: Literal["stop", "resnapshot"] = Field(
        default="stop",
        description="When PostgreSQL invalidates the slot (wal_status 'lost'): stop with an "
        "error, or drop it, create a new one and copy every table again (the changelog "
        "records a truncate followed by the copy).",
    )
    log_format: Literal["rich", "json"] = Field(
        default="rich", description="rich: for people; json: one object per line for log shippers."
    )


class Settings(BaseSettings):
    """Everything a pipeline needs. See the module docstring for the environment names."""

    model_config = SettingsConfigDict(
        env_prefix="CDC_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    name: str = Field(default="cdc", description="Pipeline name: slot, publication, state.")
    source: SourceSettings = Field(default_factory=SourceSettings)
    lake: LakeSettings = Field(default_factory=LakeSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    ops: OpsSettings = Field(default_factory=OpsSettings)
    snapshot: Literal["initial", "never"] = Field(
        default="initial",
        description="initial: copy existing rows before streaming; never: stream only.",
    )
    transforms: TransformSettings = Field(default_factory=TransformSettings)
    config_file: str | None = Field(
        default=None, exclude=True, description="The config file these settings came from."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: the environment (and .env) over the config file.
        path = _CONFIG_FILE.get()
        toml = () if path is None else (TomlConfigSettingsSource(settings_cls, toml_file=path),)
        return (init_settings, env_settings, dotenv_settings, *toml, file_secret_settings)

    def model_post_init(self, context: object, /) -> None:
        # Whatever the process prints later (logs, errors) masks these values.
        if self.source.dsn is not None:
            register_secrets(dsn_password(self.source.dsn.get_secret_value()))
        k = self.kafka
        for props in (k.client, k.producer, k.consumer):
            register_secrets(*(str(v) for n, v in props.items() if is_secret_property(n)))
        if self.transforms.hash_key is not None:
            register_secrets(self.transforms.hash_key.get_secret_value())

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _SLOT_NAME.match(value):
            raise ValueError(
                "must be 1-63 lower-case letters, digits or underscores "
                "(it names the replication slot)"
            )
        return value

    @property
    def slot_name(self) -> str:
        return self.source.slot or self.name

    @property
    def publication_name(self) -> str:
        return self.source.publication or self.name

    @property
    def topic_prefix(self) -> str:
        """Kafka topic prefix: ``kafka.topic_prefix``, else the pipeline name."""
        return self.kafka.topic_prefix or self.name

    @property
    def kafka_group(self) -> str:
        """Consumer group of the sink workers: ``kafka.group``, else ``<name>-sink``."""
        return self.kafka.group or f"{self.name}-sink"

    def kafka_bootstrap(self) -> str:
        """The bootstrap servers, or a :class:`ConfigError` that says where they were looked for."""
        if not self.kafka.bootstrap:
            raise ConfigError(
                "no Kafka cluster: pass --kafka HOST:PORT, or set CDC_KAFKA__BOOTSTRAP in the "
                "environment or in ./.env"
            )
        return self.kafka.bootstrap

    def source_dsn(self) -> str:
        """The source DSN, or a :class:`ConfigError` that says where it was looked for."""
        if self.source.dsn is None or not self.source.dsn.get_secret_value():
            raise ConfigError(
                "no source database: pass --source DSN, or set CDC_SOURCE__DSN in the "
                "environment or in ./.env"
            )
        return self.source.dsn.get_secret_value()


def _unknown_keys(model: type[BaseModel], data: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the keys of ``data`` that ``model`` has no field for (recursively)."""
    unknown: list[str] = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None or key == "config_file":
            unknown.append(prefix + key)
            continue
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            if isinstance(value, dict):
                unknown += _unknown_keys(inner, value, f"{prefix}{key}.")
        elif key == "rules" and inner == list[TransformRuleSettings] and isinstance(value, list):
            for i, rule in enumerate(value):
                if isinstance(rule, dict):
                    unknown += _unknown_keys(TransformRuleSettings, rule, f"{prefix}rules[{i}].")
    return unknown


def _read_config_file(path: Path) -> dict[str, Any]:
    """The TOML file's data, or a :class:`ConfigError` naming the file and what is wrong."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    unknown = _unknown_keys(Settings, data)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)} (see docs/transforms.md and the CDC_* variables)"
        )
    return data


def _describe(error: ValidationError, file: Path | None, file_data: dict[str, Any]) -> str:
    """One line per problem: ``key: what is wrong``, saying when the key is from the file."""
    lines = []
    for item in error.errors():
        loc = item["loc"]
        key = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        node: Any = file_data
        for part in loc:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        where = f" (in {file})" if file is not None and node is not None else ""
        lines.append(f"{key}{where}: {item['msg']}")
    return "; ".join(lines)


def _reveal(data: Any) -> Any:
    """``data`` with every SecretStr replaced by its value, to validate it again."""
    if isinstance(data, SecretStr):
        return data.get_secret_value()
    if isinstance(data, dict):
        return {k: _reveal(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_reveal(v) for v in data]
    return data


def load_settings(config: str | Path | None = None, /, **overrides: object) -> Settings:
    """Settings from command-line ``overrides``, the environment and the config file.

    ``config`` (else ``CDC_CONFIG``) is a TOML file with the same sections as the
    environment variables; the environment wins over it, and non-None ``overrides`` (from
    CLI options) win over both. Overrides use dotted paths for nested values:
    ``{"source.dsn": "postgresql://..."}``. Unknown keys in the file are errors, and every
    error names the file and the key.

    Example:
        >>> load_settings(**{"lake.path": "/tmp/lake"}).lake.path
        '/tmp/lake'
    """
    config = config or os.environ.get("CDC_CONFIG") or None
    path = Path(config) if config else None
    file_data = _read_config_file(path) if path is not None else {}
    token = _CONFIG_FILE.set(path)
    try:
        settings = Settings()
        data = _reveal(settings.model_dump())
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        data["config_file"] = None if path is None else str(path)
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid settings: {_describe(e, path, file_data)}") from e
    except ValueError as e:
        raise ConfigError(f"invalid settings: {e}") from e
    finally:
        _CONFIG_FILE.reset(token)
