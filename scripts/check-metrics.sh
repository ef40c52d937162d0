#!/usr/bin/env bash
# A fresh server's /metrics: `promtool check metrics` passes, and every metric docs/metrics.md
# lists is exposed (at zero) before any request. Run from .ci/run after deploy/validate.sh,
# which installs promtool into deploy/.venv/bin when it is not on PATH.
#
#   scripts/check-metrics.sh [path/to/gptj]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/gptj}
PROMTOOL=$(command -v promtool || echo deploy/.venv/bin/promtool)
[[ -x "$PROMTOOL" ]] || { echo "check-metrics: no promtool (run deploy/validate.sh first)" >&2; exit 1; }
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
LOG=$(mktemp)
"$BIN" serve --model builtin:tiny --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null && break
  sleep 0.1
done
OUT=$(mktemp)
curl -sf "http://127.0.0.1:$PORT/metrics" >"$OUT"
echo "== promtool check metrics"
"$PROMTOOL" check metrics <"$OUT"
echo "== every documented metric is exposed by a fresh server"
python3 - "$OUT" <<'PY'
import re, sys
exposed = {l.split("{")[0].split(" ")[0] for l in open(sys.argv[1]) if l and not l.startswith("#")}
exposed |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in exposed}
documented = set(re.findall(r"^\| `(gptj_[a-z0-9_]+)` \|", open("docs/metrics.md").read(), re.M))
# Per-request series appear with the first request of each route.
later = {"gptj_http_requests_total", "gptj_http_request_duration_seconds"}
missing = sorted(documented - exposed - later)
if missing:
    sys.exit(f"documented but not exposed by a fresh server: {missing}")
undocumented = sorted(n for n in exposed if n.startswith("gptj_") and not re.search(r"_(bucket|sum|count)$", n) and n not in documented)
if undocumented:
    sys.exit(f"exposed but not in docs/metrics.md: {undocumented}")
print(f"{len(documented)} documented metrics, all exposed")
PY
rm -f "$OUT"
