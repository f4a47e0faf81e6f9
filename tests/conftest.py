pytest_plugins = [
    "tests.plugins.postgres",
    "tests.plugins.kafka",
    "tests.plugins.lake",
    "tests.plugins.s3",
]
