/**
 * Upstream state: one `Upstream` per upstream origin of a route, holding the keep-alive connection
 * pool (`upstream/http1-pool.ts`) and the counters the balancer and the health checks read.
 *
 * The proxy (`proxy/forward.ts`) dispatches on `upstream.pool` and keeps `inFlight` up to date;
 * `upstream/balancer.ts` and `upstream/health.ts` read `inFlight`/`weight` and write `available`.
 */
import { UpstreamPool } from './http1-pool.js';
import type { TimeoutsConfig } from '../config/schema.js';

/** The timeouts an upstream pool uses, all in milliseconds (the route's `timeouts`). */
export type UpstreamTimeouts = Pick<TimeoutsConfig, 'connect' | 'response_header' | 'body_idle' | 'keepalive'>;

/** Defaults used when an `Upstream` is built without timeouts; the same as the config schema's. */
export const DEFAULT_UPSTREAM_TIMEOUTS: Readonly<UpstreamTimeouts> = Object.freeze({
  connect: 5_000,
  response_header: 60_000,
  body_idle: 60_000,
  keepalive: 4_000,
});

/** Options of `new Upstream()`. */
export interface UpstreamOptions {
  /** Relative weight for weighted policies (integer >= 1). Default 1. */
  readonly weight?: number;
  /** Route timeouts (ms). Default `DEFAULT_UPSTREAM_TIMEOUTS`. */
  readonly timeouts?: UpstreamTimeouts;
  /** Most connections kept to this upstream; `undefined` = no limit. */
  readonly connections?: number;
  /** TLS options for `https://` upstreams (e.g. `{ ca }` or `{ rejectUnauthorized: false }`). */
  readonly tls?: { readonly ca?: string | Buffer; readonly rejectUnauthorized?: boolean; readonly servername?: string };
}

/**
 * One upstream origin (`http://host:port` or `https://host:port`) and its connection pool.
 *
 * The pool speaks HTTP/1.1 with keep-alive and no pipelining (pipelining 1: one request at a time
 * per connection, so a slow response never holds back another request; RFC 9112 §9.3.2).
 * Idle connections close after `timeouts.keepalive` — also when the upstream announces a longer
 * `Keep-Alive: timeout=` — so Gatehouse closes an idle connection before the upstream does and never
 * writes a request on a connection the upstream is closing (the keep-alive race).
 */
export class Upstream {
  /** The origin, e.g. `http://127.0.0.1:8080` (no path, no trailing slash). */
  readonly origin: string;
  /** Relative weight (>= 1). */
  readonly weight: number;
  /**
   * The connection pool; dispatch requests on it with `pool.dispatch(options, handler)`.
   * Built on first use: routes never requested never build one.
   */
  get pool(): UpstreamPool {
    this.#pool ??= new UpstreamPool(this.hostname, this.port, {
      connections: this.#connections,
      connectTimeout: this.timeouts.connect,
      headersTimeout: this.timeouts.response_header,
      bodyTimeout: this.timeouts.body_idle,
      keepAliveTimeout: this.timeouts.keepalive,
      tls: this.secure ? { ...this.tls } : null,
    }, new URL(this.origin).host);
    return this.#pool;
  }
  /** The timeouts the pool was built with (ms). */
  readonly timeouts: UpstreamTimeouts;
  /** `true` for `https://` upstreams. */
  readonly secure: boolean;
  /** Host name (brackets removed for IPv6) and port, for raw connections (`proxy/upgrade.ts`). */
  readonly hostname: string;
  readonly port: number;
  /** TLS options for raw connections to `https://` upstreams. */
  readonly tls: UpstreamOptions['tls'];
  /** Requests currently being proxied to this upstream; `proxy/forward.ts` increments and decrements it. */
  inFlight = 0;
  /** False when health checks or the circuit breaker took this upstream out of rotation. */
  available = true;
  #pool: UpstreamPool | undefined;
  readonly #connections: number | null;

  /**
   * @param origin upstream origin URL (`http:` or `https:`, no path).
   * @param options weight, timeouts, connection limit, TLS options.
   * @throws TypeError when `origin` is not an http(s) URL.
   */
  constructor(origin: string, options: UpstreamOptions = {}) {
    const url = new URL(origin);
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      throw new TypeError(`GH_UPSTREAM_INVALID: expected an http:// or https:// origin, got ${JSON.stringify(origin)}`);
    }
    this.origin = url.origin;
    this.secure = url.protocol === 'https:';
    this.hostname = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
    this.port = url.port ? Number(url.port) : this.secure ? 443 : 80;
    this.weight = options.weight ?? 1;
    this.timeouts = options.timeouts ?? DEFAULT_UPSTREAM_TIMEOUTS;
    this.tls = options.tls;
    this.#connections = options.connections ?? null;
  }

  /** Finishes queued and running requests, then closes every connection. */
  close(): Promise<void> {
    return this.#pool?.close() ?? Promise.resolve();
  }

  /** Aborts running requests and closes every connection now. */
  destroy(): Promise<void> {
    return this.#pool?.destroy() ?? Promise.resolve();
  }
}
