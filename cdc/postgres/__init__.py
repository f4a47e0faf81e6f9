"""PostgreSQL: the replication protocol (:mod:`cdc.postgres.protocol`, pure) and the IO
beside it: the replication connection, slots and publications, snapshots, streaming,
spilling streamed transactions, catalog introspection and ``cdc check``."""
