// Builds the Markdown results table from the lines run.sh recorded.
// Usage: node bench/report.mjs RESULTS_FILE SCENARIOS TARGETS
//   RESULTS_FILE lines: "#meta\tKEY\tVALUE" | "#target\tNAME" | "TARGET\tSCENARIO\tJSON\tROUND"
//   | "#cpu\tTARGET\tSCENARIO\tLOAD%\tPROXY%\tROUND" (ROUND absent in older files: 1)
// Cells: throughput (higher is better) or latency p50 / p99 (lower is better). The peers' cells
// carry their ratio to Gatehouse (peer ÷ Gatehouse) when both were measured. With several rounds
// (BENCH_ROUNDS), each cell is the median round of that target and scenario (its CPU figures are
// that round's), the targets table gives the median of the per-round ratios (each from figures
// measured minutes apart, not across the whole run), and a last table lists every round.
import { readFileSync } from 'node:fs';

const [file, scenarioArg, targetArg] = process.argv.slice(2);
const scenarios = scenarioArg.split(',').filter(Boolean);
const targets = targetArg.split(',').filter(Boolean);

const TARGET_NAMES = { direct: 'Direct backend', gatehouse: 'Gatehouse', parts: 'Node + undici alone', nginx: 'nginx', caddy: 'Caddy', haproxy: 'HAProxy' };
const meta = {};
const rounds = new Map(); // "target scenario" -> [{ round, result }] in the order measured
const cpu = new Map(); // "target scenario round" -> [load CPU %, proxy CPU %]

for (const line of readFileSync(file, 'utf8').split('\n')) {
  if (!line) continue;
  const fields = line.split('\t');
  if (fields[0] === '#meta') meta[fields[1]] = fields[2];
  else if (fields[0] === '#cpu') cpu.set(`${fields[1]} ${fields[2]} ${fields[5] ?? '1'}`, [fields[3], fields[4]]);
  else if (fields[0].startsWith('#')) continue;
  else {
    let result;
    try { result = JSON.parse(fields[2]); } catch { result = { value: null, error: `unreadable result: ${fields[2]}` }; }
    const key = `${fields[0]} ${fields[1]}`;
    if (!rounds.has(key)) rounds.set(key, []);
    rounds.get(key).push({ round: fields[3] ?? '1', result });
  }
}
const roundCount = Math.max(1, ...[...rounds.values()].map((list) => list.length));

const SCENARIO_NAMES = {
  h1: 'HTTP/1.1 plain, keep-alive, 1 KiB (req/s)',
  'h1-256k': 'HTTP/1.1 plain, keep-alive, 256 KiB (req/s)',
  'h1-tls': 'HTTPS HTTP/1.1, keep-alive, 1 KiB (req/s)',
  h2: 'HTTPS HTTP/2, 16 conns × 16 streams, 1 KiB (req/s)',
  'tls-new': 'New TLS connection per request (handshakes/s)',
  ws: 'WebSocket echo, 16 conns × 4 in flight (msg/s)',
  latency: 'Latency, HTTPS h1 at a fixed rate: p50 / p99 ms, p99 added over the direct backend at that rate, rate (lower is better)',
};

const isLatency = (scenario) => scenario === 'latency';
const measured = (scenario, result) => result && (isLatency(scenario) ? Number.isFinite(result.p99) : Number.isFinite(result.value));
/** What a round is ranked by: throughput, or the p99 added over the direct backend (else p99). */
const figure = (scenario, result) => (isLatency(scenario) ? (Number.isFinite(result.added_p99) ? result.added_p99 : result.p99) : result.value);

/** The median of numbers (the lower middle one of an even count: a figure that was measured). */
function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor((sorted.length - 1) / 2)];
}

/** The median round of a target and scenario ({ round, result }), or its last round when none has a figure. */
function pick(target, scenario) {
  const list = rounds.get(`${target} ${scenario}`);
  if (!list) return undefined;
  const ok = list.filter((r) => measured(scenario, r.result));
  if (ok.length === 0) return list.at(-1);
  const middle = median(ok.map((r) => figure(scenario, r.result)));
  return ok.find((r) => figure(scenario, r.result) === middle);
}

/** The result shown for a target and scenario (see pick). */
const shown = (target, scenario) => pick(target, scenario)?.result;

/**
 * Gatehouse ÷ Caddy (or parts ÷ Caddy) throughput: the median of the ratios of the rounds where
 * both were measured, each from the same round.
 */
function ratioOf(target, scenario) {
  const mine = rounds.get(`${target} ${scenario}`) ?? [];
  const caddy = rounds.get(`caddy ${scenario}`) ?? [];
  const ratios = [];
  for (const r of mine) {
    const c = caddy.find((x) => x.round === r.round);
    if (c && measured(scenario, r.result) && measured(scenario, c.result)) ratios.push(r.result.value / c.result.value);
  }
  return ratios.length === 0 ? undefined : median(ratios);
}
const formatRate = (n) => Math.round(n).toLocaleString('en-US');
const formatMs = (n) => (n < 10 ? n.toFixed(2) : n.toFixed(1));

const notes = [];
function noteFor(reason) {
  let index = notes.indexOf(reason);
  if (index === -1) index = notes.push(reason) - 1;
  return `n/a [${index + 1}]`;
}

