#!/usr/bin/env bash
# Install what the tests need and run every suite, also after one fails: ruff, mypy, the core
# and end-to-end tests, then each plugin (plugins/*/) and each example plugin (examples/*/)
# with its own tests in a virtual environment holding only deploy-core and that plugin.
# Prints one line per suite, then a last line "N passed, N failed, N skipped" summed over the
# pytest suites (a suite that could not run, or collected no test, counts as one failure);
# exits non-zero when any suite, ruff or mypy failed.  Arguments go to the core pytest run.
# DEPLOY_CENTER_STRICT=1 (CI) turns "missing part" skips into failures.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export DEBIAN_FRONTEND=noninteractive

cat <<'EOF'
== What this installs and starts
System-wide, with apt, when missing (needs root; without root each step says what to run):
  - python3-venv, when python3 cannot make a virtual environment;
  - chromium, the headless browser of the web page tests;
  - docker.io (+ docker-cli on Debian 13), docker-registry, busybox-static: the Docker test
    bed (scripts/docker-testbed.sh), which also starts dockerd and a registry of its own.
Into this checkout: .venv and .venv-plugins/NAME (Python packages from PyPI).
Left running afterwards: dockerd and the test registry (stop: bash scripts/docker-testbed.sh --stop),
and a local PostgreSQL cluster if this script had to start it.
EOF

# The main venv: deploy-core with its test and dev extras, and every plugin.
# (Plain assignments, not "VAR=x source …": bash undoes those when the builtin returns, and
# install_checkout below would then install without the test and dev extras.)
EXTRAS=test,dev
BOOTSTRAP_FUNCTIONS_ONLY=1
source "$ROOT/scripts/bootstrap.sh"
set +e  # from here on a failing step is recorded, and the next one runs
SUITE_TIMEOUT="${DEPLOY_CENTER_SUITE_TIMEOUT:-4500}"  # seconds one pytest suite may take (the core suite takes ~30 min here by Dec 2026)
PY="$VENV/bin/python"
RESULTS=$(mktemp -d)
trap 'rm -rf "$RESULTS"' EXIT

summary=()          # one line per suite
# Which interpreter the suites run under: the distribution's own unless DEPLOY_CENTER_PYTHON
# says otherwise (a newer python3 earlier on PATH would hide what a fresh machine lacks).
interpreter="$("$PY" -c 'import sys; print(sys.version.split()[0])') ($("$PY" -c 'import sys; print(sys._base_executable)'))"
echo "== interpreter: Python $interpreter, from DEPLOY_CENTER_PYTHON=$DEPLOY_CENTER_PYTHON"
summary+=("interpreter: Python $interpreter")
failed_steps=()     # names of suites, ruff or mypy runs that failed
total_passed=0 total_failed=0 total_skipped=0
if ! install_checkout; then
  # What did install still runs; the suites that need the rest fail and say so.
  failed_steps+=("install into .venv")
  summary+=("install into .venv: FAILED (pip output above)")
fi

# record NAME OK(yes/no) TEXT: remember one summary line.
record() {
  summary+=("$1: $3")
  [ "$2" = yes ] || failed_steps+=("$1")
}

# check NAME COMMAND...: a step that passes or fails as a whole (ruff, mypy).
check() {
  local name="$1" start=$SECONDS
  shift
  echo "== $name"
  if "$@"; then
    record "$name" yes "passed ($((SECONDS - start)) s)"
  else
    record "$name" no "FAILED ($((SECONDS - start)) s)"
  fi
}

# pytest_suite NAME DIR PYTHON [PYTEST-ARG...]: run DIR's tests with PYTHON and count them from
# pytest's JUnit report (errors count as failures).
pytest_suite() {
  local name="$1" dir="$2" python="$3" start=$SECONDS rc counts passed failed skipped
  shift 3
  local xml="$RESULTS/$(echo "$name" | tr -c 'A-Za-z0-9_\n-' '_').xml"
  echo "== $name"
  # A wall-clock bound per suite: a hung test (a thread that never stops) fails its suite
  # with a clear line instead of running into CI's own limit.
  (cd "$dir" && timeout --kill-after=30 "$SUITE_TIMEOUT" \
    "$python" -m pytest tests -q -p no:cacheprovider --junitxml="$xml" "$@")
  rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "deploy-center: $name did not finish within $SUITE_TIMEOUT s and was stopped" >&2
  fi
  counts=$("$PY" - "$xml" <<'EOF' 2>/dev/null
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
failed = n["failures"] + n["errors"]
print(n["tests"] - failed - n["skipped"], failed, n["skipped"])
EOF
  )
  if [ -z "$counts" ]; then
    counts="0 1 0"
    [ "$rc" != 0 ] || rc=1
  fi
  read -r passed failed skipped <<<"$counts"
  local text="$passed passed, $failed failed, $skipped skipped"
  case "$rc" in
    0) ;;
    1) [ "$failed" -gt 0 ] || failed=1 ;;
    5) failed=1; text="no tests collected (pytest exit 5)" ;;
    124|137) failed=$((failed + 1)); text="$text; stopped after $SUITE_TIMEOUT s (hung)" ;;
    *) [ "$failed" -gt 0 ] || failed=1; text="$text; pytest exited with $rc" ;;
  esac
  total_passed=$((total_passed + passed))
  total_failed=$((total_failed + failed))
  total_skipped=$((total_skipped + skipped))
  if [ "$rc" = 0 ]; then
    record "$name" yes "$text ($((SECONDS - start)) s)"
  else
    record "$name" no "$text ($((SECONDS - start)) s)"
  fi
}

