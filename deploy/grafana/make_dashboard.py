#!/usr/bin/env python3
"""Writes gptj's Grafana dashboard, deploy/helm/gptj/files/gptj-dashboard.json.

    python3 deploy/grafana/make_dashboard.py          # rewrite the JSON
    python3 deploy/grafana/make_dashboard.py --check  # exit 1 if the JSON is not what this writes

The chart ships the JSON in a ConfigMap for Grafana's dashboard sidecar (grafana.dashboard.*).
Edit the panels here, not in the JSON: chart_test.py checks that the two agree, that every
query names only metrics docs/metrics.md lists, and that promtool parses every query.
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "helm" / "gptj" / "files" / "gptj-dashboard.json"

S = 'namespace="$namespace",pod=~"$pod"'
# The routes that generate text (docs/metrics.md lists the route patterns).
GEN = 'route=~".*(:predict|/generate|/generate_stream|/completions)"'
RATE = "[$__rate_interval]"
DS = {"type": "prometheus", "uid": "${datasource}"}


def target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def quantiles(metric: str) -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{S}}}{RATE})))", f"p{int(q * 100)}")
        for q in (0.5, 0.9, 0.99)
    ]


class Layout:
    def __init__(self):
        self.panels: list[dict] = []
        self.x = 0
        self.y = 0
        self.row_h = 0

    def add(self, title: str, queries: list[tuple[str, str]], *, unit: str = "short", w: int = 8, h: int = 8,
            kind: str = "timeseries", description: str = "", max_: float | None = None) -> None:
        if self.x + w > 24:
            self.x, self.y = 0, self.y + self.row_h
            self.row_h = 0
        refs = "ABCDEFGH"
        panel = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h},
            "targets": [target(e, legend, refs[i]) for i, (e, legend) in enumerate(queries)],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {},
        }
        if max_ is not None:
            panel["fieldConfig"]["defaults"]["max"] = max_
            panel["fieldConfig"]["defaults"]["min"] = 0
        if kind == "timeseries":
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
        else:
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def dashboard() -> dict:
    lay = Layout()
    lay.add("Ready replicas", [(f"sum(gptj_server_ready{{{S}}})", "ready")], kind="stat", w=4, h=4,
            description="gptj_server_ready: 1 once a replica's model is loaded and it takes work")
    lay.add("Engine threads running", [(f"sum(gptj_engine_alive{{{S}}})", "alive")], kind="stat", w=4, h=4,
            description="gptj_engine_alive: 0 on a replica whose engine thread has stopped")
    lay.add("Requests waiting", [(f"sum(gptj_num_requests_waiting{{{S}}})", "waiting")], kind="stat", w=4, h=4)
    lay.add("Requests running", [(f"sum(gptj_num_requests_running{{{S}}})", "running")], kind="stat", w=4, h=4)
    lay.add("KV cache use (max)", [(f"max(gptj_kv_cache_usage_perc{{{S}}})", "max")], kind="stat", w=4, h=4,
            unit="percentunit", max_=1)
    lay.add("HTTP requests in flight", [(f"sum(gptj_http_requests_in_flight{{{S}}})", "in flight")], kind="stat",
            w=4, h=4)

    lay.add("Generation requests by status", [
        (f"sum by (status) (rate(gptj_http_requests_total{{{S},{GEN}}}{RATE}))", "{{status}}")], unit="reqps",
        description="Answers of the generation routes (predict, generate, completions) per second")
    lay.add("Token throughput", [
        (f"sum(rate(gptj_generation_tokens_total{{{S}}}{RATE}))", "generated"),
        (f"sum(rate(gptj_prompt_tokens_total{{{S}}}{RATE}))", "prompt")], unit="short",
        description="Tokens per second: generated (output throughput) and prompt tokens admitted")
    lay.add("Sequences finished by reason", [
        (f"sum by (finished_reason) (rate(gptj_request_success_total{{{S}}}{RATE}))", "{{finished_reason}}")],
        unit="short")

    lay.add("Time to first token", quantiles("gptj_time_to_first_token_seconds"), unit="s")
    lay.add("Inter-token latency", quantiles("gptj_inter_token_latency_seconds"), unit="s")
    lay.add("End-to-end sequence latency", quantiles("gptj_e2e_request_latency_seconds"), unit="s")

    lay.add("Queue per replica", [
        (f"gptj_num_requests_waiting{{{S}}}", "{{pod}} waiting"),
        (f"gptj_num_requests_running{{{S}}}", "{{pod}} running")], unit="short",
        description="Sequences waiting for the batch (queued or preempted) and in it; what the endpoint "
                    "picker and the autoscaler read")
    lay.add("KV cache use per replica", [(f"gptj_kv_cache_usage_perc{{{S}}}", "{{pod}}")], unit="percentunit",
            max_=1, description="Fraction of KV blocks held by sequences; near 1 the scheduler preempts")
    lay.add("Queue time", quantiles("gptj_request_queue_time_seconds"), unit="s",
            description="From submission to the first admission into the batch")

    lay.add("Preemptions", [
        (f"sum by (pod) (rate(gptj_num_preemptions_total{{{S}}}{RATE}))", "{{pod}}")], unit="short",
        description="Sequences preempted per second (their blocks freed, recomputed later): KV cache too small")
    lay.add("Rejections by reason", [
        (f"sum by (reason) (rate(gptj_request_rejected_total{{{S}}}{RATE}))", "{{reason}}")], unit="reqps",
        description="Requests refused before work started: overloaded = 429, not_ready/draining = 503")
    lay.add("Request errors", [
        (f"sum by (reason) (rate(gptj_request_failed_total{{{S}}}{RATE}))", "failed: {{reason}}"),
        (f'sum by (status) (rate(gptj_http_requests_total{{{S},status=~"5.."}}{RATE}))', "HTTP {{status}}")],
        unit="reqps")

    lay.add("Prefix cache hit rate", [
        (f"sum(rate(gptj_prefix_cache_hits_total{{{S}}}{RATE})) / sum(rate(gptj_prefix_cache_queries_total{{{S}}}{RATE}))",
         "hit rate")], unit="percentunit", max_=1,
        description="Prompt tokens whose KV was found in the prefix cache (what prefix-aware routing raises)")
    lay.add("Engine step duration", [
        (f"histogram_quantile(0.5, sum by (le) (rate(gptj_step_duration_seconds_bucket{{{S}}}{RATE})))", "p50"),
        (f"histogram_quantile(0.99, sum by (le) (rate(gptj_step_duration_seconds_bucket{{{S}}}{RATE})))", "p99")],
        unit="s")
    lay.add("HTTP request duration p99 by route", [
        (f"histogram_quantile(0.99, sum by (le, route) (rate(gptj_http_request_duration_seconds_bucket{{{S}}}{RATE})))",
         "{{route}}")], unit="s")

    def var(name: str, query: str, label: str) -> dict:
        return {
            "name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": name}, "definition": query,
            "refresh": 2, "sort": 1, "includeAll": name == "pod", "multi": name == "pod",
            **({"allValue": ".*"} if name == "pod" else {}),
        }

    return {
        "title": "gptj",
        "uid": "gptj-serving",
        "description": "gptj inference server: throughput, latency, queue, KV cache, rejections, errors",
        "tags": ["gptj", "llm", "inference"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timezone": "",
        "graphTooltip": 1,
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            var("namespace", "label_values(gptj_server_ready, namespace)", "Namespace"),
            var("pod", 'label_values(gptj_server_ready{namespace="$namespace"}, pod)', "Replica"),
        ]},
        "panels": lay.panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not OUT.is_file() or OUT.read_text() != text:
            sys.exit(f"{OUT} is not what {__file__} writes: rerun it")
    else:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(text)
        print("wrote", OUT)
