#!/usr/bin/env bash
# Builds gptj's images from deploy/Dockerfile and deploy/Dockerfile.cuda (buildah) and runs the
# CPU image the way a user would (podman): the seed's curl bodies, as a non-root user, on $PORT,
# with the model cache on a volume, readiness 503 until the model is loaded and warm, and a
# SIGTERM that drains in-flight requests and exits 0 within the chart's grace period.
#
#   deploy/image-test.sh                # build the bases if needed, the CPU image, test it, try CUDA
#   deploy/image-test.sh --skip-build   # test the image built last time
#
# Needs root, and apt-get to install podman, buildah, runc and debootstrap when they are missing.
# Without a registry (as on this project's machines), the base images are made locally:
#   debian:bookworm-slim  <- debootstrap --variant=minbase bookworm, trimmed as Debian's slim images
#   rust:1.95-slim-bookworm <- that + gcc, libc6-dev, ca-certificates + this machine's Rust toolchain
#                              (and its local CAs, for cargo behind a TLS-inspecting egress proxy)
# and passed as the Dockerfile's BUILD_IMAGE/RUNTIME_IMAGE build arguments. The build stage
# downloads the crates from crates.io and builds the release binary: on 2 cores about 10 minutes,
# so CI (deploy/validate.sh) does not run this; docs/deploy.md carries its output.
# The model: a tiny random-weight GPT-J (deploy/tests/fake_hub.py), "downloaded" by the server
# from a stand-in for the HuggingFace hub into the cache volume, then reused from it.
# Logs: deploy/.image-test/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/deploy/.image-test
WORK=${GPTJ_IMAGE_WORK:-/var/tmp/gptj-image-test}
VERSION=$(awk -F'"' '/^appVersion:/{print $2}' deploy/helm/gptj/Chart.yaml)
IMAGE=localhost/gptj:$VERSION
RUNTIME_BASE=localhost/gptj-base/debian:bookworm-slim
BUILD_BASE=localhost/gptj-base/rust:1.95-slim-bookworm
PORT=18080         # not 8080: the test shows that $PORT is honoured
HUB_PORT=18090
REPO=gptj-test/tiny-random
VOLUME=gptj-image-test-cache
NAME=gptj-image-test
# The chart's defaults: the server drains for shutdownTimeoutSeconds; the pod's grace period is
# preStop + that + 15 s, so SIGTERM (sent after the preStop sleep) has shutdown + 15 s.
SHUTDOWN=$(awk '/^  shutdownTimeoutSeconds:/{print $2}' deploy/helm/gptj/values.yaml)
GRACE=$((SHUTDOWN + 15))
skip_build=0
[[ ${1:-} == --skip-build ]] && skip_build=1

mkdir -p "$OUT" "$WORK"
LOG=$OUT/image-test.log
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }
fail() { say "FAIL: $*"; exit 1; }
started=$SECONDS

need=()
for tool in podman buildah runc debootstrap curl; do
  command -v "$tool" >/dev/null || need+=("$tool")
