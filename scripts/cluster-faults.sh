#!/usr/bin/env bash
# The long cluster fault run of docs/reliability.md: ROUNDS rounds of the four faults of
# tests/tests/cluster.rs (kill the writer, kill a follower, kill the stream leader, pause the
# writer past its lease) against three bursard nodes over a real 3-node NATS cluster.
# Usage: scripts/cluster-faults.sh [ROUNDS]   (default 25, i.e. 100 faults)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-25}"
cargo build -p bursard -p bursar-cli
BURSAR_CLUSTER_FAULT_ROUNDS="$rounds" cargo test -p bursar-tests --test cluster \
    faults_lose_no_acknowledged_write -- --nocapture
