/**
 * The HTTPS listener: `node:http2`'s secure server with `allowHTTP1`, so ALPN picks h2 or
 * http/1.1 on one port. TLS settings, the SNI callback and session tickets come from the
 * certificate store; requests go to the router through {@link DispatchContext}.
 *
 * Why node:http2 and not `spdy`: spdy is unmaintained, relies on removed Node internals and
 * measured 4x slower; Node's own HTTP/2 server is maintained with Node itself.
 */
import {
  createSecureServer, Http2ServerRequest, type Http2SecureServer, type Http2ServerResponse, type IncomingHttpHeaders, type ServerHttp2Stream,
} from 'node:http2';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { createServer as createNetServer, type AddressInfo, type Server as NetServer, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import { DEFAULT_CLIENTS, type ClientsConfig, type ListenAddress } from '../config/schema.js';
import type { CertificateStore } from '../tls/certificates.js';
import { ConnectionTracker } from './connections.js';
import { markAwaitingContinue } from '../routing/dispatch.js';
import { applyHttp1Deadlines, Http2SessionWatch, watchRequestBody } from './deadlines.js';
import { checkRequest, guardServer, refuse, serveHttp1Request, type GuardedServing } from './guard.js';
import type { ClientRequest } from '../proxy/forward.js';
import type { ProxyFailure } from '../proxy/errors.js';
import { StreamRequest, StreamResponse } from '../proxy/http2-stream.js';
import { busyPollKick } from '../busy-poll.js';

/**
 * Streams Node may refuse on one HTTP/2 session (its `maxSessionRejectedStreams`, default 100)
 * before it destroys the session. Set high so that a HEADERS + RST_STREAM flood (rapid reset,
 * CVE-2023-44487) is ended by nghttp2's own limit on received RST_STREAM frames (a burst of 1000,
 * then 33 a second), whose GOAWAY (INTERNAL_ERROR) goes out through the session's normal writes.
 *
 * Why not Node's limit: from Node 24.22 a closed stream leaves the session's table only after the
 * read that closed it, so within one read a flood fills `concurrent_streams` and Node refuses the
 * rest (ENHANCE_YOUR_CALM). Past this limit Node destroys the session at once, and when a write is
 * in flight at that moment (an earlier RST_STREAM), its GOAWAY is dropped: the client sees a bare
 * close. A stream Node refuses was reset by the client in the same read, and so counts against
 * nghttp2's limit: a client that opens more streams than `concurrent_streams` without resetting
 * them is stopped by nghttp2's own concurrency check before Node sees the stream.
 */
const MAX_SESSION_REJECTED_STREAMS = 10_000;

/**
 * HTTP/2 SETTINGS (RFC 9113 §6.5.2) from the client limits: `maxConcurrentStreams` bounded (each
 * open stream may hold an upstream request), `maxHeaderListSize` = `clients.limits.header_size`
 * (Node resets a stream whose header list is larger with ENHANCE_YOUR_CALM), no server push.
 */
export function http2Settings(clients: ClientsConfig): { maxConcurrentStreams: number; maxHeaderListSize: number; enablePush: boolean } {
  return { maxConcurrentStreams: clients.limits.concurrent_streams, maxHeaderListSize: clients.limits.header_size, enablePush: false };
}

/** Options of {@link HttpsListener}. */
export interface HttpsListenerOptions {
  readonly address: ListenAddress;
  readonly store: CertificateStore;
  /**
   * Handles every request, HTTP/2 streams and HTTP/1.1 requests alike. HTTP/2 requests without a
   * body come as a `StreamRequest`/`StreamResponse` pair (see `proxy/http2-stream.ts`), the others
   * as Node's compat objects.
   */
  readonly onRequest: (req: IncomingMessage | Http2ServerRequest | StreamRequest, res: Http2ServerResponse | StreamResponse) => void;
  /** Handles HTTP/1.1 Upgrade requests (WebSocket). */
  readonly onUpgrade: (req: IncomingMessage, socket: Duplex, head: Buffer) => void;
  /**
   * Sees every TCP connection before TLS starts; calls `next(socket)` to hand it to the TLS
   * server. The ACME TLS-ALPN-01 responder uses it. Default: straight through.
   */
  readonly acceptConnection?: (socket: Socket, next: (socket: Socket) => void) => void;
  /** Reports errors of single connections and requests refused before routing (never fatal). */
  readonly onClientError?: (error: Error) => void;
  /** Called for every request refused before routing, after its answer (access log, metrics). */
  readonly onRefused?: (req: ClientRequest, failed: ProxyFailure) => void;
  /** Client deadlines and limits. Default: the schema's defaults. */
  readonly clients?: ClientsConfig;
}

/** The HTTPS listener. */
export class HttpsListener {
  readonly server: Http2SecureServer;
  readonly #tracker: ConnectionTracker;
  readonly #options: HttpsListenerOptions;
  readonly #sessions: Http2SessionWatch;
  readonly #serving: GuardedServing;
  readonly #handshakeMs: number;
  /** False once a TLS socket turned out not to know its TCP socket (`_parent`): see {@link onHandshakeDeadline}. */
  #mapsRawSockets = true;
  /** TCP connections not handed to the TLS server yet (no byte so far): closed by {@link close}. */
  readonly #pending = new Set<RawSocket>();
  #tcp: NetServer | undefined;
  #detach: (() => void) | undefined;
  /** Node's compat 'stream' listener, for the HTTP/2 requests {@link #onStream} does not serve itself. */
  #compat: CompatStreamListener | undefined;

  constructor(options: HttpsListenerOptions) {
    this.#options = options;
    const clients = options.clients ?? DEFAULT_CLIENTS;
    const limits = clients.limits;
    const server = createSecureServer({
      ...options.store.serverOptions(),
      allowHTTP1: true,
      handshakeTimeout: clients.timeouts.handshake,
      settings: http2Settings(clients),
      // Header fields per HTTP/2 request, the four pseudo-headers included; more resets the stream.
      maxHeaderListPairs: limits.header_count + 4,
      maxSessionInvalidFrames: 100,
      maxSessionRejectedStreams: MAX_SESSION_REJECTED_STREAMS,
    });
    this.server = server;
    this.#handshakeMs = clients.timeouts.handshake;
    applyHttp1Deadlines(server, clients);
    this.#tracker = new ConnectionTracker(server, 'secureConnection');
    this.#sessions = new Http2SessionWatch(server, clients.timeouts);
    const report = options.onClientError;
    const serving: GuardedServing = {
      limits,
      bodyIdle: clients.timeouts.body_idle,
      report,
      onRefused: options.onRefused,
      onRequest: options.onRequest as GuardedServing['onRequest'],
      onUpgrade: options.onUpgrade,
    };
    this.#serving = serving;
    const onRequest = (req: IncomingMessage | Http2ServerRequest, res: Http2ServerResponse): void => {
      if (req instanceof Http2ServerRequest) {
        // Dispatch after the frames read with this HEADERS are processed: a stream the client reset
        // at once (rapid reset, CVE-2023-44487) is closed by then and never reaches an upstream.
        setImmediate(dispatchStream, req, res, this);
        return;
      }
      serveHttp1Request(req, res, serving);
    };
    const before = new Set(server.listeners('stream'));
    server.on('request', onRequest);
    // Adding a 'request' listener made Node put its compat layer on 'stream' (one listener that
    // builds Http2ServerRequest/Http2ServerResponse and emits 'request'). Take it off: streams
    // without a body are served from the stream (proxy/http2-stream.ts), the rest are handed to it.
    // Should a Node release not add it, the compat path is left as Node set it up.
    const compat = server.listeners('stream').filter((listener) => !before.has(listener)) as CompatStreamListener[];
    if (compat.length === 1) {
      this.#compat = compat[0]!;
      server.removeListener('stream', this.#compat);
      server.on('stream', (stream: ServerHttp2Stream, headers: IncomingHttpHeaders, flags: number, rawHeaders: string[]) => {
        this.#onStream(stream, headers, flags, rawHeaders);
      });
    }
    server.on('checkContinue', (req: IncomingMessage | Http2ServerRequest, res: Http2ServerResponse) => {
      markAwaitingContinue(req);
      onRequest(req, res);
    });
    guardServer(server, serving);
    server.on('tlsClientError', (error: Error) => report?.(error));
    server.on('secureConnection', (socket: TLSSocket) => {
      // The handshake is done: end the deadline that started at the accept (see #accept).
      const raw = (socket as TLSSocket & { _parent?: RawSocket })._parent;
      if (raw?.[kAccepted] === undefined) {
        this.#mapsRawSockets = false;
        return;
      }
      clearTimeout(raw[kAccepted].deadline);
      raw[kAccepted] = undefined;
    });
    server.on('sessionError', (error: Error) => report?.(error));
    this.#detach = options.store.attach(server);
  }

  /**
   * A new HTTP/2 stream. One whose HEADERS ended it (no body), without `Expect` and not a CONNECT,
   * gets a StreamRequest/StreamResponse pair; any other goes through Node's compat layer, which
   * emits 'request' with its own objects (body streaming, `100-continue`, flow control).
   */
  #onStream(stream: ServerHttp2Stream, headers: IncomingHttpHeaders, flags: number, rawHeaders: string[]): void {
    if (!stream.endAfterHeaders || headers.expect !== undefined || headers[':method'] === 'CONNECT') {
      this.#compat!.call(this.server, stream, headers, flags, rawHeaders);
      return;
    }
    // As the compat layer does: a stream error (a reset from the client) must not be unhandled.
    stream.on('error', ignoreStreamError);
    // Node ended the stream's readable side with its HEADERS; reading it now emits 'end' (one
    // tick), so that Node destroys the stream once it closes instead of resuming it then to
    // drain nothing (a resume and three end ticks; bench/README.md, 2026-12-07 12:13, "What
    // changed: the dump").
    stream.read();
    setImmediate(dispatchStream, new StreamRequest(stream, headers, rawHeaders), new StreamResponse(stream), this);
  }

  /** @internal An HTTP/2 request, one turn of the event loop after its HEADERS: still open, and valid? */
  dispatchStream(req: Http2ServerRequest | StreamRequest, res: Http2ServerResponse | StreamResponse): void {
    const stream = req.stream;
    if (stream.destroyed || stream.closed) return;
    const serving = this.#serving;
    const failed = checkRequest(req, serving.limits);
    if (failed !== undefined) {
      refuse(req, res, failed, serving);
      return;
    }
    watchRequestBody(req, res, serving.bodyIdle);
    this.#options.onRequest(req, res);
  }

  /** True while draining: HTTP/1.1 answers should close their connection. */
  get draining(): boolean {
    return this.#tracker.draining;
  }

  /**
   * Start listening.
   * @returns the bound address (the real port when 0 was asked).
   * @throws the listen error (EADDRINUSE, EACCES for ports < 1024 without the capability).
   */
  async listen(): Promise<AddressInfo> {
    // Take TCP connections ourselves (#accept) and hand them to the TLS server.
    const tcp = createNetServer({ pauseOnConnect: false }, (socket) => this.#accept(socket));
    this.#tcp = tcp;
    await listenOn(tcp, this.#options.address);
    // The TLS server itself never listens: start Node's HTTP/1 header-deadline checks, which
    // it only starts on 'listening' (without them HTTP/1 connections have no header deadline).
    this.server.emit('listening');
    return tcp.address() as AddressInfo;
  }

  /**
   * A new TCP connection: the `acceptConnection` hook (ACME TLS-ALPN-01) first, then its first
   * bytes are read here and pushed back before the TLS server takes the socket. Node then hands
   * them to the TLS layer itself, whose input buffer starts the size of that chunk; when the TLS
   * layer reads a new socket first, it keeps a 64 KiB buffer (libuv's read size) for the life of
   * the connection, ~10 KiB of it resident. The handshake deadline runs from here, the accept:
   * Node's own (`handshakeTimeout`) starts only when the TLS server gets the socket.
   */
  #accept(socket: Socket): void {
    busyPollKick();
    const raw = socket as RawSocket;
    raw[kAccepted] = { listener: this, deadline: setTimeout(onHandshakeDeadline, this.#handshakeMs, raw).unref() };
    this.#pending.add(raw);
    raw.on('error', onRawError);
    raw.on('close', onRawClose);
    const hook = this.#options.acceptConnection;
    if (hook !== undefined) hook(raw, readFirstBytes);
    else readFirstBytes(raw);
  }

  /** @internal The first bytes of `socket` arrived (pushed back): the TLS server takes it. */
  handOver(socket: RawSocket): void {
    this.#pending.delete(socket);
    this.server.emit('connection', socket);
  }

  /** @internal A TCP connection closed (before or after the handover). */
  closed(socket: RawSocket): void {
    this.#pending.delete(socket);
  }

  /** @internal The handshake of a connection accepted `clients.timeouts.handshake` ago has not finished: close it. */
  handshakeDeadline(socket: RawSocket): void {
    if (socket.destroyed || !this.#mapsRawSockets) return; // (then Node's deadline, from the handover, applies)
    const error = Object.assign(new Error('TLS handshake timeout'), { code: 'ERR_TLS_HANDSHAKE_TIMEOUT' });
    this.#serving.report?.(error);
    socket.destroy();
  }

  /** Stop accepting, let in-flight requests finish for up to `graceMs`, then close everything. */
  async close(graceMs: number): Promise<void> {
    this.#detach?.();
    this.#detach = undefined;
    this.#tcp?.close();
    for (const socket of this.#pending) socket.destroy(); // connected, but not one byte sent: nothing in flight
    await this.#tracker.drain(this.server, graceMs);
    this.#sessions.stop();
  }
}

/** Listen on a port or host:port; host undefined = every interface. */
export function listenOn(server: NetServer, address: ListenAddress): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (error: Error) => reject(error);
    server.once('error', onError);
    server.listen({ port: address.port, host: address.host }, () => {
      server.off('error', onError);
      resolve();
    });
  });
}

function dispatchStream(req: Http2ServerRequest | StreamRequest, res: Http2ServerResponse | StreamResponse, listener: HttpsListener): void {
  listener.dispatchStream(req, res);
}

/** Node's compat layer's listener of the server's 'stream' event. */
type CompatStreamListener = (this: Http2SecureServer, stream: ServerHttp2Stream, headers: IncomingHttpHeaders, flags: number, rawHeaders: string[]) => void;

/** Stream errors are seen through 'close' (proxy/forward.ts); nothing to do here. */
function ignoreStreamError(): void {}

const kAccepted = Symbol('gatehouse.accepted');

/** A TCP connection of the HTTPS listener, from the accept until it closes. */
type RawSocket = Socket & { [kAccepted]?: { readonly listener: HttpsListener; readonly deadline: NodeJS.Timeout } };

/** Wait for the first bytes of `socket` (also when the ACME hook paused it with bytes pushed back). */
function readFirstBytes(socket: Socket): void {
  socket.once('data', onFirstBytes);
  socket.resume();
}

function onFirstBytes(this: RawSocket, chunk: Buffer): void {
  this.pause();
  this.unshift(chunk);
  this[kAccepted]?.listener.handOver(this);
}

function onHandshakeDeadline(socket: RawSocket): void {
  socket[kAccepted]?.listener.handshakeDeadline(socket);
}

/** Errors of the TCP socket itself (a reset before the first bytes): it is gone, nothing to answer. */
function onRawError(this: RawSocket): void {
  this.destroy();
}

function onRawClose(this: RawSocket): void {
  const accepted = this[kAccepted];
  if (accepted === undefined) return;
  clearTimeout(accepted.deadline);
  accepted.listener.closed(this);
}
