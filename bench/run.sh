#!/usr/bin/env bash
# Gatehouse benchmark: the same backend reached directly, through Gatehouse, and through nginx,
# Caddy and HAProxy (each when installed). Proxies run one at a time, alone on one CPU; the
# backend and the load generators share the other. Prints a Markdown table and saves it to
# bench/results/latest.md. See bench/README.md.
#
# Environment:
#   BENCH_DURATION   seconds per measurement (default 10)
#   BENCH_WARMUP     seconds of warm-up before each measurement (default 2)
#   BENCH_SCENARIOS  comma list (default all): h1,h1-256k,h1-tls,h2,tls-new,ws,latency
#   BENCH_TARGETS    comma list (default all): direct,gatehouse,parts,nginx,caddy,haproxy
#                    (parts: bench/parts-proxy.mjs, Node's servers and undici without Gatehouse)
#   BENCH_RATE       requests/s of the latency scenario (default: half of the same target's h1-tls
#                    req/s in this run, or 1000 when h1-tls was not measured)
#   BENCH_ROUNDS     rounds (default 1): every target measured once per round, targets taking
#                    turns, so a slow spell of the machine falls on all of them; the table gives
#                    each figure's median over the rounds and the targets' median ratio
#   BENCH_INSTALL    0 = never apt-get install missing tools (default 1, as root only)
#   BENCH_CONGESTION TCP congestion control for the run (default: leave the machine's, e.g. bbr):
#                    as root, sets net.ipv4.tcp_congestion_control before anything starts and puts
#                    the old value back on exit. The one in force is recorded with the results.
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
# Node resolves ws and undici from the project's node_modules; gatehouse runs from here.
cd "$ROOT" || exit 1

RATE=${BENCH_RATE:-}
bench_settings 1 || exit 1
LATENCY_CONNECTIONS=32
WRK_CONNECTIONS=50
ALL_SCENARIOS=h1,h1-256k,h1-tls,h2,tls-new,ws,latency
ALL_TARGETS=direct,gatehouse,parts,nginx,caddy,haproxy
SCENARIOS=${BENCH_SCENARIOS:-$ALL_SCENARIOS}
TARGETS=${BENCH_TARGETS:-$ALL_TARGETS}

ensure_tools node:nodejs curl:curl openssl:openssl taskset:util-linux wrk:wrk h2load:nghttp2-client \
  nginx:nginx-light -- caddy:caddy haproxy:haproxy || exit 1

# Load generator and backend on CPU 0, the proxy under test alone on CPU 1.
CPU_LOAD=0
CPU_PROXY=1
if [ "$(nproc --all)" -lt 2 ]; then
  log "only one CPU: no pinning separation, figures mean even less"
  CPU_PROXY=0
fi

