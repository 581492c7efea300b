#!/usr/bin/env bash
# A realistic month of agent traffic (four teams, eight models, 2026-11-01 to 2026-12-01 UTC)
# sent through a real bursard, then reported: the table, and the stacked bar chart of cost per
# day by team that docs/report-example.{svg,png} show.
#
#   bash examples/month-of-traffic.sh [OUT_DIR]     # default: docs/
#
# The traffic is seeded (daemon/examples/month_of_traffic.rs), so every run draws the same
# month. Needs only cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cargo build --release -q -p bursard --example month_of_traffic
cargo build --release -q -p bursar-cli
target/release/examples/month_of_traffic "$work/data"
bursar=(target/release/bursar --data-dir "$work/data")
month=(--since 2026-11-01T00:00:00Z --until 2026-12-01T00:00:00Z)
"${bursar[@]}" report --by team --every week "${month[@]}"
"${bursar[@]}" report --by model --every month "${month[@]}"
"${bursar[@]}" report --by team --every day "${month[@]}" --format svg -o "$out/report-example.svg"
"${bursar[@]}" report --by team --every day "${month[@]}" --format png -o "$out/report-example.png"
echo "charts written: $out/report-example.svg, $out/report-example.png"
