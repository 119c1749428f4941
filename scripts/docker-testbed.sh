#!/usr/bin/env bash
# Bring up the Docker test bed the Docker tests run against (docs/docker.md):
#   - docker.io, docker-registry and busybox-static from apt, when missing;
#   - dockerd, started in the background when it does not answer (no systemd here);
#   - a registry on 127.0.0.1:5000 (storage under /var/lib/deploy-center-testbed);
#   - images built from the static busybox with `docker import` and pushed there:
#       127.0.0.1:5000/web:v1           busybox httpd on :8080, / and /healthz answer
#       127.0.0.1:5000/web:v2           starts, but /healthz is missing (HTTP 404)
#       127.0.0.1:5000/web:healthcheck  v1 with a Docker HEALTHCHECK that passes
#       127.0.0.1:5000/web:unhealthy    v1 with a Docker HEALTHCHECK that never passes
#       127.0.0.1:5000/web:crash        exits with code 3 right after starting
# Nothing comes from the internet but the apt packages.  Idempotent: a second run checks,
# finds everything up and returns in about a second.
#
# Usage: bash scripts/docker-testbed.sh        (as root; prints what it did)
# Env:   DOCKERD_FLAGS  extra dockerd flags, tried before the automatic fallbacks
#        TESTBED_WAIT   seconds to wait for dockerd to answer (default 60)
set -euo pipefail

STATE=/var/lib/deploy-center-testbed
DOCKERD_LOG=/var/log/dockerd-testbed.log
REGISTRY_LOG=/var/log/docker-registry-testbed.log
REGISTRY=127.0.0.1:5000
REPO=web
# Bump when the images below change: a different stamp rebuilds and pushes them again.
IMAGES_VERSION=4
TAGS=(v1 v2 healthcheck unhealthy crash)
WAIT="${TESTBED_WAIT:-60}"

START=$(date +%s.%N)
say() { printf 'docker-testbed: %s\n' "$*"; }
die() { printf 'docker-testbed: ERROR: %s\n' "$*" >&2; exit 1; }
elapsed() { awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

mkdir -p "$STATE"

# --------------------------------------------------------------------------- packages

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-registry >/dev/null || missing+=(docker-registry)
# The images need a static busybox: the rootfs holds no libc.
if ! dpkg -s busybox-static >/dev/null 2>&1; then missing+=(busybox-static); fi
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]} and not root: install them or run as root"
  say "installing ${missing[*]} with apt"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$STATE/apt.log" 2>&1; then
    apt-get update -qq >>"$STATE/apt.log" 2>&1
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$STATE/apt.log" 2>&1 \
      || { cat "$STATE/apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
  fi
else
  say "packages present (docker.io, docker-registry, busybox-static)"
fi
# The Debian docker CLI matches the Debian dockerd; another docker earlier on PATH works too
# (the API version is negotiated), but prefer the pair.
DOCKER=docker
[ -x /usr/bin/docker ] && DOCKER=/usr/bin/docker
BUSYBOX=/bin/busybox

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

# No `wget -T`: this busybox build segfaults with it; coreutils timeout bounds the call.
fetch() { timeout 5 "$BUSYBOX" wget -q -O - "$1" 2>/dev/null; }
registry_up() { fetch "http://$REGISTRY/v2/" >/dev/null; }

if registry_up; then
  say "registry answers on $REGISTRY"
else
  mkdir -p "$STATE/registry"
  cat >"$STATE/registry.yml" <<EOF
# Written by scripts/docker-testbed.sh: a local, unauthenticated registry for the tests.
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $STATE/registry
  delete:
    enabled: true
http:
  addr: $REGISTRY
EOF
  say "starting docker-registry on $REGISTRY (storage $STATE/registry, log $REGISTRY_LOG)"
  setsid nohup docker-registry serve "$STATE/registry.yml" >>"$REGISTRY_LOG" 2>&1 </dev/null &
  end=$(( $(date +%s) + 20 ))
  until registry_up; do
    [ "$(date +%s)" -lt "$end" ] || { tail -n 5 "$REGISTRY_LOG" >&2; die "registry did not answer"; }
    sleep 0.2
  done
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

say "ready in $(elapsed)s: engine $("$DOCKER" context inspect --format '{{.Endpoints.docker.Host}}' 2>/dev/null || echo unix:///var/run/docker.sock), registry http://$REGISTRY"
