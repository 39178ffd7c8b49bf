/**
 * A two-worker node:cluster for test/cluster-metrics.test.ts, with the real metrics and the real
 * aggregation: worker N counts (N + 1) × 10 finished requests, 2xx; worker 1 then asks for the
 * aggregated text and prints it on stdout as one JSON line; the primary exits with it.
 */
import cluster from 'node:cluster';
import { Metrics } from '../../src/observability/metrics.ts';
import { clusterMetricsText, serveClusterMetrics, shareWorkerMetrics } from '../../src/observability/cluster-metrics.ts';

if (cluster.isPrimary) {
  serveClusterMetrics();
  let ready = 0;
  const workers = [0, 1].map((index) => cluster.fork({ FIXTURE_WORKER: String(index) }));
  for (const worker of workers) {
    worker.on('message', (message: { fixture?: string; text?: string }) => {
      if (message.fixture === 'ready' && ++ready === 2) workers[1]!.send({ fixture: 'scrape' });
      if (message.fixture === 'text') {
        process.stdout.write(`${JSON.stringify({ text: message.text })}\n`);
        for (const w of workers) w.kill();
      }
    });
  }
} else {
  const index = Number(process.env.FIXTURE_WORKER);
  const metrics = new Metrics({ runtime: () => ({ sites: [] }) as never, certificates: () => [], acme: () => undefined, tunnels: () => index });
  shareWorkerMetrics(metrics.registry);
  const route = { config: { path: '/' } } as never;
  const site = { hosts: ['a.test'] } as never;
  for (let i = 0; i < (index + 1) * 10; i++) {
    metrics.inFlight++;
    metrics.observe({ site, route, status: 200, startedAt: performance.now(), bytesIn: 0, bytesOut: 100, error: undefined, upstream: undefined } as never);
  }
  metrics.reloaded(true, 2 + index);
  process.on('message', (message: { fixture?: string }) => {
    if (message.fixture !== 'scrape') return;
    clusterMetricsText().then((text) => process.send!({ fixture: 'text', text }));
  });
  process.send!({ fixture: 'ready' });
}
