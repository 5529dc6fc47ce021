#!/bin/bash
# apache/kafka's kafka-broker-api-versions.sh, as far as the compose healthcheck uses it:
# --bootstrap-server HOST:PORT answers a Kafka ApiVersions request.
set -eu
bootstrap=localhost:9092
while [ $# -gt 0 ]; do
  case "$1" in
    --bootstrap-server) bootstrap="$2"; shift ;;
    *) echo "kafka-broker-api-versions.sh (tansu stand-in): $1 is not supported" >&2; exit 2 ;;
  esac
  shift
done
exec python3 /opt/kafka/bin/kafka_probe.py api-versions "$bootstrap"
