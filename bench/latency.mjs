// Latency at a fixed rate, open loop: requests are scheduled at RATE per second whatever the
// server does, and each latency is measured from the moment the request was *due*, not from when
// it was sent, so a stall shows in the tail instead of silently lowering the rate (the
// "coordinated omission" that a closed-loop tool such as wrk hides). HTTPS, HTTP/1.1 keep-alive,
// undici Pool of CONNECTIONS connections. Prints one JSON line: { p50, p99, unit, rate, error? }.
// Usage: node bench/latency.mjs ORIGIN PATH RATE SECONDS WARMUP_SECONDS [CONNECTIONS=32]
import { Pool } from 'undici';

const [origin, path, rate, seconds, warmup, connections = '32'] = process.argv.slice(2);
const pool = new Pool(origin, {
  connections: Number(connections),
  pipelining: 1,
  connect: { rejectUnauthorized: false, servername: 'bench.localhost' },
});
const headers = { host: 'bench.localhost' };
const interval = 1000 / Number(rate);

async function runPhase(durationMs, record) {
  const latencies = [];
  let failed = 0;
  let lastError;
  const pending = [];
  const start = performance.now();
  let sent = 0;
  while (true) {
    const now = performance.now();
    if (now - start >= durationMs) break;
    const due = Math.floor((now - start) / interval);
    while (sent <= due) {
      const scheduled = start + sent * interval;
      sent++;
      pending.push(pool.request({ method: 'GET', path, headers }).then(async (response) => {
        await response.body.dump({ limit: Infinity });
        if (response.statusCode !== 200) throw new Error(`status ${response.statusCode}`);
        if (record) latencies.push(performance.now() - scheduled);
      }).catch((error) => { failed++; lastError = error.message; }));
    }
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  await Promise.all(pending);
  return { latencies, failed, sent, lastError };
}

const percentile = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];

await runPhase(Number(warmup) * 1000, false);
const { latencies, failed, sent, lastError } = await runPhase(Number(seconds) * 1000, true);
await pool.close();
latencies.sort((a, b) => a - b);
const result = latencies.length > 0 && failed <= sent * 0.01
  ? { p50: percentile(latencies, 50), p99: percentile(latencies, 99), unit: 'ms', rate: Number(rate) }
  : { p50: null, p99: null, unit: 'ms', rate: Number(rate), error: `${failed} of ${sent} failed${lastError ? `: ${lastError}` : ''}` };
process.stdout.write(`${JSON.stringify(result)}\n`);
