"""Renders target/bench/*.json (written by scripts/bench.sh) as docs/BENCHMARKS.md."""
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None


def cpu():
    """The CPU's model and whether it has AVX-512 IFMA: curve25519-dalek's signature checks
    take about half the time with it, so two hosts of one model name can differ by that."""
    model, flags = None, None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and flags is None:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    model = model or platform.processor() or "unknown"
    if flags is None:
        return model
    vector = "AVX-512 IFMA" if "avx512ifma" in flags else (
        "AVX2, no AVX-512 IFMA" if "avx2" in flags else "no AVX2")
    return f"{model} ({vector})"


def peak_mib(json_path):
    """The run's peak resident memory of the largest replica (bench.sh's `.peak_kb`)."""
    path = json_path[:-len(".json")] + ".peak_kb"
    try:
        kb = open(path).read().strip()
        return f"{int(kb) / 1024:.0f}" if kb else "-"
    except OSError:
        return "-"


def row(r, peak="-", ratio="-"):
    # `late` was `missed` before open-loop requests waited for a free client.
    late = r.get("late", r.get("missed", 0))
    return (f"| {r['target']} | {r['mode']} | {r['payload_bytes']} | {r['throughput_per_sec']:.0f} "
            f"| {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} "
            f"| {r['errors']} | {late} | {ratio} | {peak} |")


params = load("params.json") or {}
duration, warmup = params.get("duration", 10), params.get("warmup", 2)
concurrency, repeats = params.get("concurrency", 64), params.get("repeats", 3)


