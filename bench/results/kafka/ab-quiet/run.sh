#!/bin/bash
# A/B: librdkafka max.in.flight 5 (main) vs 1 (ingcpu), alternating, same broker.
export JETMQ_BROKER_BIN=/tmp/ab/broker
for round in 1 2; do
  for v in main ingcpu; do
    if [ $v = main ]; then script=/work/main/bench/kafka_bench.py; else script=/work/wt-ingcpu/bench/kafka_bench.py; fi
    echo "=== $v round $round $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    JETMQ_INGESTOR_BIN=/tmp/ab/$v-ingestor timeout 900 ~/.cache/jetmq/venv/bin/python $script \
      --direct-bin /tmp/ab/$v-direct --json /tmp/ab/$v-$round.json --count 30000 --latency-secs 5 > /tmp/ab/$v-$round.log 2>&1
    echo "rc=$?"
  done
done
