"""The metric names in PromQL expressions, and the names gptj exposes (docs/metrics.md).

chart_test.py uses it to check that every query of the dashboard, the alerts, the autoscalers
and the examples names only metrics gptj has. Run it alone for its self-test:

    python3 deploy/tests/promql_names.py
"""

from __future__ import annotations

import re
from pathlib import Path

METRICS_MD = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"

# Names that docs/metrics.md may still list but that no query may use: they are being renamed
# (to gptj_kv_cache_blocks and gptj_iteration_tokens) for promtool's naming rules.
RENAMING = {"gptj_kv_cache_blocks_total", "gptj_iteration_tokens_total"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# PromQL words that are not metric names.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "start", "end",
    # aggregation operators, which may be written `sum by (le) (...)`
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:$.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def names_in(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels, durations left out).

    A selector's name inside the braces (`{__name__="x"}`) is taken too. Grafana's variables
    ($__rate_interval, $pod) live in strings and ranges, which are dropped first.
    """
    found = set(re.findall(r'__name__\s*=~?\s*"([^"]*)"', expr))
    s = _STRING.sub('""', expr)
    s = _BRACES.sub("{}", s)
    s = _BRACKETS.sub("[]", s)
    s = _GROUPING.sub(r"\1 ()", s)
    s = re.sub(r"#[^\n]*", "", s)  # comments
    for m in _IDENT.finditer(s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in KEYWORDS:
            continue
        found.add(word)
    return found


def exposed(metrics_md: Path = METRICS_MD) -> dict[str, str]:
    """name -> type of every metric in docs/metrics.md's tables."""
    out = {}
    for line in metrics_md.read_text().splitlines():
        m = re.match(r"\|\s*`(gptj_[a-z0-9_]+)`\s*\|\s*(counter|gauge|histogram|summary)\s*\|", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def unknown(names: set[str], known: dict[str, str], allow: set[str] = frozenset()) -> set[str]:
    """Names that are not gptj metrics (a histogram's _bucket/_sum/_count series count as it)."""
    bad = set()
    for n in names:
        if n in allow:
            continue
        base = n
        for suffix in HISTOGRAM_SUFFIXES:
            if n.endswith(suffix) and known.get(n[: -len(suffix)]) in ("histogram", "summary"):
                base = n[: -len(suffix)]
                break
        if base not in known or n in RENAMING:
            bad.add(n)
    return bad


def self_test() -> None:
    """The parser's own cases, bogus names among them: the check must be able to fail."""
    known = {"gptj_a_total": "counter", "gptj_h_seconds": "histogram", "gptj_g": "gauge",
             "gptj_kv_cache_blocks_total": "gauge"}
    cases = {
        'sum by (le, route) (rate(gptj_h_seconds_bucket{route=~".*x", pod=~"$pod"}[$__rate_interval]))':
            {"gptj_h_seconds_bucket"},
        "histogram_quantile(0.99, sum by (le) (rate(gptj_h_seconds_bucket[5m]))) > 10": {"gptj_h_seconds_bucket"},
        'deriv(gptj_g{a="b"}[10m]) > 0 and on (pod) gptj_g > 0 unless gptj_a_total offset 5m':
            {"gptj_g", "gptj_a_total"},
        "up == 0 or vllm:num_requests_waiting > 1": {"up", "vllm:num_requests_waiting"},
        '{__name__="gptj_bogus"}': {"gptj_bogus"},
        "rate(gptj_h_seconds_sum[1m]) / rate(gptj_h_seconds_count[1m])": {"gptj_h_seconds_sum", "gptj_h_seconds_count"},
        "max(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)": set(),
    }
    for expr, want in cases.items():
        got = names_in(expr)
        assert got == want, f"names_in({expr!r}) = {got}, expected {want}"
    assert unknown({"gptj_h_seconds_bucket", "gptj_g", "gptj_a_total"}, known) == set()
    assert unknown({"gptj_bogus_total", "up", "gptj_g_bucket", "gptj_a_total_count"}, known) == \
        {"gptj_bogus_total", "up", "gptj_g_bucket", "gptj_a_total_count"}, "bogus names must be refused"
    assert unknown({"gptj_kv_cache_blocks_total"}, known) == {"gptj_kv_cache_blocks_total"}, \
        "names being renamed must be refused"
    assert unknown({"gptj_cache_config_info"}, known, allow={"gptj_cache_config_info"}) == set()
    table = exposed()
    for name, kind in (("gptj_num_requests_waiting", "gauge"), ("gptj_time_to_first_token_seconds", "histogram"),
                       ("gptj_http_requests_total", "counter")):
        assert table.get(name) == kind, f"docs/metrics.md: {name} should be a {kind}, found {table.get(name)}"


if __name__ == "__main__":
    self_test()
    print(f"ok: {len(exposed())} metrics in {METRICS_MD}")