done
if ((${#need[@]})); then
  say "== installing ${need[*]} (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$LOG" 2>&1 \
    || { apt-get update -qq >>"$LOG" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$LOG" 2>&1; }
fi
say "podman $(podman --version | awk '{print $3}'), buildah $(buildah --version | awk '{print $3}')"

# ---- base images --------------------------------------------------------------------------
have_image() { podman image exists "$1"; }

make_runtime_base() {
  local rootfs=$WORK/rootfs
  rm -rf "$rootfs"
  say "== $RUNTIME_BASE: debootstrap --variant=minbase bookworm"
  nice -n 19 debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >>"$LOG" 2>&1
  # What Debian's -slim images leave out (debuerreotype's slimify): docs, man pages, locales.
  cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$rootfs"/usr/share/{groff,info,linda,lintian,man}/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  tar -C "$rootfs" --numeric-owner -c . | podman import \
    --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$RUNTIME_BASE" >>"$LOG"
  rm -rf "$rootfs"
}

make_build_base() {
  local ctx=$WORK/build-base sysroot
  sysroot=$(rustc --print sysroot)
  say "== $BUILD_BASE: $RUNTIME_BASE + gcc, libc6-dev + the Rust toolchain at $sysroot ($(rustc --version))"
  rm -rf "$ctx" && mkdir -p "$ctx/rust" "$ctx/ca"
  cp -a "$sysroot"/{bin,lib,libexec,etc} "$ctx/rust/"
  # This machine's own CAs (an egress proxy's, say), so that cargo in the build stage reaches
  # crates.io the way the host does. Only the throw-away build stage has them, not the image.
  cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/" 2>/dev/null || true
  cat > "$ctx/Containerfile" <<EOF
FROM $RUNTIME_BASE
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \\
    && rm -rf /var/lib/apt/lists/*
COPY ca /usr/local/share/ca-certificates
RUN update-ca-certificates
COPY rust /usr/local/rust
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/rust/bin:\$PATH
EOF
  nice -n 19 buildah bud --isolation chroot -f "$ctx/Containerfile" -t "$BUILD_BASE" "$ctx" >>"$LOG" 2>&1
  rm -rf "$ctx"
}

if ((!skip_build)); then
  if timeout 60 podman pull -q docker.io/library/debian:bookworm-slim >>"$LOG" 2>&1; then
    say "== the public base images can be pulled: using the Dockerfile's defaults"
    base_args=()
  else
    say "== no registry reachable (podman pull debian:bookworm-slim failed): local base images"
    have_image "$RUNTIME_BASE" || make_runtime_base
    have_image "$BUILD_BASE" || make_build_base
    base_args=(--build-arg "BUILD_IMAGE=$BUILD_BASE" --build-arg "RUNTIME_IMAGE=$RUNTIME_BASE")
  fi

  # ---- the CPU image ------------------------------------------------------------------------
  say "== buildah bud -f deploy/Dockerfile ${base_args[*]} -t $IMAGE ."
  t0=$SECONDS
  nice -n 19 buildah bud --isolation chroot --layers -f deploy/Dockerfile --ignorefile deploy/Dockerfile.dockerignore \
    "${base_args[@]}" -t "$IMAGE" . > "$OUT/build-cpu.log" 2>&1 || { tail -30 "$OUT/build-cpu.log" | tee -a "$LOG"; fail "CPU image build"; }
  say "built $IMAGE in $((SECONDS - t0)) s; build log summary (deploy/.image-test/build-cpu.log):"
  grep -E 'STEP [0-9]+/[0-9]+: (FROM|RUN)|Using cache|Finished .release|COMMIT|Successfully tagged' "$OUT/build-cpu.log" \
    | cut -c1-150 | sed 's/^/  /' | tee -a "$LOG"

  # ---- the CUDA image, as far as it goes ------------------------------------------------------
  say "== buildah bud -f deploy/Dockerfile.cuda -t $IMAGE-cuda . (the Dockerfile's public CUDA bases)"
  if timeout 300 nice -n 19 buildah bud --isolation chroot --layers -f deploy/Dockerfile.cuda \
      --ignorefile deploy/Dockerfile.cuda.dockerignore -t "$IMAGE-cuda" . > "$OUT/build-cuda.log" 2>&1; then
    say "built $IMAGE-cuda"
  else
    say "CUDA image not built; where it stopped (deploy/.image-test/build-cuda.log):"
    grep -E 'STEP|[Ee]rror' "$OUT/build-cuda.log" | tail -4 | cut -c1-300 | sed 's/^/  /' | tee -a "$LOG"
    say "  (registry-1.docker.io: $(getent hosts registry-1.docker.io >/dev/null && echo resolves || echo 'does not resolve here'))"
  fi
fi

have_image "$IMAGE" || fail "no image $IMAGE: run without --skip-build"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
say "image $IMAGE: $((size / 1000000)) MB ($size bytes); layers:"
podman history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | cut -c1-110 | sed 's/^/  /' | tee -a "$LOG"
have_image "$RUNTIME_BASE" && say "runtime base $RUNTIME_BASE: $(($(podman image inspect --format '{{.Size}}' "$RUNTIME_BASE") / 1000000)) MB"

# ---- run it ---------------------------------------------------------------------------------
# podman's defaults set rlimits the kernel refuses where the process lacks CAP_SYS_RESOURCE (a
# container host such as this project's): then pass the current limits and use runc.
run_flags=()
if ! podman run --rm "$IMAGE" --help >/dev/null 2>>"$LOG"; then
  run_flags=(--runtime runc --ulimit "nofile=$(ulimit -n):$(ulimit -Hn)" --ulimit nproc=4096:4096)
  say "plain podman run failed here ($(tail -1 "$LOG")); running with ${run_flags[*]}"
  podman run --rm "${run_flags[@]}" "$IMAGE" --help >/dev/null || fail "podman run"
fi

cleanup() {
  podman rm -f "$NAME" >/dev/null 2>&1 || true
  [[ -n ${hub_pid:-} ]] && kill "$hub_pid" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
podman volume create "$VOLUME" >/dev/null

rm -rf "$WORK/hub" && python3 deploy/tests/fake_hub.py --make "$WORK/hub" >>"$LOG"
python3 deploy/tests/fake_hub.py --serve "$WORK/hub" --port "$HUB_PORT" --repo "$REPO" --rate 4000000 2>>"$OUT/hub.log" &
hub_pid=$!
for _ in $(seq 1 100); do
  [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$HUB_PORT/api/models/$REPO/revision/main") == 200 ]] && break
  kill -0 "$hub_pid" 2>/dev/null || fail "the stand-in hub exited: $(tail -3 "$OUT/hub.log")"
  sleep 0.1
done

URL=http://127.0.0.1:$PORT
MODEL_URL=$URL/v1/models/eleutherai-gpt-j-6b
start() {  # the image as a user runs it: the model from the hub into the cache volume
  podman run -d --name "$NAME" "${run_flags[@]}" --network host -e PORT=$PORT \
    -e GPTJ_MODEL="$REPO@main" -e HF_ENDPOINT="http://127.0.0.1:$HUB_PORT" -e GPTJ_PRECISION=fp32 \
    -e GPTJ_SHUTDOWN_TIMEOUT="${SHUTDOWN}s" -e GPTJ_LOG_FORMAT=text \
    -v "$VOLUME:/var/cache/gptj" "$IMAGE" >/dev/null
}
code() { curl -s -o /dev/null -w '%{http_code}' "$@" || true; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

say "== run 1: podman run -e PORT=$PORT -v $VOLUME:/var/cache/gptj $IMAGE (the model comes from the hub)"
start
t0=$(date +%s.%N)
saw_live_503=0 ready_at=
for _ in $(seq 1 600); do
  live=$(code "$URL/") ready=$(code "$MODEL_URL")
  if [[ $live == 200 && $ready == 503 && $saw_live_503 == 0 ]]; then
    saw_live_503=1
    say "while loading: GET / -> $live, GET /v1/models/eleutherai-gpt-j-6b -> $ready $(curl -s "$MODEL_URL")"
  fi
  if [[ $ready == 200 ]]; then ready_at=$(date +%s.%N); break; fi
  sleep 0.1
done
[[ -n $ready_at ]] || { podman logs "$NAME" | tail -20 | tee -a "$LOG"; fail "never ready"; }
((saw_live_503)) || fail "readiness was never 503 before the model was loaded"
say "ready after $(awk -v a="$t0" -v b="$ready_at" 'BEGIN { printf "%.1f", b - a }') s: GET /v1/models/eleutherai-gpt-j-6b -> 200 $(curl -s "$MODEL_URL")"
say "listening on \$PORT: $(podman logs "$NAME" 2>&1 | grep -m1 -o 'listening.*' | cut -c1-120)"
pid=$(podman inspect --format '{{.State.Pid}}' "$NAME")
uids=$(awk '/^Uid:/{print $2, $3}' "/proc/$pid/status")
say "process: $(tr '\0' ' ' < "/proc/$pid/cmdline")with uid/euid $uids, gid $(awk '/^Gid:/{print $2}' "/proc/$pid/status") (image user $(podman image inspect --format '{{.Config.User}}' "$IMAGE"))"
[[ $uids == "10001 10001" ]] || fail "the server does not run as uid 10001"
say "cache volume: $(podman run --rm "${run_flags[@]}" -v "$VOLUME:/c" --entrypoint sh "$IMAGE" -c 'cd /c && find . -type f | sort | xargs ls -ln | awk "{print \$3\":\"\$4, \$5, \$9}"' | tr '\n' ';')"

seed_bodies=(
  '{"parameters": {"min_length":150,"max_length":200}, "instances": ["In a shocking finding, scientist discovered a herd of unicorns living in a remote, previously unexplored valley"]}'
  '{"parameters": {"min_length":50,"max_length":100}, "instances": ["Everytime I look to the sky, I always think", "Right now is the perfect time to", "The one thing I will never regret is", "The secret to a happy life is to"]}'
  '{"parameters": {"min_length":50,"max_length":100}, "instances": ["Message: The last show was terrible. Sentiment: Negative, Message: I feel great this morning.Sentiment: Positive, Message: GPT-J has 6 billion parameters.Sentiment: Neutral, Message: It was my all-time favorite movie.Sentiment:"]}'
  '{"parameters": {"min_length":50,"max_length":250}, "instances": ["Question: Select teams that have less than 3 developers in it.Answer: SELECT TEAM, COUNT(DEVELOPER) FROM team GROUP BY TEAM HAVING COUNT(DEVELOPER) < 3;Question: Show all teams along with the number of developers in each team, Answer: SELECT TEAM, COUNT(TEAM) FROM team GROUP BY TEAM;Question: Show the recent hired developer, Answer: SELECT * FROM team ORDER BY ID DESC LIMIT 1;Question: Fetch the first three developers from team table;Answer:"]}'
)
i=0
for body in "${seed_bodies[@]}"; do
  i=$((i + 1))
  resp=$(curl -s -w '\n%{http_code} %{time_total}' -d "$body" "$MODEL_URL:predict")
  status=$(tail -1 <<<"$resp")
  json=$(head -n -1 <<<"$resp")
  summary=$(python3 -c '
import json, sys
want = len(json.loads(sys.argv[2])["instances"])
p = json.loads(sys.argv[1])["predictions"]
assert len(p) == want, f"{len(p)} predictions for {want} instances"
text = p[0]["generated_text"] if isinstance(p[0], dict) else p[0][0]["generated_text"]
print(f"{len(p)} prediction(s), generated_text[0] = {text[:60]!r}...")' "$json" "$body") \
    || fail "seed curl $i: $status $json"
  say "seed curl $i: HTTP ${status% *} in ${status#* } s, $summary"
  [[ ${status% *} == 200 ]] || fail "seed curl $i: $status"
done
say "metrics: $(curl -s "$URL/metrics" | grep -E '^gptj_(server_ready|engine_alive|request_success_total)' | tr '\n' ';' | cut -c1-200)"
# The metrics the dashboard and the alerts query, against this server's /metrics (a metric that
# nothing has recorded yet, such as preemptions, is not printed until it is).
curl -s "$URL/metrics" > "$WORK/metrics.txt"
PYTHONPATH=deploy/tests python3 - "$WORK/metrics.txt" <<'PY' | tee -a "$LOG"
import json, re, sys
import promql_names as pn
served = set(re.findall(r"^# TYPE (\S+) ", open(sys.argv[1]).read(), re.M))
dash = json.load(open("deploy/helm/gptj/files/gptj-dashboard.json"))
names = {n for p in dash["panels"] for t in p["targets"] for n in pn.names_in(t["expr"])}
names |= set(re.findall(r"\b(gptj_[a-z_]+?)(?:_bucket)?\{", open("deploy/helm/gptj/templates/prometheusrule.yaml").read()))
base = {re.sub(r"_(bucket|sum|count)$", "", n) if re.sub(r"_(bucket|sum|count)$", "", n) in served else n for n in names}
print(f"/metrics of this server: {len(base & served)} of the {len(base)} metrics the dashboard and alerts query are there;"
      f" not yet recorded: {sorted(base - served) or 'none'}")
PY

say "== SIGTERM with requests in flight (the chart gives $GRACE s after SIGTERM: preStop aside, server.shutdownTimeoutSeconds $SHUTDOWN + 15)"
long='{"parameters": {"max_new_tokens": 1500, "min_new_tokens": 1500, "do_sample": true}, "instances": ["a", "b", "c", "d"]}'
pids=()
for n in 1 2 3; do
  curl -s -o "$WORK/inflight-$n.json" -w '%{http_code}' -d "$long" "$MODEL_URL:predict" > "$WORK/inflight-$n.code" &
  pids+=($!)
done
sleep 0.5
in_flight=$(curl -s "$URL/metrics" | awk '/^gptj_http_requests_in_flight /{print $2}')
t0=$(date +%s.%N)
podman kill --signal TERM "$NAME" >/dev/null
sleep 0.2
say "in flight at SIGTERM: $in_flight; after it: readiness $(code "$MODEL_URL"), new request $(code -d "${seed_bodies[0]}" "$MODEL_URL:predict") $(curl -s -d "${seed_bodies[0]}" "$MODEL_URL:predict" | cut -c1-80)"
timeout "$GRACE" podman wait "$NAME" >/dev/null || fail "still running $GRACE s after SIGTERM"
took=$(since "$t0")
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
wait "${pids[@]}" || true
codes=$(for f in "$WORK"/inflight-*.code; do printf '%s ' "$(cat "$f")"; done)
say "exited with code $exit_code $took s after SIGTERM; the in-flight requests got: $codes"
[[ $exit_code == 0 ]] || fail "exit code $exit_code"
[[ $codes == "200 200 200 " ]] || fail "in-flight requests: $codes"
podman logs "$NAME" 2>&1 | tail -n 8 | sed -E 's/ request_id=[0-9a-f]+//; s/ (method|stream|queue_ms|first_token_ms|target)=[^ ]+//g' \
  | cut -c1-180 | sed 's/^/  log: /' | tee -a "$LOG"
podman rm "$NAME" >/dev/null

say "== run 2: a new container on the same volume, the hub gone: the model comes from the cache"
kill "$hub_pid"
wait "$hub_pid" 2>/dev/null || true
hub_pid=
start
for _ in $(seq 1 300); do
  [[ $(code "$MODEL_URL") == 200 ]] && break
  sleep 0.1
done
[[ $(code "$MODEL_URL") == 200 ]] || { podman logs "$NAME" | tail -20 | tee -a "$LOG"; fail "run 2 never ready"; }
say "ready; $(podman logs "$NAME" 2>&1 | grep -m1 -o 'using cached model.*' | cut -c1-140)"
code=$(code -d "${seed_bodies[1]}" "$MODEL_URL:predict")
say "seed curl 2 -> $code"
[[ $code == 200 ]] || fail "run 2: seed curl"
t0=$(date +%s.%N)
podman stop --time "$GRACE" "$NAME" >/dev/null
say "podman stop: exit code $(podman inspect --format '{{.State.ExitCode}}' "$NAME") after $(since "$t0") s"
podman rm "$NAME" >/dev/null
podman volume rm "$VOLUME" >/dev/null

say "== image-test.sh: PASSED in $((SECONDS - started)) s (log: deploy/.image-test/image-test.log)"
