#!/usr/bin/env bash
# Bring up the Docker test bed the Docker tests run against (docs/docker.md):
#   - docker.io (and docker-cli where it is a package of its own, as on Debian 13),
#     docker-registry and busybox-static from apt, when missing;
#   - dockerd, started in the background when it does not answer (no systemd here);
#   - a registry of its own on a free loopback port it chooses, never one it did not start:
#     it is known by its pid file and by a random token it sends back in a response header.
#     The address (host:port) is recorded in $STATE/registry.address, where the tests read
#     it (deploy_core.testing_docker; DEPLOY_CENTER_TEST_REGISTRY overrides);
#   - images built from the static busybox with `docker import` and pushed there:
#       REGISTRY/web:v1           busybox httpd on :8080, / and /healthz answer
#       REGISTRY/web:v2           starts, but /healthz is missing (HTTP 404)
#       REGISTRY/web:healthcheck  v1 with a Docker HEALTHCHECK that passes
#       REGISTRY/web:unhealthy    v1 with a Docker HEALTHCHECK that never passes
#       REGISTRY/web:crash        exits with code 3 right after starting
# Nothing comes from the internet but the apt packages.  Idempotent: a second run checks,
# finds everything up and returns in about a second.  dockerd and the registry are left
# running for the next test run; `--stop` stops what this script started.
#
# Usage: bash scripts/docker-testbed.sh           (as root; prints what it did)
#        bash scripts/docker-testbed.sh --address (the registry's host:port, when it is up)
#        bash scripts/docker-testbed.sh --stop    (stop the registry, and dockerd if it
#                                                   was started here)
# Env:   DOCKERD_FLAGS  extra dockerd flags, tried before the automatic fallbacks
#        TESTBED_WAIT   seconds to wait for dockerd to answer (default 60)
#        DEPLOY_CENTER_TESTBED_STATE  state directory (default /var/lib/deploy-center-testbed)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive  # apt asks nothing and prints no debconf noise

STATE="${DEPLOY_CENTER_TESTBED_STATE:-/var/lib/deploy-center-testbed}"
DOCKERD_LOG=/var/log/dockerd-testbed.log
REGISTRY_LOG=/var/log/docker-registry-testbed.log
# The registry's files: its address (read by the tests), pid, identifying token, config and
# storage.  (An older version of this script used registry.yml, registry/ and port 5000.)
REGISTRY_ADDRESS_FILE="$STATE/registry.address"
REGISTRY_PID_FILE="$STATE/registry.pid"
REGISTRY_TOKEN_FILE="$STATE/registry.token"
REGISTRY_CONFIG="$STATE/registry-config.yml"
REGISTRY_STORAGE="$STATE/registry-storage"
REGISTRY_HEADER=X-Deploy-Center-Testbed
DOCKERD_PID_FILE="$STATE/dockerd.pid"  # only when this script started dockerd
REPO=web
# Bump when the images below change: a different stamp rebuilds and pushes them again.
IMAGES_VERSION=4
TAGS=(v1 v2 healthcheck unhealthy crash)
WAIT="${TESTBED_WAIT:-60}"

START=$(date +%s.%N)
say() { printf 'docker-testbed: %s\n' "$*"; }
die() { printf 'docker-testbed: ERROR: %s\n' "$*" >&2; exit 1; }
elapsed() { awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }
BUSYBOX=/bin/busybox

# No `wget -T`: this busybox build segfaults with it; coreutils timeout bounds the call.
fetch() { timeout 5 "$BUSYBOX" wget -q -O - "$1" 2>/dev/null; }

# --------------------------------------------------------------------------- registry identity

# The pid of the registry this script started, when that process still runs its config.
own_registry_pid() {
  local pid
  pid=$(cat "$REGISTRY_PID_FILE" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$REGISTRY_CONFIG" || return 1
  echo "$pid"
}

# 0 when ADDRESS answers as the registry this script started: /v2/ answers with its token.
registry_is_ours() {
  local address="$1" token
  token=$(cat "$REGISTRY_TOKEN_FILE" 2>/dev/null) || return 1
  own_registry_pid >/dev/null || return 1
  timeout 5 "$BUSYBOX" wget -S -q -O /dev/null "http://$address/v2/" 2>&1 \
    | grep -qiF "$REGISTRY_HEADER: $token"
}

recorded_address() { cat "$REGISTRY_ADDRESS_FILE" 2>/dev/null; }

stop_pid() {
  local pid="$1" what="$2"
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || { say "stopped $what (pid $pid)"; return 0; }; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
  say "killed $what (pid $pid): it did not stop within 20 s"
}

case "${1:-}" in
  --address)
    address=$(recorded_address) && registry_is_ours "$address" || die "the test bed's registry is not up; run: bash scripts/docker-testbed.sh"
    echo "$address"
    exit 0
    ;;
  --stop)
    if pid=$(own_registry_pid); then stop_pid "$pid" "the test registry"; else say "no test registry of ours is running"; fi
    rm -f "$REGISTRY_PID_FILE" "$REGISTRY_ADDRESS_FILE"
    pid=$(cat "$DOCKERD_PID_FILE" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat /var/run/docker.pid 2>/dev/null)" = "$pid" ]; then
      stop_pid "$pid" dockerd
    elif [ -n "$(cat /var/run/docker.pid 2>/dev/null)" ]; then
      say "dockerd (pid $(cat /var/run/docker.pid)) was not started by this script; left running"
    fi
    rm -f "$DOCKERD_PID_FILE"
    exit 0
    ;;
  "") ;;
  *) die "unknown argument $1 (use no argument, --address or --stop)" ;;
