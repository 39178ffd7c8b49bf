/**
 * The config schema: the one source of truth for the shape, the types, the defaults and the docs of
 * `gatehouse.yaml`. The README's config reference and `config/gatehouse.example.yaml` follow it.
 *
 * Field names are the YAML names (snake_case) so that a log line, an error path and the docs all
 * say the same thing. Durations arrive as strings with units and leave as milliseconds; sizes
 * arrive as `64KiB`/`10MB` and leave as bytes. Unknown keys are errors (a typo must not be
 * silently ignored).
 */
import { isIP } from 'node:net';
import { z } from 'zod';
import { parseDuration, parseSize } from './units.js';

/** A duration string (`"250ms"`, `"10s"`, `"5m"`) parsed to milliseconds. */
export const duration = z.union([z.string(), z.number()]).transform((value, ctx) => {
  try {
    return parseDuration(value);
  } catch (error) {
    ctx.addIssue({ code: 'custom', message: (error as Error).message });
    return z.NEVER;
  }
});

/** A size (`"64KiB"`, `"10MB"`, a number of bytes) parsed to bytes. */
export const size = z.union([z.string(), z.number()]).transform((value, ctx) => {
  try {
    return parseSize(value);
  } catch (error) {
    ctx.addIssue({ code: 'custom', message: (error as Error).message });
    return z.NEVER;
  }
});

/** A listening address: a port (`443`) or `"host:port"` (`"127.0.0.1:2019"`, `"[::1]:8443"`). */
export const listenAddress = z.union([z.number(), z.string()]).transform((value, ctx): ListenAddress => {
  const parsed = parseListenAddress(value);
  if (!parsed) {
    ctx.addIssue({ code: 'custom', message: `expected a port (0-65535) or "host:port", got ${JSON.stringify(value)}` });
    return z.NEVER;
  }
  return parsed;
});

/** Where a listener binds. `host` undefined means all interfaces (IPv6 and IPv4). */
export interface ListenAddress {
  readonly host: string | undefined;
  /** TCP port; 0 picks a free one (tests). */
  readonly port: number;
}

/**
 * Parse a listen address: a port (`443`, `"443"`) or `"host:port"` (`"127.0.0.1:2019"`,
 * `"[::1]:8443"`).
 * @returns the address, or undefined when the value is not one (port outside 0-65535, no port).
 */
export function parseListenAddress(value: string | number): ListenAddress | undefined {
  const isPort = (n: number) => Number.isInteger(n) && n >= 0 && n <= 65535;
  if (typeof value === 'number') return isPort(value) ? { host: undefined, port: value } : undefined;
  const text = value.trim();
  if (/^\d+$/.test(text)) return isPort(Number(text)) ? { host: undefined, port: Number(text) } : undefined;
  const match = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(text);
  if (!match) return undefined;
  const port = Number(match[3]);
  return isPort(port) ? { host: match[1] ?? match[2], port } : undefined;
}

/** An IP address or CIDR block (`10.0.0.0/8`, `2001:db8::/32`, `127.0.0.1`). */
const cidr = z.string().refine((value) => {
  const [address, bits, extra] = value.split('/');
  const family = isIP(address ?? '');
  if (family === 0 || extra !== undefined) return false;
  if (bits === undefined) return true;
  const n = Number(bits);
  return /^\d+$/.test(bits) && n <= (family === 4 ? 32 : 128);
}, 'expected an IP address or a CIDR block such as "10.0.0.0/8"');

const upstreamUrl = z.string().transform((value, ctx) => {
  let url: URL | undefined;
  try {
    url = new URL(value);
  } catch {
    url = undefined;
  }
  if (!url || (url.protocol !== 'http:' && url.protocol !== 'https:') || url.username || url.password) {
    ctx.addIssue({ code: 'custom', message: `expected a URL such as "http://127.0.0.1:8080", got ${JSON.stringify(value)}` });
    return z.NEVER;
  }
  if (url.pathname !== '/' || url.search || url.hash) {
    ctx.addIssue({ code: 'custom', message: `an upstream URL is an origin (scheme, host, port) without a path, got ${JSON.stringify(value)}` });
    return z.NEVER;
  }
  return url.origin;
});

