"""The Kafka shell around the engine: ``detector worker``.

``config`` (the ``[kafka]`` settings) and ``clock`` (idle event-time advance) import no Faust;
``app`` builds the Faust app with :func:`detector.worker.app.create_app`.
"""
