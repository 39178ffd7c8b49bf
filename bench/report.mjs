// Builds the Markdown results table from the lines run.sh recorded.
// Usage: node bench/report.mjs RESULTS_FILE SCENARIOS TARGETS
//   RESULTS_FILE lines: "#meta\tKEY\tVALUE" | "#target\tNAME" | "TARGET\tSCENARIO\tJSON"
// Cells: throughput (higher is better) or latency p50 / p99 (lower is better). The peers' cells
// carry their ratio to Gatehouse (peer ÷ Gatehouse) when both were measured.
import { readFileSync } from 'node:fs';

const [file, scenarioArg, targetArg] = process.argv.slice(2);
const scenarios = scenarioArg.split(',').filter(Boolean);
const targets = targetArg.split(',').filter(Boolean);

const TARGET_NAMES = { direct: 'Direct backend', gatehouse: 'Gatehouse', parts: 'Node + undici alone', nginx: 'nginx', caddy: 'Caddy', haproxy: 'HAProxy' };
const meta = {};
const results = new Map(); // "target scenario" -> result object
const cpu = new Map(); // "target scenario" -> [load CPU %, proxy CPU %]

for (const line of readFileSync(file, 'utf8').split('\n')) {
  if (!line) continue;
  const fields = line.split('\t');
  if (fields[0] === '#meta') meta[fields[1]] = fields[2];
  else if (fields[0] === '#cpu') cpu.set(`${fields[1]} ${fields[2]}`, [fields[3], fields[4]]);
  else if (fields[0].startsWith('#')) continue;
  else {
    let result;
    try { result = JSON.parse(fields[2]); } catch { result = { value: null, error: `unreadable result: ${fields[2]}` }; }
    results.set(`${fields[0]} ${fields[1]}`, result);
  }
}

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
const formatRate = (n) => Math.round(n).toLocaleString('en-US');
const formatMs = (n) => (n < 10 ? n.toFixed(2) : n.toFixed(1));

const notes = [];
function noteFor(reason) {
  let index = notes.indexOf(reason);
  if (index === -1) index = notes.push(reason) - 1;
  return `n/a [${index + 1}]`;
}

function cell(target, scenario) {
  const result = results.get(`${target} ${scenario}`);
  if (!result) return noteFor('not run');
  if (!measured(scenario, result)) return noteFor(`${TARGET_NAMES[target] ?? target}: ${result.error ?? 'no figure'}`);
  const base = results.get(`gatehouse ${scenario}`);
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
    const g = results.get(`gatehouse ${t.scenario}`);
    const c = results.get(`caddy ${t.scenario}`);
    if (!measured(t.scenario, g) || !measured(t.scenario, c)) continue;
    const ratio = g.value / c.value;
    // The same ratio for the parts-alone proxy (bench/parts-proxy.mjs): what Node's servers and
    // undici reach without any of Gatehouse's own code.
    const p = results.get(`parts ${t.scenario}`);
    const parts = measured(t.scenario, p) ? `${(p.value / c.value).toFixed(2)}×` : 'not run';
    lines.push(`| ${t.name} | Gatehouse ÷ Caddy ${ratio.toFixed(2)}× | ≥ ${t.min}× | ${ratio >= t.min ? 'met' : 'not met'} | ${parts} |`);
  }
  const lat = results.get('gatehouse latency');
  if (scenarios.includes('latency') && measured('latency', lat) && Number.isFinite(lat.added_p99)) {
    const p = results.get('parts latency');
    const parts = measured('latency', p) && Number.isFinite(p.added_p99) ? `${formatMs(p.added_p99)} ms at ${formatRate(p.rate)} req/s` : 'not run';
    lines.push(`| p99 added at ${formatRate(lat.rate)} req/s | ${formatMs(lat.added_p99)} ms | < 2 ms | ${lat.added_p99 < 2 ? 'met' : 'not met'} | ${parts} |`);
  }
  return lines;
}

const out = [];
out.push('# Gatehouse benchmark');
out.push('');
out.push(`${meta.date ?? ''} · ${meta.machine ?? ''} · ${meta.settings ?? ''}`);
out.push('');
out.push(`| Scenario | ${targets.map((t) => TARGET_NAMES[t] ?? t).join(' | ')} |`);
out.push(`|---|${targets.map(() => '---:').join('|')}|`);
for (const scenario of scenarios) {
  out.push(`| ${SCENARIO_NAMES[scenario] ?? scenario} | ${targets.map((t) => cell(t, scenario)).join(' | ')} |`);
}
out.push('');
out.push('Ratios in parentheses: that column ÷ Gatehouse (throughput: above 1 means faster than Gatehouse; ' +
  'latency: p99 ratio, below 1 means lower latency than Gatehouse). Only ratios from one run are comparable.');
const verdicts = targetLines();
if (verdicts.length > 0) {
  out.push('');
  out.push('Targets of the performance issue, in this run:');
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
  out.push(`| Scenario | ${targets.map((t) => TARGET_NAMES[t] ?? t).join(' | ')} |`);
  out.push(`|---|${targets.map(() => '---:').join('|')}|`);
  for (const scenario of scenarios) {
    const cells = targets.map((t) => { const c = cpu.get(`${t} ${scenario}`); return c ? `${c[0]} / ${c[1]}` : '–'; });
    out.push(`| ${scenario} | ${cells.join(' | ')} |`);
  }
}
if (notes.length > 0) {
  out.push('');
  notes.forEach((note, i) => out.push(`[${i + 1}] ${note}`));
}
process.stdout.write(`${out.join('\n')}\n`);
