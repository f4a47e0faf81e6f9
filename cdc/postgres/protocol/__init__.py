"""The streaming-replication and pgoutput protocols as pure functions over bytes: no
sockets, no files, no psycopg. Unit-, property- and fuzz-tested without a server."""
