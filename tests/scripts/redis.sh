#!/usr/bin/env bash
# The machine's Redis for the shared result store tests (tests/tests/shared_store.rs):
# redis-server on 127.0.0.1:6379, from the distribution's packages. Not managed by systemd
# (machines here have none): started detached by this script when it is not running.
# tests/run.sh calls `start` before its phases.
#
#   redis.sh start    installs redis-server if missing (apt-get), starts a server on
#                     127.0.0.1:6379 if nothing answers there (in memory only: no RDB, no
#                     AOF), waits until it answers PING. A Redis already running is left as
#                     it is (never restarted, reconfigured or flushed). Idempotent.
#   redis.sh status   exit 0 when 127.0.0.1:6379 answers PING, with its version
#   redis.sh stop     stops the server this script started (its pid file); a Redis started
#                     by anything else is left alone
#
# RMQ_TEST_REDIS_PORT (default 6379) and RMQ_TEST_REDIS_DIR (pid file, log) change where, for
# trying the script itself on a spare port.
#
# The tests' private servers (the outage and TLS tests) run on other ports, started and
# stopped by the tests themselves (tests/src/redis.rs); nothing here touches them.
set -euo pipefail

PORT=${RMQ_TEST_REDIS_PORT:-6379}
DIR=${RMQ_TEST_REDIS_DIR:-/var/lib/rmq-consumer-tests/redis}
PIDFILE=$DIR/redis.pid

log() { printf '[redis.sh] %s\n' "$*" >&2; }

up() { redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null | grep -q PONG; }

version() { redis-cli -h 127.0.0.1 -p "$PORT" info server 2>/dev/null | sed -n 's/^redis_version:\(.*\)\r\?$/\1/p' | tr -d '\r'; }

start() {
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    log "installing redis-server"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
  fi
  if up; then
    log "Redis $(version) already running on 127.0.0.1:$PORT (left as it is)"
    return 0
  fi
  mkdir -p "$DIR"
  log "starting redis-server on 127.0.0.1:$PORT"
  # Every descriptor redirected: the server must not hold the caller's output pipe open.
  redis-server --bind 127.0.0.1 --port "$PORT" --save '' --appendonly no \
    --daemonize yes --pidfile "$PIDFILE" --dir "$DIR" --logfile "$DIR/redis.log" \
    </dev/null >/dev/null 2>&1
  for _ in $(seq 1 50); do
    if up; then
      log "Redis $(version) ready on 127.0.0.1:$PORT"
      return 0
    fi
    sleep 0.2
  done
  log "redis-server does not answer on 127.0.0.1:$PORT (log: $DIR/redis.log)"
  return 1
}

status() {
  if up; then
    log "Redis $(version) running on 127.0.0.1:$PORT"
  else
    log "nothing answers PING on 127.0.0.1:$PORT (tests/scripts/redis.sh start)"
    return 1
  fi
}

stop() {
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    kill "$(cat "$PIDFILE")"
    rm -f "$PIDFILE"
    log "stopped the redis-server this script started"
  else
    log "no redis-server started by this script is running (a Redis started otherwise is left alone)"
  fi
}

case "${1:-}" in
  start) start ;;
  status | check) status ;;
  stop) stop ;;
  *)
    echo "usage: $0 start | status | stop" >&2
    exit 2
    ;;
esac
