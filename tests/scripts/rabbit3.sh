#!/usr/bin/env bash
# The machine's own RabbitMQ (3.10 from the distribution's packages, node rabbit@localhost):
# AMQP on 127.0.0.1:5672, management API on 15672, guest/guest. The default test broker
# (RMQ_TEST_BROKER=rabbit3); tests/run.sh and .ci/run call `start`.
#
#   rabbit3.sh start     installs rabbitmq-server if missing (apt-get), starts the node if it
#                        is down, starts its application if a test left it stopped, enables
#                        the management plugin, restores the memory watermark a fault test may
#                        have changed, and waits until the management API answers. Idempotent.
#   rabbit3.sh check     exit 0 when the node runs, its app is up and the API answers
#   rabbit3.sh stop      stops the node
#   rabbit3.sh ctl ARGS  rabbitmqctl ARGS against the node
set -euo pipefail

MANAGEMENT=http://127.0.0.1:15672

log() { printf '[rabbit3.sh] %s\n' "$*" >&2; }

api_up() { curl -fsS -m 5 -u guest:guest "$MANAGEMENT/api/overview" >/dev/null 2>&1; }

start() {
  if ! command -v rabbitmqctl >/dev/null 2>&1; then
    log "installing rabbitmq-server"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  if ! rabbitmqctl ping >/dev/null 2>&1; then
    log "starting RabbitMQ"
    # Every descriptor redirected: the node must not hold the caller's output pipe open.
    rabbitmq-server -detached </dev/null >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do
      rabbitmqctl ping >/dev/null 2>&1 && break
      sleep 1
    done
  fi
  # A fault test may have left the app stopped.
  if ! rabbitmqctl await_startup --timeout 5 >/dev/null 2>&1; then
    log "starting the stopped application"
    rabbitmqctl start_app >/dev/null 2>&1 || true
  fi
  rabbitmqctl await_startup --timeout 120 >/dev/null
  rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null
  # Restore a setting a fault test (F11) may have changed.
  rabbitmqctl set_vm_memory_high_watermark 0.4 >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do
    if api_up; then
      log "RabbitMQ $(rabbitmqctl version 2>/dev/null || echo '?') ready on 5672, management on 15672"
      return 0
    fi
    sleep 1
  done
  log "the management API does not answer on $MANAGEMENT"
  return 1
}

check() {
  rabbitmqctl await_startup --timeout 5 >/dev/null 2>&1 || {
    log "node rabbit@localhost is not running (or its application is stopped)"
    return 1
  }
  api_up || {
    log "the management API does not answer on $MANAGEMENT"
    return 1
  }
  log "RabbitMQ $(rabbitmqctl version 2>/dev/null || echo '?') running"
}

case "${1:-}" in
  start) start ;;
  check) check ;;
  stop) rabbitmqctl stop ;;
  ctl)
    shift
    exec rabbitmqctl "$@"
    ;;
  *)
    echo "usage: $0 start | check | stop | ctl ARGS..." >&2
    exit 2
    ;;
esac
