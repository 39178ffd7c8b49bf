/**
 * The proxy hot path: relays one client request (HTTP/1.x; HTTP/2 through Node's compat API or, without
 * a body, straight from its stream: `proxy/http2-stream.ts`) to one upstream over
 * its connection pool (`upstream/http1-pool.ts`) and relays the answer back, streaming both bodies
 * with backpressure.
 *
 * One `ProxyExchange` object per request is both the pool's handler (onConnect, onHeaders, onData,
 * onComplete, onError, onBodySent) and the outcome handed to the access log. Client-side events reach
 * it through module-level functions and a symbol on the response, so no closure is allocated per
 * request.
 *
 * Retries (when the target carries the route's `UpstreamGroup`): an attempt that fails before any
 * response byte arrived is reported to the upstream's circuit breaker, `upstream/retry.ts` decides
 * whether the request may be sent again, and if so the same exchange is dispatched to another
 * upstream (chosen with the tried ones excluded). What decides: whether the pool called `onConnect`
 * (the request head is about to be written, so "bytes were sent") and how many body bytes
 * `onBodySent` saw. A request with a body is sent again only when it never reached a connection
 * (the body stream is untouched); bodies are not buffered for replay, so a PUT with a body that hit
 * a stale connection is not retried. A POST that reached an upstream is never sent twice. The
 * common path — first attempt succeeds — allocates nothing for this.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { constants as http2Constants, sensitiveHeaders as http2SensitiveHeaders, type Http2ServerRequest, type Http2ServerResponse, type ServerHttp2Stream } from 'node:http2';
import type { Socket } from 'node:net';
import { Readable } from 'node:stream';
import type { TimeoutsConfig } from '../config/schema.js';
import type { SelectionContext } from '../upstream/balancer.js';
import type { UpstreamGroup } from '../upstream/group.js';
import type { UpstreamCall, UpstreamHandler, UpstreamRequestOptions } from '../upstream/http1-pool.js';
import type { Upstream } from '../upstream/pool.js';
import { retryVerdict, type RetryVerdict } from '../upstream/retry.js';
import { classifyUpstreamError, errorBody, FAILURES, ProxyAbortError, type ProxyFailure } from './errors.js';
import type { StreamRequest, StreamResponse } from './http2-stream.js';
import {
  newRequestHeadFacts, toClientResponseHeaders, toClientTrailers, toUpstreamRequestHeaders,
  type ClientResponseHeaders, type RequestHeadFacts,
} from './headers.js';

/**
 * A client request: `http.IncomingMessage` (HTTP/1.x, TLS or plain), `http2.Http2ServerRequest`
 * (HTTP/2 with a body), or a {@link StreamRequest} (HTTP/2 without a body, served from its stream).
 */
export type ClientRequest = IncomingMessage | Http2ServerRequest | StreamRequest;
/** A client response: `http.ServerResponse`, `http2.Http2ServerResponse` or a {@link StreamResponse}. */
export type ClientResponse = ServerResponse | Http2ServerResponse | StreamResponse;
/**
 * `end` as every client response has it (their overloads differ, so a union cannot be called):
 * `endable(res).end(body)`.
 */
export function endable(res: ClientResponse): { end(chunk?: string | Buffer): unknown } {
  return res as { end(chunk?: string | Buffer): unknown };
}
/** The HTTP/2 request and response kinds; both carry their `stream`. */
type Http2Request = Http2ServerRequest | StreamRequest;
type Http2Response = Http2ServerResponse | StreamResponse;