/** One upstream (backend) of a route. */
const upstream = z.union([
  upstreamUrl.transform((url) => ({ url, weight: 1 })),
  z.strictObject({
    /** Origin of the upstream, `http://host:port` (or `https://`). */
    url: upstreamUrl,
    /** Relative weight for `weighted_round_robin` (integer >= 1). Default 1. */
    weight: z.number().int().min(1).max(1000).default(1),
  }),
]);
export type UpstreamConfig = z.output<typeof upstream>;

/** Balancing policy names, as in Caddy (`lb_policy`) and nginx. */
export const LOAD_BALANCING_POLICIES = [
  'round_robin', 'weighted_round_robin', 'least_conn', 'random_two', 'ip_hash', 'cookie', 'first',
] as const;
export type LoadBalancingPolicyName = (typeof LOAD_BALANCING_POLICIES)[number];

const statusRange = z.string().regex(/^([1-5]xx|[1-5]\d\d(-[1-5]\d\d)?)$/, 'expected a status such as "2xx", "200" or "200-399"');

/** Active health checks (Caddy `health_uri`/`health_interval`, nginx `health_check`). */
const healthCheck = z.strictObject({
  /** Path requested on each upstream with GET. Default `/health`. */
  path: z.string().startsWith('/').default('/health'),
  /** Time between checks of one upstream (ms after parsing). Default `10s`; jittered by ±10%. */
  interval: duration.default(10_000),
  /** Time a check may take before it counts as a failure (ms). Default `2s`. */
  timeout: duration.default(2_000),
  /** Status that counts as healthy: `"2xx"`, `"200"`, `"200-399"`. Default `"2xx"`. */
  status: statusRange.default('2xx'),
  /** Consecutive passing checks before an unhealthy upstream is marked healthy. Default 1. */
  passes: z.number().int().min(1).default(1),
  /** Consecutive failing checks before a healthy upstream is marked unhealthy. Default 1. */
  fails: z.number().int().min(1).default(1),
});
export type HealthCheckConfig = z.output<typeof healthCheck>;

/** Passive health checks and circuit breaking (Caddy `passive_health_checks`, nginx `max_fails`). */
const passiveHealth = z.strictObject({
  /** Failures within `window` that open the breaker for one upstream. Default 5. */
  max_fails: z.number().int().min(1).default(5),
  /** Sliding window in which failures are counted (ms). Default `10s`. */
  window: duration.default(10_000),
  /** How long an opened breaker keeps the upstream out before one trial request (ms). Default `30s`. */
  cooldown: duration.default(30_000),
  /** Count 5xx responses as failures. Default false (a 5xx is the application's answer). */
  fail_on_5xx: z.boolean().default(false),
  /** Count responses slower than this as failures (ms); off when absent. */
  max_latency: duration.optional(),
});
export type PassiveHealthConfig = z.output<typeof passiveHealth>;

/** Retries of failed upstream attempts (Caddy `lb_retries`/`lb_try_duration`). */
const retries = z.strictObject({
  /** Extra attempts after the first one, each on another upstream when there is one. Default 2. */
  count: z.number().int().min(0).max(10).default(2),
  /** Total time budget for all attempts (ms). Default `5s`. */
  try_duration: duration.default(5_000),
});
export type RetriesConfig = z.output<typeof retries>;

/** Timeouts towards upstreams, per route. */
const timeouts = z.strictObject({
  /** TCP (and TLS) connect to an upstream (ms). Default `5s`; exceeded gives 504 (or a retry). */
  connect: duration.default(5_000),
  /** Wait for the upstream's response headers once the request, body included, was sent (ms; as Go's `ResponseHeaderTimeout`). Default `60s`; 504. */
  response_header: duration.default(60_000),
  /** Longest gap between two body chunks from the upstream (ms). Default `60s`; the response is aborted. */
  body_idle: duration.default(60_000),
  /** Idle keep-alive connections to the upstream are closed after this (ms). Default `4s`,
   * below the 5 s default of Node and nginx upstreams, so Gatehouse closes first (keep-alive race). */
  keepalive: duration.default(4_000),
});
export type TimeoutsConfig = z.output<typeof timeouts>;

