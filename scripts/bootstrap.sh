#!/usr/bin/env bash
# Make .venv (or $VENV) with deploy-core and every plugin of this checkout installed (editable).
# Sourced by scripts/up.sh and scripts/test.sh, which also use its functions.
#
# The interpreter is the distribution's own /usr/bin/python3 when present, the one a fresh
# machine has (not a newer build earlier on PATH); DEPLOY_CENTER_PYTHON names another.
# pip runs only when something it depends on changed since the last successful install: the
# pyproject.toml of the root and of each plugin, the interpreter, or the extras. A hash of
# them is kept in the venv (.deploy-center-installed); delete that file to force a reinstall.
# apt is used only when the interpreter cannot make a virtual environment (python3-venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
EXTRAS="${EXTRAS:-}"
if [ -z "${DEPLOY_CENTER_PYTHON:-}" ]; then
  if [ -x /usr/bin/python3 ]; then DEPLOY_CENTER_PYTHON=/usr/bin/python3; else DEPLOY_CENTER_PYTHON=python3; fi
fi
export DEBIAN_FRONTEND=noninteractive  # apt asks nothing and prints no debconf noise
RERUN="bash ${0#"$ROOT/"}"             # how the user started us, to tell them what to rerun

# apt_install WHY PACKAGE...: install distribution packages, saying first which and why.
# Without root, or without apt, say what to run instead and return 1.
apt_install() {
  local why="$1" log
  shift
  if ! command -v apt-get >/dev/null; then
    echo "deploy-center: $why needs $*; this machine has no apt-get: install the equivalent" \
      "packages with its package manager, then rerun: $RERUN" >&2
    return 1
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "deploy-center: $why needs the apt package(s) $*, and apt needs root." >&2
    echo "  Run: sudo apt install $*" >&2
    echo "  then rerun: $RERUN" >&2
    return 1
  fi
  echo "deploy-center: installing $* with apt ($why)"
  log=$(mktemp)
  if ! { apt-get update -qq && apt-get install -y -qq "$@"; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "deploy-center: apt-get install $* failed (output above)" >&2
    return 1
  fi
  rm -f "$log"
}

py_version() { "$1" -c 'import sys; print(sys.version.split()[0])'; }

# ensure_venv DIR: a virtual environment in DIR made with $DEPLOY_CENTER_PYTHON (remade when
# an existing one was made with another Python version).
ensure_venv() {
  local dir="$1" out want
  want=$(py_version "$DEPLOY_CENTER_PYTHON")
  if [ -x "$dir/bin/python" ]; then
    local have
    have=$(py_version "$dir/bin/python" 2>/dev/null || echo unknown)
    [ "$have" = "$want" ] && return 0
    echo "deploy-center: remaking $dir: it runs Python $have, not $DEPLOY_CENTER_PYTHON ($want)"
    rm -rf "$dir"
  fi
  if ! out=$("$DEPLOY_CENTER_PYTHON" -m venv "$dir" 2>&1); then
    rm -rf "$dir"
    case "$out" in
      *ensurepip*)
        # Debian and Ubuntu leave venv's pip bootstrap out of python3: it is python3-venv.
        echo "deploy-center: $DEPLOY_CENTER_PYTHON ($want) cannot make a virtual environment" \
          "yet: Debian and Ubuntu ship that part separately, in the python3-venv package."
        apt_install "making a virtual environment" python3-venv || exit 1
        "$DEPLOY_CENTER_PYTHON" -m venv "$dir"
        ;;
      *)
        echo "$out" >&2
        echo "deploy-center: $DEPLOY_CENTER_PYTHON -m venv $dir failed (output above)" >&2
        exit 1
        ;;
    esac
  fi
  echo "deploy-center: made $dir with $DEPLOY_CENTER_PYTHON ($want)"
  "$dir/bin/python" -m pip install -q --upgrade pip
}

# dependency_hash DIR PIP-ARG...: a hash of the arguments, the venv's Python version and the
# dependency files of every local project the arguments name.
dependency_hash() {
  local dir="$1" arg path
  shift
  {
    py_version "$dir/bin/python"
    printf '%s\n' "$@"
    for arg in "$@"; do
      path="${arg%%\[*}"
      for f in pyproject.toml setup.cfg setup.py; do
        if [ -f "$path/$f" ]; then cat "$path/$f"; fi
      done
    done
  } | sha256sum | cut -d' ' -f1
}

# install_once DIR PIP-ARG...: pip install the arguments into the venv DIR, unless the same
# install with the same dependency files and interpreter already succeeded there.
install_once() {
  local dir="$1" want stamp
  shift
  stamp="$dir/.deploy-center-installed"
  want=$(dependency_hash "$dir" "$@")
  if grep -qxF "$want" "$stamp" 2>/dev/null; then
    echo "deploy-center: ${dir#"$ROOT/"} is up to date (no dependency file changed since its last install)"
    return 0
  fi
  echo "deploy-center: installing into ${dir#"$ROOT/"} (first install, or a pyproject.toml changed)"
  # Quiet unless it fails: the log is shown then.
  if ! "$dir/bin/python" -m pip install -q "$@" >"$dir/install.log" 2>&1; then
    cat "$dir/install.log" >&2
    echo "deploy-center: pip install into $dir failed (output above)" >&2
    return 1
  fi
  # Keep the hashes of the last few installs: up.sh and test.sh install different extras.
  { tail -n 9 "$stamp" 2>/dev/null || true; echo "$want"; } >"$stamp.new"
  mv "$stamp.new" "$stamp"
}

plugin_dirs() {
  for p in "$ROOT"/plugins/*/; do [ -f "$p/pyproject.toml" ] && echo "${p%/}"; done
}

# install_checkout: deploy-core (with $EXTRAS) and every plugin, editable, into $VENV.
install_checkout() {
  local args=(-e "$ROOT${EXTRAS:+[$EXTRAS]}") p
  while read -r p; do args+=(-e "$p"); done < <(plugin_dirs)
  install_once "$VENV" "${args[@]}"
}

ensure_venv "$VENV"
# scripts/test.sh installs by itself, to go on with what it can run when this fails.
[ "${BOOTSTRAP_FUNCTIONS_ONLY:-}" = 1 ] || install_checkout