/** What `forward` needs besides the request and response; built by the router per request. */
export interface ForwardTarget {
  /**
   * The upstream chosen by the balancer (with `group.choose`, which took its breaker's permission
   * when `group` is given); `forward` increments/decrements its `inFlight`.
   */
  readonly upstream: Upstream;
  /**
   * The route's upstreams. When given, every attempt's outcome is reported to the upstream's
   * circuit breaker, and a failed attempt is retried on another upstream within `group.retries`
   * (see the file comment). When absent: one attempt, no breaker.
   */
  readonly group?: UpstreamGroup;
  /**
   * A `Set-Cookie` value to add to the response (the `cookie` policy's sticky cookie), next to any
   * the upstream sends. A retry that moves the client to another upstream replaces it.
   */
  readonly setCookie?: string;
  /**
   * Extra response fields, `[name, value, name, value, ...]` with lower-case names (e.g. the site's
   * `strict-transport-security`). Each replaces the upstream's field of the same name; written
   * only on responses relayed from an upstream, not on the proxy's own error answers.
   */
  readonly responseHeaders?: readonly string[];
  /**
   * The request target sent upstream: path and query, starting with `/` (RFC 9112 §3.2.1
   * origin-form). The router strips the route prefix before (`strip_prefix`), e.g. `/api/users?id=1`
   * → `/users?id=1`; otherwise it passes `req.url`.
   */
  readonly path: string;
  /** Largest request body in bytes (route `max_body`); 0 = no limit. Default 0. */
  readonly maxBody?: number;
  /**
   * Per-request overrides of the upstream pool's timeouts (ms): `response_header` (504 when exceeded)
   * and `body_idle` (the response is aborted). Default: the `Upstream`'s own timeouts.
   */
  readonly timeouts?: Partial<Pick<TimeoutsConfig, 'response_header' | 'body_idle'>>;
  /** The client's IP address (`req.socket.remoteAddress`), appended to `X-Forwarded-For`. */
  readonly clientIp: string;
  /** `https` on the TLS listener, `http` on the plain one (`X-Forwarded-Proto`). */
  readonly protocol: 'http' | 'https';
  /** A request id chosen earlier (middleware). Default: the client's `X-Request-Id` if sane, else a new one. */
  readonly requestId?: string;
  /**
   * Called once, as a method of the target, when the exchange is over (response ended, failed or
   * the client left). A class implementing the target can keep its per-request facts in fields
   * instead of a closure.
   */
  onDone?(outcome: ForwardOutcome): void;
}

/** The result of one exchange, for the access log and metrics. Valid only during `onDone`. */
export interface ForwardOutcome extends ExchangeOutcome {
  /** The original host (`Host` or `:authority`). */
  readonly host: string;
}

/** What the access log needs of any proxied exchange: a request/response or an upgrade tunnel. */
export interface ExchangeOutcome {
  /** Status sent to the client; 499 when the client left before any status was sent; 101 for a tunnel. */
  readonly status: number;
  /** Bytes relayed client → upstream (request body, or tunnel bytes after the switch). */
  readonly bytesIn: number;
  /** Bytes relayed upstream → client (response body, or tunnel bytes after the switch). */
  readonly bytesOut: number;
  /** The upstream's origin, e.g. `http://127.0.0.1:8080`. */
  readonly upstream: string;
  /** The failure code (`GH_UPSTREAM_REFUSED`, `GH_CLIENT_ABORTED`, ...) or `undefined` on success. */
  readonly error: string | undefined;
  /** The request id sent upstream and returned in `X-Request-Id`. */
  readonly requestId: string;
}

/**
 * Forwards one request to `target.upstream` and streams the answer to the client.
 *
 * - Headers: see `proxy/headers.ts` (hop-by-hop removal, `X-Forwarded-*`, `Via`, `X-Request-Id`).
 * - Bodies stream both ways with backpressure; nothing is buffered. Upstream trailers reach the
 *   client (HTTP/1.1 chunked trailers, HTTP/2 trailing HEADERS); `TE: trailers` goes upstream when
 *   the client sent it. Request trailers are not forwarded.
 * - `maxBody`: 413 before contacting the upstream when `Content-Length` exceeds it; a body without
 *   a length is counted and the exchange aborted with 413 (if no response header was sent yet).
 * - Failures before the response header: 502 (refused, reset, DNS, TLS, invalid response), 504
 *   (connect or response-header timeout), with a short text body. After the header: the client
 *   response is aborted (HTTP/1.1 socket destroyed, HTTP/2 stream reset with INTERNAL_ERROR) so it
 *   never looks complete.
 * - The client leaving (socket closed, stream reset) aborts the upstream request, which frees (or
 *   closes) its connection.
 * - `Expect: 100-continue` is not forwarded; Node's server answers `100 Continue` itself.
 *
 * Never throws and never emits an unhandled 'error'.
 *
 * @param req the client request (plain `http.IncomingMessage` or `http2.Http2ServerRequest`).
 * @param res its response.
 * @param target upstream, path, limits, client facts and the completion callback.
 */
