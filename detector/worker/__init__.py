"""The Kafka shell around the engine: ``detector worker``.

``config`` (the ``[kafka]`` settings) and ``clock`` (idle event-time advance) import no Faust;
``snapshots`` writes and reads engine snapshots (the state topic, plain aiokafka);
``app`` builds the Faust app with :func:`detector.worker.app.create_app`: one engine per usage
partition, snapshotted and restored across restarts and rebalances.
"""
