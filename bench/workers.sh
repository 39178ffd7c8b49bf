#!/usr/bin/env bash
# Several workers: Gatehouse with `workers: 1` and `workers: 2`, and Caddy with GOMAXPROCS=1 and
# GOMAXPROCS=2, each in front of the same backend as bench/run.sh. Nothing is pinned: the proxy,
# the backend and the load generators share every CPU, as they do when the load comes from the same
# machine, so the figures are a floor and the scaling is what this machine shows, not a core's
# worth. Prints a Markdown table and saves it to bench/results/workers.md. See bench/README.md.
#
# Environment:
#   BENCH_DURATION   seconds per measurement (default 10)
#   BENCH_WARMUP     seconds of warm-up before each measurement (default 2)
#   BENCH_ROUNDS     rounds (default 2): every variant measured once per round, taking turns; the
#                    table gives each figure's median over the rounds
#   BENCH_TARGETS    comma list (default gatehouse,caddy)
#   BENCH_INSTALL    0 = never apt-get install missing tools (default 1, as root only)
#   BENCH_GLIBC_TUNABLES  GLIBC_TUNABLES of Gatehouse (default: the trim threshold at 64 MiB, lib.sh)
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
cd "$ROOT" || exit 1

TARGETS=${BENCH_TARGETS:-gatehouse,caddy}
bench_settings 2 || exit 1
SCENARIOS=(h1 h1-tls h2 tls-new)
# Every CPU: "pinned" to all of them is not pinned at all (lib.sh's start and load take a CPU list).
CPUS=$(nproc --all)
CPU_LOAD="0-$(( CPUS - 1 ))"
PROCS=(1 2)

ensure_tools node:nodejs curl:curl openssl:openssl taskset:util-linux wrk:wrk h2load:nghttp2-client \
  nginx:nginx-light -- caddy:caddy || exit 1
[ "$CPUS" -ge 2 ] || log "only one CPU: a second worker has no core of its own"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-workers.XXXXXX")
cleanup() { stop_all; rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

RESULTS=$TMP/results.tsv
: > "$RESULTS"
setup_backend "$CPU_LOAD" || exit 1

# start_variant TARGET N: Gatehouse with `workers: N` or Caddy with GOMAXPROCS=N; TARGET_PID.
start_variant() {
  local target=$1 n=$2
  case $target in
    gatehouse)
      # Busy polling off: the cores are shared, and a spinning worker would take the load
      # generator's time.
      render "$BENCH_DIR/templates/gatehouse.yaml" "$TMP/gatehouse.yaml"
      sed -i -e 's/^busy_polling: .*/busy_polling: 0/' "$TMP/gatehouse.yaml"
      printf 'workers: %s\n' "$n" >> "$TMP/gatehouse.yaml"
      start_gatehouse "$CPU_LOAD" "$TMP/gatehouse.yaml" || return 1
      TARGET_PID=$STARTED_PID ;;
    caddy)
      start_caddy "$CPU_LOAD" "$n" || return 1
      TARGET_PID=$STARTED_PID ;;
    *) REASON="unknown target"; return 1 ;;
  esac
  if ! wait_port "$PLAIN_PORT" "$TARGET_PID" 20 || ! wait_port "$TLS_PORT" "$TARGET_PID" 5; then
    REASON="did not start: $(tail -c 300 "$TMP/$target.out" | tr '\n' ' ')"; return 1
  fi
  if REASON=$(check "http://127.0.0.1:$PLAIN_PORT/1k" 1024) \
    && REASON=$(check "https://bench.localhost:$TLS_PORT/1k" 1024 --http2 --resolve "bench.localhost:$TLS_PORT:127.0.0.1"); then
    return 0
  fi
  return 1
}

# handshakes: one client process per CPU (one Node client is a single thread and would cap the
# figure at what one core can open), their handshakes/s added up.
handshakes() {
  local i pids=()
  for (( i = 0; i < CPUS; i++ )); do
    load node "$BENCH_DIR/tls-handshakes.mjs" 127.0.0.1 "$TLS_PORT" /1k "$DURATION" "$WARMUP" 16 > "$TMP/handshakes.$i" &
    pids+=("$!")
  done
  wait "${pids[@]}"
  node -e '
    let sum = 0; let error;
    for (const file of process.argv.slice(1)) {
      let r; try { r = JSON.parse(require("node:fs").readFileSync(file, "utf8").trim().split("\n").pop()); } catch { r = { error: `no result in ${file}` }; }
      if (Number.isFinite(r.value)) sum += r.value; else error ??= r.error ?? "no figure";
    }
    console.log(JSON.stringify(error ? { value: null, error } : { value: sum, unit: "handshakes/s" }));' "$TMP"/handshakes.*
}

measure() {  # measure SCENARIO: one JSON result line.
  case $1 in
    h1)      load wrk -t"$CPUS" -c100 -d"${WARMUP}s" "http://127.0.0.1:$PLAIN_PORT/1k" >/dev/null 2>&1
             load wrk -t"$CPUS" -c100 -d"${DURATION}s" "http://127.0.0.1:$PLAIN_PORT/1k" 2>&1 | parse wrk ;;
    h1-tls)  h2load_run "$TLS_PORT" /1k --h1 -t"$CPUS" -c100 -m1 ;;
    h2)      h2load_run "$TLS_PORT" /1k -t"$CPUS" -c32 -m16 ;;
    tls-new) handshakes ;;
  esac
}

