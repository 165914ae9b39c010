# Stormwatch test Kafka broker (see deploy/kafka/README.md).
# Include from the top-level Makefile:   include deploy/kafka/kafka.mk
#
#   make kafka-build     fetch the Kafka jars (offline from ~/.m2 if possible, else Maven Central)
#   make kafka-up        start on 127.0.0.1:$(KAFKA_PORT) (default 19092), fresh data, wait until ready
#   make kafka-down      stop it (idempotent)
#   make kafka-status
#
# Settings come from the environment or the make command line, e.g.
#   make kafka-up KAFKA_PORT=19192 KAFKA_RUN_DIR=/tmp/k
# (KAFKA_PORT, KAFKA_CONTROLLER_PORT, KAFKA_RUN_DIR, KAFKA_HEAP_OPTS, KAFKA_START_TIMEOUT, ...).

KAFKA_SH := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))/kafka.sh

# Do not let these targets become the default goal when included near the top.
_kafka_mk_saved_goal := $(.DEFAULT_GOAL)

.PHONY: kafka-build kafka-up kafka-down kafka-status

kafka-build:
	@'$(KAFKA_SH)' build

kafka-up:
	@'$(KAFKA_SH)' up

kafka-down:
	@'$(KAFKA_SH)' down

# Exit code 3 (stopped) is not a make error.
kafka-status:
	@'$(KAFKA_SH)' status || true

.DEFAULT_GOAL := $(_kafka_mk_saved_goal)
