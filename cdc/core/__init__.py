"""The contract every package shares: change events, table schemas, the PostgreSQL-to-Arrow
type mapping, LSNs, the capture position, the Kafka event format, settings and the error
root. It imports nothing of ours outside itself and does no IO."""
