/**
 * Routing: request host → site, then longest path prefix → route.
 *
 * Host lookup is O(1): exact names in one Map, one-label wildcards (`*.example.com`) in another
 * keyed by the parent name, then the catch-all `*`. Path prefixes of a site are tried longest
 * first and match on a segment boundary: `/api` and `/api/` both match `/api`, `/api/x` and
 * `/api?q`, never `/apix` (as Caddy's `handle_path /api/*` and nginx's `location /api/` users expect).
 */

/** What the router needs to know of a site. `R` is the runtime route the caller builds. */
export interface RoutableSite<R> {
  readonly hosts: readonly string[];
  readonly routes: readonly RoutableRoute<R>[];
}

export interface RoutableRoute<R> {
  /** Path prefix, starting with `/`. */
  readonly path: string;
  readonly route: R;
}

/** A site as the router holds it: its routes sorted longest prefix first. */
export interface RoutedSite<S, R> {
  readonly site: S;
  readonly routes: readonly PrefixRoute<R>[];
}

export interface PrefixRoute<R> {
  /** The prefix without a trailing slash (`/api/` → `/api`, `/` → ``). */
  readonly prefix: string;
  readonly route: R;
}

/**
 * Host and path router. Built once per config; immutable afterwards, so a reload swaps the whole
 * router and in-flight requests keep the one they started with.
 */
export class Router<S extends RoutableSite<R>, R> {
  private readonly exact = new Map<string, RoutedSite<S, R>>();
  private readonly wildcard = new Map<string, RoutedSite<S, R>>();
  private catchAll: RoutedSite<S, R> | undefined;

  /** @param sites in config order; a host listed twice is a config error caught before this. */
  constructor(sites: readonly S[]) {
    for (const site of sites) {
      const routes = site.routes
        .map((r) => ({ prefix: r.path.endsWith('/') ? r.path.slice(0, -1) : r.path, route: r.route }))
        .sort((a, b) => b.prefix.length - a.prefix.length);
      const routed: RoutedSite<S, R> = { site, routes };
      for (const host of site.hosts) {
        if (host === '*') this.catchAll ??= routed;
        else if (host.startsWith('*.')) this.wildcard.set(host.slice(2), routed);
        else this.exact.set(host, routed);
      }
    }
  }

  /**
   * The site for a host name.
   * @param host a normalised host (lowercase, no port, no trailing dot): see {@link normalizeHost}.
   */
  siteFor(host: string): RoutedSite<S, R> | undefined {
    const exact = this.exact.get(host);
    if (exact) return exact;
    const dot = host.indexOf('.');
    if (dot > 0) {
      const wild = this.wildcard.get(host.slice(dot + 1));
      if (wild) return wild;
    }
    return this.catchAll;
  }

  /**
   * The route of a site for a request target.
   * @param target origin-form request target (`/path?query`).
   * @returns the route with the longest matching prefix, or undefined.
   */
  routeFor(site: RoutedSite<S, R>, target: string): PrefixRoute<R> | undefined {
    const routes = site.routes;
    for (let i = 0; i < routes.length; i++) {
      const candidate = routes[i]!;
      const prefix = candidate.prefix;
      if (prefix.length === 0) return candidate;
      if (target.startsWith(prefix)) {
        const next = target.charCodeAt(prefix.length);
        // end of target, "/", "?" : a segment boundary
        if (Number.isNaN(next) || next === 47 || next === 63) return candidate;
      }
    }
    return undefined;
  }
}

/**
 * Normalise a Host header or `:authority` value for lookups: lowercase, port removed, trailing dot
 * removed, IPv6 brackets removed (RFC 9110 §7.2, RFC 3986 §3.2.2).
 * @returns the host, or undefined when the value is empty, carries userinfo, or is malformed.
 */
export function normalizeHost(value: string | undefined): string | undefined {
  if (!value) return undefined;
  let host = value;
  if (host.charCodeAt(0) === 91 /* [ */) {
    const end = host.indexOf(']');
    if (end < 0) return undefined;
    const rest = host.slice(end + 1);
    if (rest.length > 0 && !/^:\d{1,5}$/.test(rest)) return undefined;
    host = host.slice(1, end);
  } else {
    const colon = host.indexOf(':');
    if (colon >= 0) {
      if (!/^\d{0,5}$/.test(host.slice(colon + 1))) return undefined;
      host = host.slice(0, colon);
    }
    if (host.includes('@')) return undefined;
  }
  if (host.length === 0 || host.length > 253) return undefined;
  if (host.charCodeAt(host.length - 1) === 46 /* . */) host = host.slice(0, -1);
  // Cheap check first: most hosts are already lowercase.
  return /[A-Z]/.test(host) ? host.toLowerCase() : host;
}
