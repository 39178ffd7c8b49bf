/**
 * Request validation before routing, on both listeners: what Node's parsers let through but an
 * edge server must not. A request that fails here is answered by the listener, never routed, never
 * forwarded, and (HTTP/1.x) its connection is closed, since its framing cannot be trusted.
 *
 * - Version: HTTP/1.0 and HTTP/1.1 only on an HTTP/1 connection (llhttp also accepts `HTTP/0.9`
 *   and `HTTP/2.0` request lines) → 505.
 * - Limits: request target length → 414, header field count → 431 (the header section size is
 *   Node's `maxHeaderSize`, answered in {@link answerClientError}).
 * - Framing (RFC 9112 §6): `Transfer-Encoding` must be exactly `chunked`, in one field → else 501;
 *   `Transfer-Encoding` in an HTTP/1.0 request → 400 (§6.1: its framing is unreliable).
 * - Host (RFC 9112 §3.2): more than one `Host` → 400; none in HTTP/1.1 → 400.
 * - Target (RFC 9112 §3.2): origin-form, `*` for OPTIONS, or absolute-form, whose authority
 *   replaces `Host` and whose path becomes the target (§3.2.2); userinfo in it → 400.
 * - Upgrade (RFC 9110 §7.8): only GET with HTTP/1.1 (a body or HTTP/1.0 cannot be tunnelled) → 400.
 *
 * `Expect` other than `100-continue` (RFC 9110 §10.1.1) → 417: Node emits `'checkExpectation'`
 * instead of `'request'` for it, and the listeners answer with {@link rejectRequest} (Node's own
 * 417 would keep the connection and read the unread body as the next request).
 */
import { STATUS_CODES, type IncomingMessage, type ServerResponse } from 'node:http';
import type { Http2ServerRequest, Http2ServerResponse } from 'node:http2';
import type { Socket } from 'node:net';
import type { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';
import type { ClientLimitsConfig } from '../config/schema.js';
import { errorBody, failure, type ProxyFailure } from '../proxy/errors.js';
import { sendProxyError, type ClientRequest, type ClientResponse } from '../proxy/forward.js';
import { hasHttp1Body } from '../proxy/headers.js';
import type { StreamRequest } from '../proxy/http2-stream.js';
import { requestEnded, requestStarted } from './connections.js';
import { watchRequestBody } from './deadlines.js';

/** Answers of the guard; frozen singletons, branch on `code`. */
export const GUARD_FAILURES = Object.freeze({
  badVersion: failure(505, 'GH_BAD_VERSION', 'only HTTP/1.0, HTTP/1.1 and HTTP/2 are served'),
  targetTooLong: failure(414, 'GH_TARGET_TOO_LONG', 'the request target is too long'),
  headersTooLarge: failure(431, 'GH_HEADERS_TOO_LARGE', 'the request header section is too large'),
  tooManyHeaders: failure(431, 'GH_TOO_MANY_HEADERS', 'the request has too many header fields'),
  duplicateHost: failure(400, 'GH_DUPLICATE_HOST', 'the request has more than one Host field'),
  missingHost: failure(400, 'GH_MISSING_HOST', 'an HTTP/1.1 request needs a Host field'),
  badTarget: failure(400, 'GH_BAD_TARGET', 'the request target is not a path or an absolute http(s) URL'),
  transferEncoding: failure(501, 'GH_TRANSFER_ENCODING', 'only "Transfer-Encoding: chunked" is supported'),
  transferEncodingHttp10: failure(400, 'GH_TRANSFER_ENCODING_HTTP10', 'Transfer-Encoding is not allowed in an HTTP/1.0 request'),
  badRequest: failure(400, 'GH_BAD_REQUEST', 'the request is malformed'),
  badHeaderValue: failure(400, 'GH_BAD_HEADER_VALUE', 'a header field value is malformed'),
  expectation: failure(417, 'GH_EXPECTATION_FAILED', 'the only expectation supported is "100-continue"'),
  headersTimeout: failure(408, 'GH_HEADERS_TIMEOUT', 'the request header was not received in time'),
  bodyTimeout: failure(408, 'GH_BODY_TIMEOUT', 'the request body stopped arriving'),
  badUpgrade: failure(400, 'GH_UPGRADE_REFUSED', 'an upgrade needs GET and HTTP/1.1'),
});

/**
 * Checks a request before routing; rewrites an absolute-form target to origin-form and its
 * authority into `Host` (in `req.url`, `req.headers.host` and `req.rawHeaders`).
 * @returns the failure to answer, or undefined when the request may be routed.
 */
export function checkRequest(req: ClientRequest, limits: ClientLimitsConfig): ProxyFailure | undefined {
  const url = req.url ?? '';
  if (url.length > limits.target_length) return GUARD_FAILURES.targetTooLong;
  const raw = req.rawHeaders;
  if (isHttp2Request(req)) {
    // The field count includes the four pseudo-headers.
    if (raw.length > 2 * (limits.header_count + 4)) return GUARD_FAILURES.tooManyHeaders;
    // Node's nghttp2 session does not check field values: a value with CR, LF or NUL, or with
    // white space around it, makes the request malformed (RFC 9113 §8.2.1).
    for (let i = 1; i < raw.length; i += 2) {
      if (MALFORMED_H2_VALUE.test(raw[i]!)) return GUARD_FAILURES.badHeaderValue;
    }
    return undefined;
  }
  if (req.httpVersionMajor !== 1 || req.httpVersionMinor > 1) return GUARD_FAILURES.badVersion;
  if (raw.length > 2 * limits.header_count) return GUARD_FAILURES.tooManyHeaders;
  let hosts = 0;
  let transferEncodings = 0;
  let transferEncoding = '';
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!;
    // Cheap prefilter on the length: only `host` (4) and `transfer-encoding` (17) matter here.
    if (name.length === 4 && name.toLowerCase() === 'host') hosts++;
    else if (name.length === 17 && name.toLowerCase() === 'transfer-encoding') {
      transferEncodings++;
      transferEncoding = raw[i + 1]!;
    }
  }
  if (hosts > 1) return GUARD_FAILURES.duplicateHost;
  if (transferEncodings > 0) {
    if (req.httpVersionMinor === 0) return GUARD_FAILURES.transferEncodingHttp10;
    if (transferEncodings > 1 || transferEncoding.trim().toLowerCase() !== 'chunked') return GUARD_FAILURES.transferEncoding;
  }
  const first = url.charCodeAt(0);
  if (first !== 47 /* / */) {
    if (url === '*' && req.method === 'OPTIONS') return undefined;
    const failed = useAbsoluteForm(req as IncomingMessage, url);
    if (failed !== undefined) return failed;
  } else if (hosts === 0 && req.httpVersionMinor === 1) {
    return GUARD_FAILURES.missingHost;
  }
  return undefined;
}

