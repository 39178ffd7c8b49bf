/**
 * `GET /metrics` with `workers` > 1: the metrics of every worker, aggregated, whichever worker the
 * scrape reaches. Without this, each scrape would read the counters of one worker picked by the
 * kernel, and every counter would jump between the workers' values.
 *
 * prom-client's `AggregatorRegistry` does the collecting: the worker that got the scrape asks the
 * primary ({@link clusterMetricsText}), the primary asks every live worker for its registry
 * (`getMetricsAsJSON`), merges them metric by metric with each metric's `aggregator` (counters and
 * histograms add up; see `metrics.ts` for the gauges that do not) and sends back the text.
 * `/status` stays the answering worker's own.
 */
import cluster from 'node:cluster';
import { AggregatorRegistry, type Registry } from 'prom-client';

/** Message of a worker asking the primary for the aggregated metrics, and its answer. */
interface MetricsMessage {
  readonly gatehouse: 'metrics';
  readonly op: 'request' | 'response';
  readonly id: number;
  readonly body?: string;
  readonly error?: string;
}

/** How long a worker waits for the aggregated metrics (ms); prom-client gives up on a silent worker after 5 s. */
const CLUSTER_METRICS_TIMEOUT_MS = 6_000;

function isMetricsMessage(message: unknown): message is MetricsMessage {
  return typeof message === 'object' && message !== null && (message as { gatehouse?: unknown }).gatehouse === 'metrics';
}

/**
 * In the primary (`runPrimary`): answers the workers' requests for the aggregated metrics.
 * Idempotent.
 */
export function serveClusterMetrics(): void {
  if (!cluster.isPrimary || serving) return;
  serving = true;
  const aggregator = new AggregatorRegistry();
  cluster.on('message', (worker, message: unknown) => {
    if (!isMetricsMessage(message) || message.op !== 'request') return;
    const answer = (fields: Pick<MetricsMessage, 'body' | 'error'>): void => {
      if (worker.isConnected()) worker.send({ gatehouse: 'metrics', op: 'response', id: message.id, ...fields } satisfies MetricsMessage);
    };
    aggregator.clusterMetrics().then(
      (body) => answer({ body }),
      (error: unknown) => answer({ error: (error as Error).message }),
    );
  });
}

let serving = false;

/**
 * In a worker: answers the primary's requests for this worker's metrics, with `registry` once it is
 * given. Call it early without one (the worker's start): until the registry comes, the answer is
 * prom-client's empty global registry, so a scrape while a worker starts is not held up waiting
 * for it. Does nothing outside a cluster worker. Idempotent.
 */
export function shareWorkerMetrics(registry?: Registry): void {
  if (!cluster.isWorker) return;
  if (registry !== undefined) AggregatorRegistry.setRegistries([registry]);
  if (answering) return;
  answering = true;
  new AggregatorRegistry(); // installs the worker's answer to the primary's requests
}

let answering = false;

/** The error of {@link clusterMetricsText} when the metrics of every worker could not be had. */
export class ClusterMetricsError extends Error {
  readonly code = 'GH_METRICS_UNAVAILABLE';
}

let nextId = 0;
const pending = new Map<number, { resolve: (body: string) => void; reject: (error: Error) => void; timer: NodeJS.Timeout }>();
let listening = false;

/**
 * In a worker: the Prometheus text of every worker's metrics, aggregated by the primary.
 * @throws {ClusterMetricsError} when the primary or a worker did not answer in time (a worker
 *   busy or gone): the scrape fails rather than report one worker's counters as everyone's.
 */
export function clusterMetricsText(): Promise<string> {
  if (!cluster.isWorker || process.send === undefined) return Promise.reject(new ClusterMetricsError('not a cluster worker'));
  if (!process.connected) return Promise.reject(new ClusterMetricsError('the channel to the primary is closed'));
  if (!listening) {
    listening = true;
    process.on('message', (message: unknown) => {
      if (!isMetricsMessage(message) || message.op !== 'response') return;
      const waiting = pending.get(message.id);
      if (waiting === undefined) return;
      pending.delete(message.id);
      clearTimeout(waiting.timer);
      if (message.body !== undefined) waiting.resolve(message.body);
      else waiting.reject(new ClusterMetricsError(`the metrics of every worker could not be collected: ${message.error ?? 'no answer'}`));
    });
  }
  const id = nextId++;
  return new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => {
      pending.delete(id);
      reject(new ClusterMetricsError(`the primary did not send the workers' metrics within ${CLUSTER_METRICS_TIMEOUT_MS} ms`));
    }, CLUSTER_METRICS_TIMEOUT_MS);
    timer.unref();
    pending.set(id, { resolve, reject, timer });
    process.send!({ gatehouse: 'metrics', op: 'request', id } satisfies MetricsMessage);
  });
}