export function forward(req: ClientRequest, res: ClientResponse, target: ForwardTarget): void {
  const exchange = new ProxyExchange(req, res, target);
  exchange.start();
}

/**
 * Sends a proxy error response (plain text, `X-Request-Id` when given) if no header was sent yet;
 * e.g. 503 when the balancer found no available upstream. Never throws.
 *
 * @param close add `Connection: close` (HTTP/1.x only), for answers sent before the body was read.
 * @param retryAfterMs add `Retry-After` (RFC 9110 §10.2.3) in whole seconds, rounded up (at least 1),
 *   e.g. from `UpstreamGroup.retryAfterMs()` on a 503. None when undefined.
 */
export function sendProxyError(res: ClientResponse, failure: ProxyFailure, requestId = '', close = false, retryAfterMs?: number): void {
  if (res.headersSent || res.writableEnded || res.destroyed) return;
  const body = errorBody(failure);
  const length = String(Buffer.byteLength(body));
  const retryAfter = retryAfterMs === undefined ? undefined : String(Math.max(1, Math.ceil(retryAfterMs / 1000)));
  try {
    if (isHttp2Response(res)) {
      const headers: Record<string, string> = { 'content-type': 'text/plain; charset=utf-8', 'content-length': length };
      if (requestId !== '') headers['x-request-id'] = requestId;
      if (retryAfter !== undefined) headers['retry-after'] = retryAfter;
      res.writeHead(failure.status, headers);
    } else {
      const headers = ['Content-Type', 'text/plain; charset=utf-8', 'Content-Length', length];
      if (requestId !== '') headers.push('X-Request-Id', requestId);
      if (retryAfter !== undefined) headers.push('Retry-After', retryAfter);
      if (close) headers.push('Connection', 'close');
      res.writeHead(failure.status, headers);
    }
    endable(res).end(body);
  } catch {
    res.destroy();
  }
}

/** Response bytes queued for a client before the upstream is paused (bytes). */
const RESPONSE_BUFFER = 256 * 1024;

const kExchange = Symbol('gatehouse.proxyExchange');

interface ExchangeCarrier {
  [kExchange]?: ProxyExchange;
}

/** One request's life; the upstream pool's handler and the `ForwardOutcome`. */
class ProxyExchange implements ForwardOutcome, UpstreamHandler {
  status = 0;
  bytesIn = 0;
  bytesOut = 0;
  error: string | undefined = undefined;
  /** Origin of the upstream of the current (last) attempt. */
  upstream: string;
  requestId = '';
  host = '';

  private readonly http2: boolean;
  /**
   * Where the client side's 'close' and 'drain' are listened for: the response (HTTP/1.x), or the
   * HTTP/2 stream itself (the compat response only relays the stream's events).
   */
  private readonly events: ExchangeCarrier & { on(event: 'close' | 'drain', listener: (this: ExchangeCarrier) => void): unknown };
  /**
   * HTTP/2 only: the response goes straight to the `ServerHttp2Stream` (`respond`/`write`/`end`)
   * instead of through the compat `Http2ServerResponse`, whose `writeHead` copies and validates
   * every field a second time (see `respondDirect`). Set per response in `onHeaders`.
   */
  private direct: ServerHttp2Stream | null = null;
  private readonly maxBody: number;
  /** The current attempt's upstream request, once the pool called onConnect. */
  private call: UpstreamCall | null = null;
  private headersSent = false;
  /** The upstream side is over (onComplete or onError ran, or it was never dispatched). */
  private finished = false;
  private clientGone = false;
  private drainListening = false;
  private bodyTooLarge = false;
  /** The upstream of the current attempt. */
  private current: Upstream;
  /** The dispatch options, kept for a retry. */
  private options: UpstreamRequestOptions | null = null;
  private body: Readable | null = null;
  /** The pool called onConnect for the current attempt: the request head is being written. */
  private connected = false;
  /** The pool called onHeaders for the current attempt: response bytes arrived. */
  private responded = false;
  /** Attempts made, including the current one. */
  private attempts = 1;
  /** performance.now() when the first and the current attempt were dispatched. */
  private startedAt = 0;
  private attemptAt = 0;
  /** Upstreams already tried; allocated on the first retry. */
  private tried: Upstream[] | undefined = undefined;
  /** A stale-connection reset was already not counted against a breaker for this request. */
  private staleForgiven = false;
  /** The sticky cookie to set; a retry may replace the target's. */
  private setCookie: string | undefined;

