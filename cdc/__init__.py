"""Capture: PostgreSQL logical replication into change events (see README.md)."""
