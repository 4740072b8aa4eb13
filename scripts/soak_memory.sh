#!/usr/bin/env bash
# Memory over a long run (part of `make bench`): a 4-replica gRPC cluster under steady open-
# loop load for SOAK_SECONDS (default 600), sampling every replica's resident set (VmRSS)
# every SAMPLE seconds into target/bench/soak_rss.csv, plus each replica's peak (VmHWM).
# bench_report.py turns it into the "Memory over time" section of docs/BENCHMARKS.md.
# Bounded: SOAK_SECONDS plus about a minute; stops its cluster on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
SOAK_SECONDS=${SOAK_SECONDS:-600}
SAMPLE=${SAMPLE:-10}
# Half the open-loop floor row's rate: enough to build and turn over the log window,
# reply cache and checkpoints that hold most of a loaded replica's memory, for 10 minutes.
RATE=${SOAK_RATE:-5000}
OUT=target/bench
mkdir -p "$OUT"
PBFT=target/release/pbft
[ -x "$PBFT" ] || cargo build --release -q -p pbft-replica -p pbft-client
dir="$OUT/soak"
rm -rf "$dir"
"$PBFT" --data "$dir" up --replicas 4 --port 22000 >"$dir.up.log" 2>&1 &
up=$!
# The cluster's data (gigabytes after a long soak) is measured, then removed: left behind,
# repeated runs fill the disk.
trap 'kill -TERM "$up" 2>/dev/null; wait "$up" 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 300); do
    if "$PBFT" --data "$dir" status >/dev/null 2>&1; then break; fi
    sleep 0.2
done
pids=()
for i in 0 1 2 3; do
    pids+=("$(pgrep -f "$dir/replica-$i.yaml" | head -1)")
done
"$PBFT" --data "$dir" bench --rate "$RATE" --payload 512 --duration "$SOAK_SECONDS" --warmup 5 \
    --json "$OUT/soak_bench.json" >"$OUT/soak_bench.log" 2>&1 &
bench=$!
echo "seconds,replica,rss_kb" >"$OUT/soak_rss.csv"
start=$(date +%s)
while kill -0 "$bench" 2>/dev/null; do
    now=$(( $(date +%s) - start ))
    for i in 0 1 2 3; do
        # A replica that exited has no samples from then on (and the report shows fewer).
        rss=$(awk '/VmRSS/ {print $2}' "/proc/${pids[$i]}/status" 2>/dev/null || echo "")
        [ -n "$rss" ] && echo "$now,$i,$rss" >>"$OUT/soak_rss.csv"
    done
    sleep "$SAMPLE"
done
wait "$bench"
for i in 0 1 2 3; do
    awk -v i="$i" '/VmHWM/ {print i "," $2}' "/proc/${pids[$i]}/status" 2>/dev/null || true
done >"$OUT/soak_hwm.csv"
du -sk "$dir/data-0" | cut -f1 >"$OUT/soak_disk_kb"
tail -3 "$OUT/soak_bench.log"
echo "memory samples: $OUT/soak_rss.csv"
