/**
 * Deadlines for client connections: the part of slow-client protection that Node leaves to the
 * application.
 *
 * - HTTP/1 (both listeners): Node's own machinery, set explicitly. `http2.createSecureServer` with
 *   `allowHTTP1` hands HTTP/1 connections to the `http` module's connection listener, which reads
 *   its settings from the server object, where Node 20 leaves `keepAliveTimeout`, `maxHeaderSize`
 *   and `maxHeadersCount` undefined (no keep-alive deadline at all) and the header deadline at 60 s,
 *   checked every 30 s, and only once the server emitted `'listening'`.
 * - Request bodies: an idle deadline per request while its body arrives (`socket`/stream timeout).
 * - HTTP/2 sessions ({@link Http2SessionWatch}): idle sessions are closed, and a session with no
 *   open stream must answer a PING within the header deadline. A client in the middle of a header
 *   block cannot send anything but CONTINUATION (RFC 9113 §6.10), PING ACK included, so a header
 *   block left open (or a connection preface never sent) ends the session on time. A session whose
 *   last PING was answered by the ACK alone, and that has sent nothing since, cannot be inside a
 *   header block: it is not pinged again until more bytes arrive, so idle sessions cost no PINGs.
 */
import type { IncomingMessage, Server as HttpServer, ServerResponse } from 'node:http';
import { constants as http2Constants, type Http2SecureServer, type Http2ServerRequest, type Http2Session, type ServerHttp2Stream } from 'node:http2';
import type { Socket } from 'node:net';
import type { ClientsConfig } from '../config/schema.js';
import type { ClientRequest, ClientResponse } from '../proxy/forward.js';
import { GUARD_FAILURES, isHttp2Request } from './guard.js';
import { hasHttp1Body } from '../proxy/headers.js';
import { sendProxyError } from '../proxy/forward.js';

/**
 * Sets the HTTP/1 deadlines and limits on a server (an `http.Server`, or an `Http2SecureServer`
 * with `allowHTTP1`, which takes them the same way). Call before `listen`.
 *
 * `requestTimeout` (a deadline for the whole request, body included) is turned off: it would cut
 * long uploads; the body is bounded by the idle deadline instead ({@link watchRequestBody}).
 */
export function applyHttp1Deadlines(server: HttpServer | Http2SecureServer, clients: ClientsConfig): void {
  const target = server as unknown as Record<string, unknown>;
  const { timeouts, limits } = clients;
  target.requestTimeout = 0;
  target.headersTimeout = timeouts.headers;
  // Node checks header deadlines on an interval (30 s by default): check often enough to be on time.
  target.connectionsCheckingInterval = checkingInterval(timeouts.headers);
  target.keepAliveTimeout = timeouts.keepalive;
  // Node closes an idle connection this much after the advertised `Keep-Alive: timeout` (a fixed
  // 1 s in Node 20; the `keepAliveTimeoutBuffer` property in later versions, which they add to
  // `keepAliveTimeout` without a default on the HTTP/2 server): set it, never leave it undefined.
  if (target.keepAliveTimeoutBuffer === undefined) target.keepAliveTimeoutBuffer = 1_000;
  target.maxHeaderSize = limits.header_size;
  // One more than the limit, so that the guard sees the excess and answers 431 (Node drops extra fields silently).
  target.maxHeadersCount = limits.header_count + 1;
  // The socket-wide idle timeout would also cut long polls waiting for an upstream: off.
  target.timeout = 0;
}

/** How often deadlines are checked: a quarter of the deadline, between 100 ms and 1 s. */
export function checkingInterval(deadlineMs: number): number {
  return Math.max(100, Math.min(1_000, Math.floor(deadlineMs / 4)));
}

const kBodyWatch = Symbol('gatehouse.bodyWatch');

interface WatchedRequest {
  [kBodyWatch]?: ClientResponse;
}

/**
 * Starts the request-body idle deadline of one request when it has a body: no byte for `idleMs`
 * → 408 (if no answer was started; the connection closes) or the connection/stream is closed.
 * The deadline ends with the body. No closure per request: the response rides on a symbol.
 */
