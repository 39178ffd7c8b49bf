/**
 * Rate limiting of a route (`rate_limit`): a token bucket per key, the client IP by default or the
 * value of a header. Each request takes one token; tokens come back at `rate` per `per` up to
 * `burst`. An empty bucket answers 429 Too Many Requests (RFC 6585 §4) with `Retry-After` and the
 * IETF httpapi RateLimit headers (draft-ietf-httpapi-ratelimit-headers):
 *
 * ```
 * RateLimit-Policy: "gatehouse";q=20;w=1     quota q requests per w seconds (the refill rate)
 * RateLimit: "gatehouse";r=4;t=1             r requests left now; t seconds until the bucket is
 *                                            full again (until the next token when r is 0)
 * ```
 *
 * Buckets are kept in a bounded LRU (`max_keys`): a flood of distinct keys evicts the oldest
 * buckets (which then start full again) instead of growing without end.
 */
import { LRUCache } from 'lru-cache';
import type { RateLimitConfig } from '../config/schema.js';
import { endable, type ClientRequest, type ClientResponse } from '../proxy/forward.js';
import type { ClientAddress } from './client-ip.js';
import { hasHttp1Body } from '../proxy/headers.js';

/** The policy name in the RateLimit headers. */
const POLICY_NAME = '"gatehouse"';
const BODY = 'rate limit exceeded: retry later\n';
const BODY_LENGTH = String(Buffer.byteLength(BODY));

interface Bucket {
  tokens: number;
  /** `performance.now()` of the last refill. */
  updated: number;
}

/** One route's rate limiter. */
export class RateLimiter {
  readonly config: RateLimitConfig;
  /** `RateLimit-Policy` value. */
  readonly policy: string;
  readonly #buckets: LRUCache<string, Bucket>;
  readonly #perMs: number;
  readonly #burst: number;
  /** Lowercase header name when keyed by a header, else undefined (client IP). */
  readonly #header: string | undefined;
  readonly #clients: ClientAddress;

  constructor(config: RateLimitConfig, clients: ClientAddress) {
    this.config = config;
    this.#clients = clients;
    this.#perMs = config.rate / config.per;
    this.#burst = config.burst ?? Math.max(1, Math.ceil(config.rate));
    this.#header = config.key.startsWith('header:') ? config.key.slice(7).toLowerCase() : undefined;
    this.#buckets = new LRUCache<string, Bucket>({ max: config.max_keys });
    const window = Math.max(1, Math.round(config.per / 1000));
    const quota = Math.max(1, Math.floor(this.#perMs * window * 1000));
    this.policy = `${POLICY_NAME};q=${quota};w=${window}`;
  }

  /** Buckets currently kept. */
  get size(): number {
    return this.#buckets.size;
  }

  /** Clients are resolved with this (the `trusted_proxies` of the config the limiter serves). */
  get clients(): ClientAddress {
    return this.#clients;
  }

  /**
   * Take a token for `req`. Allowed: adds the RateLimit headers to `res` and returns 0. Refused:
   * answers 429 itself and returns 429.
   */
  admit(req: ClientRequest, res: ClientResponse, now = performance.now()): number {
    const key = this.keyOf(req);
    let bucket = this.#buckets.get(key);
    if (bucket === undefined) {
      bucket = { tokens: this.#burst, updated: now };
      this.#buckets.set(key, bucket);
    } else {
      bucket.tokens = Math.min(this.#burst, bucket.tokens + (now - bucket.updated) * this.#perMs);
      bucket.updated = now;
    }
    if (bucket.tokens >= 1) {
      bucket.tokens -= 1;
      const remaining = Math.floor(bucket.tokens);
      const reset = remaining > 0 ? (this.#burst - bucket.tokens) / this.#perMs : (1 - bucket.tokens) / this.#perMs;
      res.setHeader('ratelimit-policy', this.policy);
      res.setHeader('ratelimit', `${POLICY_NAME};r=${remaining};t=${Math.ceil(reset / 1000)}`);
      return 0;
    }
    const retryAfter = String(Math.max(1, Math.ceil((1 - bucket.tokens) / this.#perMs / 1000)));
    tooManyRequests(req, res, this.policy, `${POLICY_NAME};r=0;t=${retryAfter}`, retryAfter);
    return 429;
  }

  /** `h:<value>` for a header key that is present, else `i:<client ip>`. */
  keyOf(req: ClientRequest): string {
    if (this.#header !== undefined) {
      const value = req.headers[this.#header];
      if (typeof value === 'string' && value !== '') return `h:${value}`;
    }
    return `i:${this.#clients.of(req)}`;
  }
}

/** The 429 answer. HTTP/1.1 with an unread body closes the connection (RFC 9112 §9.3). */
function tooManyRequests(req: ClientRequest, res: ClientResponse, policy: string, state: string, retryAfter: string): void {
  if (res.headersSent || res.writableEnded) return;
  const headers: Record<string, string> = {
    'content-type': 'text/plain; charset=utf-8',
    'content-length': BODY_LENGTH,
    'retry-after': retryAfter,
    'ratelimit-policy': policy,
    ratelimit: state,
  };
  if (req.httpVersionMajor === 1 && hasHttp1Body(req)) headers.connection = 'close';
  try {
    res.writeHead(429, headers);
    if (req.method === 'HEAD') endable(res).end();
    else endable(res).end(BODY);
  } catch {
    res.destroy();
  }
}
