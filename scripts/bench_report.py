"""Renders target/bench/*.json (written by scripts/bench.sh) as docs/BENCHMARKS.md."""
import glob
import json
import os
import platform
import subprocess
import sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None


def cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def row(r):
    return (f"| {r['target']} | {r['mode']} | {r['payload_bytes']} | {r['throughput_per_sec']:.0f} "
            f"| {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} "
            f"| {r['errors']} |")


print("# Benchmarks\n")
print("Written by `make bench` (`scripts/bench.sh`); rerun it to refresh. Every figure below")
print("comes from one run on one machine, replicas and load generator sharing it.\n")
print(f"- machine: {os.cpu_count()} cores, {cpu()}, {platform.system()} {platform.release()}")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"- commit: {commit}; release build; requests are signed (ed25519), ordered, executed and fsync'd")
print("- command: `make bench` (closed loop, 64 requests in flight, 2 s warm-up, 10 s measured)\n")
print("| cluster | load | payload B | committed/s | p50 ms | p90 ms | p99 ms | max ms | errors |")
print("|---|---|---|---|---|---|---|---|---|")
ratio = None
for name in sorted(glob.glob(os.path.join(out, "n*-*.json"))):
    data = json.load(open(name))
    print(row(data["replicated"]))
    if "unreplicated" in data:
        print(row(data["unreplicated"]))
        ratio = ratio or []
        ratio.append((data["replicated"]["payload_bytes"], data["ratio"]))
print()
if ratio:
    print("Replicated / unreplicated throughput, measured in the same run (n = 4, gRPC):",
          ", ".join(f"{p} B: {r:.2f}" for p, r in ratio))
    print()
print("Peak resident memory per replica (VmHWM, largest of the cluster):\n")
for name in sorted(glob.glob(os.path.join(out, "*.rss_kb"))):
    kb = open(name).read().strip()
    label = os.path.basename(name)[:-len(".rss_kb")]
    print(f"- {label}: {int(kb) / 1024:.0f} MiB" if kb else f"- {label}: not measured")
print()
notes = os.path.join(os.path.dirname(__file__), "bench_notes.md")
if os.path.exists(notes):
    print(open(notes).read())
