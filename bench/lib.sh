# Helpers for bench/run.sh and bench/workers.sh: logging, free ports, process start/stop by pid,
# config rendering, the backend, load generators and their output parsing. Sourced, not run.

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# bench_settings DEFAULT_ROUNDS: DURATION, WARMUP and ROUNDS from BENCH_DURATION (10 s),
# BENCH_WARMUP (2 s) and BENCH_ROUNDS (DEFAULT_ROUNDS); returns 1 when ROUNDS is no whole number.
bench_settings() {
  DURATION=${BENCH_DURATION:-10}
  WARMUP=${BENCH_WARMUP:-2}
  ROUNDS=${BENCH_ROUNDS:-$1}
  [[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { log "BENCH_ROUNDS must be a whole number >= 1, not '$ROUNDS'"; return 1; }
}

# Install what is missing (Debian/Ubuntu, as root), unless BENCH_INSTALL=0.
# Usage: ensure_tools REQUIRED_CMD:PACKAGE... -- OPTIONAL_CMD:PACKAGE...
ensure_tools() {
  local missing=() spec required=1
  for spec in "$@"; do
    if [ "$spec" = "--" ]; then required=0; continue; fi
    command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
  done
  if [ "${#missing[@]}" -gt 0 ] && [ "${BENCH_INSTALL:-1}" = "1" ] && command -v apt-get >/dev/null 2>&1 \
      && [ "$(id -u)" = "0" ]; then
    log "installing ${missing[*]}"
    apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 || log "apt-get failed; continuing with what is installed"
  fi
  required=1
  for spec in "$@"; do
    if [ "$spec" = "--" ]; then required=0; continue; fi
    if ! command -v "${spec%%:*}" >/dev/null 2>&1; then
      if [ "$required" = 1 ]; then log "missing required tool: ${spec%%:*} (Debian package ${spec#*:})"; return 1; fi
      log "not installed, skipped: ${spec%%:*}"
    fi
  done
}

# Print N free TCP ports on 127.0.0.1 (the kernel picks them; all held open until all are known).
free_ports() {
  node -e '
    const net = require("node:net");
    const n = Number(process.argv[1]); const servers = []; const ports = [];
    const next = () => {
      if (ports.length === n) { for (const s of servers) s.close(); console.log(ports.join(" ")); return; }
      const s = net.createServer(); servers.push(s);
      s.listen(0, "127.0.0.1", () => { ports.push(s.address().port); next(); });
    };
    next();' "$1"
}

# Substitute @NAME@ placeholders from the environment-like variables of this script.
render() {
  sed -e "s#@TMP@#${TMP}#g" \
      -e "s#@CERT@#${CERT}#g" -e "s#@KEY@#${KEY}#g" -e "s#@PEM@#${PEM}#g" \
      -e "s#@BACKEND_PORT@#${BACKEND_PORT}#g" -e "s#@BACKEND_TLS_PORT@#${BACKEND_TLS_PORT}#g" \
      -e "s#@WS_PORT@#${WS_PORT}#g" -e "s#@PLAIN_PORT@#${PLAIN_PORT}#g" -e "s#@TLS_PORT@#${TLS_PORT}#g" \
      "$1" > "$2"
}

# Every process we start, by pid, so the EXIT trap can stop them all.
PIDS=()

# start NAME CPU COMMAND...: run COMMAND pinned to CPU in the background; its pid in STARTED_PID.
start() {
  local name=$1 cpu=$2; shift 2
  taskset -c "$cpu" "$@" >"$TMP/$name.out" 2>&1 </dev/null &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
}

# GLIBC_TUNABLES of the Node proxies under test (Gatehouse, parts), as deployed (README: systemd
# unit, Docker image): glibc's heap trim threshold at 64 MiB. Node >= 22.15 sets it by itself;
# Node 20 needs it in the environment. BENCH_GLIBC_TUNABLES overrides it
# ("glibc.malloc.trim_threshold=131072" is glibc's default).
NODE_GLIBC_TUNABLES=${BENCH_GLIBC_TUNABLES:-glibc.malloc.trim_threshold=67108864}

# start_gatehouse CPU CONFIG: dist/cli.js serving CONFIG on CPU; its pid in STARTED_PID. Sets
# REASON and returns 1 when it is not built.
start_gatehouse() {
  [ -f "$ROOT/dist/cli.js" ] || { REASON="dist/cli.js missing (run npm run build)"; return 1; }
  start gatehouse "$1" env GLIBC_TUNABLES="$NODE_GLIBC_TUNABLES" node "$ROOT/dist/cli.js" run --config "$2"
}

# start_caddy CPU GOMAXPROCS: Caddy serving templates/Caddyfile on CPU, its state under $TMP; its
# pid in STARTED_PID. Sets REASON and returns 1 when it is not installed.
start_caddy() {
  command -v caddy >/dev/null || { REASON="caddy not installed"; return 1; }
  render "$BENCH_DIR/templates/Caddyfile" "$TMP/Caddyfile"
  mkdir -p "$TMP/caddy-home"
  start caddy "$1" env GOMAXPROCS="$2" HOME="$TMP/caddy-home" XDG_DATA_HOME="$TMP/caddy-home" \
    XDG_CONFIG_HOME="$TMP/caddy-home" caddy run --config "$TMP/Caddyfile" --adapter caddyfile
}

# stop PID: SIGTERM, then SIGKILL after 5 s; waits for it to be gone.
stop() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}

stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do stop "$pid"; done
  PIDS=()
}

