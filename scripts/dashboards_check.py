#!/usr/bin/env python3
"""Proves the Grafana dashboards and the alert rules against a real Prometheus scraping a
real local 4-replica cluster under load. No Grafana exists here, so a dashboard is proven by
evaluating each of its queries the way Grafana would send them.

Steps (everything bounded; about a minute in all):
  1. `promtool check rules` on deploy/helm/pbft/rules/pbft-alerts.yaml;
  2. `pbft up` starts 4 replicas on 127.0.0.1-4 with 200 requests/s of demo load;
  3. a Prometheus scrapes their sidecars every second, with the rules loaded, and the labels
     the chart's ServiceMonitor gives in Kubernetes (`namespace`, `pbft_cluster`, `pod`);
  4. once every target is up and a few seconds of load are recorded:
       - every dashboard variable query returns values;
       - every panel query (variables substituted as Grafana would) parses, and every panel
         returns data;
       - every alert expression parses, every rule evaluates without error, and none is
         pending or firing on this healthy cluster;
       - each alert's expression with its threshold removed (its "companions" below, each a
         verbatim piece of the rule) returns data, with values on the healthy side;
       - every pbft_* metric the dashboards and alerts name is exported, except the ones
         that only appear after an event (EVENT_ONLY);
  5. everything started is stopped, also on failure or Ctrl-C.

Needs: `prometheus` and `promtool` (Debian package prometheus: `make deps`), and
`cargo build -p pbft-replica -p pbft-client`. Python standard library only.
Exit status 0 when every check passed, 1 otherwise, 2 when a prerequisite is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "helm" / "pbft" / "rules" / "pbft-alerts.yaml"
DASHBOARDS = ROOT / "deploy" / "helm" / "pbft" / "dashboards"

REPLICAS = 4
LOAD = 200  # requests per second of demo load
SCRAPE = "1s"
# What Grafana's $__rate_interval would be here is max(4 x scrape, step + scrape) = 4 s;
# 10 s keeps every rate() over several samples. $__interval is the step of a short panel.
GRAFANA_BUILTINS = {"__rate_interval": "10s", "__interval": "2s", "__range": "1m"}
MIN_SAMPLES = 12  # per replica, before queries are evaluated
# The labels Kubernetes gives (see the chart's ServiceMonitor): namespace, pbft_cluster, pod.
NAMESPACE, CLUSTER = "local", "local"

# Metrics that only exist after an event (a dropped message); a dashboard may query them
# next to a metric that always exists, but they are absent on a healthy cluster.
EVENT_ONLY = {"pbft_dropped_messages_total"}

# Each alert's expression with the threshold removed: verbatim pieces of the rule (checked
# below), each of which must return data here, with a check that the values are healthy.
Check = Callable[[list[float]], bool]
COMPANIONS: dict[str, list[tuple[str, Check, str]]] = {
    "PbftNoProgress": [
        ('sum by (namespace, pbft_cluster) (increase(pbft_client_requests_total{outcome="submitted"}[5m]))',
         lambda v: all(x > 0 for x in v), "requests arrive (> 0)"),
        ("max by (namespace, pbft_cluster) (changes(pbft_committed_height[5m]))",
         lambda v: all(x > 0 for x in v), "height changes (> 0, so the alert stays off)"),
    ],
    "PbftViewChangeStorm": [
        ("max by (namespace, pbft_cluster) (increase(pbft_view_changes_total[10m]))",
         lambda v: all(x <= 3 for x in v), "at most 3 view changes"),
    ],
    "PbftReplicaLagging": [
        ("( max by (namespace, pbft_cluster) (pbft_committed_height) - on (namespace, pbft_cluster) group_right "
         "pbft_committed_height ) / on (namespace, pbft_cluster) group_left "
         "clamp_min(max by (namespace, pbft_cluster) (deriv(pbft_committed_height[5m])), 1)",
         lambda v: len(v) == REPLICAS and all(0 <= x <= 60 for x in v), f"{REPLICAS} replicas, each <= 60 s behind"),
    ],
    "PbftPeerUnreachable": [
        ("pbft_peer_connected",
         lambda v: len(v) == REPLICAS * (REPLICAS - 1) and all(x == 1 for x in v), f"{REPLICAS * (REPLICAS - 1)} links, all 1"),
    ],
    "PbftForgedRequest": [
        ('sum by (namespace, pbft_cluster) (increase(pbft_vouch_timeouts_total{verdict="forged"}[10m]))',
         lambda v: v == [0], "no forged request found"),
    ],
    "PbftQuorumAtRisk": [
        ("sum by (namespace, pbft_cluster) ( pbft_peers_connected >= bool 2 * floor(count without (peer) (pbft_peer_connected) / 3) )",
         lambda v: v == [REPLICAS], f"{REPLICAS} replicas connected to 2f peers"),
        ("2 * floor(max by (namespace, pbft_cluster) (count without (peer) (pbft_peer_connected)) / 3) + 1",
         lambda v: v == [2 * ((REPLICAS - 1) // 3) + 1], f"quorum 2f+1 = {2 * ((REPLICAS - 1) // 3) + 1}"),
    ],
}


# ----------------------------------------------------------------------------- reporting


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, bool, str]] = []

    def add(self, group: str, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((group, name, ok, detail))
        print(f"[{'ok  ' if ok else 'FAIL'}] {group}: {name}" + (f" ({detail})" if detail else ""), flush=True)
        return ok

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if not r[2])

    def summary(self) -> None:
        gw = max((len(r[0]) for r in self.rows), default=5)
        nw = min(max((len(r[1]) for r in self.rows), default=5), 60)
        line = "-" * (gw + nw + 60)
        print("\n" + line)
        print(f"{'group':<{gw}}  {'check':<{nw}}  result  detail")
        print(line)
        for group, name, ok, detail in self.rows:
            n = name if len(name) <= nw else name[: nw - 3] + "..."
            d = detail if len(detail) <= 70 else detail[:67] + "..."
            print(f"{group:<{gw}}  {n:<{nw}}  {'ok    ' if ok else 'FAIL  '}  {d}")
        print(line)
        print(f"{len(self.rows) - self.failed} passed, {self.failed} failed")


class Abort(Exception):
    """A step that later steps depend on failed."""


# ----------------------------------------------------------------------------- processes


class Procs:
    """Processes this script started, each in its own process group, stopped on exit."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], float]] = []

    def start(self, name: str, cmd: list[str], log: Path, grace: float) -> subprocess.Popen[bytes]:
        f = open(log, "wb")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, cwd=ROOT)
        f.close()
        self.procs.append((name, p, grace))
        return p

    def stop_all(self) -> None:
        for name, p, grace in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)  # pbft up stops its replicas on SIGTERM
                    p.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop in {grace:.0f} s; killing its process group", flush=True)
            # Whatever is left of the group (replicas of a killed `pbft up`), by group id.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()


