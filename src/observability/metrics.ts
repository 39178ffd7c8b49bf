/**
 * Prometheus metrics (prom-client), every name prefixed `gatehouse_`, served by the admin API at
 * `GET /metrics`.
 *
 * The per-request cost is a few additions to plain numbers: each route has a `Series` object
 * (found through a WeakMap keyed by the route), whose counters and histogram buckets are numbers
 * turned into Prometheus samples only when `/metrics` is scraped. (prom-client's label children
 * hash their label set on every `inc`/`observe`; the hot path never calls them.) Labels are the
 * site's first host and the route's path prefix — never the raw request path — so the number of
 * series is bounded by the config; series outlive reloads, so counters never go back. Gauges that
 * mirror state (upstreams, certificates, ACME, tunnels) are computed when scraped too.
 *
 * With `workers` > 1 a scrape gets every worker's metrics merged (`cluster-metrics.ts`): counters,
 * histograms and in-flight gauges add up; `upstream_healthy`, the certificate expiry, the config
 * version and its load time take the lowest value of any worker; reloads count once per signal.
 */
import type { TLSSocket } from 'node:tls';
import { collectDefaultMetrics, Counter, Gauge, Registry } from 'prom-client';
import type { AccessRecord } from '../routing/dispatch.js';
import type { RouteRuntime, Runtime, SiteRuntime } from '../routing/runtime.js';
import type { CertificateInfo } from '../tls/certificates.js';

/** Prefix of every metric name. */
export const METRIC_PREFIX = 'gatehouse_';

/** Request duration buckets (seconds): 1 ms to 30 s. */
const DURATION_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

/** The state the scrape-time gauges read. */
export interface MetricsSources {
  runtime(): Runtime;
  certificates(): CertificateInfo[];
  /** ACME order and failure counts; undefined without an ACME issuer. */
  acme(): { readonly orders: number; readonly failures: number } | undefined;
  /** Open upgrade tunnels (WebSocket). */
  tunnels(): number;
}

/** The counters of one site + route pair, plain numbers (see the file comment). */
interface Series {
  readonly site: string;
  readonly route: string;
  /** Index = status class (1..5). */
  readonly requests: Float64Array;
  /** Non-cumulative bucket counts; the last one is +Inf. */
  readonly buckets: Float64Array;
  durationSum: number;
  durationCount: number;
  bytesIn: number;
  bytesOut: number;
  rateLimited: number;
}

type Sample = { labels: Record<string, string | number>; value: number; metricName?: string };

/** A metric whose samples are computed at scrape time; what prom-client's `Registry` needs of a metric. */
class ScrapedMetric {
  constructor(
    readonly name: string,
    readonly help: string,
    readonly type: 'counter' | 'gauge' | 'histogram',
    private readonly samples: () => Sample[],
  ) {}

  get(): { name: string; help: string; type: string; values: Sample[]; aggregator: 'sum' } {
    return { name: this.name, help: this.help, type: this.type, values: this.samples(), aggregator: 'sum' };
  }

  reset(): void {}
}

/** The metrics of one server. */
export class Metrics {
  readonly registry = new Registry();
  /** Exchanges in flight (requests, and upgrade tunnels while open). */
  inFlight = 0;
  readonly #upstreamFailures: Counter<'upstream' | 'code'>;
  readonly #handshakes: Counter<'protocol' | 'version'>;
  readonly #reloads: Counter<'result'>;
  readonly #configVersion: Gauge;
  readonly #reloadTime: Gauge;
  /** Fast path: the series of a route object. */
  readonly #routeSeries = new WeakMap<RouteRuntime, Series>();
  /** Every series by site and route label, kept across reloads. */
  readonly #series = new Map<string, Series>();
  readonly #failureChildren = new Map<string, Counter.Internal>();
  readonly #handshakeChildren = new Map<string, Counter.Internal>();

