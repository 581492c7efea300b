#!/usr/bin/env bash
# The long cluster fault run of docs/reliability.md: ROUNDS rounds of the five faults of
# tests/tests/cluster.rs (kill the writer, kill a follower, kill the stream leader, kill a NATS
# node that does not lead the stream, pause the writer past its lease) against three bursard
# nodes over a real 3-node NATS cluster, each round checked (writers back, folds equal, copies
# verified), and the whole logs checked at the end (nothing acknowledged lost, no overspend).
# Usage: scripts/cluster-faults.sh [ROUNDS]   (default 100, i.e. 500 faults, ~70 min)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-100}"
cargo build -p bursard -p bursar-cli
BURSAR_CLUSTER_FAULT_ROUNDS="$rounds" cargo test -p bursar-tests --test cluster \
    faults_lose_no_acknowledged_write -- --nocapture
