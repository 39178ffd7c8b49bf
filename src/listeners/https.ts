/**
 * The HTTPS listener: `node:http2`'s secure server with `allowHTTP1`, so ALPN picks h2 or
 * http/1.1 on one port. TLS settings, the SNI callback and session tickets come from the
 * certificate store; requests go to the router through {@link DispatchContext}.
 *
 * Why node:http2 and not `spdy`: spdy is unmaintained, relies on removed Node internals and
 * measured 4x slower; Node's own HTTP/2 server is maintained with Node itself.
 */
import { createSecureServer, Http2ServerRequest, type Http2SecureServer, type Http2ServerResponse } from 'node:http2';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { createServer as createNetServer, type AddressInfo, type Server as NetServer, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { DEFAULT_CLIENTS, type ClientsConfig, type ListenAddress } from '../config/schema.js';
import type { CertificateStore } from '../tls/certificates.js';
import { ConnectionTracker } from './connections.js';
import { markAwaitingContinue } from '../routing/dispatch.js';
import { applyHttp1Deadlines, Http2SessionWatch, watchRequestBody } from './deadlines.js';
import { checkRequest, guardServer, refuse, serveHttp1Request, type GuardedServing } from './guard.js';
import type { ClientRequest } from '../proxy/forward.js';
import type { ProxyFailure } from '../proxy/errors.js';

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
  /** Handles every request, HTTP/2 streams and HTTP/1.1 requests alike. */
  readonly onRequest: (req: IncomingMessage | Http2ServerRequest, res: Http2ServerResponse) => void;
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
  #tcp: NetServer | undefined;
  #detach: (() => void) | undefined;

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
      maxSessionRejectedStreams: 100,
    });
    this.server = server;
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
    server.on('request', onRequest);
    server.on('checkContinue', (req: IncomingMessage | Http2ServerRequest, res: Http2ServerResponse) => {
      markAwaitingContinue(req);
      onRequest(req, res);
    });
    guardServer(server, serving);
    server.on('tlsClientError', (error: Error) => report?.(error));
    server.on('sessionError', (error: Error) => report?.(error));
    this.#detach = options.store.attach(server);
  }

  /** @internal An HTTP/2 request, one turn of the event loop after its HEADERS: still open, and valid? */
  dispatchStream(req: Http2ServerRequest, res: Http2ServerResponse): void {
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
    const { address, acceptConnection } = this.#options;
    if (acceptConnection !== undefined) {
      // Take TCP connections ourselves and hand them to the TLS server when the hook says so.
      const tcp = createNetServer({ pauseOnConnect: false }, (socket) => {
        acceptConnection(socket, (s) => this.server.emit('connection', s));
      });
      this.#tcp = tcp;
      await listenOn(tcp, address);
      // The TLS server itself never listens: start Node's HTTP/1 header-deadline checks, which
      // it only starts on 'listening' (without them HTTP/1 connections have no header deadline).
      this.server.emit('listening');
      return tcp.address() as AddressInfo;
    }
    await listenOn(this.server, address);
    return this.server.address() as AddressInfo;
  }

  /** Stop accepting, let in-flight requests finish for up to `graceMs`, then close everything. */
  async close(graceMs: number): Promise<void> {
    this.#detach?.();
    this.#detach = undefined;
    this.#tcp?.close();
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

function dispatchStream(req: Http2ServerRequest, res: Http2ServerResponse, listener: HttpsListener): void {
  listener.dispatchStream(req, res);
}
