#!/usr/bin/env bash
# Install Deploy Center into .venv and run the embedded default: a server and one local
# agent (client id "local") on SQLite, state in ~/.deploy-center (or $DEPLOY_CENTER_STATE).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
exec "$VENV/bin/deployctl" up "$@"
