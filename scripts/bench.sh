#!/usr/bin/env bash
# make bench: measures the local cluster (n = 4 and 7, gRPC and TCP, 64 B / 512 B / 1 KiB
# payloads) with `pbft bench`, compares with the unreplicated baseline in the same run,
# records peak replica memory, runs a 10-minute memory soak (scripts/soak_memory.sh), and
# writes docs/BENCHMARKS.md. Bounded: about 25 minutes after the release build, the
# 10-minute soak included.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONCURRENCY=${CONCURRENCY:-64}
# The rows the floors are stated for (1,024 in flight with its unreplicated baseline, and
# 10,000/s offered) run this many times, interleaved; the report shows the median run and
# lists every run. One 10-second run on this shared machine varies by about a tenth.
REPEATS=${REPEATS:-3}
# Whole numbers only: they go into params.json and the report (checked here, before a
# 16-minute run, rather than by the report at its end).
for v in DURATION WARMUP CONCURRENCY REPEATS SOAK_SECONDS SOAK_RATE SAMPLE; do
    val=${!v:-1}
    if ! [[ $val =~ ^[0-9]+$ ]]; then
        echo "make bench: $v must be a whole number of seconds or requests, got '$val'" >&2
        exit 2
    fi
done
OUT=target/bench
mkdir -p "$OUT"
# The commit measured, so a report regenerated later (new notes) still names it.
git rev-parse --short HEAD > "$OUT/commit"
# Nothing from an earlier run may show up in this one's report (a skipped soak included).
rm -rf "$OUT"/n* "$OUT"/soak* "$OUT"/hwm_reset_failed
# The parameters this run used, for the report's "command" line.
cat >"$OUT/params.json" <<EOF
{"duration": $DURATION, "warmup": $WARMUP, "concurrency": $CONCURRENCY, "repeats": $REPEATS,
 "soak_seconds": ${SOAK_SECONDS:-600}, "soak_rate": ${SOAK_RATE:-5000}, "soak_sample": ${SAMPLE:-10}}
EOF
cargo build --release -q -p pbft-replica -p pbft-client
cargo run --release -q -p pbft-core --example crypto_cost -- --json "$OUT/crypto.json"
PBFT=target/release/pbft
PORT=21000

# Peak resident memory of each run: every replica's VmHWM is reset before a run (writing 5
# to /proc/<pid>/clear_refs) and read after it, so a row's peak is that run's, not one left
# by the runs before it on the same cluster. Where the reset is refused, a row's figure is
# the peak so far, an upper bound (the report says so). A cluster's peak is the largest of
# its rows'.
replica_pids() { pgrep -f "$1/replica-[0-9]*.yaml" || true; }
reset_peaks() {
    for pid in $(replica_pids "$1"); do
        echo 5 2>/dev/null >"/proc/$pid/clear_refs" || echo "$pid" >>"$OUT/hwm_reset_failed"
    done
}
read_peak() {
    for pid in $(replica_pids "$1"); do awk '/VmHWM/ {print $2}' "/proc/$pid/status"; done |
        sort -n | tail -1
}

bench_run() { # dir name lines-to-show bench-args...
    local dir=$1 name=$2 lines=$3
    shift 3
    reset_peaks "$dir"
    "$PBFT" --data "$dir" bench --duration "$DURATION" --warmup "$WARMUP" \
        --json "$OUT/$name.json" "$@" | tail -"$lines"
    read_peak "$dir" >"$OUT/$name.peak_kb"
}

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
    # Every row is followed by the unreplicated baseline on the same workload: its ratio
    # then compares two runs a few seconds apart. This host's speed drifts within minutes
    # (in one run the baseline at 1 KiB ran at half its speed of a fresh start), so a
    # baseline from another part of the run would not do.
    for p in 64 512 1024; do
        bench_run "$dir" "n$n-$t-$p" 3 --concurrency "$CONCURRENCY" --payload "$p" --unreplicated
    done
    if [ "$n" = 4 ] && [ "$t" = grpc ]; then
        # Enough requests in flight to fill batches (the floor is stated for that).
        bench_run "$dir" "n$n-$t-512-c256" 3 --concurrency 256 --payload 512 --unreplicated
        for r in $(seq 1 "$REPEATS"); do
            bench_run "$dir" "n$n-$t-512-c1024.r$r" 3 --concurrency 1024 --payload 512 --unreplicated
            bench_run "$dir" "n4-grpc-open10k.r$r" 1 --rate 10000 --payload 512
        done
    fi
    # The cluster's peak: the largest of its runs' (the runs' peaks cover the whole
    # benchmark; between runs the cluster is idle).
    cat "$OUT/n$n-$t"-*.peak_kb | sort -n | tail -1 >"$OUT/n$n-$t.rss_kb"
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

# Into a temporary file first: a report that fails leaves the last good one in place.
python3 scripts/bench_report.py "$OUT" > "$OUT/BENCHMARKS.md"
mv "$OUT/BENCHMARKS.md" docs/BENCHMARKS.md
echo "wrote docs/BENCHMARKS.md"