/** {@link checkRequest}, plus: an upgrade needs GET and HTTP/1.1. */
export function checkUpgrade(req: IncomingMessage, limits: ClientLimitsConfig): ProxyFailure | undefined {
  const failed = checkRequest(req, limits);
  if (failed !== undefined) return failed;
  if (req.method !== 'GET' || req.httpVersionMinor !== 1) return GUARD_FAILURES.badUpgrade;
  return undefined;
}

/** A request refused before routing, as the listeners report it to `onClientError`. */
export class GuardError extends Error {
  /** The failure's code (`GH_DUPLICATE_HOST`, ...). */
  readonly code: string;
  readonly status: number;
  constructor(failed: ProxyFailure) {
    super(failed.message);
    this.name = 'GuardError';
    this.code = failed.code;
    this.status = failed.status;
  }
}

const kRejected = Symbol('gatehouse.rejectedConnection');

/**
 * Answers a rejected request. HTTP/1.x: the connection closes after the answer, and requests the
 * client pipelined behind it (Node may have parsed them already) are never served: after a framing
 * error, they may be a body read as a request (request smuggling). Never throws.
 */
export function rejectRequest(req: ClientRequest, res: ClientResponse, failed: ProxyFailure): void {
  if (isHttp2Request(req)) {
    sendProxyError(res, failed);
    return;
  }
  (req.socket as Socket & { [kRejected]?: true })[kRejected] = true;
  sendProxyError(res, failed, '', true);
}

/** True when an earlier request on this HTTP/1 connection was rejected: drop this one unanswered. */
export function followsRejectedRequest(req: IncomingMessage): boolean {
  return (req.socket as Socket & { [kRejected]?: true })[kRejected] === true;
}

/** Answers a rejected upgrade request on its raw socket and closes it. Never throws. */
export function rejectUpgrade(socket: Duplex, failed: ProxyFailure): void {
  writeRawAnswer(socket, failed);
}

/**
 * The guard's answer to an HTTP/1 parse error (the server's `'clientError'`): 431 (header section
 * too large) or 414 (a request line alone over the target limit), 505 (bad version), 408 (header
 * deadline), 400 otherwise; the connection is closed. A connection that already has an answer
 * under way, or that is gone, is destroyed.
 * @returns the failure answered (for the log), or undefined when the socket was only destroyed.
 */