# isolated_suite NAME DIR: DIR's tests in .venv-plugins/<venv name> with only deploy-core
# (and its test extras) and DIR's project installed.
isolated_suite() {
  local name="$1" dir="$2" venv="$ROOT/.venv-plugins/$3"
  ensure_venv "$venv"
  if ! install_once "$venv" -e "$ROOT[test]" -e "$ROOT/$dir"; then
    echo "== $name"
    total_failed=$((total_failed + 1))
    record "$name" no "could not be installed into $venv (pip output above)"
    return
  fi
  pytest_suite "$name" "$dir" "$venv/bin/python"
}

# ----------------------------------------------------------------------- real parts

# PostgreSQL (DEPLOY_CENTER_TEST_PG, README "Giving the tests a PostgreSQL"): a local cluster
# that has stopped is started again.
pg_line=""
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    cluster="$(ls /etc/postgresql | head -1)"
    echo "deploy-center: starting the local PostgreSQL cluster $cluster/main for the database tests"
    if pg_ctlcluster --skip-systemctl-redirect "$cluster" main start; then
      pg_line="PostgreSQL $cluster/main, started for the tests and left running; stop it with: pg_ctlcluster $cluster main stop"
    fi
  fi
fi

# Headless Chromium for the web page tests.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  apt_install "the web page tests (headless Chromium)" chromium \
    || echo "deploy-center: without chromium the web page tests skip"
fi

# A real Docker engine and the test bed's own registry for the Docker tests.
echo "== docker test bed (scripts/docker-testbed.sh)"
if bash "$ROOT/scripts/docker-testbed.sh"; then
  # The tests read the registry's address from here (deploy_core.testing_docker).
  DEPLOY_CENTER_TEST_REGISTRY=$(bash "$ROOT/scripts/docker-testbed.sh" --address)
  export DEPLOY_CENTER_TEST_REGISTRY
  testbed_line="dockerd and the test registry at $DEPLOY_CENTER_TEST_REGISTRY, left running; stop them with: bash scripts/docker-testbed.sh --stop"
else
  testbed_line="unavailable: the Docker tests skip (fail under DEPLOY_CENTER_STRICT=1)"
  [ "${DEPLOY_CENTER_STRICT:-}" = 1 ] && failed_steps+=("docker test bed")
fi

# ----------------------------------------------------------------------- suites

check ruff "$VENV/bin/ruff" check deploy_core plugins tests bench examples
mypy_all() {
  local rc=0 p
  "$VENV/bin/mypy" deploy_core || rc=1
  for p in plugins/*/ examples/*/; do
    [ -f "$p/pyproject.toml" ] || continue
    "$VENV/bin/mypy" --config-file pyproject.toml "$p$(basename "$p")" || rc=1
  done
  return $rc
}
check mypy mypy_all

pytest_suite "core and end-to-end" . "$PY" "$@"

for p in plugins/*/; do
  [ -f "$p/pyproject.toml" ] || continue
  name=$(basename "$p")
  isolated_suite "plugin $name" "plugins/$name" "$name"
done
for p in examples/*/; do
  [ -f "$p/pyproject.toml" ] || continue
  name=$(basename "$p")
  isolated_suite "example $name" "examples/$name" "example-$name"
done

# ----------------------------------------------------------------------- summary

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
echo "docker test bed: $testbed_line"
[ -z "$pg_line" ] || echo "$pg_line"
if [ ${#failed_steps[@]} -gt 0 ]; then
  echo "FAILED: $(IFS=,; echo "${failed_steps[*]}" | sed 's/,/, /g')"
fi
echo "$total_passed passed, $total_failed failed, $total_skipped skipped"
[ ${#failed_steps[@]} -eq 0 ]