CONGESTION_SYSCTL=/proc/sys/net/ipv4/tcp_congestion_control
CONGESTION_BEFORE=
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-bench.XXXXXX")
cleanup() {
  stop_all
  rm -rf "$TMP"
  if [ -n "$CONGESTION_BEFORE" ]; then printf '%s\n' "$CONGESTION_BEFORE" > "$CONGESTION_SYSCTL"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The TCP congestion control every socket of the run gets (backend, proxies, load generators):
# with bbr on loopback (no qdisc), the backend paces its 256 KiB answers with kernel timers, and how
# often depends on when the proxy reads and ACKs (bench/README.md, "congestion control").
if [ -n "${BENCH_CONGESTION:-}" ]; then
  available=$(cat /proc/sys/net/ipv4/tcp_available_congestion_control 2>/dev/null)
  if ! grep -qw -- "$BENCH_CONGESTION" <<<"$available"; then
    log "BENCH_CONGESTION=$BENCH_CONGESTION: not one of: $available"; exit 1
  fi
  CONGESTION_BEFORE=$(cat "$CONGESTION_SYSCTL")
  if ! printf '%s\n' "$BENCH_CONGESTION" > "$CONGESTION_SYSCTL" 2>/dev/null; then
    log "BENCH_CONGESTION=$BENCH_CONGESTION: cannot write $CONGESTION_SYSCTL (root only)"; exit 1
  fi
  log "TCP congestion control $BENCH_CONGESTION for this run (was $CONGESTION_BEFORE)"
fi
CONGESTION=$(cat "$CONGESTION_SYSCTL" 2>/dev/null || echo unknown)

RESULTS=$TMP/results.tsv
: > "$RESULTS"

# The certificate, the bodies and the backend (CPU 0): nginx with one worker, and a WebSocket echo
# server (lib.sh).
setup_backend "$CPU_LOAD" || exit 1

printf '#meta\tdate\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" >> "$RESULTS"
printf '#meta\tmachine\t%s CPUs, %s\n' "$(nproc --all)" \
  "$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //' || uname -m)" >> "$RESULTS"
printf '#meta\tsettings\t%sduration %ss, warm-up %ss, TCP congestion control %s%s, latency rate %s\n' \
  "$([ "$ROUNDS" -gt 1 ] && echo "$ROUNDS rounds (medians), ")" "$DURATION" "$WARMUP" \
  "$CONGESTION" "$([ -n "$CONGESTION_BEFORE" ] && echo " (BENCH_CONGESTION)")" \
  "${RATE:+$RATE req/s}${RATE:-half of the h1-tls req/s of each target}" >> "$RESULTS"

# --- targets: start one, measure every scenario, stop it ---

# start_target NAME: sets TARGET_PLAIN, TARGET_TLS, TARGET_PID (empty for direct); sets REASON and
# returns 1 when the target cannot run.
start_target() {
  local name=$1
  TARGET_PID=
  case $name in
    direct)
      TARGET_PLAIN=$BACKEND_PORT; TARGET_TLS=$BACKEND_TLS_PORT; return 0 ;;
    gatehouse)
      render "$BENCH_DIR/templates/gatehouse.yaml" "$TMP/gatehouse.yaml"
      start_gatehouse "$CPU_PROXY" "$TMP/gatehouse.yaml" || return 1
      TARGET_PID=$STARTED_PID ;;
    parts)
      # The same parts as Gatehouse (node:http, node:http2, undici) and none of its own code, with
      # the same heap tuning: the ceiling Gatehouse's code is measured against.
      start parts "$CPU_PROXY" env GLIBC_TUNABLES="$NODE_GLIBC_TUNABLES" \
        node "$BENCH_DIR/parts-proxy.mjs" "$PLAIN_PORT" "$TLS_PORT" "$BACKEND_PORT" "$WS_PORT" "$CERT" "$KEY"
      TARGET_PID=$STARTED_PID ;;
    nginx)
      render "$BENCH_DIR/templates/nginx.conf" "$TMP/nginx.conf"
      start nginx "$CPU_PROXY" nginx -p "$TMP" -c "$TMP/nginx.conf" -e "$TMP/nginx-proxy-error.log"
      TARGET_PID=$STARTED_PID ;;
    caddy)
      start_caddy "$CPU_PROXY" 1 || return 1
      TARGET_PID=$STARTED_PID ;;
    haproxy)
      command -v haproxy >/dev/null || { REASON="haproxy not installed"; return 1; }
      render "$BENCH_DIR/templates/haproxy.cfg" "$TMP/haproxy.cfg"
      start haproxy "$CPU_PROXY" haproxy -db -f "$TMP/haproxy.cfg"
      TARGET_PID=$STARTED_PID ;;
    *) REASON="unknown target"; return 1 ;;
  esac
  TARGET_PLAIN=$PLAIN_PORT; TARGET_TLS=$TLS_PORT
  if ! wait_port "$TARGET_PLAIN" "$TARGET_PID" 20 || ! wait_port "$TARGET_TLS" "$TARGET_PID" 5; then
    REASON="did not start: $(tail -c 300 "$TMP/$name.out" | tr '\n' ' ')"
    return 1
  fi
}

is_tls_scenario() { case $1 in h1-tls|h2|tls-new|latency) return 0 ;; *) return 1 ;; esac; }

# result_value TARGET SCENARIO: the throughput recorded for it last in this run, i.e. in this round
# (integer), or nothing.
result_value() {
  node -e '
    const [file, target, scenario] = process.argv.slice(1);
    for (const line of require("node:fs").readFileSync(file, "utf8").split("\n")) {
      const f = line.split("\t");
      if (f[0] === target && f[1] === scenario) { try { const v = JSON.parse(f[2]).value; if (Number.isFinite(v)) console.log(Math.round(v)); } catch {} }
    }' "$RESULTS" "$1" "$2" | tail -n 1
}

# The latency scenario: p50/p99 at half of the target's own h1-tls saturation (from this run),
# then the direct backend at the same rate: what the proxy adds is p99(target) - p99(direct).
latency_scenario() {
  local rate=$RATE sat own direct
  if [ -z "$rate" ]; then
    sat=$(result_value "$TARGET_NAME" h1-tls)
    if [ -n "$sat" ] && [ "$sat" -ge 200 ]; then rate=$(( sat / 2 )); else rate=1000; fi
  fi
  own=$(latency_run "$TARGET_TLS" /1k "$rate" "$TARGET_NAME" | tail -n 1)
  if [ "$TARGET_NAME" = direct ]; then echo "$own"; return; fi
  direct=$(latency_run "$BACKEND_TLS_PORT" /1k "$rate" "$TARGET_NAME-direct" | tail -n 1)
  node -e '
    const own = JSON.parse(process.argv[1]);
    let direct; try { direct = JSON.parse(process.argv[2]); } catch { direct = { error: "no result" }; }
    if (Number.isFinite(own.p99) && Number.isFinite(direct.p99)) {
      Object.assign(own, { direct_p50: direct.p50, direct_p99: direct.p99, added_p99: own.p99 - direct.p99 });
    } else if (Number.isFinite(own.p99)) own.direct_error = direct.error ?? "no figure";
    console.log(JSON.stringify(own));' "$own" "$direct"
}