export function answerClientError(error: Error & { code?: string; rawPacket?: Buffer }, socket: Duplex, limits: ClientLimitsConfig): ProxyFailure | undefined {
  const s = socket as Socket & { _httpMessage?: { headersSent?: boolean } | null };
  const code = error.code ?? '';
  if (!s.writable || s._httpMessage?.headersSent === true || code === 'ECONNRESET' || code === 'EPIPE') {
    socket.destroy();
    return undefined;
  }
  let failed: ProxyFailure;
  switch (code) {
    case 'HPE_HEADER_OVERFLOW':
      failed = requestLineLongerThan(error.rawPacket, limits.target_length) ? GUARD_FAILURES.targetTooLong : GUARD_FAILURES.headersTooLarge;
      break;
    case 'HPE_INVALID_VERSION':
      // llhttp reports a request line not ended by CRLF as a version error too: 505 only for a
      // well-formed line that names another version.
      failed = WELL_FORMED_REQUEST_LINE.test(error.rawPacket?.toString('latin1') ?? '') ? GUARD_FAILURES.badVersion : GUARD_FAILURES.badRequest;
      break;
    case 'HPE_HEADERS_TIMEOUT':
    case 'ERR_HTTP_REQUEST_TIMEOUT':
      failed = GUARD_FAILURES.headersTimeout;
      break;
    default:
      failed = GUARD_FAILURES.badRequest;
  }
  writeRawAnswer(socket, failed);
  return failed;
}

/**
 * True for an HTTP/2 request, an `http2.Http2ServerRequest` or a `StreamRequest` (the version
 * fields of an HTTP/1 request line are the client's to choose).
 */
export function isHttp2Request(req: ClientRequest): req is Http2ServerRequest | StreamRequest {
  return (req as Http2ServerRequest | StreamRequest).stream !== undefined;
}

/** Absolute-form (RFC 9112 §3.2.2): route by the target's authority, forward its path. */
function useAbsoluteForm(req: IncomingMessage, url: string): ProxyFailure | undefined {
  const match = /^https?:\/\/([^/?#]*)([^#]*)/i.exec(url);
  if (match === null) return GUARD_FAILURES.badTarget;
  const authority = match[1]!;
  if (authority === '' || authority.includes('@')) return GUARD_FAILURES.badTarget;
  const rest = match[2]!;
  req.url = rest === '' ? '/' : rest.charCodeAt(0) === 47 ? rest : `/${rest}`;
  // The server MUST ignore the Host field and use the target's authority (§3.2.2).
  req.headers.host = authority;
  const raw = req.rawHeaders;
  let replaced = false;
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i]!.length === 4 && raw[i]!.toLowerCase() === 'host') {
      raw[i + 1] = authority;
      replaced = true;
    }
  }
  if (!replaced) raw.push('Host', authority);
  return undefined;
}

/** An HTTP/2 field value that is malformed: CR, LF, NUL anywhere, SP or HTAB at either end. */
const MALFORMED_H2_VALUE = /[\r\n\0]|^[ \t]|[ \t]$/;

/** `METHOD target HTTP/d.d` CRLF (RFC 9112 §3). */
const WELL_FORMED_REQUEST_LINE = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP\/\d\.\d\r\n/;

/** Was the first line of `packet` (a request line) already longer than `limit` before its end? */
function requestLineLongerThan(packet: Buffer | undefined, limit: number): boolean {
  if (packet === undefined) return false;
  const end = packet.indexOf('\r\n');
  return (end < 0 ? packet.length : end) > limit;
}

function writeRawAnswer(socket: Duplex, failed: ProxyFailure): void {
  if (socket.destroyed || !socket.writable) {
    socket.destroy();
    return;
  }
  const body = errorBody(failed);
  socket.end(
    `HTTP/1.1 ${failed.status} ${STATUS_CODES[failed.status] ?? 'Error'}\r\n`
      + 'Content-Type: text/plain; charset=utf-8\r\n'
      + `Content-Length: ${Buffer.byteLength(body)}\r\n`
      + `Connection: close\r\n\r\n${body}`,
  );
  // A client that never reads would keep the socket half-open: give it one second.
  const timer = setTimeout(() => socket.destroy(), 1_000);
  timer.unref();
  socket.once('close', () => clearTimeout(timer));
}

/** Where {@link guardServer} and {@link serveHttp1Request} hand requests that passed the guard. */
export interface GuardedServing {
  readonly limits: ClientLimitsConfig;
  /** Longest pause inside a request body (ms); 408 past it. */
  readonly bodyIdle: number;
  /** Reports refused requests and connection errors (never fatal). */
  readonly report: ((error: Error) => void) | undefined;
  /** Called for every request the guard refuses, after its answer was sent (access log, metrics). */
  readonly onRefused: ((req: ClientRequest, failed: ProxyFailure) => void) | undefined;
  readonly onRequest: (req: IncomingMessage, res: ClientResponse) => void;
  readonly onUpgrade: (req: IncomingMessage, socket: Duplex, head: Buffer) => void;
}

