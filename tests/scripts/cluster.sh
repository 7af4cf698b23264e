#!/usr/bin/env bash
# Starts or stops a local 3-node RabbitMQ cluster beside the regular broker on 5672, for the
# node-loss tests (tests/tests/fault_cluster.rs). Nodes c1..c3 listen on 127.0.0.1:5781..5783
# (guest/guest works: loopback), with distribution ports 25781..25783 and no plugins. Each
# node gets its own config and env files, so nothing from /etc/rabbitmq (which pins the main
# broker's listener on 5672 and its node name) applies to them. All data lives under
# $RMQ_CLUSTER_DIR (default $TMPDIR/rmq-test-cluster); `stop` removes it.
#
#   cluster.sh start     stops leftovers, starts the nodes (c1 first, then c2 and c3, which
#                        join it by classic peer discovery), waits until the cluster has three
#                        running nodes, prints the three AMQP URLs, one per line
#   cluster.sh stop      kills the nodes and removes their data (never fails)
#   cluster.sh kill N    kill -9 of node cN's Erlang VM (1..3): an abrupt node loss
#   cluster.sh revive N  starts node cN again with its data; it rejoins the cluster
#   cluster.sh pid N     the OS pid of node cN's VM (exit 1 when it is not running)
#   cluster.sh logs DIR  copies the nodes' logs to DIR (before a `stop`, to keep them)
#
# The nodes run as the `rabbitmq` user when this runs as root (the Debian wrappers switch to
# it), so they and `rabbitmqctl -n cN@localhost` share /var/lib/rabbitmq/.erlang.cookie.
# Memory: about 100-150 MiB per node (one scheduler pair each, a small Raft WAL).
set -euo pipefail

BASE=${RMQ_CLUSTER_DIR:-${TMPDIR:-/tmp}/rmq-test-cluster}
NODES=(1 2 3)

log() { printf '[cluster.sh] %s\n' "$*" >&2; }

# Writes node i's config and env files.
configure() {
  local i=$1 dir=$BASE/n$1
  mkdir -p "$dir/mnesia" "$dir/log"
  cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:$((5780 + i))
cluster_formation.peer_discovery_backend = classic_config
cluster_formation.classic_config.nodes.1 = c1@localhost
cluster_formation.classic_config.nodes.2 = c2@localhost
cluster_formation.classic_config.nodes.3 = c3@localhost
cluster_partition_handling = ignore
raft.wal_max_size_bytes = 32000000
vm_memory_high_watermark.relative = 0.2
log.file.level = info
log.console = false
CONF
  echo '[].' >"$dir/enabled_plugins"
  # Sourced by the rabbitmq-env shell script and by the node (instead of /etc/rabbitmq's).
  cat >"$dir/rabbitmq-env.conf" <<CONF
NODENAME=c$i@localhost
ERL_EPMD_ADDRESS=127.0.0.1
CONF
}

# The environment of node i, for rabbitmq-server.
node_env() {
  local i=$1 dir=$BASE/n$1
  echo RABBITMQ_NODENAME="c$i@localhost" \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" \
    RABBITMQ_DIST_PORT=$((25780 + i))
}

# The pid of node i's VM, if it runs (checked against its environment, so a stale pid file
# never names another process).
node_pid() {
  local i=$1 pid
  pid=$(cat "$BASE/n$i/pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qx "RABBITMQ_NODENAME=c$i@localhost" || return 1
  echo "$pid"
}

ctl() {
  local i=$1
  shift
  rabbitmqctl -n "c$i@localhost" "$@"
}

# Launches node i in the background (in its own session, so it outlives this script).
launch() {
  local i=$1
  configure "$i"
  if id rabbitmq >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then chown -R rabbitmq:rabbitmq "$BASE"; fi
  # Every descriptor redirected: nothing may keep the caller's stdout pipe open.
  (cd "$BASE" && exec setsid env $(node_env "$i") \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+S 1:1 +A 4 -kernel inet_dist_use_interface {127,0,0,1}" \
    rabbitmq-server) >>"$BASE/n$i.out" 2>&1 </dev/null &
}

# Waits until node i has booted; prints its logs and fails otherwise.
await_node() {
  local i=$1
  for _ in $(seq 1 120); do
    if node_pid "$i" >/dev/null && ctl "$i" await_startup --timeout 120 >/dev/null 2>&1; then
      return 0
    fi
    sleep 1
  done
  log "node c$i@localhost did not start; its output and log:"
  tail -n 40 "$BASE/n$i.out" >&2 || true
  tail -n 60 "$BASE/n$i/log/"*.log >&2 || true
  return 1
}

stop_all() {
  local i pid
  for i in "${NODES[@]}"; do
    if pid=$(node_pid "$i"); then kill -9 "$pid" 2>/dev/null || true; fi
  done
  # Let epmd notice the VMs are gone before a new start reuses the names.
  for _ in $(seq 1 50); do
    local alive=0
    for i in "${NODES[@]}"; do node_pid "$i" >/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  rm -rf "$BASE"
}

case "${1:-}" in
  start)
    stop_all
    mkdir -p "$BASE"
    launch 1
    await_node 1
    launch 2
    launch 3
    await_node 2
    await_node 3
    status=""
    for _ in $(seq 1 60); do
      status=$(ctl 1 cluster_status --formatter json 2>&1) || true
      running=$(grep -o '"running_nodes":\[[^]]*\]' <<<"$status" | grep -o '@localhost' | wc -l || true)
      [ "$running" = 3 ] && break
      sleep 1
    done
    if [ "$running" != 3 ]; then
      log "the cluster did not form three running nodes: $status"
      exit 1
    fi
    for i in "${NODES[@]}"; do echo "amqp://guest:guest@127.0.0.1:$((5780 + i))/%2f"; done
    ;;
  stop)
    stop_all
    ;;
  kill)
    i=${2:?node 1..3}
    pid=$(node_pid "$i") || { log "node c$i@localhost is not running"; exit 1; }
    kill -9 "$pid"
    ;;
  revive)
    i=${2:?node 1..3}
    launch "$i"
    await_node "$i"
    ;;
  pid)
    node_pid "${2:?node 1..3}"
    ;;
  logs)
    dir=${2:?target directory}
    rm -rf "$dir"
    mkdir -p "$dir"
    for i in "${NODES[@]}"; do
      [ -d "$BASE/n$i/log" ] && cp -r "$BASE/n$i/log" "$dir/n$i"
      [ -f "$BASE/n$i.out" ] && cp "$BASE/n$i.out" "$dir/n$i.out"
    done
    true
    ;;
  *)
    echo "usage: $0 start|stop|kill N|revive N|pid N|logs DIR" >&2
    exit 2
    ;;
esac