print("# Benchmarks\n")
print("Written by `make bench` (`scripts/bench.sh`); rerun it to refresh. Every figure below")
print("comes from one `make bench` on one machine, replicas and load generator sharing it.\n")
print(f"- machine: {os.cpu_count()} cores, {cpu()}, {platform.system()} {platform.release()}")
commit_file = os.path.join(out, "commit")
commit = (open(commit_file).read().strip() if os.path.exists(commit_file) else
          subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
print(f"- commit: {commit}; release build; requests are signed (ed25519), ordered, executed and fsync'd")
# Variables given to `make bench` that differ from its defaults, as they were given.
DEFAULTS = {"duration": ("DURATION", 10), "warmup": ("WARMUP", 2), "concurrency": ("CONCURRENCY", 64),
            "repeats": ("REPEATS", 3), "soak_seconds": ("SOAK_SECONDS", 600),
            "soak_rate": ("SOAK_RATE", 5000), "soak_sample": ("SAMPLE", 10)}
overrides = " ".join(f"{var}={params[k]}" for k, (var, default) in DEFAULTS.items()
                     if k in params and params[k] != default)
print(f"- command: `{overrides + ' ' if overrides else ''}make bench` (closed loop with {concurrency} "
      "requests in flight unless the row says 256 or 1024, one shared set of connections for all load "
      f"clients; {warmup} s warm-up, {duration} s measured; "
      + (f"the 1,024-in-flight and 10,000/s rows: the median of {repeats} runs, listed below the table)\n"
         if repeats > 1 else "each row run once)\n"))
print("| cluster | load | payload B | committed/s | p50 ms | p90 ms | p99 ms | max ms | errors | late "
      "| ratio | peak MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")


def median_run(paths):
    """The median of repeated runs of one row: by throughput for a closed loop, by p99 for
    an open loop (its rate is fixed; the tail is what a busier machine moves first)."""
    runs = [(p, json.load(open(p))) for p in paths]

    def key(run):
        r = run[1]["replicated"]
        return -r["p99_ms"] if r["mode"].startswith("open") else r["throughput_per_sec"]

    runs.sort(key=key)
    return runs[(len(runs) - 1) // 2]


# Rows run more than once are `<row>.r<k>.json`: grouped under `<row>`, in run order.
groups = {}
for name in glob.glob(os.path.join(out, "n*-*.json")):
    m = re.match(r"(.*)\.r(\d+)\.json$", name)
    row_name, run = (m.group(1), int(m.group(2))) if m else (name[:-len(".json")], 0)
    groups.setdefault(row_name, []).append((run, name))
groups = {row_name: [name for _, name in sorted(runs)] for row_name, runs in groups.items()}
repeated = {row_name: paths for row_name, paths in groups.items() if len(paths) > 1}
medians = {row_name: median_run(paths) for row_name, paths in groups.items()}
# The unreplicated baseline of each (payload, load), from the row that measured it (n = 4,
# gRPC): rows of other clusters with the same payload and load are compared with it.
baselines = {}
for row_name in sorted(medians):  # the same pick on every run, whatever glob's order
    _, data = medians[row_name]
    b = data.get("unreplicated")
    if b and b.get("committed"):
        baselines.setdefault((b["payload_bytes"], b["mode"]), b)
ratio = None
for row_name in sorted(groups):
    name, data = medians[row_name]
    r = data["replicated"]
    base = baselines.get((r["payload_bytes"], r["mode"]))
    if "ratio" in data:
        cell = f"{data['ratio']:.2f}"
    elif base:
        cell = f"{r['throughput_per_sec'] / base['throughput_per_sec']:.2f}*"
    else:
        cell = "-"
    print(row(r, peak_mib(name), cell))
    if "unreplicated" in data:
        print(row(data["unreplicated"]))
        if "ratio" in data:
            ratio = ratio or []
            ratio.append((f"{r['target']}, {r['payload_bytes']} B, {r['mode']}", data["ratio"]))
print()
print("`ratio`: committed/s over the unreplicated baseline's (one server executing the same "
      "signed requests with no consensus: it checks their signatures in batches, executes them "
      "and appends and fsyncs a block per batch, like a replica, and serves the same client API). "
      "Clients reach replicas over gRPC whatever the transport between replicas, and reach the "
      "baseline the same way. Without a mark, the baseline ran right after that row, on the same "
      "workload; `*`: no baseline ran after the row, and the one "
      "measured with the same payload and load elsewhere in this run is used.")
print()
if ratio:
    print("Replicated / unreplicated throughput, each measured right after the other:\n")
    for p, r in ratio:
        print(f"- {p}: {r:.2f}")
    print()
if repeated:
    print("Rows measured more than once (interleaved, same cluster) show their median run above, "
          "by committed/s for a closed loop and by p99 for the open loop. Every run:\n")
    print("| row | run | committed/s | p50 ms | p99 ms | ratio to unreplicated |")
    print("|---|---|---|---|---|---|")
    for row_name, paths in sorted(repeated.items()):
        label = os.path.basename(row_name)
        runs = [json.load(open(p)) for p in paths]
        for k, d in enumerate(runs, 1):
            r = d["replicated"]
            ratio_cell = f"{d['ratio']:.2f}" if "ratio" in d else "-"
            print(f"| {label} | {k} | {r['throughput_per_sec']:.0f} | {r['p50_ms']:.1f} "
                  f"| {r['p99_ms']:.1f} | {ratio_cell} |")

        med = statistics.median_low
        ratios = [d["ratio"] for d in runs if "ratio" in d]
        ratio_cell = f"{med(ratios):.2f}" if ratios else "-"
        print(f"| {label} | median of each | "
              f"{med([d['replicated']['throughput_per_sec'] for d in runs]):.0f} "
              f"| {med([d['replicated']['p50_ms'] for d in runs]):.1f} "
              f"| {med([d['replicated']['p99_ms'] for d in runs]):.1f} | {ratio_cell} |")
    print()
reset_failed = os.path.exists(os.path.join(out, "hwm_reset_failed"))
print("`peak MiB`: the largest replica's peak resident memory (VmHWM) during that run, "
      + ("NOT reset before each run here (the kernel refused), so the peak since the replica "
         "started, an upper bound" if reset_failed else "reset before each run")
      + "; the unreplicated baseline's is not measured. Each cluster's peak over "
      "all its runs:\n")
for name in sorted(glob.glob(os.path.join(out, "*.rss_kb"))):
    kb = open(name).read().strip()
    label = os.path.basename(name)[:-len(".rss_kb")]
    print(f"- {label}: {int(kb) / 1024:.0f} MiB" if kb else f"- {label}: not measured")
print()


def soak_section():
    """Memory over time from soak_memory.sh: per replica, the resident set each minute, the
    growth over the second half of the run, and the peak."""
    path = os.path.join(out, "soak_rss.csv")
    if not os.path.exists(path):
        return
    samples = {}
    for line in open(path).read().splitlines()[1:]:
        t, r, kb = line.split(",")
        samples.setdefault(int(r), []).append((int(t), int(kb)))
    hwm = {}
    hwm_path = os.path.join(out, "soak_hwm.csv")
    if os.path.exists(hwm_path):
        for line in open(hwm_path).read().splitlines():
            r, kb = line.split(",")
            hwm[int(r)] = int(kb)
    bench = load("soak_bench.json")
    seconds = max(t for s in samples.values() for t, _ in s)
    print(f"## Memory over time\n")
    load_desc = ""
    if bench:
        r = bench["replicated"]
        load_desc = (f" {r['throughput_per_sec']:.0f} committed/s of 512 B requests, "
                     f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['errors']} errors;")
    sample = params.get("soak_sample", 10)
    rate = params.get("soak_rate", 5000)
    measured = params.get("soak_seconds", seconds)
    print(f"`scripts/soak_memory.sh`: n = 4, gRPC, open loop at {rate}/s, 5 s warm-up and {measured} s "
          f"measured;{load_desc} resident set (VmRSS) of each replica sampled every {sample} s.\n")
    minutes = list(range(0, seconds // 60 + 1))
    print("| replica | " + " | ".join(f"{m} min" for m in minutes)
          + " | second half growth | peak (VmHWM) |")
    print("|---" * (len(minutes) + 3) + "|")
    for r in sorted(samples):
        s = samples[r]

        def at(t):
            # The sample nearest to t seconds, in MiB.
            return min(s, key=lambda x: abs(x[0] - t))[1] / 1024

        half, end = at(seconds / 2), at(seconds)
        peak = f"{hwm[r] / 1024:.0f} MiB" if r in hwm else "-"
        cells = " | ".join(f"{at(m * 60):.0f}" for m in minutes)
        print(f"| {r} | {cells} | {100 * (end - half) / half:+.1f} % | {peak} |")
    print("\nResident set in MiB. Growth over the second half is what a leak would show; the "
          "first minutes fill the log window, reply cache and storage caches.")
    disk = os.path.join(out, "soak_disk_kb")
    if os.path.exists(disk) and bench:
        kb = int(open(disk).read().strip() or 0)
        done = bench["replicated"].get("committed", 0)
        per = f", about {kb * 1024 / done:,.0f} bytes per committed request" if done else ""
        print(f"\nOne replica's data directory at the end: {kb / 1024:,.0f} MiB{per} (every "
              "block is kept: the ledger is the audit trail).")
    print()


soak_section()


def crypto_section():
    """What signatures alone cost here (services/pbft-core/examples/crypto_cost.rs), and the
    throughput ceiling that sets on this machine's cores."""
    c = load("crypto.json")
    if not c:
        return
    # Signed once; verified by the primary and f designated backups (f+1 = 2 at n = 4).
    per_request = c["sign_us"] + 2 * c["verify_zip215_batch64_us"]
    cores = os.cpu_count() or 1
    print("## What the signatures alone cost\n")
    print("`cargo run --release -p pbft-core --example crypto_cost`, median per operation:\n")
    print("| operation | us |")
    print("|---|---|")
    print(f"| sign a request (client) | {c['sign_us']:.1f} |")
    print(f"| verify a replica message, alone (ZIP215) | {c['verify_replica_us']:.1f} |")
    print(f"| verify a client request, alone (ZIP215) | {c['verify_zip215_us']:.1f} |")
    print(f"| verify a client request, in a batch of 64 | {c['verify_zip215_batch64_us']:.1f} |")
    print(f"| SHA-256 of 1 KiB | {c['sha256_kib_us']:.1f} |")
    print(f"\nEvery request is signed once and verified by f+1 = 2 of the n = 4 replicas "
          "(the primary and the batch's designated voucher): "
          f"{per_request:.0f} us of CPU, so signatures alone cap this {cores}-core machine at "
          f"about {cores * 1e6 / per_request:,.0f} requests/s before any networking, storage "
          "or execution.\n")


crypto_section()
notes = os.path.join(os.path.dirname(__file__), "bench_notes.md")
if os.path.exists(notes):
    print(open(notes).read())
