// Latency percentiles from an h2load --log-file (one tab-separated line per request: start time
// in µs since the epoch, status code, µs until the end of the response). Prints one JSON line:
// { p50, p99, p999, unit: 'ms', rate, requests, error? }. A run with more than 1% of requests
// failed or not 2xx is an error, like the throughput scenarios (bench/parse-output.mjs).
// Usage: node bench/latency-stats.mjs LOG_FILE RATE H2LOAD_OUTPUT_FILE
import { readFileSync } from 'node:fs';

const [logFile, rate, outputFile] = process.argv.slice(2);
let lines = [];
try {
  lines = readFileSync(logFile, 'utf8').split('\n').filter(Boolean);
} catch {
  // no log: h2load failed; its output says why
}
const latencies = [];
let bad = 0;
for (const line of lines) {
  const [, status, micros] = line.split('\t');
  if (status >= '200' && status < '300' && status.length === 3) latencies.push(Number(micros) / 1000);
  else bad++;
}
const started = Number(/requests: (\d+) total/.exec(readOutput())?.[1] ?? lines.length);
latencies.sort((a, b) => a - b);
const percentile = (p) => latencies[Math.min(latencies.length - 1, Math.ceil(p * latencies.length) - 1)];
const missing = Math.max(0, started - lines.length);
const result = latencies.length > 0 && bad + missing <= started * 0.01
  ? { p50: percentile(0.5), p99: percentile(0.99), p999: percentile(0.999), unit: 'ms', rate: Number(rate), requests: latencies.length }
  : { p50: null, p99: null, unit: 'ms', rate: Number(rate), error: latencies.length === 0 ? `h2load: ${lastLines()}` : `${bad + missing} of ${started} requests failed or not 2xx` };
process.stdout.write(`${JSON.stringify(result)}\n`);

function readOutput() {
  try { return readFileSync(outputFile, 'utf8'); } catch { return ''; }
}
function lastLines() {
  return readOutput().trim().split('\n').slice(-2).join(' ').slice(0, 200) || 'no output';
}