  constructor(
    private readonly req: ClientRequest,
    private readonly res: ClientResponse,
    private readonly target: ForwardTarget,
  ) {
    this.current = target.upstream;
    this.upstream = target.upstream.origin;
    this.setCookie = target.setCookie;
    this.http2 = req.httpVersionMajor === 2;
    this.events = (this.http2 ? (res as Http2Response).stream : res) as ProxyExchange['events'];
    this.maxBody = target.maxBody ?? 0;
  }

  start(): void {
    const { req, res, target } = this;
    const facts: RequestHeadFacts = newRequestHeadFacts();
    const headers = toUpstreamRequestHeaders(req.rawHeaders, req.httpVersion, target, facts);
    this.requestId = facts.requestId;
    this.host = facts.host;
    this.current.inFlight++;

    const events = this.events;
    events[kExchange] = this;
    events.on('close', onClientClose);

    if (this.maxBody > 0 && facts.contentLength > this.maxBody) {
      this.fail(FAILURES.bodyTooLarge);
      return;
    }

    let body: Readable | null = null;
    if (this.http2) {
      // The body of an Http2ServerRequest goes through its own stream (RequestBody), which reads
      // and drops the rest of it when the upstream request ends early.
      const stream = (req as Http2Request).stream;
      if (facts.contentLength !== 0 && !stream.endAfterHeaders && !req.readableEnded) body = new RequestBody(req as Http2ServerRequest);
    } else if (facts.contentLength > 0 || facts.chunked) {
      body = req as IncomingMessage;
    }

    const timeouts = target.timeouts;
    const options: UpstreamRequestOptions = {
      path: target.path,
      method: req.method!,
      headers,
      body,
      headersTimeout: timeouts?.response_header,
      bodyTimeout: timeouts?.body_idle,
    };
    this.options = options;
    this.body = body;
    this.startedAt = performance.now();
    this.send();
  }

  /** Dispatches the current attempt on the current upstream's pool. */
  send(): void {
    this.attemptAt = performance.now();
    try {
      this.current.pool.dispatch(this.options!, this);
    } catch (error) {
      // dispatch reports through onError; this only guards against a throwing handler.
      this.onError(error as Error);
    }
  }

  // ---- the upstream pool's handler ----

  onConnect(call: UpstreamCall): void {
    this.call = call;
    this.connected = true;
    if (this.clientGone) call.abort(new ProxyAbortError(FAILURES.clientAborted));
  }

  onBodySent(chunk: Buffer | string): void {
    this.bytesIn += chunk.length;
    if (this.maxBody > 0 && this.bytesIn > this.maxBody) {
      this.bodyTooLarge = true;
      throw new ProxyAbortError(FAILURES.bodyTooLarge); // the pool aborts the request: onError
    }
  }

  onHeaders(statusCode: number, rawHeaders: string[], _statusText: string, validated: boolean): boolean {
    this.responded = true;
    this.target.group?.reportResponse(this.current, statusCode, performance.now() - this.attemptAt);
    if (this.clientGone) return true;
    const headers = toClientResponseHeaders(rawHeaders, this.http2, this.requestId, statusCode, validated);
    const extra = this.target.responseHeaders;
    if (this.setCookie !== undefined || extra !== undefined) addResponseHeaders(headers, this.http2, this.setCookie, extra);
    try {
      if (this.http2 && respondDirect(this.res as Http2Response, statusCode, headers as Record<string, string | string[]>, this.req.method === 'HEAD')) {
        this.direct = (this.res as Http2Response).stream;
      } else {
        (this.res as ServerResponse).writeHead(statusCode, headers as string[]);
      }
    } catch {
      this.call?.abort(new ProxyAbortError(FAILURES.badResponse));
      return false;
    }
    this.headersSent = true;
    this.status = statusCode;
    return true;
  }

