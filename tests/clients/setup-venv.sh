#!/usr/bin/env bash
# Creates (or reuses) the virtual environment of the client-compatibility suite and installs
# the clients users run, at pinned versions, from PyPI. Prints the venv's python.
#   tests/clients/setup-venv.sh [VENV_DIR]      (default: .venv-clients, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${1:-.venv-clients}
pins=(openai==3.57.0 'tritonclient[http]==2.73.0')
stamp="$venv/.pins"
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
if [[ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
    echo "${pins[*]}" >"$stamp"
fi
echo "$venv/bin/python"
