/**
 * Load-balancing policies: which upstream of a route gets the next request.
 *
 * A policy is a {@link Selector}, built by name from a registry ({@link registerPolicy},
 * {@link createSelector}) as Caddy's `lb_policy` modules are; adding a policy never touches the
 * proxy. Built in, with Caddy/nginx names: `round_robin`, `weighted_round_robin`, `least_conn`,
 * `random_two`, `ip_hash`, `cookie`, `first`.
 *
 * Every policy skips upstreams whose `available` is false (active health check failed, or the
 * circuit breaker is open) and those listed in `ctx.exclude` (already tried by this request).
 *
 * Hot path: `select` runs once per request. It allocates nothing (the cookie policy computes each
 * upstream's signed cookie once and caches it), is O(n) in the number of upstreams of the route,
 * and never retains `ctx`.
 */
import { createHmac, randomBytes } from 'node:crypto';

/**
 * What a policy needs to know about an upstream. `upstream/pool.ts`'s `Upstream` satisfies it.
 */
export interface BalancedUpstream {
  /** Origin, e.g. `http://127.0.0.1:8080`; identifies the upstream (hashing, cookies). */
  readonly origin: string;
  /** Relative weight (integer >= 1) for `weighted_round_robin`, `least_conn`, `ip_hash`. */
  readonly weight: number;
  /** Requests currently in flight to this upstream; the proxy increments and decrements it. */
  inFlight: number;
  /** False while health checks or the circuit breaker keep the upstream out of rotation. */
  available: boolean;
}

/**
 * Per-request input and output of {@link Selector.select}. Plain fields, no callbacks, so the proxy
 * can fill one object per request (or reuse one) without allocating closures.
 */
export interface SelectionContext {
  /** Client IP address (`ip_hash`). IPv4-mapped IPv6 (`::ffff:1.2.3.4`) is treated as `1.2.3.4`. */
  clientIp: string;
  /**
   * The request's `Cookie` header, or undefined (`cookie`). HTTP/2 may send several `cookie`
   * fields: join them with `"; "` (RFC 9113 §8.2.3); Node's http2 already does.
   */
  cookieHeader: string | undefined;
  /**
   * Upstreams this request already tried (on a retry), skipped like unavailable ones; undefined
   * on the first attempt. When every available upstream is excluded `select` returns undefined and
   * the proxy may select again without `exclude` to reuse one.
   */
  exclude: readonly BalancedUpstream[] | undefined;
  /**
   * Output: a complete `Set-Cookie` header value the proxy must add to the response, or
   * undefined. The proxy sets it to undefined before calling `select`; the `cookie` policy sets it
   * when it (re)assigns the client to an upstream.
   */
  setCookie: string | undefined;
}

/** A load-balancing policy. One instance per route: policies keep state (counters, weights). */
export interface Selector {
  /**
   * Choose the upstream for one request.
   * @param upstreams the route's upstreams. Pass the same array on every call: a policy with
   *   per-upstream state (`weighted_round_robin`) resets that state when it sees a new array.
   * @param ctx request facts, and the `setCookie` output.
   * @returns an available upstream not in `ctx.exclude`, or undefined when there is none (the
   *   proxy answers 503).
   */
  select(upstreams: readonly BalancedUpstream[], ctx: SelectionContext): BalancedUpstream | undefined;
}

/** Options every policy factory receives; each policy reads the ones it knows. */
export interface SelectorOptions {
  /** `cookie`: name of the sticky cookie (route `cookie_name`). Default `gatehouse_upstream`. */
  readonly cookieName?: string;
  /**
   * `cookie`: HMAC-SHA256 key signing the cookie value. Default: 32 random bytes drawn once per
   * process, so cookies stay valid for the life of the process (and across config reloads) but
   * not across restarts or between several Gatehouse instances — configure a secret for those.
   */
  readonly cookieSecret?: string | Uint8Array;
  /** `cookie`: add the `Secure` attribute (set it for HTTPS sites). Default false. */
  readonly cookieSecure?: boolean;
  /** `cookie`: policy used when the cookie is absent, invalid, or names an unavailable upstream. Default `round_robin`. */
  readonly fallback?: string;
  /** Random source in [0, 1) (`random_two`). Default `Math.random`; tests pass a seeded one. */
  readonly random?: () => number;
}