  onData(chunk: Buffer): boolean {
    this.bytesOut += chunk.length;
    if (this.clientGone) return true;
    const res = this.direct ?? this.res as ServerResponse;
    // A chunk of a large read views a read block that is reused once released (call.hold()),
    // from the write's callback: node:http calls it once the bytes are with the kernel; an
    // HTTP/2 stream once its session wrote the DATA frames that carry them to the socket (Node's
    // Http2Session completes a stream's write request after the socket write of the frames sent
    // from its memory). A failed write (the stream or socket destroyed; a native write may still
    // read the memory) keeps its hold: the block is then left to the garbage collector.
    const call = this.call!;
    const release = call.hold();
    if (release === null && !this.http2 && call.lastChunk) {
      // The body's last bytes go out with the end of the response: write() would cork the socket
      // until the next tick (a process.nextTick per response); end(chunk) writes at once.
      (res as ServerResponse).end(chunk);
      return true;
    }
    // The chunks of a large body read in this event-loop turn go to an HTTP/1.1 client in one
    // writev (HTTP/2 sessions already send their DATA frames once per turn).
    if (release !== null && !this.http2) corkForTurn((res as ServerResponse).socket);
    // Keep reading while less than RESPONSE_BUFFER is queued for the client, though write() says
    // false past the socket's 16 KiB mark: pausing the upstream for each 32 KiB chunk costs a
    // readStop/readStart pair and an event-loop turn per chunk on large bodies.
    const queued = release === null ? res.write(chunk) : res.write(chunk, release);
    if (queued || res.writableLength < RESPONSE_BUFFER) return true;
    if (!this.drainListening) {
      this.drainListening = true;
      this.events.on('drain', onClientDrain);
    }
    return false; // the pool pauses the upstream socket until call.resume()
  }

  onComplete(trailers: string[] | Buffer[] | null): void {
    if (this.finished) return;
    this.finished = true;
    this.releaseBody();
    if (this.direct !== null) {
      // A response with a Content-Length: no trailers (HTTP/1.1 sends them only after chunks).
      if (!this.clientGone && !this.direct.writableEnded) this.direct.end();
    } else if (!this.clientGone && !this.res.writableEnded) {
      const clientTrailers = toClientTrailers(trailers);
      try {
        if (clientTrailers !== undefined) this.res.addTrailers(clientTrailers);
      } catch {
        // Trailers the client protocol cannot carry are dropped; the body is complete.
      }
      endable(this.res).end();
    }
    this.done();
  }

  onError(error: Error): void {
    if (this.finished) return;
    const group = this.target.group;
    if (group !== undefined) {
      if (this.clientGone || this.bodyTooLarge) {
        group.release(this.current);
      } else {
        const verdict = this.responded ? 'no_response_started' : this.retryVerdict(error, group);
        if (verdict === 'retry_stale_connection' && !this.staleForgiven) {
          // The keep-alive race is not the upstream's failure; once per request it does not count.
          this.staleForgiven = true;
          group.release(this.current);
        } else {
          group.reportFailure(this.current, error);
        }
        if (verdict.startsWith('retry_') && this.retry(group)) return;
      }
    }
    this.finished = true;
    this.releaseBody();
    const failure = this.bodyTooLarge ? FAILURES.bodyTooLarge : classifyUpstreamError(error);
    if (this.clientGone) {
      this.error = FAILURES.clientAborted.code;
    } else if (!this.headersSent) {
      this.error = failure.code;
      this.status = failure.status;
      sendProxyError(this.res, failure, this.requestId, failure === FAILURES.bodyTooLarge);
    } else {
      this.error = failure.code;
      abortClientResponse(this.res, this.http2);
    }
    this.done();
  }

  // ---- client side ----