# wait_port PORT PID [SECONDS=15]: until 127.0.0.1:PORT accepts, or PID exits, or the time is up.
wait_port() {
  local port=$1 pid=$2 deadline=$(( SECONDS + ${3:-15} ))
  while [ "$SECONDS" -lt "$deadline" ]; do
    kill -0 "$pid" 2>/dev/null || return 1
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# check URL EXPECTED_SIZE [CURL ARGS...]: one request must answer 200 with the full body.
# Prints the reason when it does not.
check() {
  local url=$1 size=$2 got; shift 2
  got=$(curl -sk --max-time 5 -o /dev/null -w '%{http_code} %{size_download}' "$@" "$url" 2>&1) || true
  [ "$got" = "200 $size" ] && return 0
  echo "check of $url answered '${got:-nothing}'"
  return 1
}

# A JSON string literal of $1 (quotes, backslashes and control characters escaped).
json_string() {
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  s=$(printf '%s' "$s" | tr '\n\t\r' '   ')
  printf '"%s"' "$s"
}

# record TARGET SCENARIO JSON: one result line for report.mjs, with the round (ROUND, default 1).
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${ROUND:-1}" >> "$RESULTS"; }
record_error() { record "$1" "$2" "{\"value\":null,\"error\":$(json_string "$3")}"; }

# wrk and h2load print text; parse it into the JSON result line.
parse() { node "$BENCH_DIR/parse-output.mjs" "$@"; }

# The load generator, always on the load CPU.
load() { taskset -c "$CPU_LOAD" "$@"; }

wrk_run() {  # wrk_run URL [WRK ARGS...]: warm-up, then the measured run.
  local url=$1; shift
  load wrk -t1 -c"$WRK_CONNECTIONS" -d"${WARMUP}s" "$@" "$url" >/dev/null 2>&1
  load wrk -t1 -c"$WRK_CONNECTIONS" -d"${DURATION}s" "$@" "$url" 2>&1 | parse wrk
}

# h2load_run TLS_PORT PATH [H2LOAD ARGS...]: warm-up included. The URL names bench.localhost, so
# SNI and :authority/Host are right, and --connect-to sends it to 127.0.0.1. (wrk would send the
# IP as SNI, which a server may rightly answer with 421 Misdirected Request.)
h2load_run() {
  local port=$1 path=$2; shift 2
  load h2load -D "$DURATION" --warm-up-time="$WARMUP" "$@" \
    --connect-to="127.0.0.1:$port" "https://bench.localhost:$port$path" 2>&1 | parse h2load
}

# latency_run TLS_PORT PATH RATE NAME: HTTPS HTTP/1.1 at a fixed RATE (req/s in all) over
# LATENCY_CONNECTIONS keep-alive connections (h2load --rps per connection), warm-up included;
# percentiles from h2load's per-request log (bench/latency-stats.mjs). NAME names the files kept in $TMP.
latency_run() {
  local port=$1 path=$2 rate=$3 name=$4 per
  per=$(( (rate + LATENCY_CONNECTIONS - 1) / LATENCY_CONNECTIONS ))
  rm -f "$TMP/$name.latency.log"
  load h2load --h1 -c"$LATENCY_CONNECTIONS" -m1 --rps="$per" -D "$DURATION" --warm-up-time="$WARMUP" \
    --log-file="$TMP/$name.latency.log" --connect-to="127.0.0.1:$port" "https://bench.localhost:$port$path" \
    > "$TMP/$name.latency.out" 2>&1
  node "$BENCH_DIR/latency-stats.mjs" "$TMP/$name.latency.log" "$(( per * LATENCY_CONNECTIONS ))" "$TMP/$name.latency.out"
}

# cpu_ticks CPU: "busy total" jiffies of one CPU from /proc/stat (empty when unavailable).
cpu_ticks() {
  awk -v cpu="cpu$1" '$1 == cpu { total = 0; for (i = 2; i <= NF; i++) total += $i; print total - $5 - $6, total }' \
    /proc/stat 2>/dev/null
}

# cpu_busy BEFORE AFTER: percent busy between two cpu_ticks snapshots ("?" when unknown).
cpu_busy() {
  local b0 t0 b1 t1
  read -r b0 t0 <<< "$1"; read -r b1 t1 <<< "$2"
  if [ -n "$t0" ] && [ -n "$t1" ] && [ "$t1" -gt "$t0" ]; then echo $(( 100 * (b1 - b0) / (t1 - t0) )); else echo '?'; fi
}

# setup_backend CPU: in $TMP, one self-signed ECDSA P-256 certificate for bench.localhost (CERT,
# KEY, PEM: used by every TLS listener), the bodies the backend serves (www/1k, www/256k), five
# free ports (BACKEND_PORT, BACKEND_TLS_PORT, WS_PORT, PLAIN_PORT, TLS_PORT), and on CPU the
# backend: nginx with one worker (BACKEND_PID) and a WebSocket echo server (WS_PID). Logs why and
# returns 1 when any of it fails.
setup_backend() {
  local cpu=$1 reason
  CERT=$TMP/bench.localhost.crt
  KEY=$TMP/bench.localhost.key
  PEM=$TMP/bench.localhost.pem
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 \
    -subj /CN=bench.localhost -addext subjectAltName=DNS:bench.localhost \
    -keyout "$KEY" -out "$CERT" >/dev/null 2>&1 || { log "openssl could not make a certificate"; return 1; }
  cat "$CERT" "$KEY" > "$PEM"

  mkdir -p "$TMP/www"
  head -c 1024 /dev/urandom > "$TMP/www/1k"
  head -c 262144 /dev/urandom > "$TMP/www/256k"
  # nginx workers run as an unprivileged user when started as root: they must reach the files.
  chmod 755 "$TMP"
  chmod 644 "$TMP/www/"*

  read -r BACKEND_PORT BACKEND_TLS_PORT WS_PORT PLAIN_PORT TLS_PORT < <(free_ports 5)

  render "$BENCH_DIR/templates/backend-nginx.conf" "$TMP/backend-nginx.conf"
  start backend "$cpu" nginx -p "$TMP" -c "$TMP/backend-nginx.conf" -e "$TMP/backend-error.log"
  BACKEND_PID=$STARTED_PID
  start ws-echo "$cpu" node "$BENCH_DIR/ws-echo.mjs" "$WS_PORT"
  WS_PID=$STARTED_PID
  if ! wait_port "$BACKEND_PORT" "$BACKEND_PID" || ! wait_port "$WS_PORT" "$WS_PID"; then
    log "the backend did not start:"; cat "$TMP/backend.out" "$TMP/ws-echo.out" >&2; return 1
  fi
  if reason=$(check "http://127.0.0.1:$BACKEND_PORT/1k" 1024); then :; else log "backend: $reason"; return 1; fi
}
