#!/usr/bin/env bash
# A RabbitMQ 4.0 node beside the machine's 3.10 one, for the test phase that runs the
# broker-facing tests against 4.0 (RMQ_TEST_BROKER=rabbit4, see tests/run.sh). It runs from
# Debian trixie's packages (rabbitmq-server 4.0.5, Erlang 27) in a debootstrap root, so
# nothing of the host's RabbitMQ installation changes:
#
#   node rabbit4@localhost, AMQP on 5673, management API on 15673, distribution port 25673,
#   guest/guest from anywhere (loopback_users = none); it shares the host's epmd.
#   TLS (the `tls` tests): AMQPS on 5674 and management HTTPS on 15674, both requiring a
#   client certificate (verify_peer, fail_if_no_peer_cert). The PKI is made once under
#   $TLS_DIR: ca.pem, server.pem/server.key (localhost and 127.0.0.1), client.pem/client.key
#   (signed by ca.pem), wrong-ca.pem (an unrelated CA); kept between runs.
#
#   rabbit4.sh start          builds the root if it is missing (debootstrap, ~1 min, 370 MB,
#                             kept between runs), makes the test PKI if it is missing, starts
#                             the node if it is down (or adopts the running one; a node
#                             running without the TLS listeners is restarted once with them), starts its application if a test left it stopped,
#                             enables the management plugin, restores the memory watermark and
#                             the dead-letter retry interval, waits until the management API
#                             answers. Idempotent.
#   rabbit4.sh check          exit 0 when the node runs, its app is up and the API answers
#   rabbit4.sh stop           stops the node and unmounts the root's /proc
#   rabbit4.sh ctl ARGS       rabbitmqctl ARGS against the node (the host's 3.10 rabbitmqctl
#                             cannot talk to a 4.0 node)
#   rabbit4.sh plugins ARGS   rabbitmq-plugins ARGS against the node
#   rabbit4.sh logs [N]       the last N (default 100) lines of the node's log
#
# The root is $RABBIT4_ROOT (default /var/lib/rmq-consumer-tests/rabbit4-root). Needs root
# (debootstrap, chroot, mount).
set -euo pipefail