  /** The response closed: normal after the end, else the client went away. */
  clientClosed(): void {
    if (this.finished || this.clientGone) return;
    this.clientGone = true;
    if (!this.headersSent) this.status = FAILURES.clientAborted.status;
    this.call?.abort(new ProxyAbortError(FAILURES.clientAborted));
    // Not yet connected: onConnect aborts as soon as the pool calls it.
  }

  clientDrained(): void {
    if (!this.finished) this.call?.resume();
  }

  /** May the failed attempt be made again? `upstream/retry.ts` decides from what was sent. */
  private retryVerdict(error: Error, group: UpstreamGroup): RetryVerdict {
    const body = this.body;
    // A body the pool started reading cannot be sent again (it is not buffered).
    if (body !== null && (body.readableDidRead || body.destroyed)) return 'no_body_not_replayable';
    return retryVerdict({
      method: this.req.method ?? 'GET',
      attempt: this.attempts,
      startedAt: this.startedAt,
      now: performance.now(),
      error,
      requestBodyReplayable: body === null,
      bytesSent: this.connected ? this.bytesIn + 1 : 0,
      responseStarted: this.responded,
    }, group.retries);
  }

  /**
   * Move to another upstream (or the same one, on a single-upstream route) and dispatch again on
   * the next tick — not from inside the pool's error handling, which may still be failing the pool's
   * queue.
   * @returns true when an attempt was scheduled; false when no upstream can be chosen.
   */
  private retry(group: UpstreamGroup): boolean {
    let tried = this.tried;
    if (tried === undefined) tried = this.tried = [];
    tried.push(this.current);
    const selection = retrySelection;
    selection.clientIp = this.target.clientIp;
    const cookie = this.req.headers.cookie;
    selection.cookieHeader = typeof cookie === 'string' ? cookie : undefined;
    selection.exclude = tried;
    selection.setCookie = undefined;
    const next = group.choose(selection);
    selection.exclude = undefined;
    if (next === undefined) return false;
    if (selection.setCookie !== undefined) this.setCookie = selection.setCookie;
    this.current.inFlight--;
    next.inFlight++;
    this.current = next;
    this.upstream = next.origin;
    this.attempts++;
    this.connected = false;
    this.bytesIn = 0;
    this.call = null;
    process.nextTick(sendAgain, this);
    return true;
  }

  /** The client left between two attempts: end as aborted, giving back the breaker's permission. */
  abandon(): void {
    this.onError(new ProxyAbortError(FAILURES.clientAborted));
  }

  /** True once the client went away (checked before a retry is dispatched). */
  isClientGone(): boolean {
    return this.clientGone;
  }

  /**
   * The upstream request is over: an HTTP/2 request body it did not read to the end is read and
   * dropped (`RequestBody`), so flow control never stalls the connection. Node's HTTP/1.x server
   * discards an unread request body itself once the response ends.
   */
  private releaseBody(): void {
    const body = this.body;
    if (body instanceof RequestBody && !body.destroyed && !body.readableEnded) body.destroy();
  }

  /** Fails before dispatching (e.g. 413 on Content-Length). */
  private fail(failure: ProxyFailure): void {
    this.target.group?.release(this.current);
    this.finished = true;
    this.error = failure.code;
    this.status = failure.status;
    sendProxyError(this.res, failure, this.requestId, true);
    this.done();
  }

  private done(): void {
    this.current.inFlight--;
    if (this.target.onDone !== undefined) {
      try {
        this.target.onDone(this);
      } catch {
        // A failing access log must not break the proxy.
      }
    }
  }
}

/** Reused by every retry: `choose` is synchronous and keeps no reference to it. */
const retrySelection: SelectionContext = { clientIp: '', cookieHeader: undefined, exclude: undefined, setCookie: undefined };

function sendAgain(exchange: ProxyExchange): void {
  if (exchange.isClientGone()) exchange.abandon();
  else exchange.send();
}

/**
 * Adds the target's extra response fields to the upstream's (as translated by
 * `toClientResponseHeaders`): `setCookie` next to the upstream's own `Set-Cookie` fields, every
 * other field replacing the upstream's field of the same name.
 */
