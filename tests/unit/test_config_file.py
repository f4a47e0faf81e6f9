"""The pipeline config file: sections, precedence (options > environment > file), errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc.core.errors import ConfigError
from cdc.core.settings import load_settings

CONFIG = """
name = "shop"

[source]
dsn = "postgresql://file/db"
tables = ["crm.customers"]

[lake]
path = "/lake/from-file"

[batch]
max_rows = 5
max_seconds = 2.5

[kafka]
bootstrap = "file:9092"

[transforms]
hash_key = "file-secret"

[[transforms.rules]]
tables = ["crm.*"]
mask = { email = "hash" }
skip_operations = ["d"]
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CDC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray ./.env


def _write(tmp_path: Path, text: str, name: str = "cdc.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_sections_load(tmp_path: Path) -> None:
    path = _write(tmp_path, CONFIG)
    settings = load_settings(path)
    assert settings.name == "shop"
    assert settings.source_dsn() == "postgresql://file/db"
    assert settings.source.tables == ["crm.customers"]
    assert (settings.lake.path, settings.batch.max_rows, settings.batch.max_seconds) == (
        "/lake/from-file",
        5,
        2.5,
    )
    assert settings.kafka.bootstrap == "file:9092"
    rule = settings.transforms.rules[0]
    assert (rule.tables, rule.mask, rule.skip_operations) == (["crm.*"], {"email": "hash"}, ["d"])
    assert settings.transforms.hash_key is not None
    assert settings.transforms.hash_key.get_secret_value() == "file-secret"
    assert "file-secret" not in repr(settings)
    assert settings.config_file == str(path)


def test_precedence_options_then_environment_then_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, CONFIG)
    monkeypatch.setenv("CDC_BATCH__MAX_ROWS", "7")
    monkeypatch.setenv("CDC_LAKE__PATH", "/lake/from-env")
    monkeypatch.setenv("CDC_TRANSFORMS__HASH_KEY", "env-secret")
    settings = load_settings(path, **{"lake.path": "/lake/from-option"})
    assert settings.lake.path == "/lake/from-option"
    assert settings.batch.max_rows == 7
    assert settings.batch.max_seconds == 2.5  # untouched keys of a section keep the file's
    assert settings.transforms.hash_key is not None
    assert settings.transforms.hash_key.get_secret_value() == "env-secret"
    assert settings.transforms.rules[0].mask == {"email": "hash"}


def test_cdc_config_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, CONFIG)
    monkeypatch.setenv("CDC_CONFIG", str(path))
    assert load_settings().name == "shop"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[batch]\nmax_rowz = 1\n", "batch.max_rowz"),
        ("colour = 'red'\n", "colour"),
        ("[[transforms.rules]]\ntables = ['a.b']\nmaks = {x = 'hash'}\n", "rules[0].maks"),
        ("[transforms]\nhash_kee = 'x'\n", "transforms.hash_kee"),
    ],
)
def test_unknown_keys_are_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_bad_value_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "[batch]\nmax_rows = -5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "batch.max_rows" in message and str(path) in message and "greater than 0" in message


def test_bad_skip_operation_names_rule(tmp_path: Path) -> None:
    path = _write(tmp_path, "[[transforms.rules]]\ntables = ['a.b']\nskip_operations = ['x']\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "transforms.rules[0].skip_operations[0]" in str(info.value)
    assert str(path) in str(info.value)


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[batch\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_settings(path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_settings(tmp_path / "missing.toml")