ROOT=${RABBIT4_ROOT:-/var/lib/rmq-consumer-tests/rabbit4-root}
NODE=rabbit4@localhost
AMQP_PORT=5673
MANAGEMENT_PORT=15673
AMQPS_PORT=5674
MANAGEMENT_TLS_PORT=15674
DIST_PORT=25673
TLS_DIR=${RMQ_TEST_TLS_DIR:-/var/lib/rmq-consumer-tests/tls}
MIRROR=${RABBIT4_MIRROR:-http://deb.debian.org/debian}
MANAGEMENT=http://127.0.0.1:$MANAGEMENT_PORT
# Quorum queues' at-least-once dead-lettering retries an unconfirmed hop after this many ms
# (180 s by default); the tests need seconds.
DLX_CONFIRM_TIMEOUT_MS=2000

log() { printf '[rabbit4.sh] %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}

in_root() { chroot "$ROOT" env HOME=/root "$@"; }
ctl() { in_root rabbitmqctl -n "$NODE" "$@"; }
plugins() { in_root rabbitmq-plugins -n "$NODE" "$@"; }
api_up() { curl -fsS -m 5 -u guest:guest "$MANAGEMENT/api/overview" >/dev/null 2>&1; }
# Whether the node's AMQPS listener accepts connections.
tls_up() { (exec 3<>"/dev/tcp/127.0.0.1/$AMQPS_PORT") 2>/dev/null; }
need_root() { [ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount)"; }

# Unmounts whatever is mounted at or below $1 (deepest first).
unmount_below() {
  local dir=$1 target
  awk -v dir="$dir" '$2 == dir || index($2, dir "/") == 1 {print $2}' /proc/mounts | sort -r |
    while read -r target; do
      umount "$target" 2>/dev/null || umount -l "$target" 2>/dev/null || true
    done
}

# Builds the root in a temporary directory beside it and renames it when debootstrap
# succeeded: an interrupted build never leaves a root that looks complete.
build_root() {
  [ -x "$ROOT/usr/sbin/rabbitmq-server" ] && return 0
  [ -e "$ROOT" ] && die "$ROOT exists but has no rabbitmq-server; remove it to rebuild"
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  local parent tmp leftover
  parent=$(dirname "$ROOT")
  mkdir -p "$parent"
  # Leftovers of an interrupted build (debootstrap mounts proc and sys inside its target).
  for leftover in "$ROOT".partial.*; do
    [ -d "$leftover" ] || continue
    unmount_below "$leftover"
    rm -rf --one-file-system "$leftover"
  done
  tmp="$ROOT.partial.$$"
  log "building the RabbitMQ 4.0 root in $ROOT (debootstrap trixie, about a minute)"
  if ! debootstrap --variant=minbase --include=rabbitmq-server trixie "$tmp" "$MIRROR" \
    >"$parent/debootstrap.log" 2>&1; then
    tail -n 30 "$parent/debootstrap.log" >&2 || true
    unmount_below "$tmp"
    die "debootstrap failed (log: $parent/debootstrap.log)"
  fi
  # Debian's packaging may have started a node with the default name inside the root.
  pkill_root_nodes "$tmp"
  unmount_below "$tmp"
  [ -x "$tmp/usr/sbin/rabbitmq-server" ] || die "debootstrap did not install rabbitmq-server"
  mv "$tmp" "$ROOT"
  log "root ready: $(in_root dpkg-query -W -f '${Package} ${Version}' rabbitmq-server)"
}

# The pids of the processes named $1 that run inside the root $2 (default: $ROOT).
root_pids() {
  local name=$1 dir=${2:-$ROOT} pid
  for pid in $(pgrep -x "$name" 2>/dev/null || true); do
    [ "$(readlink "/proc/$pid/root" 2>/dev/null)" = "$dir" ] && echo "$pid"
  done
  return 0
}

# Kills Erlang VMs running inside the root $1 (a node the package's install scripts may have
# started while debootstrap ran).
pkill_root_nodes() {
  local pid
  for pid in $(root_pids beam.smp "$1"); do
    log "stopping a node started by the package's install scripts (pid $pid)"
    kill "$pid" 2>/dev/null || true
  done
}

# The test PKI: a CA, a server certificate for localhost and 127.0.0.1, a client certificate,
# and a second, unrelated CA. Made once (files written to a temporary directory, renamed when
# complete); P-256 keys, valid for ten years.
make_pki() {
  [ -s "$TLS_DIR/wrong-ca.pem" ] && return 0
  if ! command -v openssl >/dev/null 2>&1; then
    log "installing openssl"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
  fi
  log "making the test PKI in $TLS_DIR"
  local tmp="$TLS_DIR.partial.$$" name
  rm -rf "$tmp"
  mkdir -p "$tmp"
  (
    set -e
    cd "$tmp"
    for name in ca wrong-ca; do
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -subj "/CN=rmq-consumer test $name" -keyout "$name.key" -out "$name.pem" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    done
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1" >server.ext
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=clientAuth" >client.ext
    for name in server client; do
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=rmq-consumer test $name" -keyout "$name.key" -out "$name.csr" 2>/dev/null
      openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$name.ext" -out "$name.pem" 2>/dev/null
    done
    rm -f ./*.csr ./*.ext ./*.srl
    chmod 644 ./*.pem ./*.key
  ) || die "openssl could not make the test PKI"
  rm -rf "$TLS_DIR"
  mv "$tmp" "$TLS_DIR"
}

# Host files the node needs, its mounts and its configuration. Rewritten on every start.
prepare() {
  cp /etc/hosts "$ROOT/etc/hosts"
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  cat >"$ROOT/etc/rabbitmq/rabbit4.conf" <<CONF
listeners.tcp.default = $AMQP_PORT
management.tcp.port = $MANAGEMENT_PORT
loopback_users = none
listeners.ssl.default = $AMQPS_PORT
ssl_options.cacertfile = /etc/rabbitmq/tls/ca.pem
ssl_options.certfile = /etc/rabbitmq/tls/server.pem
ssl_options.keyfile = /etc/rabbitmq/tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
management.ssl.port = $MANAGEMENT_TLS_PORT
management.ssl.cacertfile = /etc/rabbitmq/tls/ca.pem
management.ssl.certfile = /etc/rabbitmq/tls/server.pem
management.ssl.keyfile = /etc/rabbitmq/tls/server.key
management.ssl.verify = verify_peer
management.ssl.fail_if_no_peer_cert = true
CONF
  # The node runs as the root's rabbitmq user: it must read the certificates and the key.
  mkdir -p "$ROOT/etc/rabbitmq/tls"
  cp "$TLS_DIR/ca.pem" "$TLS_DIR/server.pem" "$TLS_DIR/server.key" "$ROOT/etc/rabbitmq/tls/"
  in_root chown -R rabbitmq:rabbitmq /etc/rabbitmq/tls
  chmod 750 "$ROOT/etc/rabbitmq/tls"
  chmod 640 "$ROOT/etc/rabbitmq/tls/"*
  cat >"$ROOT/etc/rabbitmq/rabbit4-advanced.config" <<CONF
[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, $DLX_CONFIRM_TIMEOUT_MS}]}].
CONF
  # The node boots with management already on; `start` enables it on an adopted node too.
  [ -s "$ROOT/etc/rabbitmq/enabled_plugins" ] || echo '[rabbitmq_management].' >"$ROOT/etc/rabbitmq/enabled_plugins"
}

launch() {
  log "starting node $NODE"
  # Its own session, every descriptor redirected: the node must not hold the caller's output
  # pipe (cargo's, CI's) open.
  setsid chroot "$ROOT" env HOME=/root \
    RABBITMQ_NODENAME="$NODE" \
    RABBITMQ_DIST_PORT="$DIST_PORT" \
    RABBITMQ_CONFIG_FILE=/etc/rabbitmq/rabbit4.conf \
    RABBITMQ_ADVANCED_CONFIG_FILE=/etc/rabbitmq/rabbit4-advanced.config \
    rabbitmq-server -detached </dev/null >>"$ROOT/var/log/rabbit4-start.log" 2>&1 || true
  # `await_startup` fails at once until the node has registered with epmd.
  local started=0
  for _ in $(seq 1 60); do
    if ctl await_startup --timeout 120 >/dev/null 2>&1; then
      started=1
      break
    fi
    sleep 1
  done
  if [ $started = 0 ]; then
    tail -n 20 "$ROOT/var/log/rabbit4-start.log" >&2 || true
    tail -n 60 "$ROOT/var/log/rabbitmq/$NODE.log" >&2 || true
    die "node $NODE did not start"
  fi
}

start() {
  need_root
  build_root
  make_pki
  prepare
  if ! ctl ping >/dev/null 2>&1; then
    launch
  elif ! tls_up; then
    # Started by an older version of this script (or by hand): restart it once with the
    # TLS listeners. Tests running against the node meanwhile see a broker restart.
    log "node $NODE runs without its TLS listeners: restarting it with them"
    ctl stop >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do
      [ -z "$(root_pids beam.smp)" ] && break
      sleep 0.5
    done
    launch
  fi
  # A fault test may have left the app stopped.
  if ! ctl await_startup --timeout 5 >/dev/null 2>&1; then
    log "starting the stopped application"
    ctl start_app >/dev/null 2>&1 || true
  fi
  ctl await_startup --timeout 120 >/dev/null
  plugins enable --quiet rabbitmq_management >/dev/null
  # Restore a setting a fault test (F11) may have changed.
  ctl set_vm_memory_high_watermark 0.4 >/dev/null 2>&1 || true
  # A node started by hand without the advanced config: the setting applies to the
  # dead-letter workers of queues declared from now on.
  local dlx
  dlx=$(ctl eval "application:get_env(rabbit, dead_letter_worker_publisher_confirm_timeout)." 2>/dev/null || true)
  if [ "$dlx" != "{ok,$DLX_CONFIRM_TIMEOUT_MS}" ]; then
    log "setting dead_letter_worker_publisher_confirm_timeout to $DLX_CONFIRM_TIMEOUT_MS ms at runtime (was $dlx)"
    ctl eval "application:set_env(rabbit, dead_letter_worker_publisher_confirm_timeout, $DLX_CONFIRM_TIMEOUT_MS)." >/dev/null
  fi
  for _ in $(seq 1 60); do
    if api_up; then
      tls_up || die "the AMQPS listener does not answer on $AMQPS_PORT (log: $0 logs)"
      log "RabbitMQ $(ctl version 2>/dev/null || echo '?') ready on $AMQP_PORT, management on $MANAGEMENT_PORT, AMQPS on $AMQPS_PORT, management HTTPS on $MANAGEMENT_TLS_PORT"
      return 0
    fi
    sleep 1
  done
  die "the management API does not answer on $MANAGEMENT"
}

check() {
  need_root
  [ -x "$ROOT/usr/sbin/rabbitmq-server" ] || die "no RabbitMQ 4.0 root at $ROOT (run: $0 start)"
  ctl await_startup --timeout 5 >/dev/null 2>&1 ||
    die "node $NODE is not running (or its application is stopped)"
  api_up || die "the management API does not answer on $MANAGEMENT"
  tls_up || die "the AMQPS listener does not answer on $AMQPS_PORT"
  log "RabbitMQ $(ctl version 2>/dev/null || echo '?') running as $NODE"
}

stop() {
  need_root
  [ -x "$ROOT/usr/sbin/rabbitmq-server" ] || return 0
  if ctl ping >/dev/null 2>&1; then
    log "stopping node $NODE"
    ctl stop >/dev/null
  fi
  # `stop` returns when the node began to stop; its VM lingers for a moment.
  for _ in $(seq 1 60); do
    [ -z "$(root_pids beam.smp)" ] && break
    sleep 0.5
  done
  if mountpoint -q "$ROOT/proc"; then
    umount "$ROOT/proc" 2>/dev/null || umount -l "$ROOT/proc"
  fi
}

case "${1:-}" in
  start) start ;;
  check) check ;;
  stop) stop ;;
  ctl)
    shift
    exec chroot "$ROOT" env HOME=/root rabbitmqctl -n "$NODE" "$@"
    ;;
  plugins)
    shift
    exec chroot "$ROOT" env HOME=/root rabbitmq-plugins -n "$NODE" "$@"
    ;;
  logs) tail -n "${2:-100}" "$ROOT/var/log/rabbitmq/$NODE.log" ;;
  *)
    echo "usage: $0 start | check | stop | ctl ARGS... | plugins ARGS... | logs [N]" >&2
    exit 2
    ;;
esac