function cell(target, scenario) {
  const result = shown(target, scenario);
  if (!result) return noteFor('not run');
  if (!measured(scenario, result)) return noteFor(`${TARGET_NAMES[target] ?? target}: ${result.error ?? 'no figure'}`);
  const base = shown('gatehouse', scenario);
  let text = isLatency(scenario) ? latencyText(result) : formatRate(result.value);
  if (target !== 'gatehouse' && measured(scenario, base)) {
    const ratio = isLatency(scenario) ? result.p99 / base.p99 : result.value / base.value;
    text += isLatency(scenario) ? ` (p99 ${ratio.toFixed(2)}×)` : ` (${ratio.toFixed(2)}×)`;
  }
  return text;
}

function latencyText(result) {
  let text = `${formatMs(result.p50)} / ${formatMs(result.p99)}`;
  if (Number.isFinite(result.added_p99)) text += `, +${formatMs(Math.max(0, result.added_p99))}`;
  return `${text} @ ${formatRate(result.rate)}/s`;
}

// The performance issue's targets, Gatehouse ÷ Caddy in this run (throughput) or p99 added (ms).
const TARGETS = [
  { scenario: 'h1', name: 'plain HTTP/1.1, 1 KiB', min: 1.5 },
  { scenario: 'h1-tls', name: 'HTTPS HTTP/1.1, 1 KiB', min: 1.5 },
  { scenario: 'h2', name: 'HTTPS HTTP/2', min: 2 },
  { scenario: 'h1-256k', name: '256 KiB bodies', min: 1 },
  { scenario: 'tls-new', name: 'handshakes/s', min: 1 },
];

function targetLines() {
  const lines = [];
  for (const t of TARGETS) {
    if (!scenarios.includes(t.scenario)) continue;
    const ratio = ratioOf('gatehouse', t.scenario);
    if (ratio === undefined) continue;
    // The same ratio for the parts-alone proxy (bench/parts-proxy.mjs): what Node's servers and
    // undici reach without any of Gatehouse's own code.
    const partsRatio = ratioOf('parts', t.scenario);
    const parts = partsRatio === undefined ? 'not run' : `${partsRatio.toFixed(2)}×`;
    lines.push(`| ${t.name} | Gatehouse ÷ Caddy ${ratio.toFixed(2)}× | ≥ ${t.min}× | ${ratio >= t.min ? 'met' : 'not met'} | ${parts} |`);
  }
  const lat = shown('gatehouse', 'latency');
  if (scenarios.includes('latency') && measured('latency', lat) && Number.isFinite(lat.added_p99)) {
    const p = shown('parts', 'latency');
    const parts = measured('latency', p) && Number.isFinite(p.added_p99) ? `${formatMs(p.added_p99)} ms at ${formatRate(p.rate)} req/s` : 'not run';
    lines.push(`| p99 added at ${formatRate(lat.rate)} req/s | ${formatMs(lat.added_p99)} ms | < 2 ms | ${lat.added_p99 < 2 ? 'met' : 'not met'} | ${parts} |`);
  }
  return lines;
}

/** The two head lines of a table with one column per target. */
function tableHead() {
  return [`| Scenario | ${targets.map((t) => TARGET_NAMES[t] ?? t).join(' | ')} |`, `|---|${targets.map(() => '---:').join('|')}|`];
}

const out = [];
out.push('# Gatehouse benchmark');
out.push('');
out.push(`${meta.date ?? ''} · ${meta.machine ?? ''} · ${meta.settings ?? ''}`);
out.push('');
out.push(...tableHead());
for (const scenario of scenarios) {
  out.push(`| ${SCENARIO_NAMES[scenario] ?? scenario} | ${targets.map((t) => cell(t, scenario)).join(' | ')} |`);
}
out.push('');
out.push('Ratios in parentheses: that column ÷ Gatehouse (throughput: above 1 means faster than Gatehouse; ' +
  'latency: p99 ratio, below 1 means lower latency than Gatehouse). Only ratios from one run are comparable.');
const verdicts = targetLines();
if (verdicts.length > 0) {
  out.push('');
  out.push(roundCount > 1
    ? `Targets of the performance issue, in this run (median of the ${roundCount} rounds' ratios):`
    : 'Targets of the performance issue, in this run:');
  out.push('');
  out.push('| Target | Measured | Wanted | | Node + undici alone, same measure |');
  out.push('|---|---:|---:|---|---:|');
  out.push(...verdicts);
}
if (cpu.size > 0) {
  out.push('');
  out.push('CPU busy during each measurement, load CPU / proxy CPU (%). A proxy well below 100% was not the');
  out.push('bottleneck: the load generator or the backend on the other CPU was, so that figure is a floor.');
  out.push('');
  out.push(...tableHead());
  for (const scenario of scenarios) {
    const cells = targets.map((t) => {
      const chosen = pick(t, scenario);
      const c = chosen && cpu.get(`${t} ${scenario} ${chosen.round}`);
      return c ? `${c[0]} / ${c[1]}` : '–';
    });
    out.push(`| ${scenario} | ${cells.join(' | ')} |`);
  }
}
if (roundCount > 1) {
  out.push('');
  out.push('Every round, in order (req/s or msg/s; latency: p99 added in ms); the tables above give the median.');
  out.push('');
  out.push(...tableHead());
  for (const scenario of scenarios) {
    const cells = targets.map((t) => (rounds.get(`${t} ${scenario}`) ?? [])
      .map((r) => (measured(scenario, r.result) ? (isLatency(scenario) ? formatMs(figure(scenario, r.result)) : formatRate(r.result.value)) : 'n/a'))
      .join(' · ') || '–');
    out.push(`| ${scenario} | ${cells.join(' | ')} |`);
  }
}
if (notes.length > 0) {
  out.push('');
  notes.forEach((note, i) => out.push(`[${i + 1}] ${note}`));
}
process.stdout.write(`${out.join('\n')}\n`);
