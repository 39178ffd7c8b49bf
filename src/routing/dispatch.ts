/**
 * From a request to its route: host → site → route → proxy. Both listeners call
 * {@link dispatchRequest} and {@link dispatchUpgrade}; the HTTP listener answers ACME challenges
 * and redirects before it gets here.
 *
 * Answers that never reach an upstream: 400 (no or malformed Host/`:authority`), 404 (no site or
 * route for the host and path), 421 (HTTPS: the connection's certificate does not cover the host,
 * RFC 9110 §15.5.20), 503 (no available upstream).
 */
import type { IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import { forward, sendProxyError, type ClientRequest, type ClientResponse, type ForwardOutcome, type ForwardTarget } from '../proxy/forward.js';
import { failure, FAILURES, type ProxyFailure } from '../proxy/errors.js';
import { proxyUpgrade, type UpgradeOutcome } from '../proxy/upgrade.js';
import { hasHttp1Body } from '../proxy/headers.js';
import type { SelectionContext } from '../upstream/balancer.js';
import type { Upstream } from '../upstream/pool.js';
import { normalizeHost, type RoutedSite } from './router.js';
import type { RouteRuntime, Runtime, SiteRuntime } from './runtime.js';
import { busyPollKick } from '../busy-poll.js';

/** Answers of the router itself (not of an upstream). */
export const ROUTING_FAILURES = Object.freeze({
  badHost: failure(400, 'GH_BAD_HOST', 'the request has no valid Host'),
  noSite: failure(404, 'GH_NO_SITE', 'no site is configured for this host'),
  noRoute: failure(404, 'GH_NO_ROUTE', 'no route matches this path'),
  misdirected: failure(421, 'GH_MISDIRECTED', 'this connection cannot serve this host'),
});

/** What the listener knows of the connection and the rest of the server. */
export interface DispatchContext {
  /** The current runtime (swapped on reload). */
  readonly runtime: Runtime;
  /** `https` on the TLS listener. */
  readonly protocol: 'http' | 'https';
  /**
   * HTTPS only: does the certificate served for `serverName` cover `host`? Used for 421 on
   * connections whose SNI differs from the request's host (HTTP/2 connection reuse, RFC 9113 §9.1.1).
   */
  readonly certificateCovers?: (serverName: string, host: string) => boolean;
  /** Called once per finished exchange (access log, metrics). */
  readonly onComplete: (record: AccessRecord) => void;
  /** Whether HTTP/1.1 answers should close their connection (draining). */
  readonly draining: () => boolean;
  /**
   * Route middleware (rate limit, debug capture): runs once a route matched, before an upstream is
   * chosen. Returns 0 to go on, or the status of the answer it sent itself (e.g. 429).
   */
  readonly beforeForward?: (req: ClientRequest, res: ClientResponse, site: SiteRuntime, route: RouteRuntime) => number;
  /** Called when an upgrade request was routed, before the tunnel opens (tunnels are tracked per route). */
  readonly onTunnel?: (req: IncomingMessage, socket: Duplex, route: RouteRuntime) => void;
}

/** One finished exchange, for the access log. */
export interface AccessRecord {
  readonly req: ClientRequest;
  readonly startedAt: number;
  readonly protocol: 'http' | 'https';
  readonly host: string;
  readonly site: SiteRuntime | undefined;
  readonly route: RouteRuntime | undefined;
  readonly status: number;
  readonly bytesIn: number;
  readonly bytesOut: number;
  readonly upstream: string | undefined;
  readonly error: string | undefined;
  readonly requestId: string | undefined;
}

const kAwaitingContinue = Symbol('gatehouse.awaitingContinue');

/**
 * Mark a request whose `Expect: 100-continue` Node has not answered (it came through the server's
 * 'checkContinue' event): the router sends `100 Continue` once the request is routed and its
 * declared length fits the route's `max_body`, and never for a request it refuses (RFC 9110
 * §10.1.1: a final status instead of 100 spares the client sending a body nobody reads).
 */
export function markAwaitingContinue(req: ClientRequest): void {
  (req as ClientRequest & { [kAwaitingContinue]?: true })[kAwaitingContinue] = true;
}

/** True when the request still waits for `100 Continue` (see {@link markAwaitingContinue}). */
export function awaitsContinue(req: ClientRequest): boolean {
  return (req as ClientRequest & { [kAwaitingContinue]?: true })[kAwaitingContinue] === true;
}

/** The host a request is for: `:authority` (HTTP/2, wins over `host`), else `Host` (RFC 9113 §8.3.1). */
export function requestHost(req: ClientRequest): string | undefined {
  const headers = req.headers;
  const authority = headers[':authority'];
  return normalizeHost(typeof authority === 'string' ? authority : headers.host);
}

/**
 * Route one request and forward it. Never throws.
 * @param site the site, when the caller already looked it up (the HTTP listener does).
 */
export function dispatchRequest(
  req: ClientRequest, res: ClientResponse, ctx: DispatchContext,
  hostArg?: string, routedArg?: RoutedSite<SiteRuntime, RouteRuntime>,
): void {
  busyPollKick();
  const startedAt = performance.now();
  const host = hostArg ?? requestHost(req);
  if (host === undefined) return reject(req, res, ctx, startedAt, '', undefined, ROUTING_FAILURES.badHost);
  const router = ctx.runtime.router;
  let routed = routedArg;
  if (routed === undefined) {
    if (ctx.certificateCovers !== undefined) {
      const serverName = (req.socket as TLSSocket | undefined)?.servername;
      if (typeof serverName === 'string' && serverName !== host && !ctx.certificateCovers(serverName, host)) {
        return reject(req, res, ctx, startedAt, host, undefined, ROUTING_FAILURES.misdirected);
      }
    }
    routed = router.siteFor(host);
    if (routed === undefined || (ctx.protocol === 'https' && routed.site.config.tls === 'off')) {
      return reject(req, res, ctx, startedAt, host, undefined, ROUTING_FAILURES.noSite);
    }
  }
  const site = routed.site;
  const url = req.url ?? '/';
  const matched = router.routeFor(routed, url);
  if (matched === undefined) return reject(req, res, ctx, startedAt, host, site, ROUTING_FAILURES.noRoute);
  const route = matched.route;
  if (ctx.beforeForward !== undefined) {
    const answered = ctx.beforeForward(req, res, site, route);
    if (answered !== 0) {
      return ctx.onComplete({
        req, startedAt, protocol: ctx.protocol, host, site, route,
        status: answered, bytesIn: 0, bytesOut: 0, upstream: undefined, error: undefined, requestId: undefined,
      });
    }
  }
  const group = route.group;
  const upstream = selectUpstream(route, req);
  if (upstream === undefined) return reject(req, res, ctx, startedAt, host, site, FAILURES.noUpstream, group.retryAfterMs());
  if (ctx.draining() && req.httpVersionMajor === 1) (res as { shouldKeepAlive?: boolean }).shouldKeepAlive = false;
  if (awaitsContinue(req)) {
    // Routed and an upstream chosen: ask for the body now, unless its declared length is over
    // max_body (forward answers 413 without reading it).
    const length = Number(req.headers['content-length']);
    const maxBody = route.config.max_body;
    if (!(maxBody > 0 && length > maxBody)) res.writeContinue();
  }

  forward(req, res, new RoutedExchange(req, ctx, startedAt, host, site, route, upstream, url));
}

/**
 * One routed request: the target `forward` reads, and the facts the access log needs once it is
 * done, in one object per request (no closure).
 */
class RoutedExchange implements ForwardTarget {
  readonly group: RouteRuntime['group'];
  readonly setCookie: string | undefined;
  readonly responseHeaders: readonly string[] | undefined;
  readonly path: string;
  readonly maxBody: number;
  readonly clientIp: string;
  readonly protocol: 'http' | 'https';

  constructor(
    private readonly req: ClientRequest,
    private readonly ctx: DispatchContext,
    private readonly startedAt: number,
    private readonly host: string,
    private readonly site: SiteRuntime,
    private readonly route: RouteRuntime,
    readonly upstream: Upstream,
    url: string,
  ) {
    this.group = route.group;
    this.setCookie = selection.setCookie;
    this.protocol = ctx.protocol;
    this.responseHeaders = ctx.protocol === 'https' ? site.httpsResponseHeaders : undefined;
    this.path = route.strip === '' ? url : stripPrefix(url, route.strip);
    this.maxBody = route.config.max_body;
    this.clientIp = req.socket?.remoteAddress ?? '';
  }

  onDone(outcome: ForwardOutcome): void {
    this.ctx.onComplete({
      req: this.req, startedAt: this.startedAt, protocol: this.protocol, host: this.host, site: this.site, route: this.route,
      status: outcome.status, bytesIn: outcome.bytesIn, bytesOut: outcome.bytesOut,
      upstream: outcome.upstream, error: outcome.error, requestId: outcome.requestId,
    });
  }
}

/**
 * Route an HTTP/1.1 Upgrade request (WebSocket) and open the tunnel. Never throws.
 */
export function dispatchUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer, ctx: DispatchContext): void {
  busyPollKick();
  const startedAt = performance.now();
  const host = requestHost(req);
  const runtime = ctx.runtime;
  const routed = host === undefined ? undefined : runtime.router.siteFor(host);
  let failure: ProxyFailure | undefined;
  let route: RouteRuntime | undefined;
  let upstream: Upstream | undefined;
  if (host === undefined) failure = ROUTING_FAILURES.badHost;
  else if (routed === undefined || (ctx.protocol === 'https' && routed.site.config.tls === 'off')) failure = ROUTING_FAILURES.noSite;
  else {
    route = runtime.router.routeFor(routed, req.url ?? '/')?.route;
    if (route === undefined) failure = ROUTING_FAILURES.noRoute;
    else {
      upstream = selectUpstream(route, req);
      if (upstream === undefined) failure = FAILURES.noUpstream;
      // A tunnel's outcome is not reported to the breaker: it never serves as a half-open trial.
      else route.group.release(upstream);
    }
  }
  if (failure !== undefined || route === undefined || upstream === undefined) {
    const f = failure ?? FAILURES.noUpstream;
    writeRawResponse(socket, f);
    ctx.onComplete({
      req, startedAt, protocol: ctx.protocol, host: host ?? '', site: routed?.site, route,
      status: f.status, bytesIn: 0, bytesOut: 0, upstream: undefined, error: f.code, requestId: undefined,
    });
    return;
  }
  const url = req.url ?? '/';
  ctx.onTunnel?.(req, socket, route);
  proxyUpgrade(req, socket, head, {
    upstream,
    path: route.strip === '' ? url : stripPrefix(url, route.strip),
    clientIp: (socket as Socket).remoteAddress ?? '',
    protocol: ctx.protocol,
    onDone: (outcome: UpgradeOutcome) => ctx.onComplete({
      req, startedAt, protocol: ctx.protocol, host: host!, site: routed!.site, route,
      status: outcome.status, bytesIn: outcome.bytesIn, bytesOut: outcome.bytesOut,
      upstream: outcome.upstream, error: outcome.error, requestId: outcome.requestId,
    }),
  });
}