export function watchRequestBody(req: ClientRequest, res: ClientResponse, idleMs: number): void {
  if (idleMs <= 0) return;
  if (isHttp2Request(req)) {
    if (req.stream.endAfterHeaders || req.readableEnded) return;
  } else {
    if (!hasHttp1Body(req)) return;
  }
  // Here the request has a body: not a StreamRequest (those have none).
  const watched = req as (IncomingMessage | Http2ServerRequest) & WatchedRequest;
  watched[kBodyWatch] = res;
  watched.setTimeout(idleMs);
  watched.on('timeout', onBodyIdle);
  watched.once('end', onBodyEnd);
}

function onBodyIdle(this: ClientRequest & WatchedRequest): void {
  const res = this[kBodyWatch];
  if (res === undefined || this.readableEnded) return;
  this[kBodyWatch] = undefined;
  if (isHttp2Request(this)) {
    if (!res.headersSent) sendProxyError(res, GUARD_FAILURES.bodyTimeout);
    const stream: ServerHttp2Stream = this.stream;
    // The answer is queued; the rest of the request is not wanted.
    if (!stream.destroyed) stream.close(http2Constants.NGHTTP2_CANCEL);
    return;
  }
  const socket = (this as IncomingMessage).socket;
  if (!res.headersSent) {
    sendProxyError(res, GUARD_FAILURES.bodyTimeout, '', true);
    // Connection: close ends the socket after the answer; a client that does not read is dropped.
    setTimeout(destroySocket, 1_000, socket).unref();
  } else {
    socket.destroy();
  }
}

function onBodyEnd(this: (IncomingMessage | Http2ServerRequest) & WatchedRequest): void {
  const res = this[kBodyWatch];
  this[kBodyWatch] = undefined;
  this.removeListener('timeout', onBodyIdle);
  if (isHttp2Request(this)) {
    if (!this.stream.destroyed) this.stream.setTimeout(0);
  } else if (res !== undefined && !(res as ServerResponse).writableFinished) {
    // The answer may be a long poll: no socket deadline while waiting for it. (Once the answer is
    // finished, Node has set the keep-alive deadline on the socket: leave it.)
    (this as IncomingMessage).socket.setTimeout(0);
  }
}

function destroySocket(socket: Socket): void {
  socket.destroy();
}

const kWatch = Symbol('gatehouse.sessionWatch');

interface SessionState {
  /** Open streams. */
  streams: number;
  /** When the session last had no open stream (ms, performance.now()). */
  idleSince: number;
  /** When the unanswered PING was sent; 0 when none is outstanding. */
  pingSentAt: number;
  /** When the last PING was answered, or the session was last found quiet (or it started). */
  pingAnsweredAt: number;
  /**
   * The TLS stream under the session: its `bytesRead` counts the cleartext bytes handed to the
   * HTTP/2 parser (frames). Undefined when the socket has no such handle: then every idle period
   * gets its PING, as if the session were never quiet.
   */
  readonly input: { readonly bytesRead: number } | undefined;
  /** `input.bytesRead` when the outstanding PING was sent. */
  bytesAtPing: number;
  /**
   * `input.bytesRead` right after a PING answer that came alone (exactly one PING ACK frame since
   * the PING was sent); -1 when the last answer came with other bytes, or none came yet. While the
   * count stays there, the peer has sent nothing and cannot be inside a header block.
   */
  quietAt: number;
  /** The watch's set of sessions, which this one leaves on 'close' ({@link onSessionClose}). */
  readonly watched: Set<WatchedSession>;
}

type WatchedSession = Http2Session & { [kWatch]?: SessionState };
type WatchedStream = ServerHttp2Stream & { [kWatch]?: WatchedSession };

/**
 * Idle and header deadlines of the HTTP/2 sessions of one server, checked by one interval timer
 * (unref'd) for all sessions: no timer per session or stream.
 */
export class Http2SessionWatch {
  readonly #sessions = new Set<WatchedSession>();
  readonly #headersMs: number;
  readonly #idleMs: number;
  #timer: NodeJS.Timeout | undefined;