run_scenario() {  # run_scenario SCENARIO: prints one JSON result line.
  case $1 in
    h1)       wrk_run "http://127.0.0.1:$TARGET_PLAIN/1k" ;;
    h1-256k)  wrk_run "http://127.0.0.1:$TARGET_PLAIN/256k" ;;
    h1-tls)   h2load_run "$TARGET_TLS" /1k --h1 -c"$WRK_CONNECTIONS" -m1 ;;
    h2)       h2load_run "$TARGET_TLS" /1k -c16 -m16 ;;
    tls-new)  load node "$BENCH_DIR/tls-handshakes.mjs" 127.0.0.1 "$TARGET_TLS" /1k "$DURATION" "$WARMUP" ;;
    ws)       local ws_url="ws://127.0.0.1:$TARGET_PLAIN/ws"
              [ "$TARGET_NAME" = direct ] && ws_url="ws://127.0.0.1:$WS_PORT/ws"
              load node "$BENCH_DIR/ws-client.mjs" "$ws_url" "$DURATION" "$WARMUP" ;;
    latency)  latency_scenario ;;
    *)        echo '{"value":null,"error":"unknown scenario"}' ;;
  esac
}

IFS=, read -r -a target_list <<< "$TARGETS"
IFS=, read -r -a scenario_list <<< "$SCENARIOS"
for (( ROUND = 1; ROUND <= ROUNDS; ROUND++ )); do
  [ "$ROUNDS" -gt 1 ] && log "round $ROUND of $ROUNDS"
  for TARGET_NAME in "${target_list[@]}"; do
    printf '#target\t%s\n' "$TARGET_NAME" >> "$RESULTS"
    log "$TARGET_NAME: starting"
    if ! start_target "$TARGET_NAME"; then
      log "$TARGET_NAME: $REASON"
      for scenario in "${scenario_list[@]}"; do record_error "$TARGET_NAME" "$scenario" "$REASON"; done
      [ -n "$TARGET_PID" ] && stop "$TARGET_PID"
      continue
    fi
    plain_ok=; tls_ok=
    plain_ok=$(check "http://127.0.0.1:$TARGET_PLAIN/1k" 1024) && plain_ok=ok
    tls_ok=$(check "https://bench.localhost:$TARGET_TLS/1k" 1024 --http2 \
      --resolve "bench.localhost:$TARGET_TLS:127.0.0.1") && tls_ok=ok
    for scenario in "${scenario_list[@]}"; do
      if is_tls_scenario "$scenario"; then gate=$tls_ok; else gate=$plain_ok; fi
      if [ "$gate" != ok ]; then record_error "$TARGET_NAME" "$scenario" "$gate"; continue; fi
      if [ -n "$TARGET_PID" ] && ! kill -0 "$TARGET_PID" 2>/dev/null; then
        record_error "$TARGET_NAME" "$scenario" "the process exited: $(tail -c 200 "$TMP/$TARGET_NAME.out" | tr '\n' ' ')"
        continue
      fi
      log "$TARGET_NAME: $scenario"
      load_before=$(cpu_ticks "$CPU_LOAD"); proxy_before=$(cpu_ticks "$CPU_PROXY")
      line=$(run_scenario "$scenario" | tail -n 1)
      [ -n "$line" ] || line='{"value":null,"error":"the load generator printed nothing"}'
      record "$TARGET_NAME" "$scenario" "$line"
      # How busy each CPU was (warm-up included): which side was the bottleneck.
      printf '#cpu\t%s\t%s\t%s\t%s\t%s\n' "$TARGET_NAME" "$scenario" \
        "$(cpu_busy "$load_before" "$(cpu_ticks "$CPU_LOAD")")" "$(cpu_busy "$proxy_before" "$(cpu_ticks "$CPU_PROXY")")" "$ROUND" >> "$RESULTS"
    done
    [ -n "$TARGET_PID" ] && stop "$TARGET_PID"
  done
done

mkdir -p "$BENCH_DIR/results"
node "$BENCH_DIR/report.mjs" "$RESULTS" "$SCENARIOS" "$TARGETS" > "$BENCH_DIR/results/latest.md"
cat "$BENCH_DIR/results/latest.md"
