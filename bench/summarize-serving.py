"""Medians over repeats of the `serving` and `concurrent` sections of bench/run-docs-benchmarks.sh.

    python3 bench/summarize-serving.py [OUT_DIR]      (default bench-out)

Reads OUT_DIR/serving-<setting>-<repeat>.json (gptj load --json reports) and prints one
markdown row per setting: output tokens/s, e2e p50/p99, and the ratios of the best gptj
setting's throughput to each HF setting's, taken repeat by repeat (same run) and then medianed.
"""

import glob
import json
import os
import re
import statistics
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "bench-out"
runs = {}
for path in sorted(glob.glob(os.path.join(out, "serving-*.json"))):
    m = re.match(r"serving-(.+)-(\d+)\.json$", os.path.basename(path))
    if m:
        with open(path) as f:
            runs.setdefault(m.group(1), {})[int(m.group(2))] = json.load(f)


def med(name, key):
    return statistics.median(key(r) for r in runs[name].values())


print("| setting | runs | output tok/s | req/s | e2e p50 (s) | e2e p99 (s) | failed |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for name in runs:
    print(f"| {name} | {len(runs[name])} | {med(name, lambda r: r['output_tokens_per_s']):.1f} "
          f"| {med(name, lambda r: r['requests_per_s']):.2f} "
          f"| {med(name, lambda r: r['latency']['e2e_ms']['p50']) / 1e3:.1f} "
          f"| {med(name, lambda r: r['latency']['e2e_ms']['p99']) / 1e3:.1f} "
          f"| {sum(sum(r['errors'].values()) + r['incomplete'] for r in runs[name].values())} |")

print()
gptj = [n for n in runs if "hf-" not in n]
hf = [n for n in runs if "hf-" in n]


def family(name):
    """Settings pair only within one load: `closed-*` (the `concurrent` section), `sustained-*`
    (the same for longer) or the Poisson `serving` section (no prefix)."""
    head = name.split("-")[0]
    return head if head in ("closed", "sustained") else ""


for g in gptj:
    for h in hf:
        if family(g) != family(h):
            continue
        ratios = [runs[g][i]["output_tokens_per_s"] / runs[h][i]["output_tokens_per_s"]
                  for i in runs[g] if i in runs[h]]
        p99 = [runs[g][i]["latency"]["e2e_ms"]["p99"] / runs[h][i]["latency"]["e2e_ms"]["p99"]
               for i in runs[g] if i in runs[h]]
        if ratios:
            print(f"- {g} / {h}: throughput x{statistics.median(ratios):.2f}, "
                  f"p99 x{statistics.median(p99):.2f} (repeats {sorted(i for i in runs[g] if i in runs[h])})")
