/**
 * The plain HTTP listener (`listen.http`): answers ACME HTTP-01 challenges, redirects sites that
 * have TLS to HTTPS with 308 (RFC 9110 §15.4.9: method and body kept), and serves the sites that
 * have `tls: off` or `redirect: false` in plain HTTP.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Http2ServerRequest, Http2ServerResponse } from 'node:http2';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import { DEFAULT_CLIENTS, type ClientsConfig, type ListenAddress } from '../config/schema.js';
import { ConnectionTracker } from './connections.js';
import { markAwaitingContinue } from '../routing/dispatch.js';
import { applyHttp1Deadlines } from './deadlines.js';
import { guardServer, serveHttp1Request, type GuardedServing } from './guard.js';
import type { ClientRequest } from '../proxy/forward.js';
import type { ProxyFailure } from '../proxy/errors.js';
import { listenOn } from './https.js';
import { hasHttp1Body } from '../proxy/headers.js';

/** The path prefix of ACME HTTP-01 challenges (RFC 8555 §8.3). */
export const ACME_CHALLENGE_PREFIX = '/.well-known/acme-challenge/';

/** Options of {@link HttpListener}. */
export interface HttpListenerOptions {
  readonly address: ListenAddress;
  /** Handles every request (challenge, redirect or proxy). */
  readonly onRequest: (req: IncomingMessage, res: ServerResponse) => void;
  /** Handles HTTP/1.1 Upgrade requests. */
  readonly onUpgrade: (req: IncomingMessage, socket: Duplex, head: Buffer) => void;
  /** Reports errors of single connections and requests refused before routing (never fatal). */
  readonly onClientError?: (error: Error) => void;
  /** Called for every request refused before routing, after its answer (access log, metrics). */
  readonly onRefused?: (req: ClientRequest, failed: ProxyFailure) => void;
  /** Client deadlines and limits. Default: the schema's defaults. */
  readonly clients?: ClientsConfig;
}

/** The plain HTTP listener. */
export class HttpListener {
  readonly server: Server;
  readonly #tracker: ConnectionTracker;
  readonly #address: ListenAddress;

  constructor(options: HttpListenerOptions) {
    this.#address = options.address;
    const clients = options.clients ?? DEFAULT_CLIENTS;
    const server = createServer();
    applyHttp1Deadlines(server, clients);
    this.server = server;
    this.#tracker = new ConnectionTracker(server);
    const serving: GuardedServing = {
      limits: clients.limits,
      bodyIdle: clients.timeouts.body_idle,
      report: options.onClientError,
      onRefused: options.onRefused,
      onRequest: options.onRequest as GuardedServing['onRequest'],
      onUpgrade: options.onUpgrade,
    };
    server.on('request', (req: IncomingMessage, res: ServerResponse) => serveHttp1Request(req, res, serving));
    server.on('checkContinue', (req: IncomingMessage, res: ServerResponse) => {
      markAwaitingContinue(req);
      serveHttp1Request(req, res, serving);
    });
    guardServer(server, serving);
  }

  get draining(): boolean {
    return this.#tracker.draining;
  }

  /** @returns the bound address. @throws the listen error (EADDRINUSE, EACCES). */
  async listen(): Promise<AddressInfo> {
    await listenOn(this.server, this.#address);
    return this.server.address() as AddressInfo;
  }

  /** Stop accepting, let in-flight requests finish for up to `graceMs`, then close everything. */
  async close(graceMs: number): Promise<void> {
    await this.#tracker.drain(this.server, graceMs);
  }
}

/**
 * The 308 redirect to HTTPS: same host (without the plain port), path and query; the HTTPS port
 * only when it is not 443.
 * @param host normalised host (IPv6 without brackets).
 */
export function redirectToHttps(req: IncomingMessage, res: ServerResponse, host: string, httpsPort: number): void {
  const authority = host.includes(':') ? `[${host}]` : host;
  const location = `https://${authority}${httpsPort === 443 ? '' : `:${httpsPort}`}${req.url ?? '/'}`;
  const body = 'Redirecting to HTTPS\n';
  const hasBody = hasHttp1Body(req);
  res.writeHead(308, {
    Location: location,
    'Content-Type': 'text/plain; charset=utf-8',
    'Content-Length': Buffer.byteLength(body),
    // An unread request body must not be taken for the next request (RFC 9112 §9.3).
    ...(hasBody ? { Connection: 'close' } : {}),
  });
  res.end(req.method === 'HEAD' ? undefined : body);
}