function addResponseHeaders(headers: ClientResponseHeaders, http2: boolean, setCookie: string | undefined, extra: readonly string[] | undefined): void {
  if (!http2) {
    const list = headers as string[];
    if (extra !== undefined) {
      for (let i = 0; i < extra.length; i += 2) {
        const name = extra[i]!;
        for (let j = list.length - 2; j >= 0; j -= 2) {
          if (list[j]!.length === name.length && list[j]!.toLowerCase() === name) list.splice(j, 2);
        }
        list.push(name, extra[i + 1]!);
      }
    }
    if (setCookie !== undefined) list.push('set-cookie', setCookie);
    return;
  }
  const object = headers as Record<string, string | string[]>;
  if (extra !== undefined) {
    for (let i = 0; i < extra.length; i += 2) object[extra[i]!] = extra[i + 1]!;
  }
  if (setCookie !== undefined) {
    const existing = object['set-cookie'];
    if (existing === undefined) object['set-cookie'] = setCookie;
    else if (Array.isArray(existing)) existing.push(setCookie);
    else object['set-cookie'] = [existing, setCookie];
  }
}

function onClientClose(this: ExchangeCarrier): void {
  this[kExchange]?.clientClosed();
}

function onClientDrain(this: ExchangeCarrier): void {
  this[kExchange]?.clientDrained();
}

/**
 * Starts an HTTP/2 response on its stream directly when nothing needs the compat response's own
 * `writeHead`/`write`/`end`: no instance overrides them (the debug capture does), and the answer
 * cannot carry trailers (it has a `Content-Length`, or no body: HEAD, 204, 304), since trailers
 * need the compat layer's `waitForTrailers`. Fields set with `res.setHeader` are sent as well. The
 * compat response still relays the stream's
 * 'drain' and 'close', and `headersSent` reads the stream's. Node adds `date` when it is missing
 * and ends the stream at once for HEAD, 204 and 304, as the compat layer does.
 * @param head the request is a HEAD (no body follows).
 * @returns false (nothing written) when the compat path must be used.
 * @throws what `ServerHttp2Stream.respond` throws (an invalid field or a closed stream).
 */
function respondDirect(res: Http2Response, status: number, headers: Record<string, string | string[]>, head: boolean): boolean {
  if (Object.hasOwn(res, 'writeHead') || Object.hasOwn(res, 'write') || Object.hasOwn(res, 'end')) return false;
  const stream = res.stream;
  if (headers['content-length'] === undefined && status !== 204 && status !== 304 && !head) return false;
  if (stream.destroyed || stream.closed || stream.headersSent) return false;
  // Fields set earlier with `res.setHeader` (the rate limit's RateLimit fields) go out too; the
  // upstream's translated fields win on a name both have, as with the compat writeHead.
  const set = res.getHeaders();
  for (const name in set) if (headers[name] === undefined) headers[name] = set[name] as string | string[];
  headers[':status'] = String(status);
  (headers as Record<symbol, unknown>)[http2SensitiveHeaders] = NEVER_INDEXED;
  stream.respond(headers, RESPOND_OPTIONS);
  return true;
}

/**
 * Response fields HPACK must not add to the connection's dynamic table (RFC 7541 §6.2.3, via
 * node:http2's `sensitiveHeaders`): `x-request-id` is new in every response, so indexing it would
 * only push the fields that do repeat (content-type, via, server, ...) out of the 4 KiB table, and
 * they would then be sent as literals again. Measured with h2load: 58 header bytes per response
 * before, against 34 for the same response without `x-request-id`.
 */
const NEVER_INDEXED: readonly string[] = Object.freeze(['x-request-id']);

/**
 * `waitForTrailers`, as the compat layer responds: the end of the body then sends no END_STREAM by
 * itself (Node sends empty trailers, ending the stream, once the last DATA is queued). Without it,
 * an upstream failing mid-body raced `stream.close(INTERNAL_ERROR)`: closing ends the writable side
 * first, and in ~8% of tries under load the client saw END_STREAM, a short body taken for a
 * complete answer, before the RST_STREAM.
 */
const RESPOND_OPTIONS = Object.freeze({ waitForTrailers: true });