const kCountedSocket = Symbol('gatehouse.countedSocket');
type CountedResponse = ClientResponse & { [kCountedSocket]?: Socket };

/** 'close' listener of a counted response (one shared function, no closure per request). */
function endCountedRequest(this: CountedResponse): void {
  const socket = this[kCountedSocket];
  if (socket === undefined) return;
  requestEnded(socket);
  releaseAnsweredRequest(socket, (this as ServerResponse).req);
}

/** node:http's parser of a connection: `incoming` is the request it parsed last. */
type ParsingSocket = Socket & { parser?: { incoming: IncomingMessage | null } | null };

/**
 * Lets an answered request go while its connection waits for the next one. node:http's parser
 * keeps the request it parsed last (`parser.incoming`) until the next request's head, unless
 * that request was read to its end (`clearIncoming` in `resOnFinish`); one without a body is
 * never read (see {@link skipDump}), so each idle keep-alive connection would hold its last
 * request, its header arrays and listeners (~0.6 KB of heap, ~0.5 KiB of RSS: bench/README.md,
 * 2026-12-07 23:40). Only a request parsed to its end (`complete`) that is still the parser's
 * last is let go: the parser needs `incoming` no more for it, and pipelined requests behind it
 * are their own. Does nothing where the parser is not there (HTTP/2, a Node without the field).
 */
function releaseAnsweredRequest(socket: Socket, req: IncomingMessage | undefined): void {
  const parser = (socket as ParsingSocket).parser;
  if (parser != null && req !== undefined && parser.incoming === req && req.complete) parser.incoming = null;
}

/**
 * One HTTP/1.x request as both listeners take it: counted on its socket (for draining), dropped
 * when it follows a rejected request on the same connection, checked, its body watched for idle
 * pauses, then handed on.
 */
export function serveHttp1Request(req: IncomingMessage, res: ServerResponse | Http2ServerResponse, serving: GuardedServing): void {
  const socket = req.socket;
  requestStarted(socket);
  (res as CountedResponse)[kCountedSocket] = socket;
  res.on('close', endCountedRequest); // emitted once: `once` would wrap the listener per request
  if (followsRejectedRequest(req)) {
    socket.destroySoon();
    return;
  }
  const failed = checkRequest(req, serving.limits);
  if (failed !== undefined) {
    refuse(req, res, failed, serving);
    return;
  }
  if (!hasHttp1Body(req)) skipDump(req);
  else watchRequestBody(req, res, serving.bodyIdle);
  serving.onRequest(req, res);
}

type DumpableRequest = IncomingMessage & { _dumped?: boolean };

/**
 * Spares a request without a body node:http's dump. Once a response finished, Node's server
 * "dumps" a request its handler never read (`resOnFinish` → `IncomingMessage._dump()` →
 * `resume()`) to pull an unread body off the wire. A request without one has nothing to pull,
 * yet the dump runs the readable stream's resume, end and destroy steps, six `process.nextTick`s
 * per request (bench/README.md, 2026-12-07 12:13, "What changed: the dump"). `_dump()` does
 * nothing for a request already marked `_dumped`: the request then never emits 'end' or 'close'
 * (the proxy watches the response's 'close'; a handler may still read it), and node:http's parser
 * would hold it until the next request ({@link releaseAnsweredRequest} lets it go). A Node that no
 * longer reads the field dumps as before. Call only when {@link hasHttp1Body} is false.
 */
function skipDump(req: IncomingMessage): void {
  (req as DumpableRequest)._dumped = true;
}

/** Answer a refused request, report it, and record it like any other exchange. */
export function refuse(req: ClientRequest, res: ClientResponse, failed: ProxyFailure, serving: GuardedServing): void {
  serving.report?.(new GuardError(failed));
  rejectRequest(req, res, failed);
  serving.onRefused?.(req, failed);
}

/**
 * The guard's answers to what reaches a server outside 'request': an `Expect` other than
 * `100-continue` (417), Upgrade requests (checked, then handed on), and Node's parse errors (the
 * right 4xx instead of a bare close).
 */
export function guardServer(server: EventEmitter, serving: GuardedServing): void {
  server.on('checkExpectation', (req: ClientRequest, res: ClientResponse) => {
    refuse(req, res, GUARD_FAILURES.expectation, serving);
  });
  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    const failed = checkUpgrade(req, serving.limits);
    if (failed !== undefined) {
      serving.report?.(new GuardError(failed));
      rejectUpgrade(socket, failed);
      serving.onRefused?.(req, failed);
      return;
    }
    serving.onUpgrade(req, socket, head);
  });
  server.on('clientError', (error: Error, socket: Duplex) => {
    serving.report?.(error);
    answerClientError(error, socket, serving.limits);
  });
}
