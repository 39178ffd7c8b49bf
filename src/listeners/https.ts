/**
 * The HTTPS listener: `node:http2`'s secure server with `allowHTTP1`, so ALPN picks h2 or
 * http/1.1 on one port. TLS settings, the SNI callback and session tickets come from the
 * certificate store; requests go to the router through {@link DispatchContext}.
 *
 * Why node:http2 and not `spdy`: spdy is unmaintained, relies on removed Node internals and
 * measured 4x slower; Node's own HTTP/2 server is maintained with Node itself.
 */
import { createSecureServer, type Http2SecureServer, type Http2ServerRequest, type Http2ServerResponse } from 'node:http2';
import type { IncomingMessage } from 'node:http';
import { createServer as createNetServer, type AddressInfo, type Server as NetServer, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { ListenAddress } from '../config/schema.js';
import type { CertificateStore } from '../tls/certificates.js';
import { ConnectionTracker, requestEnded, requestStarted } from './connections.js';

/** HTTP/2 SETTINGS and limits (RFC 9113 §6.5.2). */
export const HTTP2_SETTINGS = Object.freeze({
  /** Streams a client may open at once; 100-128 is what browsers and CDNs expect. */
  maxConcurrentStreams: 128,
  /** Largest header list accepted (bytes), as nginx's default `large_client_header_buffers`. */
  maxHeaderListSize: 64 * 1024,
  enablePush: false,
});

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
  /** Reports errors of single connections (never fatal). */
  readonly onClientError?: (error: Error) => void;
}

/** The HTTPS listener. */
export class HttpsListener {
  readonly server: Http2SecureServer;
  readonly #tracker: ConnectionTracker;
  readonly #options: HttpsListenerOptions;
  #tcp: NetServer | undefined;
  #detach: (() => void) | undefined;

  constructor(options: HttpsListenerOptions) {
    this.#options = options;
    const server = createSecureServer({
      ...options.store.serverOptions(),
      allowHTTP1: true,
      settings: HTTP2_SETTINGS,
      maxSessionInvalidFrames: 100,
      maxSessionRejectedStreams: 100,
    });
    this.server = server;
    this.#tracker = new ConnectionTracker(server, 'secureConnection');
    server.on('request', (req: IncomingMessage | Http2ServerRequest, res: Http2ServerResponse) => {
      if (req.httpVersionMajor === 1) {
        const socket = req.socket as Socket;
        requestStarted(socket);
        res.once('close', () => requestEnded(socket));
      }
      options.onRequest(req, res);
    });
    server.on('upgrade', options.onUpgrade);
    const report = options.onClientError;
    server.on('tlsClientError', (error: Error) => report?.(error));
    server.on('sessionError', (error: Error) => report?.(error));
    server.on('clientError', (error: Error, socket: Duplex) => {
      report?.(error);
      socket.destroy();
    });
    this.#detach = options.store.attach(server);
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