/**
 * Rate limiting of a route: a token bucket per key (client IP by default). A request takes one
 * token; an empty bucket answers 429 with `Retry-After` and the IETF `RateLimit`/`RateLimit-Policy`
 * headers. Buckets live in a bounded LRU, so a flood of distinct keys costs memory, not correctness.
 */
const rateLimit = z.strictObject({
  /** Tokens added per `per` (requests per period at a steady pace); a number > 0. Required. */
  rate: z.number().positive(),
  /** The period of `rate` (ms after parsing). Default `1s`. */
  per: duration.default(1_000),
  /** Bucket size: requests allowed at once after a quiet period (integer >= 1). Default: `rate` rounded up. */
  burst: z.number().int().min(1).optional(),
  /** What a bucket belongs to: `ip` (the client IP, see `trusted_proxies`) or `header:NAME` (e.g.
   * `header:X-Api-Key`; requests without the header fall back to the client IP). Default `ip`. */
  key: z.string().regex(/^(ip|header:[!#$%&'*+\-.^_`|~0-9A-Za-z]+)$/, 'expected "ip" or "header:NAME"').default('ip'),
  /** Most buckets kept (least recently used dropped first; a dropped key starts full again). Default 100000. */
  max_keys: z.number().int().min(1).default(100_000),
});
export type RateLimitConfig = z.output<typeof rateLimit>;

/** Debug capture: bodies and headers of each exchange of a route, logged (`http.log.capture`). */
const captureObject = z.strictObject({
  /** Bytes of each body kept (request and response); the rest is counted, not logged. Default `64KiB`. */
  max_body: size.default(64 * 1024),
});
const capture = z.union([
  z.boolean().transform((on) => (on ? { max_body: 64 * 1024 } : undefined)),
  captureObject,
]);
export type CaptureConfig = z.output<typeof captureObject>;

const routePath = z.string().refine((p) => p.startsWith('/') && !/[\s?#]/.test(p), 'expected a path prefix starting with "/"');

/** A route: a path prefix inside a site, and where its requests go. */
const route = z.strictObject({
  /** Path prefix; the longest matching prefix wins. Default `/`. Matches whole segments when it ends in `/`. */
  path: routePath.default('/'),
  /** Remove the matched prefix before forwarding (keeps a leading `/`). Default false. */
  strip_prefix: z.boolean().default(false),
  /** Upstream origins; at least one. Strings or `{ url, weight }`. */
  upstreams: z.array(upstream).min(1),
  /** Balancing policy; see the README. Default `round_robin`. */
  load_balancing: z.enum(LOAD_BALANCING_POLICIES).default('round_robin'),
  /** Name of the sticky cookie for `load_balancing: cookie`. Default `gatehouse_upstream`. */
  cookie_name: z.string().regex(/^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/).default('gatehouse_upstream'),
  /** Active health checks; off when absent. */
  health_check: healthCheck.optional(),
  /** Passive health checks / circuit breaker. Defaults apply when absent. */
  passive_health: passiveHealth.prefault({}),
  /** Retries of failed attempts. Defaults apply when absent. */
  retries: retries.prefault({}),
  /** Upstream timeouts. Defaults apply when absent. */
  timeouts: timeouts.prefault({}),
  /** Largest request body accepted (bytes); 413 above it. Default `100MiB`; `0` means no limit. */
  max_body: size.default(100 * 1024 * 1024),
  /** Rate limit (token bucket per client); off when absent. */
  rate_limit: rateLimit.optional(),
  /** Debug capture of request and response bodies into the log; off when absent. `true` = defaults. */
  capture: capture.optional(),
});
export type RouteConfig = z.output<typeof route>;

/** TLS modes of a site. `static` = from `tls.certificates`; `off` = plain HTTP only. */
export const SITE_TLS_MODES = ['acme', 'internal', 'static', 'off'] as const;
export type SiteTlsMode = (typeof SITE_TLS_MODES)[number];

const hostPattern = z.string().transform((value, ctx) => {
  const host = value.trim().toLowerCase().replace(/\.$/, '');
  const ok = host === '*' || isIP(host) !== 0 || /^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$/.test(host);
  if (!ok) {
    ctx.addIssue({ code: 'custom', message: `expected a host name, "*.name" or "*", got ${JSON.stringify(value)}` });
    return z.NEVER;
  }
  return host;
});

/** HTTP Strict Transport Security (RFC 6797). Off by default. */
const hsts = z.union([
  duration.transform((max_age) => ({ max_age, include_subdomains: false, preload: false })),
  z.strictObject({
    /** `max-age` (ms in config, written in seconds). */
    max_age: duration,
    include_subdomains: z.boolean().default(false),
    preload: z.boolean().default(false),
  }),
]);

/** A site: a set of host names and its routes. */
const site = z.strictObject({
  /** Host names: exact (`app.example.com`), one-label wildcard (`*.example.com`) or `*` (any host). */
  hosts: z.array(hostPattern).min(1),
  /** Certificate source. Default: `internal` when every host is localhost, *.localhost, an IP or `*`; else `acme`. */
  tls: z.enum(SITE_TLS_MODES).optional(),
  /** Redirect plain HTTP to HTTPS with 308. Default true unless `tls: off`. */
  redirect: z.boolean().optional(),
  /** Strict-Transport-Security on HTTPS responses: `1y` or `{ max_age, include_subdomains, preload }`. Off when absent. */
  hsts: hsts.optional(),
  /** Routes; longest path prefix wins. */
  routes: z.array(route).min(1),
});

const acme = z.strictObject({
  /** Contact email for the ACME account (RFC 8555 §7.3). Recommended: expiry warnings go there. */
  email: z.string().email().optional(),
  /** `letsencrypt`, `letsencrypt-staging`, or the https URL of any ACME directory. Default `letsencrypt`. */
  directory: z.string().default('letsencrypt'),
  /** You agree to the CA's terms of service (RFC 8555 `termsOfServiceAgreed`). Required true to use ACME. Default false. */
  agree_tos: z.boolean().default(false),
  /** PEM file of an extra CA trusted when talking to the ACME server (e.g. Pebble's). */
  ca_bundle: z.string().optional(),
  /** Challenge types, tried in this order. Default `[http-01, tls-alpn-01]`. */
  challenges: z.array(z.enum(['http-01', 'tls-alpn-01'])).min(1).default(['http-01', 'tls-alpn-01']),
  /** External account binding (RFC 8555 §7.3.4) for CAs that need it (ZeroSSL, Google). */
  eab: z.strictObject({ kid: z.string().min(1), hmac_key: z.string().min(1) }).optional(),
  /** Renew when this fraction of the certificate's lifetime is left. Default 1/3 (Let's Encrypt's advice). */
  renew_window: z.number().gt(0).lt(1).default(1 / 3),
});
export type AcmeConfig = z.output<typeof acme>;

const tls = z.strictObject({
  /** Folder for the ACME account keys, issued certificates and the local CA. Default `./certs`,
   * relative to the config file's folder. */
  storage: z.string().default('./certs'),
  /** ACME settings for sites with `tls: acme`. */
  acme: acme.prefault({}),
  /** On-demand TLS: obtain certificates at handshake time for names no site lists explicitly. */
  on_demand: z.strictObject({
    /** URL asked `GET ?domain=NAME`; a 2xx allows issuance. */
    ask: z.string().url().optional(),
    /** Names (exact or `*.wildcard`) allowed without asking. */
    allow: z.array(hostPattern).optional(),
  }).optional(),
  /** Static certificate files, chosen by SNI from their SANs. The first is the default certificate. */
  certificates: z.array(z.strictObject({ cert: z.string(), key: z.string() })).default([]),
});

const log = z.strictObject({
  /** pino level: trace, debug, info, warn, error, fatal, silent. Default `info`. */
  level: z.enum(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent']).default('info'),
  /** One JSON line per request on stdout. Default true. */
  access: z.boolean().default(true),
  /** `json` (default) or `pretty` (pino-pretty, for a terminal). */
  format: z.enum(['json', 'pretty']).default('json'),
  /** File the access log is appended to instead of stdout; reopened on SIGUSR1 (logrotate). Default: stdout. */
  access_file: z.string().min(1).optional(),
  /** Log the request headers in each access line (`headers`). Default false. */
  access_headers: z.boolean().default(false),
  /** Header names (lowercase) whose values are replaced by `[REDACTED]` in the access log and in
   * debug captures. Default `[authorization, cookie, set-cookie, proxy-authorization]`. */
  redact: z.array(z.string().regex(/^[!#$%&'*+\-.^_`|~0-9a-z]+$/, 'expected a lowercase header name')).default(['authorization', 'cookie', 'set-cookie', 'proxy-authorization']),
});

/** A client deadline: a duration of at least 100 ms (0 would turn a deadline off, or fire at once). */
const deadline = duration.refine((ms) => ms >= 100, 'expected a duration of at least 100ms');

/**
 * Deadlines for client connections, on both listeners. Node's HTTP/2 server sets none of these by
 * default, and its HTTP/1 fallback takes them from the server object, not from options: the
 * listeners set every one explicitly.
 */
const clientTimeouts = z.strictObject({
  /** TLS handshake (ms): a connection that has not finished it is closed. Default `10s` (Node: 120 s). */
  handshake: deadline.default(10_000),
  /** Request header deadline (ms), from the first byte of a request (HTTP/1) or while a session owes
   * an answer to a PING (HTTP/2: a header block left open blocks every frame, PING ACK included);
   * HTTP/1 gets 408 and the connection is closed. Default `10s` (Node: 60 s; nginx `client_header_timeout` 60 s). */
  headers: deadline.default(10_000),
  /** Longest gap between two chunks of a request body (ms); 408 before the answer started, else the
   * connection (HTTP/1) or stream (HTTP/2) is closed. Default `30s`. There is no total deadline, so
   * long uploads that keep moving are never cut. */
  body_idle: deadline.default(30_000),
  /** How long an HTTP/1.1 keep-alive connection may stay idle between requests (ms). Default `5s`
   * (Node's default for `http`, which its HTTP/2 server does not apply to HTTP/1 connections).
   * Answers advertise it as `Keep-Alive: timeout=N`, N in whole seconds rounded down (Node), and
   * the connection is closed 1 s after it, so that a client reusing it at the advertised last
   * moment is not cut off. undici clients keep 2 s in hand and reuse a connection only when N is
   * over 2: under `3s` they open one per request. */
  keepalive: deadline.default(5_000),
  /** An HTTP/2 session with no open stream is closed (GOAWAY) after this (ms). Default `2m` (nginx `keepalive_timeout` 75 s, Caddy 5 m). */
  idle: deadline.default(120_000),
});
export type ClientTimeoutsConfig = z.output<typeof clientTimeouts>;

/** Limits on what one client request may carry. */
const clientLimits = z.strictObject({
  /** Request line and header section (HTTP/1), header list (HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`)
   * in bytes; 431 above it (HTTP/2: the stream is reset). Default `32KiB` (Node: 16 KiB, nginx: 32 KiB). */
  header_size: size.default(32 * 1024),
  /** Header fields per request; 431 above it (HTTP/2: the stream is reset). Default 100 (Node: 2000). */
  header_count: z.number().int().min(8).max(10_000).default(100),
  /** Request target (path and query) length in bytes; 414 above it. Default `8KiB` (nginx: 8 KiB). */
  target_length: size.default(8 * 1024),
  /** HTTP/2 streams a client may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`). Default 128:
   * browsers and CDNs expect 100-128; each open stream may hold an upstream request. */
  concurrent_streams: z.number().int().min(1).max(1000).default(128),
});
export type ClientLimitsConfig = z.output<typeof clientLimits>;

/** Client connection deadlines and request limits. */
const clients = z.strictObject({
  timeouts: clientTimeouts.prefault({}),
  limits: clientLimits.prefault({}),
});
export type ClientsConfig = z.output<typeof clients>;

/** The defaults of `clients`, for listeners built without a config (tests, tools). */
export const DEFAULT_CLIENTS: ClientsConfig = Object.freeze(clients.parse({}));

/** The whole config file. */
export const configSchema = z.strictObject({
  listen: z.strictObject({
    /** Plain HTTP listener (ACME HTTP-01 answers and redirects). Default 80; `null` turns it off. */
    http: listenAddress.nullable().default({ host: undefined, port: 80 }),
    /** HTTPS listener (TLS, HTTP/2 and HTTP/1.1 by ALPN). Default 443; `null` turns it off. */
    https: listenAddress.nullable().default({ host: undefined, port: 443 }),
    /** Admin API and metrics listener (`/metrics`, `/status`, `POST /reload`); off when absent. A bare
     * port binds 127.0.0.1 only: the admin API is for the machine itself. */
    admin: listenAddress.optional(),
  }).prefault({}),
  /** Time in-flight requests get to finish on SIGTERM/SIGINT before connections are closed (ms). Default `10s`. */
  grace_period: duration.default(10_000),
  /** Processes serving the listeners: `auto` = one per CPU core, or a number. Default 1 (one
   * process, no supervisor). With more than one, a primary process forks the workers (node:cluster,
   * listeners shared), forwards SIGTERM/SIGINT/SIGHUP/SIGUSR1 to each and restarts a dead one
   * with backoff; the certificate storage folder is shared (see src/workers.ts). */
  workers: z.union([z.literal('auto'), z.number().int().min(1).max(1024)]).default(1),
  /** Busy polling (ms): after each accepted connection, request or upstream read, the event loop
   * polls its sockets without sleeping for this long, so the core is awake for the next packet
   * instead of halting between two (on a virtual machine, waking a halted vCPU costs the sender an
   * inter-processor interrupt and the receiver a reschedule). Like HAProxy's `busy-polling`, but
   * bounded: an idle process stops spinning one window after its last traffic. The core then
   * shows busy for up to that long after every request: for a proxy with a core of its own.
   * `0` = off. Default `0`; at most `1s`. Reloadable. See src/busy-poll.ts. */
  busy_polling: duration.refine((window) => window <= 1000, 'at most 1s').default(0),
  /** The admin API on `listen.admin`. */
  admin: z.strictObject({
    /** Bearer token every admin request must carry (`Authorization: Bearer TOKEN`). Default: none
     * (anyone who can reach `listen.admin` may use it; keep it on loopback). */
    token: z.string().min(16, 'use a token of at least 16 characters').optional(),
  }).prefault({}),
  /** Config reloads besides SIGHUP and `POST /reload`. */
  reload: z.strictObject({
    /** Reload when the config file changes. Default false. */
    watch: z.boolean().default(false),
    /** Wait after the last change before reloading, so an editor's several writes give one reload (ms). Default `500ms`. */
    debounce: duration.default(500),
  }).prefault({}),
  /** Peers (IPs or CIDRs, e.g. `10.0.0.0/8`, `::1`) whose `X-Forwarded-For` is believed when finding
   * the client IP for rate limits and logs. Default `[]`: the TCP peer is the client. */
  trusted_proxies: z.array(cidr).default([]),
  /** Client connection deadlines and request limits (both listeners). */
  clients: clients.prefault({}),
  tls: tls.prefault({}),
  log: log.prefault({}),
  sites: z.array(site).default([]),
});

/** The validated config, as the YAML names it, before site defaults are filled in. */
export type ParsedConfig = z.output<typeof configSchema>;
export type ParsedSite = ParsedConfig['sites'][number];

/** A site with every default resolved. */
export interface SiteConfig extends Omit<ParsedSite, 'tls' | 'redirect'> {
  readonly tls: SiteTlsMode;
  readonly redirect: boolean;
}

/** The runtime config: validated, defaults resolved, paths absolute, deeply frozen. */
export interface GatehouseConfig extends Omit<ParsedConfig, 'sites'> {
  /** Where it came from: a file path, `<embedded default>` or `<quick mode>`. */
  readonly source: string;
  readonly sites: readonly SiteConfig[];
}

/** True for names no public CA will issue for: localhost, *.localhost, IP literals, `*`. */
export function isLocalName(host: string): boolean {
  return host === '*' || host === 'localhost' || host.endsWith('.localhost') || isIP(host) !== 0
    || host.endsWith('.local') || host.endsWith('.internal') || host.endsWith('.test');
}