/** Builds a policy instance. */
export type SelectorFactory = (options: SelectorOptions) => Selector;

/** A policy name that is not registered, or an invalid policy setup. */
export class BalancerError extends Error {
  constructor(readonly code: 'GH_LB_UNKNOWN_POLICY' | 'GH_LB_DUPLICATE_POLICY' | 'GH_LB_INVALID_FALLBACK', message: string) {
    super(`${code}: ${message}`);
    this.name = 'BalancerError';
  }
}

const policies = new Map<string, SelectorFactory>();

/**
 * Register a policy under a name (`load_balancing: NAME` in the config).
 * @throws BalancerError `GH_LB_DUPLICATE_POLICY` when the name is taken.
 */
export function registerPolicy(name: string, factory: SelectorFactory): void {
  if (policies.has(name)) throw new BalancerError('GH_LB_DUPLICATE_POLICY', `load_balancing policy "${name}" is already registered`);
  policies.set(name, factory);
}

/**
 * Build a new instance of the named policy (one per route).
 * @throws BalancerError `GH_LB_UNKNOWN_POLICY` when no policy has that name.
 */
export function createSelector(name: string, options: SelectorOptions = {}): Selector {
  const factory = policies.get(name);
  if (!factory) {
    throw new BalancerError('GH_LB_UNKNOWN_POLICY', `unknown load_balancing policy "${name}"; expected one of ${[...policies.keys()].join(', ')}`);
  }
  return factory(options);
}

/** Names of the registered policies, in registration order. */
export function policyNames(): string[] {
  return [...policies.keys()];
}

/** Available and not already tried by this request. */
function usable(upstream: BalancedUpstream, ctx: SelectionContext): boolean {
  if (!upstream.available) return false;
  const exclude = ctx.exclude;
  return exclude === undefined || !exclude.includes(upstream);
}

/**
 * `round_robin`: each available upstream in turn (Caddy `round_robin`). Weights are ignored. When
 * an upstream is skipped the turn passes to the next available one, and the rotation continues
 * after the chosen one, so the others share its load evenly.
 */
export class RoundRobinSelector implements Selector {
  private next = 0;

  select(upstreams: readonly BalancedUpstream[], ctx: SelectionContext): BalancedUpstream | undefined {
    const n = upstreams.length;
    for (let i = 0; i < n; i++) {
      const index = (this.next + i) % n;
      const upstream = upstreams[index]!;
      if (usable(upstream, ctx)) {
        this.next = (index + 1) % n;
        return upstream;
      }
    }
    return undefined;
  }
}

/**
 * `weighted_round_robin`: nginx's smooth weighted round robin (ngx_http_upstream_round_robin.c,
 * `ngx_http_upstream_get_peer`). Each selection adds every available upstream's weight to its
 * current weight, picks the highest current weight, and subtracts the total from the winner's.
 * Weights 5:1:1 give `a a b a c a a`, not `a a a a a b c`. Unavailable upstreams take no part
 * (their current weight is frozen), as in nginx.
 */
export class WeightedRoundRobinSelector implements Selector {
  private list: readonly BalancedUpstream[] | undefined;
  private current: number[] = [];

  select(upstreams: readonly BalancedUpstream[], ctx: SelectionContext): BalancedUpstream | undefined {
    if (upstreams !== this.list) {
      this.list = upstreams;
      this.current = new Array<number>(upstreams.length).fill(0);
    }
    const current = this.current;
    let total = 0;
    let best = -1;
    for (let i = 0; i < upstreams.length; i++) {
      const upstream = upstreams[i]!;
      if (!usable(upstream, ctx)) continue;
      const weight = upstream.weight;
      current[i]! += weight;
      total += weight;
      if (best < 0 || current[i]! > current[best]!) best = i;
    }
    if (best < 0) return undefined;
    current[best]! -= total;
    return upstreams[best];
  }
}

/**
 * `least_conn`: the upstream with the fewest requests in flight relative to its weight
 * (`inFlight / weight`, compared by cross-multiplication as nginx's `least_conn` does). Ties go
 * round robin: the scan starts one position later on every call, and the first of equals wins.
 */
export class LeastConnSelector implements Selector {
  private start = 0;