# ----------------------------------------------------------------------------- helpers


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def wait_for(what: str, fn: Callable[[], Any], timeout: float, deadline: Deadline, interval: float = 0.25) -> Any:
    """Polls fn until it returns something truthy; Abort after timeout (or the global deadline)."""
    end = time.monotonic() + min(timeout, max(deadline.left(), 0))
    last_err: Exception | None = None
    while True:
        try:
            got = fn()
            if got:
                return got
        except (OSError, ValueError, KeyError, urllib.error.URLError) as e:
            last_err = e
        if time.monotonic() >= end:
            raise Abort(f"timed out waiting for {what}" + (f" (last error: {last_err})" if last_err else ""))
        time.sleep(interval)


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_base_port(n: int) -> int:
    """A port P such that P and P+1 (replica, sidecar) are free on 127.0.0.1..n."""
    for _ in range(200):
        base = free_port()
        if base > 65000:
            continue
        socks = []
        try:
            for i in range(n):
                for port in (base, base + 1):
                    s = socket.socket()
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((f"127.0.0.{i + 1}", port))
                    socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise Abort("no free port pair on 127.0.0.1-4")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def norm(s: str) -> str:
    return " ".join(s.split())


METRIC_RE = re.compile(r"\bpbft_[a-z0-9_]+")
LABEL_LISTS_RE = re.compile(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (label names such as pbft_cluster left out)."""
    expr = LABEL_LISTS_RE.sub(" ", expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r",\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", ")", expr)
    return set(METRIC_RE.findall(expr))


def base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# ----------------------------------------------------------------------------- Prometheus API


class Prom:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: Any) -> dict[str, Any]:
        q = urllib.parse.urlencode(params, doseq=True)
        code, body = http_get(f"{self.url}{path}?{q}" if q else f"{self.url}{path}")
        try:
            doc = json.loads(body)
        except ValueError:
            return {"status": "error", "error": f"HTTP {code}: {body[:200]}"}
        return doc

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("/api/v1/query", query=expr)


def values_of(result: dict[str, Any]) -> list[float]:
    data = result.get("data", {})
    if data.get("resultType") == "scalar":
        return [float(data["result"][1])]
    return [float(s["value"][1]) for s in data.get("result", [])]


# ----------------------------------------------------------------------------- dashboards


def substitute(expr: str, variables: dict[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in variables:
            return variables[name]
        return m.group(0)
    out = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}|\$([A-Za-z_][A-Za-z0-9_]*)", repl, expr)
    return out


def grafana_regex_escape(value: str) -> str:
    """What Grafana's Prometheus data source puts in a `=~"$var"` matcher for one value:
    regex specials escaped with two backslashes (one for the PromQL string, one for the regex)."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def resolve_variables(prom: Prom, dash: dict[str, Any], report: Report, group: str) -> dict[str, str]:
    """Evaluates the dashboard's variable queries in order, as Grafana does, and picks what a
    user would see: "All" (regex .*) where offered, else the first value."""
    variables = dict(GRAFANA_BUILTINS)
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "datasource":
            ok = v.get("query") == "prometheus"
            report.add(group, f"variable ${v['name']}", ok, "datasource of type prometheus" if ok else f"query {v.get('query')!r}")
            continue
        if v.get("type") != "query":
            continue
        definition = substitute(v.get("definition", ""), variables)
        m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", definition)
        if not m:
            report.add(group, f"variable ${v['name']}", False, f"not a label_values(...) query: {definition}")
            variables[v["name"]] = ".*"
            continue
        selector, label = m.group(1), m.group(2)
        res = prom.api(f"/api/v1/label/{label}/values", **{"match[]": selector})
        values = res.get("data", []) if res.get("status") == "success" else []
        report.add(group, f"variable ${v['name']}", bool(values),
                   f"{definition} -> {values}" if values else f"{definition} -> {res.get('error') or 'no values'}")
        if v.get("includeAll"):
            variables[v["name"]] = v.get("allValue") or ".*"
        else:
            variables[v["name"]] = grafana_regex_escape(values[0]) if values else ""
    return variables


def check_dashboard(prom: Prom, path: Path, report: Report, referenced: set[str]) -> None:
    dash = json.loads(path.read_text())
    group = path.stem
    variables = resolve_variables(prom, dash, report, group)
    for panel in dash.get("panels", []):
        if panel.get("type") == "row":
            continue
        title = panel.get("title", "?")
        results = []
        problems = []
        for t in panel.get("targets", []):
            expr = substitute(t.get("expr", ""), variables)
            referenced.update(metric_names(t.get("expr", "")))
            if "$" in expr:
                problems.append(f"{t.get('refId')}: unknown variable in {expr}")
                continue
            res = prom.query(expr)
            if res.get("status") != "success":
                problems.append(f"{t.get('refId')}: {res.get('errorType', '')} {res.get('error', '')}: {expr}")
                continue
            results.append((t.get("refId"), len(res["data"]["result"]) if isinstance(res["data"]["result"], list) else 1))
        series = sum(n for _, n in results)
        if not panel.get("targets"):
            problems.append("no queries")
        elif not problems and series == 0:
            problems.append("every query returned no data")
        empty = [ref for ref, n in results if n == 0]
        detail = "; ".join(problems) if problems else (
            f"{series} series" + (f" (empty: {', '.join(empty)}, event-only metric)" if empty else ""))
        report.add(group, f"panel '{title}'", not problems, detail)
        # An empty query is only acceptable when it reads an event-only metric.
        for t in panel.get("targets", []):
            if t.get("refId") in empty and not (metric_names(t.get("expr", "")) & EVENT_ONLY):
                report.add(group, f"panel '{title}' query {t.get('refId')}", False,
                           "returned no data and reads no event-only metric")


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description="Evaluate the dashboards and alerts against a real Prometheus.")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, TSDB)")
    ap.add_argument("--timeout", type=float, default=150, help="overall limit in seconds (default 150)")
    args = ap.parse_args()
    started = time.monotonic()
    deadline = Deadline(args.timeout)

    missing = [t for t in ("prometheus", "promtool") if not shutil.which(t)]
    if missing:
        print(f"error: {', '.join(missing)} not found: install the Debian package prometheus (make deps)", file=sys.stderr)
        return 2
    pbft = ROOT / "target" / "debug" / "pbft"
    replica = ROOT / "target" / "debug" / "pbft-replica"
    if not (pbft.is_file() and replica.is_file()):
        print("error: target/debug/pbft and pbft-replica are missing: cargo build -p pbft-replica -p pbft-client",
              file=sys.stderr)
        return 2

    report = Report()
    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="dashboards-check-"))

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)

    try:
        # 1. the rules file on its own
        p = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
        report.add("rules", "promtool check rules", p.returncode == 0, norm(p.stdout + p.stderr)[:200])

        # 2. the cluster
        base = free_base_port(REPLICAS)
        data = work / "cluster"
        up_log = work / "pbft-up.log"
        seconds = int(max(deadline.left(), 30)) + 30  # it stops by itself even if we are killed
        up = procs.start("pbft up", [str(pbft), "--data", str(data), "up", "--replicas", str(REPLICAS),
                                     "--port", str(base), "--load", str(LOAD), "--seconds", str(seconds)],
                         up_log, grace=20)
        cluster_yaml = data / "cluster.yaml"
        def written() -> bool:
            if up.poll() is not None:
                raise Abort(f"pbft up exited ({up.returncode}):\n{tail(up_log)}")
            return cluster_yaml.is_file() and "http:" in cluster_yaml.read_text()
        wait_for("cluster.yaml", written, 20, deadline)
        text = cluster_yaml.read_text()
        ids = [int(x) for x in re.findall(r"^\s*-?\s*id:\s*(\d+)\s*$", text, re.M)]
        https = re.findall(r"^\s*http:\s*'?\"?([0-9.]+:\d+)", text, re.M)
        if len(ids) != REPLICAS or len(https) != REPLICAS:
            raise Abort(f"cannot read {REPLICAS} replicas (id, http) from {cluster_yaml}:\n{text[:500]}")
        report.add("cluster", "pbft up", True, f"{REPLICAS} replicas, sidecars {', '.join(https)}, {LOAD} req/s load")

        # 3. Prometheus
        targets = "\n".join(
            f"      - targets: ['{addr}']\n        labels: {{pod: pbft-{i}}}" for i, addr in zip(ids, https))
        config = work / "prometheus.yml"
        config.write_text(f"""# Written by scripts/dashboards_check.py.
global:
  scrape_interval: {SCRAPE}
  scrape_timeout: 900ms
  evaluation_interval: 1s
rule_files:
  - {RULES}
scrape_configs:
  - job_name: pbft
    metrics_path: /metrics
    static_configs:
{targets}
    # The labels the chart's ServiceMonitor gives in Kubernetes (namespace and pod from the
    # operator, pbft_cluster from the StatefulSet's name); the dashboards and alerts use them.
    relabel_configs:
      - target_label: namespace
        replacement: {NAMESPACE}
      - target_label: pbft_cluster
        replacement: {CLUSTER}
""")
        port = free_port()
        prom_log = work / "prometheus.log"
        procs.start("prometheus", ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], prom_log, grace=10)
        prom = Prom(f"http://127.0.0.1:{port}")
        wait_for("Prometheus ready", lambda: http_get(f"{prom.url}/-/ready", timeout=1)[0] == 200, 30, deadline)

        def all_up() -> bool:
            if up.poll() is not None:
                raise Abort(f"pbft up exited ({up.returncode}):\n{tail(up_log)}")
            active = prom.api("/api/v1/targets").get("data", {}).get("activeTargets", [])
            return len(active) == REPLICAS and all(t.get("health") == "up" for t in active)
        wait_for(f"{REPLICAS} scrape targets up", all_up, 60, deadline)
        report.add("prometheus", "targets up", True, f"{REPLICAS}/{REPLICAS} healthy, scrape every {SCRAPE}")

        def enough_data() -> bool:
            samples = values_of(prom.query("count_over_time(pbft_committed_height[1m])"))
            load = values_of(prom.query(f"rate(pbft_batch_size_sum[{GRAFANA_BUILTINS['__rate_interval']}])"))
            rules = prom.api("/api/v1/rules").get("data", {}).get("groups", [])
            evaluated = rules and all(r.get("lastEvaluation", "").startswith("20") for g in rules for r in g["rules"])
            return (len(samples) == REPLICAS and min(samples) >= MIN_SAMPLES
                    and len(load) == REPLICAS and min(load) > 0 and bool(evaluated))
        wait_for(f"{MIN_SAMPLES} samples per replica, load flowing, rules evaluated", enough_data, 60, deadline, interval=0.5)
        report.add("prometheus", "data recorded", True, f">= {MIN_SAMPLES} scrapes per replica, commits > 0 on each")

        # 4a. dashboards
        referenced: set[str] = set()
        for path in sorted(DASHBOARDS.glob("*.json")):
            check_dashboard(prom, path, report, referenced)

        # 4b. alerts
        rules_text = norm(RULES.read_text())
        groups = prom.api("/api/v1/rules").get("data", {}).get("groups", [])
        alerts = [r for g in groups for r in g["rules"] if r.get("type") == "alerting"]
        report.add("alerts", "loaded by Prometheus", len(alerts) >= len(COMPANIONS),
                   f"{len(alerts)} alerting rules: {', '.join(r['name'] for r in alerts)}")
        for r in alerts:
            name = r["name"]
            referenced.update(metric_names(r["query"]))
            res = prom.query(r["query"])
            firing = values_of(res) if res.get("status") == "success" else []
            report.add("alerts", f"{name} expr", res.get("status") == "success",
                       f"parses; {len(firing)} series now" if res.get("status") == "success" else res.get("error", ""))
            report.add("alerts", f"{name} rule health", r.get("health") == "ok" and r.get("state") == "inactive",
                       f"health {r.get('health')}, state {r.get('state')}" + (f", {r.get('lastError')}" if r.get("lastError") else ""))
            companions = COMPANIONS.get(name)
            if not companions:
                report.add("alerts", f"{name} companion", False, "no companion expression in COMPANIONS")
                continue
            for expr, healthy, what in companions:
                if norm(expr) not in rules_text:
                    report.add("alerts", f"{name} companion", False, f"not a verbatim piece of the rule: {expr}")
                    continue
                res = prom.query(expr)
                vals = values_of(res) if res.get("status") == "success" else []
                ok = res.get("status") == "success" and bool(vals) and healthy(vals)
                report.add("alerts", f"{name} companion", ok,
                           f"{what}: {[round(v, 2) for v in vals]}" if res.get("status") == "success"
                           else res.get("error", ""))
        unknown = set(COMPANIONS) - {r["name"] for r in alerts}
        if unknown:
            report.add("alerts", "companions", False, f"companions for alerts that do not exist: {sorted(unknown)}")

        # 4c. every metric named is exported
        names = set(prom.api("/api/v1/label/__name__/values").get("data", []))
        absent = sorted(m for m in referenced if m not in names and base_metric(m) not in EVENT_ONLY)
        report.add("metrics", "every pbft_* metric queried is exported", not absent and bool(referenced),
                   f"{len(referenced)} names" + (f"; absent: {absent}" if absent else "")
                   + (f"; event-only: {sorted(referenced & EVENT_ONLY)}" if referenced & EVENT_ONLY else ""))
    except Abort as e:
        report.add("setup", "aborted", False, str(e).splitlines()[0])
        print(str(e), file=sys.stderr)
        for name, log in (("pbft up", work / "pbft-up.log"), ("prometheus", work / "prometheus.log")):
            if log.is_file():
                print(f"--- last lines of the {name} log ({log}):\n{tail(log)}", file=sys.stderr)
    except KeyboardInterrupt as e:
        report.add("setup", "interrupted", False, str(e))
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report.summary()
    print(f"dashboards_check: {time.monotonic() - started:.1f}s")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
