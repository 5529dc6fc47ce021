#!/bin/bash
# apache/kafka's kafka-topics.sh, as far as the compose file's kafka-topics service uses it:
# --create [--if-not-exists] --topic T --partitions N [--replication-factor R], and --list.
set -u
bootstrap=localhost:9092 topic="" partitions=1 action="" if_not_exists=0
while [ $# -gt 0 ]; do
  case "$1" in
    --bootstrap-server) bootstrap="$2"; shift ;;
    --topic) topic="$2"; shift ;;
    --partitions) partitions="$2"; shift ;;
    --replication-factor) shift ;;  # one tansu node: every topic has one replica
    --create) action=create ;;
    --list) action=list ;;
    --if-not-exists) if_not_exists=1 ;;
    *) echo "kafka-topics.sh (tansu stand-in): $1 is not supported" >&2; exit 2 ;;
  esac
  shift
done
case "$action" in
  create)
    if [ "$if_not_exists" = 1 ] && python3 /opt/kafka/bin/kafka_probe.py topics "$bootstrap" | grep -qxF "$topic"; then
      echo "Topic $topic exists."
      exit 0
    fi
    tansu topic create --broker "tcp://$bootstrap" --partitions "$partitions" "$topic" && echo "Created topic $topic." ;;
  list) exec python3 /opt/kafka/bin/kafka_probe.py topics "$bootstrap" ;;
  *) echo "kafka-topics.sh (tansu stand-in): --create or --list" >&2; exit 2 ;;
esac