  select(upstreams: readonly BalancedUpstream[], ctx: SelectionContext): BalancedUpstream | undefined {
    const n = upstreams.length;
    if (n === 0) return undefined;
    const start = this.start % n;
    this.start = (start + 1) % n;
    let best: BalancedUpstream | undefined;
    for (let i = 0; i < n; i++) {
      const upstream = upstreams[(start + i) % n]!;
      if (!usable(upstream, ctx)) continue;
      if (best === undefined || upstream.inFlight * best.weight < best.inFlight * upstream.weight) best = upstream;
    }
    return best;
  }
}

/**
 * `random_two`: power of two choices (Mitzenmacher; Caddy `random_choose 2`, nginx
 * `random two least_conn`). Picks two distinct available upstreams at random and keeps the one
 * with fewer requests in flight relative to its weight. Nearly as good as `least_conn` at
 * balancing, without every request piling onto the same idle upstream.
 */
export class RandomTwoSelector implements Selector {
  constructor(private readonly random: () => number = Math.random) {}

  select(upstreams: readonly BalancedUpstream[], ctx: SelectionContext): BalancedUpstream | undefined {
    let count = 0;
    let only: BalancedUpstream | undefined;
    for (let i = 0; i < upstreams.length; i++) {
      if (usable(upstreams[i]!, ctx)) {
        count++;
        only = upstreams[i];
      }
    }
    if (count <= 1) return only;
    const a = Math.floor(this.random() * count);
    let b = Math.floor(this.random() * (count - 1));
    if (b >= a) b++;
    let first: BalancedUpstream | undefined;
    let second: BalancedUpstream | undefined;
    for (let i = 0, k = 0; i < upstreams.length; i++) {
      const upstream = upstreams[i]!;
      if (!usable(upstream, ctx)) continue;
      if (k === a) first = upstream;
      else if (k === b) second = upstream;
      k++;
    }
    return second!.inFlight * first!.weight < first!.inFlight * second!.weight ? second : first;
  }
}

/**
 * `ip_hash`: the same client IP always reaches the same upstream, by rendezvous (highest random
 * weight) hashing: every upstream gets a score hash(ip, origin) and the highest available score
 * wins. Adding an upstream moves only the ~1/(n+1) of clients it now wins; removing or losing one
 * moves only its own clients, each to its next-best upstream. Weighted as in "weighted rendezvous
 * hashing" (score = weight / -ln(h)), so an upstream of weight 2 gets twice the clients.
 * (nginx's `ip_hash` hashes only the first three octets and is not consistent; `hash $remote_addr
 * consistent` is the nginx equivalent of this policy.)
 */
export class IpHashSelector implements Selector {
  private readonly originHashes = new Map<string, number>();

  select(upstreams: readonly BalancedUpstream[], ctx: SelectionContext): BalancedUpstream | undefined {
    const ip = ctx.clientIp;
    const key = hashString(ip, ip.startsWith('::ffff:') && ip.includes('.') ? 7 : 0);
    let best: BalancedUpstream | undefined;
    let bestScore = -1;
    for (let i = 0; i < upstreams.length; i++) {
      const upstream = upstreams[i]!;
      if (!usable(upstream, ctx)) continue;
      let originHash = this.originHashes.get(upstream.origin);
      if (originHash === undefined) {
        originHash = hashString(upstream.origin, 0);
        this.originHashes.set(upstream.origin, originHash);
      }
      const h = fmix32((key ^ originHash) >>> 0);
      // h in [0, 2^32): map to (0, 1) and apply the weighted-rendezvous score; monotone in h.
      const score = upstream.weight / -Math.log((h + 1) / 4294967297);
      if (score > bestScore) {
        bestScore = score;
        best = upstream;
      }
    }
    return best;
  }
}

/**
 * `cookie`: sticky sessions. The cookie's value names the upstream by HMAC-SHA256(secret, origin)
 * (base64url), as Caddy's `cookie` policy does: it does not reveal the origin, and a client cannot
 * forge a value for an upstream it was never sent to. A request whose cookie names an available
 * upstream goes there; otherwise (no cookie, a tampered or foreign value, the upstream unavailable
 * or already tried) the `fallback` policy chooses and `ctx.setCookie` carries the new cookie.
 * The cookie is a session cookie: `Path=/; HttpOnly; SameSite=Lax` (plus `Secure` when configured).
 */
