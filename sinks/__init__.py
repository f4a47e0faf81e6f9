"""Sinks: where change events are made durable (the Delta changelog writer)."""
