/**
 * On-demand TLS (`tls.on_demand`): whether a name no site lists may get a certificate at handshake
 * time. Without a gate, anyone pointing a DNS name at the server could make it order certificates
 * until the CA's rate limits lock out the real names, so a name must be in `allow` or be approved
 * by the `ask` endpoint (`GET <ask>?domain=<name>` answering 2xx), as in Caddy.
 *
 * Decisions are cached (allowed for `allowTtlMs`, refused for `refuseTtlMs`), and concurrent
 * handshakes for one name share one `ask` request.
 */
import { LRUCache } from 'lru-cache';
import { request } from 'undici';
import type { AcmeLogger } from './manager.js';

/** Options of {@link OnDemandPolicy}; `ask` and `allow` mirror `tls.on_demand`. */
export interface OnDemandOptions {
  /** URL asked `GET ?domain=NAME`; 2xx allows. Any other answer, an error or a timeout refuses. */
  readonly ask?: string;
  /** Names allowed without asking: exact (`shop.example.com`) or one-label wildcards (`*.example.com`). */
  readonly allow?: readonly string[];
  /** Timeout of one `ask` request, ms. Default 5000. */
  readonly askTimeoutMs?: number;
  /** How long an allowed decision is remembered, ms. Default 3 600 000 (1 hour). */
  readonly allowTtlMs?: number;
  /** How long a refusal is remembered, ms. Default 60 000 (so a fixed DNS entry is retried soon). */
  readonly refuseTtlMs?: number;
  /** Most decisions remembered. Default 10 000. */
  readonly maxCached?: number;
  readonly logger?: AcmeLogger;
}

/** The on-demand gate; see the file comment. */
export class OnDemandPolicy {
  readonly #ask: URL | undefined;
  readonly #exact = new Set<string>();
  readonly #wildcardParents = new Set<string>();
  readonly #askTimeoutMs: number;
  readonly #allowTtlMs: number;
  readonly #refuseTtlMs: number;
  readonly #cache: LRUCache<string, boolean>;
  readonly #inflight = new Map<string, Promise<boolean>>();
  readonly #logger: AcmeLogger | undefined;

  /** @throws {TypeError} when `ask` is not an http(s) URL. */
  constructor(options: OnDemandOptions) {
    if (options.ask !== undefined) {
      const url = new URL(options.ask);
      if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new TypeError(`tls.on_demand.ask must be an http(s) URL, got ${options.ask}`);
      this.#ask = url;
    }
    for (const pattern of options.allow ?? []) {
      const lower = pattern.toLowerCase();
      if (lower.startsWith('*.')) this.#wildcardParents.add(lower.slice(2));
      else this.#exact.add(lower);
    }
    this.#askTimeoutMs = options.askTimeoutMs ?? 5000;
    this.#allowTtlMs = options.allowTtlMs ?? 3_600_000;
    this.#refuseTtlMs = options.refuseTtlMs ?? 60_000;
    this.#cache = new LRUCache<string, boolean>({ max: options.maxCached ?? 10_000, ttlAutopurge: false });
    this.#logger = options.logger;
  }

  /**
   * May `name` be issued on demand? Allow-list first, then the cache, then `ask` (shared by
   * concurrent callers). Never throws: an unreachable or slow `ask` endpoint refuses.
   * @param name a DNS name, lowercased by the caller.
   */
  async allows(name: string): Promise<boolean> {
    if (this.#allowListed(name)) return true;
    if (!this.#ask) return false;
    const cached = this.#cache.get(name);
    if (cached !== undefined) return cached;
    let pending = this.#inflight.get(name);
    if (!pending) {
      pending = this.#askEndpoint(name).finally(() => this.#inflight.delete(name));
      this.#inflight.set(name, pending);
    }
    return pending;
  }

  #allowListed(name: string): boolean {
    if (this.#exact.has(name)) return true;
    const dot = name.indexOf('.');
    return dot > 0 && this.#wildcardParents.has(name.slice(dot + 1));
  }

  async #askEndpoint(name: string): Promise<boolean> {
    const url = new URL(this.#ask!);
    url.searchParams.set('domain', name);
    let allowed = false;
    let status: number | undefined;
    try {
      const response = await request(url, { method: 'GET', signal: AbortSignal.timeout(this.#askTimeoutMs), headersTimeout: this.#askTimeoutMs, bodyTimeout: this.#askTimeoutMs });
      status = response.statusCode;
      await response.body.dump();
      allowed = status >= 200 && status < 300;
    } catch (error) {
      this.#logger?.warn({ names: [name], ask: this.#ask!.href, error: (error as Error).message }, 'on-demand ask endpoint failed; refusing the name');
    }
    this.#cache.set(name, allowed, { ttl: allowed ? this.#allowTtlMs : this.#refuseTtlMs });
    this.#logger?.debug({ names: [name], allowed, status }, 'on-demand decision');
    return allowed;
  }
}
