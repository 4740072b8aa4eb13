#!/usr/bin/env bash
# make bench: measures the local cluster (n = 4 and 7, gRPC and TCP, 64 B / 512 B / 1 KiB
# payloads) with `pbft bench`, compares with the unreplicated baseline in the same run,
# records peak replica memory, runs a 10-minute memory soak (scripts/soak_memory.sh), and
# writes docs/BENCHMARKS.md. Bounded: about 15 minutes after the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONCURRENCY=${CONCURRENCY:-64}
OUT=target/bench
mkdir -p "$OUT"
# The commit measured, so a report regenerated later (new notes) still names it.
git rev-parse --short HEAD > "$OUT/commit"
rm -rf "$OUT"/n*
cargo build --release -q -p pbft-replica -p pbft-client
cargo run --release -q -p pbft-core --example crypto_cost -- --json "$OUT/crypto.json"
PBFT=target/release/pbft
PORT=21000

run_cluster() { # n transport
    local n=$1 t=$2 dir="$OUT/n$1-$2"
    "$PBFT" --data "$dir" up --replicas "$n" --transport "$t" --port "$PORT" >"$dir.up.log" 2>&1 &
    local up=$!
    # A failed step exits the script (set -e): stop this cluster then too, or it keeps
    # its ports and two cores' worth of timers busy under whatever runs next.
    trap 'kill -TERM '"$up"' 2>/dev/null; wait '"$up"' 2>/dev/null || true' EXIT
    for _ in $(seq 1 300); do
        if "$PBFT" --data "$dir" status >/dev/null 2>&1; then break; fi
        sleep 0.2
    done
    for p in 64 512 1024; do
        local extra=()
        if [ "$n" = 4 ] && [ "$t" = grpc ]; then extra=(--unreplicated); fi
        "$PBFT" --data "$dir" bench --concurrency "$CONCURRENCY" --payload "$p" \
            --duration "$DURATION" --warmup "$WARMUP" --json "$OUT/n$n-$t-$p.json" "${extra[@]}" | tail -3
    done
    if [ "$n" = 4 ] && [ "$t" = grpc ]; then
        # Enough requests in flight to fill batches (the floor is stated for that).
        "$PBFT" --data "$dir" bench --concurrency 256 --payload 512 --duration "$DURATION" \
            --warmup "$WARMUP" --json "$OUT/n$n-$t-512-c256.json" --unreplicated | tail -3
        "$PBFT" --data "$dir" bench --concurrency 1024 --payload 512 --duration "$DURATION" \
            --warmup "$WARMUP" --json "$OUT/n$n-$t-512-c1024.json" --unreplicated | tail -3
        "$PBFT" --data "$dir" bench --rate 10000 --payload 512 --duration "$DURATION" \
            --warmup "$WARMUP" --json "$OUT/n4-grpc-open10k.json" | tail -1
    fi
    # Peak resident memory of each replica (VmHWM).
    for pid in $(pgrep -f "$dir/replica-[0-9]*.yaml" || true); do
        awk '/VmHWM/ {print $2}' "/proc/$pid/status"
    done | sort -n | tail -1 >"$OUT/n$n-$t.rss_kb"
    kill -TERM "$up"; wait "$up" || true
    trap - EXIT
    # Keep the logs and figures, not the ledgers: repeated runs would fill the disk.
    rm -rf "$dir"
}

for n in 4 7; do
    for t in grpc tcp; do
        PORT=$((PORT + 10))
        run_cluster "$n" "$t"
    done
done

# Memory over a 10-minute steady load (SOAK_SECONDS=0 skips it).
if [ "${SOAK_SECONDS:-600}" != 0 ]; then
    bash scripts/soak_memory.sh
fi

python3 scripts/bench_report.py "$OUT" > docs/BENCHMARKS.md
echo "wrote docs/BENCHMARKS.md"