esac

mkdir -p "$STATE" 2>/dev/null && [ -w "$STATE" ] \
  || die "cannot write $STATE: run as root, or set DEPLOY_CENTER_TESTBED_STATE to a writable directory"

# --------------------------------------------------------------------------- packages

docker_cli() { [ -x /usr/bin/docker ] || command -v docker >/dev/null; }
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
docker_cli || missing+=(docker-cli)
command -v docker-registry >/dev/null || missing+=(docker-registry)
# The images need a static busybox: the rootfs holds no libc.
if ! dpkg -s busybox-static >/dev/null 2>&1; then missing+=(busybox-static); fi
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; apt needs root: run sudo apt install ${missing[*]} (or this script as root)"
  say "installing ${missing[*]} with apt (the Docker engine, its CLI, a registry and busybox for the test images)"
  apt-get update -qq >"$STATE/apt.log" 2>&1 || { cat "$STATE/apt.log" >&2; die "apt-get update failed"; }
  packages=()
  for pkg in "${missing[@]}"; do
    # Debian 13 split the CLI out of docker.io into docker-cli (only "recommended"); before
    # that docker.io ships /usr/bin/docker and there is no docker-cli package.
    if [ "$pkg" = docker-cli ] && ! apt-cache show docker-cli >/dev/null 2>&1; then pkg=docker.io; fi
    case " ${packages[*]} " in *" $pkg "*) ;; *) packages+=("$pkg") ;; esac
  done
  if [[ " ${packages[*]} " == *" docker.io "* ]] && apt-cache show docker-cli >/dev/null 2>&1; then
    case " ${packages[*]} " in *" docker-cli "*) ;; *) packages+=(docker-cli) ;; esac
  fi
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >>"$STATE/apt.log" 2>&1 \
    || { cat "$STATE/apt.log" >&2; die "apt-get install ${packages[*]} failed"; }
  docker_cli || die "no docker CLI after installing ${packages[*]}: install the docker CLI by hand"
else
  say "packages present (dockerd, docker CLI, docker-registry, busybox-static)"
fi
# The Debian docker CLI matches the Debian dockerd; another docker earlier on PATH works too
# (the API version is negotiated), but prefer the pair.
DOCKER=docker
[ -x /usr/bin/docker ] && DOCKER=/usr/bin/docker

engine_up() { timeout 10 "$DOCKER" info >/dev/null 2>&1; }

# --------------------------------------------------------------------------- dockerd

# Start dockerd with the given flags; 0 when `docker info` answers within $WAIT seconds.
start_dockerd() {
  local pid end
  # A pid file left by a killed dockerd stops the next one from starting.
  if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
  fi
  say "starting dockerd $* (log: $DOCKERD_LOG)"
  echo "=== $(date -u +%FT%TZ) dockerd $*" >>"$DOCKERD_LOG"
  # setsid: the daemon outlives this script and the test run that called it.
  setsid nohup dockerd "$@" >>"$DOCKERD_LOG" 2>&1 </dev/null &
  pid=$!
  end=$(( $(date +%s) + WAIT ))
  while [ "$(date +%s)" -lt "$end" ]; do
    if engine_up; then
      if [ -n "$*" ]; then echo "$*" >"$STATE/dockerd.flags"; else rm -f "$STATE/dockerd.flags"; fi
      echo "$pid" >"$DOCKERD_PID_FILE"  # so that --stop knows this dockerd is ours
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.3
  done
  say "dockerd $* did not come up; last log lines:"
  tail -n 5 "$DOCKERD_LOG" | sed 's/^/    /'
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
  return 1
}

started_engine=no
if engine_up; then
  say "dockerd answers ($("$DOCKER" info --format '{{.ServerVersion}}, storage {{.Driver}}, cgroup v{{.CgroupVersion}}' 2>/dev/null))"