const selection: SelectionContext = { clientIp: '', cookieHeader: undefined, exclude: undefined, setCookie: undefined };

/**
 * Ask the route's upstream group (breakers, then the policy); the sticky cookie the `cookie` policy
 * wants set is left in `selection.setCookie` until the next call.
 */
function selectUpstream(route: RouteRuntime, req: ClientRequest): Upstream | undefined {
  // One reused context: choose() is synchronous and keeps no reference to it.
  selection.clientIp = req.socket?.remoteAddress ?? '';
  const cookie = req.headers.cookie;
  selection.cookieHeader = typeof cookie === 'string' ? cookie : undefined;
  selection.exclude = undefined;
  selection.setCookie = undefined;
  return route.group.choose(selection);
}

/** `/api/users?x` with prefix `/api` → `/users?x`; `/api` → `/`. */
export function stripPrefix(url: string, prefix: string): string {
  const rest = url.slice(prefix.length);
  return rest.length === 0 || rest.charCodeAt(0) === 63 /* ? */ ? `/${rest}` : rest;
}

function reject(
  req: ClientRequest, res: ClientResponse, ctx: DispatchContext, startedAt: number, host: string,
  site: SiteRuntime | undefined, failure: ProxyFailure, retryAfterMs?: number,
): void {
  // The body was not read: HTTP/1.1 must not reuse a connection with an unread body (RFC 9112 §9.3).
  const close = req.httpVersionMajor === 1 && hasHttp1Body(req);
  sendProxyError(res, failure, '', close, retryAfterMs);
  ctx.onComplete({
    req, startedAt, protocol: ctx.protocol, host, site, route: undefined,
    status: failure.status, bytesIn: 0, bytesOut: 0, upstream: undefined, error: failure.code, requestId: undefined,
  });
}

function writeRawResponse(socket: Duplex, failure: ProxyFailure): void {
  const body = `${failure.message}\n`;
  socket.end(`HTTP/1.1 ${failure.status} ${STATUS_TEXT[failure.status] ?? 'Error'}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
}

const STATUS_TEXT: Readonly<Record<number, string>> = { 400: 'Bad Request', 404: 'Not Found', 421: 'Misdirected Request', 503: 'Service Unavailable' };
