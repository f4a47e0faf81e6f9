"""``cdc jobs schedule`` honours ``CDC_LAKE__STORAGE_OPTIONS`` like every other command."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from tests.plugins.failures import RecordingEndpoint, start_cdc


def test_schedule_uses_the_storage_options_of_the_environment(
    tmp_path: Path, down_object_store: RecordingEndpoint
) -> None:
    config = tmp_path / "jobs.toml"
    config.write_text('lake = "s3://bucket/lake"\n[[jobs]]\njob = "merge"\nevery = "1s"\n')
    options = {
        "AWS_ENDPOINT_URL": down_object_store.url,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }
    proc = start_cdc(
        "jobs",
        "schedule",
        "--config",
        str(config),
        env={"CDC_LAKE__STORAGE_OPTIONS": json.dumps(options)},
    )
    try:
        deadline = time.monotonic() + 30
        while down_object_store.connections == 0:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the job never reached the configured store"
            time.sleep(0.1)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    # The store is down: each run fails as transient, and the schedule goes on.
    assert "job merge failed" in err and "Traceback" not in err
    assert json.loads(out)["failures"]["merge"] >= 1
