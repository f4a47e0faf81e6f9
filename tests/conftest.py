import pytest

# Helper modules in tests/plugins (not only the fixture plugins below) assert with pytest's
# rewritten messages, so a failed wait says what it waited for.
pytest.register_assert_rewrite("tests.plugins")

pytest_plugins = [
    "tests.plugins.postgres",
    "tests.plugins.kafka",
    "tests.plugins.lake",
    "tests.plugins.failures",
    "tests.plugins.demo_lake",
    "tests.plugins.s3",
    "tests.plugins.capture_path",
]
