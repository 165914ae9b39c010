# Stormwatch test Kafka broker (see deploy/kafka/README.md).
# Include from the top-level Makefile:   include deploy/kafka/kafka.mk
#
#   make kafka-build                      fetch the Kafka jars from Maven Central (once)
#   make kafka-up                         start on 127.0.0.1:9092 (fresh data), wait until ready
#   make kafka-up STORMWATCH_KAFKA_PORT=0 pick a free port (printed as the last line)
#   make kafka-down                       stop it
#   make kafka-status
#
# Variables are namespaced (not KAFKA_PORT) because Docker-style links export
# KAFKA_PORT=tcp://... into environments.

KAFKA_MK_DIR := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
KAFKA_SH := $(KAFKA_MK_DIR)/kafka.sh
STORMWATCH_KAFKA_PORT ?= 9092
STORMWATCH_KAFKA_DIR ?= $(KAFKA_MK_DIR)/run

# Do not let these targets become the default goal when included near the top.
_kafka_mk_saved_goal := $(.DEFAULT_GOAL)

.PHONY: kafka-build kafka-up kafka-down kafka-status

kafka-build:
	@'$(KAFKA_SH)' build

kafka-up:
	@'$(KAFKA_SH)' up --port '$(STORMWATCH_KAFKA_PORT)' --dir '$(STORMWATCH_KAFKA_DIR)'

kafka-down:
	@'$(KAFKA_SH)' down --dir '$(STORMWATCH_KAFKA_DIR)'

kafka-status:
	@'$(KAFKA_SH)' status --dir '$(STORMWATCH_KAFKA_DIR)'

.DEFAULT_GOAL := $(_kafka_mk_saved_goal)