export class CookieSelector implements Selector {
  private readonly name: string;
  private readonly secret: Uint8Array;
  private readonly attributes: string;
  private readonly fallback: Selector;
  /** origin → [cookie value, Set-Cookie header value]; computed once per origin. */
  private readonly signed = new Map<string, readonly [string, string]>();

  constructor(options: SelectorOptions) {
    this.name = options.cookieName ?? DEFAULT_COOKIE_NAME;
    const secret = options.cookieSecret;
    this.secret = secret === undefined ? processCookieSecret : typeof secret === 'string' ? Buffer.from(secret) : secret;
    this.attributes = `; Path=/; HttpOnly; SameSite=Lax${options.cookieSecure ? '; Secure' : ''}`;
    const fallback = options.fallback ?? 'round_robin';
    if (fallback === 'cookie') throw new BalancerError('GH_LB_INVALID_FALLBACK', 'the cookie policy cannot fall back to itself');
    this.fallback = createSelector(fallback, options);
  }

  select(upstreams: readonly BalancedUpstream[], ctx: SelectionContext): BalancedUpstream | undefined {
    const header = ctx.cookieHeader;
    if (header !== undefined) {
      const start = cookieValueStart(header, this.name);
      if (start >= 0) {
        let end = header.indexOf(';', start);
        if (end < 0) end = header.length;
        while (end > start && (header.charCodeAt(end - 1) === 32 || header.charCodeAt(end - 1) === 9)) end--;
        for (let i = 0; i < upstreams.length; i++) {
          const upstream = upstreams[i]!;
          const value = this.signedFor(upstream.origin)[0];
          if (value.length === end - start && header.startsWith(value, start)) {
            if (usable(upstream, ctx)) return upstream;
            break;
          }
        }
      }
    }
    const chosen = this.fallback.select(upstreams, ctx);
    if (chosen !== undefined) ctx.setCookie = this.signedFor(chosen.origin)[1];
    return chosen;
  }

  private signedFor(origin: string): readonly [string, string] {
    let entry = this.signed.get(origin);
    if (entry === undefined) {
      const value = createHmac('sha256', this.secret).update(origin).digest('base64url');
      entry = [value, `${this.name}=${value}${this.attributes}`];
      this.signed.set(origin, entry);
    }
    return entry;
  }
}

/** `first`: the first available upstream in config order (Caddy `first`): active/passive failover. */
export class FirstSelector implements Selector {
  select(upstreams: readonly BalancedUpstream[], ctx: SelectionContext): BalancedUpstream | undefined {
    for (let i = 0; i < upstreams.length; i++) {
      if (usable(upstreams[i]!, ctx)) return upstreams[i];
    }
    return undefined;
  }
}

/** Default sticky cookie name; the same as the config schema's `cookie_name` default. */
export const DEFAULT_COOKIE_NAME = 'gatehouse_upstream';

const processCookieSecret = randomBytes(32);

registerPolicy('round_robin', () => new RoundRobinSelector());
registerPolicy('weighted_round_robin', () => new WeightedRoundRobinSelector());
registerPolicy('least_conn', () => new LeastConnSelector());
registerPolicy('random_two', (options) => new RandomTwoSelector(options.random));
registerPolicy('ip_hash', () => new IpHashSelector());
registerPolicy('cookie', (options) => new CookieSelector(options));
registerPolicy('first', () => new FirstSelector());

/**
 * Index just after `name=` in a Cookie header (`a=1; name=value; b=2`), or -1. The name must start
 * the header or follow `;` and optional whitespace, so `xname=` does not match `name=`.
 */
function cookieValueStart(header: string, name: string): number {
  let from = 0;
  for (;;) {
    const at = header.indexOf(name, from);
    if (at < 0) return -1;
    const equals = at + name.length;
    if (header.charCodeAt(equals) === 61 /* = */) {
      let before = at - 1;
      while (before >= 0 && (header.charCodeAt(before) === 32 || header.charCodeAt(before) === 9)) before--;
      if (before < 0 || header.charCodeAt(before) === 59 /* ; */) return equals + 1;
    }
    from = at + 1;
  }
}

/** FNV-1a (32-bit) of `text` from `offset`, finished with murmur3's fmix32 for avalanche. */
function hashString(text: string, offset: number): number {
  let hash = 0x811c9dc5;
  for (let i = offset; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193);
  }
  return fmix32(hash >>> 0);
}

/** murmur3's 32-bit finaliser: every input bit affects every output bit. */
function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}
