#!/usr/bin/env bash
# Install what the tests need and run them all: lint, types, the core suite, then each
# plugin's own tests in a virtual environment holding only deploy-core and that plugin.
# DEPLOY_CENTER_STRICT=1 (CI) turns "missing part" skips into failures.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS=test,dev source "$ROOT/scripts/bootstrap.sh"
PY="$VENV/bin/python"

# PostgreSQL is started by this machine kind; start it again if it has stopped.
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
fi

# Real parts the tests drive: headless Chromium for the web page.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing chromium (web page tests)"
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi

# A real Docker engine and a local registry (127.0.0.1:5000) for the Docker plugins.
echo "== docker test bed"
if ! bash "$ROOT/scripts/docker-testbed.sh"; then
  if [ "${DEPLOY_CENTER_STRICT:-}" = 1 ]; then
    echo "docker test bed could not be set up (DEPLOY_CENTER_STRICT=1)" >&2
    exit 1
  fi
  echo "docker test bed unavailable; the Docker tests will skip" >&2
fi

echo "== ruff"
"$VENV/bin/ruff" check deploy_core plugins tests bench
echo "== mypy"
"$VENV/bin/mypy" deploy_core
for p in plugins/*/; do
  name=$(basename "$p")
  "$VENV/bin/mypy" --config-file pyproject.toml "$p$name"
done

echo "== core and end-to-end tests"
"$PY" -m pytest tests -q -p no:cacheprovider "$@"

echo "== each plugin alone with deploy-core"
for p in plugins/*/; do
  name=$(basename "$p")
  iso="$ROOT/.venv-plugins/$name"
  ensure_venv "$iso"
  "$iso/bin/pip" install -q -e "$ROOT[test]" -e "$p" >"$iso/install.log" 2>&1 || { cat "$iso/install.log"; exit 1; }
  echo "-- $name"
  (cd "$p" && "$iso/bin/python" -m pytest tests -q -p no:cacheprovider)
done