else
  [ "$(id -u)" = 0 ] || die "dockerd does not answer and only root can start it here"
  # cgroups must be mounted for runc; a bare container without them gets cgroup2 mounted.
  if [ -z "$(ls -A /sys/fs/cgroup 2>/dev/null)" ]; then
    mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null || say "could not mount cgroups"
  fi
  # What worked last time first, then the defaults, then fallbacks for machines where the
  # overlay storage driver or iptables are unavailable (see docs/docker.md).
  attempts=()
  [ -n "${DOCKERD_FLAGS:-}" ] && attempts+=("$DOCKERD_FLAGS")
  [ -s "$STATE/dockerd.flags" ] && attempts+=("$(cat "$STATE/dockerd.flags")")
  attempts+=("" "--storage-driver=vfs" "--storage-driver=vfs --iptables=false --ip6tables=false")
  ok=no
  for flags in "${attempts[@]}"; do
    # shellcheck disable=SC2086  # flags are words on purpose
    if start_dockerd $flags; then ok=yes; break; fi
  done
  [ "$ok" = yes ] || die "dockerd would not start with any known flags; see $DOCKERD_LOG"
  started_engine=yes
  say "dockerd up ($("$DOCKER" info --format '{{.ServerVersion}}, storage {{.Driver}}, cgroup v{{.CgroupVersion}}'))"
fi

# --------------------------------------------------------------------------- registry

# A loopback port that is free now: PREFERRED when it is, else one the kernel picks.
free_port() {
  local py=python3
  [ -x /usr/bin/python3 ] && py=/usr/bin/python3  # the distribution's own, as bootstrap.sh
  "$py" - "$1" <<'EOF'
import socket, sys
for port in (int(sys.argv[1] or 0), 0):
    with socket.socket() as s:
        # As the registry (Go) binds: connections left in TIME_WAIT do not make a port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(s.getsockname()[1])
        break
EOF
}

# start_registry [PORT]: start a registry of our own on PORT when it is free, else on another
# free port; 0 once it answers with our token.
start_registry() {
  local port address pid token end
  port=$(free_port "${1:-}")
  address="127.0.0.1:$port"
  token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  echo "$token" >"$REGISTRY_TOKEN_FILE"
  mkdir -p "$REGISTRY_STORAGE"
  cat >"$REGISTRY_CONFIG" <<EOF
# Written by scripts/docker-testbed.sh: the tests' own local, unauthenticated registry.
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $REGISTRY_STORAGE
  delete:
    enabled: true
http:
  addr: $address
  headers:
    $REGISTRY_HEADER: ["$token"]
EOF
  say "starting docker-registry on $address (storage $REGISTRY_STORAGE, log $REGISTRY_LOG)"
  echo "=== $(date -u +%FT%TZ) docker-registry on $address" >>"$REGISTRY_LOG"
  # setsid: the registry outlives this script and the test run that called it.
  setsid nohup docker-registry serve "$REGISTRY_CONFIG" >>"$REGISTRY_LOG" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$REGISTRY_PID_FILE"
  end=$(( $(date +%s) + 20 ))
  while [ "$(date +%s)" -lt "$end" ]; do
    if registry_is_ours "$address"; then
      echo "$address" >"$REGISTRY_ADDRESS_FILE"
      echo "$port" >"$STATE/registry.port"  # kept by --stop, to come back on the same port
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  tail -n 3 "$REGISTRY_LOG" | sed 's/^/    /'
  kill "$pid" 2>/dev/null || true
  rm -f "$REGISTRY_PID_FILE"
  return 1
}

REGISTRY=$(recorded_address || true)
if [ -n "$REGISTRY" ] && registry_is_ours "$REGISTRY"; then
  say "our registry answers on $REGISTRY (pid $(own_registry_pid))"
else
  if pid=$(own_registry_pid); then
    say "our registry (pid $pid) does not answer as ours on ${REGISTRY:-its address}; restarting it"
    kill "$pid" 2>/dev/null || true
  fi
  rm -f "$REGISTRY_ADDRESS_FILE"
  # The same port as last time when it is free (stable image names); a port picked free can
  # be taken before the registry binds it: then try others.
  previous_port=$(cat "$STATE/registry.port" 2>/dev/null || true)
  ok=no
  for port in "$previous_port" "" ""; do
    if start_registry "$port"; then ok=yes; break; fi
  done
  [ "$ok" = yes ] || die "the registry did not come up (log $REGISTRY_LOG)"
  REGISTRY=$(recorded_address)
fi

# --------------------------------------------------------------------------- images

