"""Kafka on the capture side: the Debezium event encoder, the producer sink and capture's
position in a compacted topic. Consuming lives in :mod:`sinks.kafka_worker`."""