  constructor(sources: MetricsSources) {
    const registers = [this.registry];
    const self = this;
    const all = () => this.#series.values();
    const perRoute = (value: (series: Series) => number) => () => {
      const samples: Sample[] = [];
      for (const series of all()) samples.push({ labels: { site: series.site, route: series.route }, value: value(series) });
      return samples;
    };
    const scraped = [
      new ScrapedMetric(`${METRIC_PREFIX}http_requests_total`,
        'Finished HTTP exchanges by site (first host), route (path prefix) and status class (2xx...).', 'counter', () => {
          const samples: Sample[] = [];
          for (const series of all()) {
            for (let c = 1; c <= 5; c++) {
              const value = series.requests[c]!;
              if (value > 0) samples.push({ labels: { site: series.site, route: series.route, code: `${c}xx` }, value });
            }
          }
          return samples;
        }),
      new ScrapedMetric(`${METRIC_PREFIX}http_request_duration_seconds`,
        'Time from the request head to the end of the response, per route (upgrade tunnels excluded).', 'histogram', () => {
          const samples: Sample[] = [];
          const name = `${METRIC_PREFIX}http_request_duration_seconds`;
          for (const series of all()) {
            if (series.durationCount === 0) continue;
            const labels = { site: series.site, route: series.route };
            let cumulative = 0;
            for (let i = 0; i < DURATION_BUCKETS.length; i++) {
              cumulative += series.buckets[i]!;
              samples.push({ metricName: `${name}_bucket`, labels: { ...labels, le: DURATION_BUCKETS[i]! }, value: cumulative });
            }
            samples.push({ metricName: `${name}_bucket`, labels: { ...labels, le: '+Inf' }, value: series.durationCount });
            samples.push({ metricName: `${name}_sum`, labels, value: series.durationSum });
            samples.push({ metricName: `${name}_count`, labels, value: series.durationCount });
          }
          return samples;
        }),
      new ScrapedMetric(`${METRIC_PREFIX}http_request_body_bytes_total`,
        'Request body bytes sent upstream (tunnels: client to upstream), per route.', 'counter', perRoute((s) => s.bytesIn)),
      new ScrapedMetric(`${METRIC_PREFIX}http_response_body_bytes_total`,
        'Response body bytes sent to clients (tunnels: upstream to client), per route.', 'counter', perRoute((s) => s.bytesOut)),
      new ScrapedMetric(`${METRIC_PREFIX}http_rate_limited_total`,
        'Requests answered 429 by the route rate limit.', 'counter', perRoute((s) => s.rateLimited)),
    ];
    for (const metric of scraped) this.registry.registerMetric(metric as unknown as Parameters<Registry['registerMetric']>[0]);
    new Gauge({
      name: `${METRIC_PREFIX}http_requests_in_flight`,
      help: 'Exchanges in progress (requests, and upgrade tunnels while open).',
      registers,
      collect() { this.set(self.inFlight); },
    });
    new Gauge({
      name: `${METRIC_PREFIX}websocket_tunnels_open`,
      help: 'Open upgrade tunnels (WebSocket).',
      registers,
      collect() { this.set(sources.tunnels()); },
    });
    new Gauge({
      name: `${METRIC_PREFIX}upstream_healthy`,
      help: '1 when the upstream is available to the balancer of its route (health checks and circuit breaker), else 0.',
      labelNames: ['site', 'route', 'upstream'], registers,
      aggregator: 'min', // workers > 1: 1 only when every worker can use it
      collect() {
        this.reset();
        for (const { site, route, upstream } of upstreamsOf(sources.runtime())) {
          this.labels(site, route, upstream.origin).set(upstream.available ? 1 : 0);
        }
      },
    });
    new Gauge({
      name: `${METRIC_PREFIX}upstream_requests_in_flight`,
      help: 'Requests (and tunnels) being proxied to the upstream now.',
      labelNames: ['site', 'route', 'upstream'], registers,
      collect() {
        this.reset();
        for (const { site, route, upstream } of upstreamsOf(sources.runtime())) {
          this.labels(site, route, upstream.origin).set(upstream.inFlight);
        }
      },
    });
    this.#upstreamFailures = new Counter({
      name: `${METRIC_PREFIX}upstream_failures_total`,
      help: 'Proxied exchanges that failed because of the upstream, by origin and failure code (GH_UPSTREAM_*).',
      labelNames: ['upstream', 'code'], registers,
    });
    this.#handshakes = new Counter({
      name: `${METRIC_PREFIX}tls_handshakes_total`,
      help: 'Completed TLS handshakes on the HTTPS listener by ALPN protocol (h2, http/1.1, none) and TLS version.',
      labelNames: ['protocol', 'version'], registers,
    });
    new Gauge({
      name: `${METRIC_PREFIX}tls_certificate_expiry_timestamp_seconds`,
      help: 'Expiry (notAfter) of the certificate served for each name, as a Unix time.',
      labelNames: ['name', 'source'], registers,
      aggregator: 'min', // workers > 1: the oldest certificate any worker still serves
      collect() {
        this.reset();
        // Temporary certificates first, so that the real one of a name wins.
        const list = sources.certificates().sort((a, b) => Number(b.temporary) - Number(a.temporary));
        for (const certificate of list) {
          for (const name of certificate.names) this.labels(name, certificate.source).set(certificate.notAfter.getTime() / 1000);
        }
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}acme_orders_total`,
      help: 'ACME orders created (RFC 8555 newOrder) since start.',
      registers,
      collect() {
        this.reset();
        this.inc(sources.acme()?.orders ?? 0);
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}acme_failures_total`,
      help: 'Failed attempts to obtain or renew a certificate over ACME since start.',
      registers,
      collect() {
        this.reset();
        this.inc(sources.acme()?.failures ?? 0);
      },
    });
    this.#reloads = new Counter({
      name: `${METRIC_PREFIX}config_reloads_total`,
      help: 'Config reloads by result (success, failure).',
      labelNames: ['result'], registers,
      aggregator: 'max', // workers > 1: every worker reloads on each signal; count the reloads, not workers × reloads
    });
    this.#reloads.labels('success').inc(0);
    this.#reloads.labels('failure').inc(0);
    this.#configVersion = new Gauge({
      name: `${METRIC_PREFIX}config_version`,
      help: 'Version of the config being served: 1 at start, +1 per successful reload.',
      registers,
      aggregator: 'min', // workers > 1: the oldest version a worker serves
    });
    this.#configVersion.set(1);
    this.#reloadTime = new Gauge({
      name: `${METRIC_PREFIX}config_last_reload_success_timestamp_seconds`,
      help: 'Unix time of the last successful config load (start or reload).',
      registers,
      aggregator: 'min',
    });
    this.#reloadTime.set(Date.now() / 1000);
    collectDefaultMetrics({ register: this.registry, prefix: METRIC_PREFIX });
  }

  /** The `Content-Type` of {@link text}. */
  get contentType(): string {
    return this.registry.contentType;
  }

  /** The exposition text. */
  text(): Promise<string> {
    return this.registry.metrics();
  }

  /** An exchange finished (the access log record). */
  observe(record: AccessRecord): void {
    this.inFlight--;
    const series = this.#seriesOf(record.site, record.route);
    const status = record.status;
    series.requests[status >= 100 && status < 600 ? (status / 100) | 0 : 5]!++;
    if (status !== 101) {
      const seconds = (performance.now() - record.startedAt) / 1000;
      let i = 0;
      while (i < DURATION_BUCKETS.length && seconds > DURATION_BUCKETS[i]!) i++;
      series.buckets[i]!++;
      series.durationSum += seconds;
      series.durationCount++;
    }
    series.bytesIn += record.bytesIn;
    series.bytesOut += record.bytesOut;
    const error = record.error;
    if (error !== undefined && record.upstream !== undefined && error.startsWith('GH_UPSTREAM_')) {
      const key = `${record.upstream} ${error}`;
      let child = this.#failureChildren.get(key);
      if (child === undefined) {
        child = this.#upstreamFailures.labels(record.upstream, error);
        this.#failureChildren.set(key, child);
      }
      child.inc();
    }
  }

  /** The route's rate limit answered 429. */
  rateLimited(site: SiteRuntime, route: RouteRuntime): void {
    this.#seriesOf(site, route).rateLimited++;
  }

  /** A TLS handshake completed on the HTTPS listener. */
  handshake(socket: TLSSocket): void {
    const protocol = socket.alpnProtocol || 'none';
    const version = socket.getProtocol() ?? 'unknown';
    const key = `${protocol} ${version}`;
    let child = this.#handshakeChildren.get(key);
    if (child === undefined) {
      child = this.#handshakes.labels(protocol, version);
      this.#handshakeChildren.set(key, child);
    }
    child.inc();
  }

  /** A reload was tried. */
  reloaded(ok: boolean, version: number): void {
    this.#reloads.labels(ok ? 'success' : 'failure').inc();
    if (ok) {
      this.#configVersion.set(version);
      this.#reloadTime.set(Date.now() / 1000);
    }
  }

  #seriesOf(site: SiteRuntime | undefined, route: RouteRuntime | undefined): Series {
    if (route !== undefined) {
      let series = this.#routeSeries.get(route);
      if (series === undefined) {
        series = this.#namedSeries(site?.hosts[0] ?? '', route.config.path);
        this.#routeSeries.set(route, series);
      }
      return series;
    }
    return this.#namedSeries(site?.hosts[0] ?? '', '');
  }

  #namedSeries(site: string, route: string): Series {
    const key = `${site}\n${route}`;
    let series = this.#series.get(key);
    if (series === undefined) {
      series = {
        site, route,
        requests: new Float64Array(6),
        buckets: new Float64Array(DURATION_BUCKETS.length + 1),
        durationSum: 0, durationCount: 0, bytesIn: 0, bytesOut: 0, rateLimited: 0,
      };
      this.#series.set(key, series);
    }
    return series;
  }
}

function* upstreamsOf(runtime: Runtime): Generator<{ site: string; route: string; upstream: { origin: string; available: boolean; inFlight: number } }> {
  for (const site of runtime.sites) {
    for (const { route } of site.routes) {
      for (const upstream of route.upstreams) yield { site: site.hosts[0] ?? '', route: route.config.path, upstream };
    }
  }
}