  constructor(server: Http2SecureServer, timeouts: ClientsConfig['timeouts']) {
    this.#headersMs = timeouts.headers;
    this.#idleMs = timeouts.idle;
    server.on('session', (session: WatchedSession) => this.#add(session));
    server.on('stream', onStream);
  }

  /** Sessions being watched. */
  get size(): number {
    return this.#sessions.size;
  }

  /** Stop the interval timer (the server is closing). */
  stop(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  #add(session: WatchedSession): void {
    const now = performance.now();
    session[kWatch] = {
      streams: 0, idleSince: now, pingSentAt: 0, pingAnsweredAt: 0, watched: this.#sessions,
      input: inputOf(session), bytesAtPing: 0, quietAt: -1,
    };
    this.#sessions.add(session);
    session.on('close', onSessionClose);
    this.#timer ??= setInterval(() => this.#check(), checkingInterval(Math.min(this.#headersMs, this.#idleMs))).unref();
  }

  #check(): void {
    if (this.#sessions.size === 0) {
      this.stop();
      return;
    }
    const now = performance.now();
    for (const session of this.#sessions) {
      const state = session[kWatch]!;
      if (session.destroyed || session.closed) continue;
      if (state.pingSentAt > 0 && now - state.pingSentAt > this.#headersMs) {
        // A header block left open, a preface never sent, or a peer gone silent.
        // With an error: destroy(undefined, code) would take `undefined` for its default NO_ERROR
        // and send that code in the GOAWAY instead.
        session.destroy(headerDeadlineError(), http2Constants.NGHTTP2_ENHANCE_YOUR_CALM);
        continue;
      }
      if (state.streams > 0) continue;
      if (now - state.idleSince > this.#idleMs) {
        session.close();
        continue;
      }
      if (state.pingSentAt === 0 && now - state.pingAnsweredAt >= this.#headersMs / 2) {
        const input = state.input;
        // Nothing arrived since a PING was answered by its ACK alone: no header block can be open.
        // Counts as an answer now, so the count is read once per PING period, not per check.
        if (input !== undefined && state.quietAt === input.bytesRead) {
          state.pingAnsweredAt = now;
          continue;
        }
        state.quietAt = -1;
        state.bytesAtPing = input === undefined ? 0 : input.bytesRead;
        state.pingSentAt = now;
        try {
          if (!session.ping(onPingAnswered.bind(session))) state.pingSentAt = 0;
        } catch {
          state.pingSentAt = 0;
        }
      }
    }
  }
}

/** 'close' listener of every watched session: one shared function, no closure per session. */
function onSessionClose(this: WatchedSession): void {
  this[kWatch]?.watched.delete(this);
}

/** The error a session ended by the header deadline reports (the server's 'sessionError'). */
function headerDeadlineError(): Error {
  return Object.assign(new Error('HTTP/2 header deadline: no PING answer in time'), { code: 'GH_HEADERS_TIMEOUT' });
}

/** Size of a PING frame: the 9-byte frame header and 8 bytes of opaque data (RFC 9113 §6.7). */
const PING_FRAME_BYTES = 17;

function onPingAnswered(this: WatchedSession, error: Error | null): void {
  const state = this[kWatch];
  if (state === undefined || error !== null) return;
  state.pingSentAt = 0;
  state.pingAnsweredAt = performance.now();
  // Called while the parser handles the ACK: the count already includes every byte of the read
  // that carried it, so a header block started in the same read makes the answer not alone.
  const input = state.input;
  if (input !== undefined) state.quietAt = input.bytesRead - state.bytesAtPing === PING_FRAME_BYTES ? input.bytesRead : -1;
}

/**
 * The stream the session reads its frames from: the `TLSWrap` handle of its TLS socket, whose
 * `bytesRead` Node counts as it hands cleartext to the HTTP/2 parser.
 */
function inputOf(session: Http2Session): SessionState['input'] {
  const handle = (session.socket as unknown as { _handle?: { bytesRead?: unknown } } | undefined)?._handle;
  return handle !== undefined && handle !== null && typeof handle.bytesRead === 'number' ? handle as { bytesRead: number } : undefined;
}

function onStream(stream: WatchedStream): void {
  const session = stream.session as WatchedSession | undefined;
  const state = session?.[kWatch];
  if (state === undefined) return;
  state.streams++;
  // A stream proves the peer is not stuck in a header block.
  state.pingSentAt = 0;
  state.pingAnsweredAt = performance.now();
  stream[kWatch] = session;
  stream.on('close', onStreamClose); // emitted once: `once` would wrap the listener per stream
}

function onStreamClose(this: WatchedStream): void {
  const state = this[kWatch]?.[kWatch];
  if (state === undefined) return;
  if (--state.streams === 0) state.idleSince = performance.now();
}