function isHttp2Response(res: ClientResponse): res is Http2Response {
  return (res as Http2Response).stream !== undefined;
}

/** Makes a started response visibly incomplete: destroy the HTTP/1.1 socket or reset the HTTP/2 stream. */
function abortClientResponse(res: ClientResponse, http2: boolean): void {
  if (http2) {
    const stream = (res as Http2Response).stream;
    if (!stream.destroyed) stream.close(http2Constants.NGHTTP2_INTERNAL_ERROR);
  } else {
    res.destroy();
  }
}

const kBody = Symbol('gatehouse.requestBody');

interface BodyCarrier {
  [kBody]?: RequestBody;
}

/**
 * The body of an HTTP/2 request as its own stream: backpressure goes through (the source is paused
 * when the upstream socket is full), but destroying it (the proxy does when the upstream request
 * ended before reading it all) does not reset the client's stream: the rest of the client's body is
 * read and dropped, so HTTP/2 flow control never stalls the connection.
 */
class RequestBody extends Readable {
  constructor(private readonly source: Http2ServerRequest) {
    super();
    // Its errors reach the upstream pool while it sends the body; once it stopped (the upstream
    // request ended), a client reset still destroys it with an error nobody needs to hear.
    this.on('error', ignoreError);
    (source as BodyCarrier)[kBody] = this;
    source.on('data', onSourceData);
    source.on('end', onSourceEnd);
    source.on('error', onSourceError);
    source.on('close', onSourceClose);
  }

  override _read(): void {
    this.source.resume();
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    const source = this.source;
    source.removeListener('data', onSourceData);
    if (!source.readableEnded) source.resume(); // drain and drop
    callback(error);
  }
}

function onSourceData(this: BodyCarrier & Readable, chunk: Buffer): void {
  const body = this[kBody];
  if (body !== undefined && !body.destroyed && !body.push(chunk)) this.pause();
}

function onSourceEnd(this: BodyCarrier): void {
  const body = this[kBody];
  if (body !== undefined && !body.destroyed) body.push(null);
}

function onSourceError(this: BodyCarrier, error: Error): void {
  const body = this[kBody];
  if (body !== undefined && !body.destroyed) body.destroy(error);
}

function onSourceClose(this: BodyCarrier & Readable): void {
  const body = this[kBody];
  if (body !== undefined && !body.destroyed && !this.readableEnded) body.destroy(new ProxyAbortError(FAILURES.clientAborted));
}

function ignoreError(): void {}

/** Client sockets {@link corkForTurn} corked in this event-loop turn. */
const corkedThisTurn = new Set<Socket>();

/**
 * Corks an HTTP/1.1 client socket until the end of this event-loop turn (the check phase, after
 * every read of the poll phase), so the chunks of a large body that libuv reads one after another
 * (it reads a socket again while each read fills its buffer, here 32 KiB) leave in one `writev`
 * instead of one `write` each. The reads stay small (the backend's sake, see `BODY_READ` in
 * `http1-pool.ts`); the client gets fewer, larger segments and fewer wake-ups. Measured with
 * 256 KiB bodies (bench/README.md, "coalesced writes"): ~1.5 writes per response instead of ~4,
 * and 3–40% more responses per second in six alternating pairs.
 *
 * Nothing waits past the turn: every corked socket is uncorked from one `setImmediate`, and
 * node:http's `end()` uncorks fully by itself. Bytes held meanwhile count in `writableLength`, so
 * RESPONSE_BUFFER bounds them as before. A socket already corked this turn is left as it is.
 * @param socket the client connection of a node:http response (null once it was detached).
 */
function corkForTurn(socket: Socket | null): void {
  if (socket === null || corkedThisTurn.has(socket)) return;
  socket.cork();
  if (corkedThisTurn.size === 0) setImmediate(uncorkAll);
  corkedThisTurn.add(socket);
}

/** Uncorks every socket {@link corkForTurn} corked in the turn that is ending (destroyed ones too: harmless). */
function uncorkAll(): void {
  for (const socket of corkedThisTurn) socket.uncork();
  corkedThisTurn.clear();
}