IFS=, read -r -a target_list <<< "$TARGETS"
for (( ROUND = 1; ROUND <= ROUNDS; ROUND++ )); do
  [ "$ROUNDS" -gt 1 ] && log "round $ROUND of $ROUNDS"
  for target in "${target_list[@]}"; do
    for n in "${PROCS[@]}"; do
      log "$target $n: starting"
      TARGET_PID=
      if ! start_variant "$target" "$n"; then
        log "$target $n: $REASON"
        for scenario in "${SCENARIOS[@]}"; do record_error "$target:$n" "$scenario" "$REASON"; done
      else
        for scenario in "${SCENARIOS[@]}"; do
          log "$target $n: $scenario"
          line=$(measure "$scenario" | tail -n 1)
          [ -n "$line" ] || line='{"value":null,"error":"the load generator printed nothing"}'
          record "$target:$n" "$scenario" "$line"
        done
      fi
      [ -n "$TARGET_PID" ] && stop "$TARGET_PID"
    done
  done
done

mkdir -p "$BENCH_DIR/results"
{
  printf '# Several workers\n\n%s · %s CPUs, %s · %s rounds (medians), duration %ss, warm-up %ss, TCP congestion control %s, nothing pinned\n\n' \
    "$(date -u '+%Y-%m-%d %H:%M UTC')" "$CPUS" "$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //')" \
    "$ROUNDS" "$DURATION" "$WARMUP" "$(cat /proc/sys/net/ipv4/tcp_congestion_control 2>/dev/null || echo unknown)"
  node - "$RESULTS" "$TARGETS" "$CPUS" <<'EOF'
const [file, targets, cpus] = process.argv.slice(2);
const names = { gatehouse: ['Gatehouse', 'workers: '], caddy: ['Caddy', 'GOMAXPROCS='] };
const scenarios = {
  h1: 'HTTP/1.1 plain, keep-alive, 1 KiB, wrk 100 conns (req/s)',
  'h1-tls': 'HTTPS HTTP/1.1, keep-alive, 1 KiB, 100 conns (req/s)',
  h2: 'HTTPS HTTP/2, 32 conns × 16 streams, 1 KiB (req/s)',
  'tls-new': `New TLS connection per request, ${cpus} clients × 16 (handshakes/s)`,
};
const values = new Map();
// Why a measurement gave no figure: the first reason per variant and scenario, shown as a
// numbered note under the tables (as run.sh's report does).
const errors = new Map();
for (const line of require('node:fs').readFileSync(file, 'utf8').split('\n')) {
  const [variant, scenario, json] = line.split('\t');
  if (!json) continue;
  const key = `${variant} ${scenario}`;
  if (!values.has(key)) values.set(key, []);
  let result; try { result = JSON.parse(json); } catch { result = { value: null, error: `unreadable result: ${json}` }; }
  const ok = Number.isFinite(result.value);
  values.get(key).push(ok ? result.value : null);
  if (!ok && !errors.has(key)) errors.set(key, `${variant.split(':')[0]}: ${result.error ?? 'no figure'}`);
}
const notes = [];
const failed = (key) => {
  const reason = errors.get(key) ?? `${key.split(':')[0]}: not run`;
  let index = notes.indexOf(reason);
  if (index === -1) index = notes.push(reason) - 1;
  return `failed [${index + 1}]`;
};
const median = (xs) => {
  const s = xs.filter((x) => x !== null).sort((a, b) => a - b);
  if (s.length === 0) return null;
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const fmt = (x, key) => (x === null ? failed(key) : Math.round(x).toLocaleString('en-US'));
const head = ['Scenario'];
for (const t of targets.split(',')) {
  const [name, knob] = names[t] ?? [t, ''];
  head.push(`${name} ${knob}1`, `${name} ${knob}2`, `${name} 2 ÷ 1`);
}
const rows = [head, head.map((_, i) => (i === 0 ? '---' : '---:'))];
const perRound = [];
for (const [scenario, label] of Object.entries(scenarios)) {
  const row = [label];
  const rounds = [scenario];
  for (const t of targets.split(',')) {
    const keyOne = `${t}:1 ${scenario}`; const keyTwo = `${t}:2 ${scenario}`;
    const one = values.get(keyOne) ?? [];
    const two = values.get(keyTwo) ?? [];
    const a = median(one); const b = median(two);
    row.push(fmt(a, keyOne), fmt(b, keyTwo), a && b ? `${(b / a).toFixed(2)}×` : '–');
    rounds.push(one.map((x) => fmt(x, keyOne)).join(' · '), two.map((x) => fmt(x, keyTwo)).join(' · '));
  }
  rows.push(row);
  perRound.push(rounds);
}
console.log(rows.map((r) => `| ${r.join(' | ')} |`).join('\n'));
console.log('\nEvery round, in order:\n');
const rhead = ['Scenario'];
for (const t of targets.split(',')) { const [name, knob] = names[t] ?? [t, '']; rhead.push(`${name} ${knob}1`, `${name} ${knob}2`); }
console.log([rhead, rhead.map((_, i) => (i === 0 ? '---' : '---:')), ...perRound].map((r) => `| ${r.join(' | ')} |`).join('\n'));
if (notes.length > 0) console.log(`\n${notes.map((note, i) => `[${i + 1}] ${note}`).join('\n')}`);
EOF
} > "$BENCH_DIR/results/workers.md"
cat "$BENCH_DIR/results/workers.md"