images_present() {
  local tags
  [ "$(cat "$STATE/images.stamp" 2>/dev/null)" = "$IMAGES_VERSION" ] || return 1
  tags=$(fetch "http://$REGISTRY/v2/$REPO/tags/list") || return 1
  for tag in "${TAGS[@]}"; do
    case "$tags" in *"\"$tag\""*) ;; *) return 1 ;; esac
  done
}

# import NAME-TAG ROOTFS CHANGE... : docker import the rootfs with Dockerfile changes.
import_image() {
  local tag="$1" rootfs="$2"
  shift 2
  local changes=(--change 'EXPOSE 8080/tcp' --change "LABEL org.opencontainers.image.version=$tag")
  for change in "$@"; do changes+=(--change "$change"); done
  tar -C "$rootfs" -c . | "$DOCKER" import "${changes[@]}" - "$REGISTRY/$REPO:$tag" >/dev/null
}

make_rootfs() {
  local dir="$1" version="$2" healthz="$3"
  rm -rf "$dir"
  mkdir -p "$dir/bin" "$dir/www" "$dir/tmp" "$dir/etc"
  cp "$BUSYBOX" "$dir/bin/busybox"
  for applet in $("$BUSYBOX" --list); do
    [ -e "$dir/bin/$applet" ] || ln -s busybox "$dir/bin/$applet"
  done
  chmod 1777 "$dir/tmp"
  echo "root:x:0:0:root:/:/bin/sh" >"$dir/etc/passwd"
  echo "root:x:0:" >"$dir/etc/group"
  echo "<html><body><h1>web $version</h1></body></html>" >"$dir/www/index.html"
  echo "$version" >"$dir/www/version"
  if [ "$healthz" = yes ]; then echo ok >"$dir/www/healthz"; fi
}

built_images=no
if images_present; then
  say "images present in the registry: ${TAGS[*]/#/$REGISTRY/$REPO:}"
else
  build="$STATE/build"
  # httpd under a shell that exits on SIGTERM: as PID 1 httpd alone would ignore it and
  # every `docker stop` would wait out its grace period.
  httpd="CMD [\"/bin/sh\", \"-c\", \"trap 'exit 0' TERM INT; httpd -f -v -p 8080 -h /www & wait\"]"
  probe='CMD ["/bin/wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/healthz"]'
  make_rootfs "$build/v1" v1 yes
  make_rootfs "$build/v2" v2 no
  import_image v1 "$build/v1" "$httpd"
  import_image v2 "$build/v2" "$httpd"
  import_image healthcheck "$build/v1" "$httpd" \
    "HEALTHCHECK --interval=1s --timeout=2s --start-period=1s --retries=3 $probe"
  import_image unhealthy "$build/v1" "$httpd" \
    'HEALTHCHECK --interval=1s --timeout=2s --retries=2 CMD ["/bin/false"]'
  import_image crash "$build/v1" 'CMD ["/bin/sh", "-c", "echo crashing on purpose >&2; exit 3"]'
  for tag in "${TAGS[@]}"; do
    "$DOCKER" push -q "$REGISTRY/$REPO:$tag" >/dev/null \
      || die "docker push $REGISTRY/$REPO:$tag failed"
  done
  rm -rf "$build"
  echo "$IMAGES_VERSION" >"$STATE/images.stamp"
  built_images=yes
  say "built and pushed ${TAGS[*]/#/$REGISTRY/$REPO:}"
fi

# --------------------------------------------------------------------------- smoke test

# After a (re)start or rebuild: one container with a published port must answer, which
# proves storage, networking (bridge + iptables, or the fallback) and the images together.
if [ "$started_engine" = yes ] || [ "$built_images" = yes ]; then
  name="deploy-testbed-smoke-$$"
  "$DOCKER" rm -f "$name" >/dev/null 2>&1 || true
  "$DOCKER" run -d --name "$name" -p 127.0.0.1::8080 "$REGISTRY/$REPO:v1" >/dev/null
  port=$("$DOCKER" port "$name" 8080/tcp | head -n 1 | sed 's/.*://')
  answer=""
  for _ in $(seq 1 50); do
    answer=$(fetch "http://127.0.0.1:$port/healthz") && break
    sleep 0.1
  done
  "$DOCKER" rm -f "$name" >/dev/null
  [ "$answer" = ok ] || die "a test container did not answer on its published port $port"
  say "smoke test: a container answered on a published port"
fi

say "ready in $(elapsed)s: engine $("$DOCKER" context inspect --format '{{.Endpoints.docker.Host}}' 2>/dev/null || echo unix:///var/run/docker.sock), registry http://$REGISTRY (recorded in $REGISTRY_ADDRESS_FILE)"
say "left running: dockerd (pid $(cat /var/run/docker.pid 2>/dev/null || echo ?)) and the registry (pid $(own_registry_pid)); to stop them: bash scripts/docker-testbed.sh --stop"
