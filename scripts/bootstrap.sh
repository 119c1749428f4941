#!/usr/bin/env bash
# Make .venv (or $VENV) with deploy-core and every plugin of this checkout installed.
# Sourced by scripts/up.sh and scripts/test.sh; needs only python3 (and apt for python3-venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
EXTRAS="${EXTRAS:-}"
# The interpreter a fresh machine has: the distribution's own, not a newer build on PATH.
if [ -z "${DEPLOY_CENTER_PYTHON:-}" ]; then
  if [ -x /usr/bin/python3 ]; then DEPLOY_CENTER_PYTHON=/usr/bin/python3; else DEPLOY_CENTER_PYTHON=python3; fi
fi

ensure_venv() {
  local dir="$1"
  if [ ! -x "$dir/bin/python" ]; then
    if ! "$DEPLOY_CENTER_PYTHON" -m venv "$dir" >/dev/null 2>&1; then
      echo "python3 cannot make a virtual environment; installing python3-venv with apt" >&2
      rm -rf "$dir"
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      "$DEPLOY_CENTER_PYTHON" -m venv "$dir"
    fi
    "$dir/bin/python" -m pip install -q --upgrade pip
  fi
}

plugin_dirs() {
  for p in "$ROOT"/plugins/*/; do [ -f "$p/pyproject.toml" ] && echo "${p%/}"; done
}

ensure_venv "$VENV"
args=(-e "$ROOT${EXTRAS:+[$EXTRAS]}")
while read -r p; do args+=(-e "$p"); done < <(plugin_dirs)
# Quiet unless it fails: the log is shown then.
if ! "$VENV/bin/pip" install -q "${args[@]}" >"$VENV/install.log" 2>&1; then
  cat "$VENV/install.log" >&2
  exit 1
fi
