/**
 * The admin API (`listen.admin`): plain HTTP/1.1 for the machine itself and its monitoring.
 *
 * ```
 * GET  /metrics   Prometheus text exposition (every name prefixed gatehouse_)
 * GET  /status    JSON: config version, listeners, sites, routes, upstream states, certificates
 * POST /reload    reload the config file; 200 {"result":"reloaded"}, 422 with the file:line errors
 * GET  /healthz   200 "ok" while the process serves
 * ```
 *
 * With `admin.token` every request needs `Authorization: Bearer <token>` (compared in constant
 * time); 401 otherwise. Requests that carry an `Origin` header are refused (403): browsers send
 * it, monitoring tools do not, so a web page cannot drive the admin API from a browser on the same
 * machine (cross-site request forgery against loopback).
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import type { ListenAddress } from '../config/schema.js';
import { listenOn } from '../listeners/https.js';

/** The outcome of `POST /reload`. */
export interface ReloadResult {
  /** `reloaded`, `refused` (invalid config: the old one keeps serving) or `failed`. */
  readonly result: 'reloaded' | 'refused' | 'failed';
  /** The config version served afterwards. */
  readonly version: number;
  /** What was wrong (file:line lines for an invalid config). */
  readonly errors?: readonly string[];
}

/** What the admin API serves. */
export interface AdminHandlers {
  /** The bearer token required, if any (read per request: a reload may change it). */
  token(): string | undefined;
  /** The exposition; `status` (default 200) e.g. 503 when the workers' metrics could not be collected. */
  metrics(): Promise<{ contentType: string; body: string; status?: number }>;
  status(): unknown;
  reload(): Promise<ReloadResult>;
}

/** Logger calls of the admin listener. */
export interface AdminLogger {
  warn(fields: object, message: string): void;
  error(fields: object, message: string): void;
}

/** The admin listener. */
export class AdminListener {
  readonly server: Server;
  readonly #address: ListenAddress;
  readonly #sockets = new Set<Socket>();

  /** @param address where to listen; a bare port binds 127.0.0.1 (loopback by default). */
  constructor(address: ListenAddress, handlers: AdminHandlers, logger: AdminLogger) {
    this.#address = { host: address.host ?? '127.0.0.1', port: address.port };
    this.server = createServer({ keepAliveTimeout: 5_000, requestTimeout: 30_000 }, (req, res) => {
      handle(req, res, handlers).catch((error: unknown) => {
        logger.error({ err: error, path: req.url }, 'admin request failed');
        if (!res.headersSent) send(res, 500, 'text/plain; charset=utf-8', 'internal error\n');
        else res.destroy();
      });
    });
    this.server.on('connection', (socket: Socket) => {
      this.#sockets.add(socket);
      socket.once('close', () => this.#sockets.delete(socket));
    });
    this.server.on('clientError', (_error: Error, socket) => socket.destroy());
  }

  /** @returns the bound address. @throws the listen error (EADDRINUSE). */
  async listen(): Promise<AddressInfo> {
    await listenOn(this.server, this.#address);
    return this.server.address() as AddressInfo;
  }

  /** Stop accepting and close every connection (an answer being written is cut). */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const socket of this.#sockets) socket.destroy();
    await closed;
  }
}

async function handle(req: IncomingMessage, res: ServerResponse, handlers: AdminHandlers): Promise<void> {
  if (req.headers.origin !== undefined) {
    send(res, 403, 'text/plain; charset=utf-8', 'requests from browsers are refused\n');
    return;
  }
  const token = handlers.token();
  if (token !== undefined && !bearerMatches(req.headers.authorization, token)) {
    res.setHeader('www-authenticate', 'Bearer realm="gatehouse admin"');
    send(res, 401, 'text/plain; charset=utf-8', 'a valid bearer token is required\n');
    return;
  }
  const url = req.url ?? '/';
  const query = url.indexOf('?');
  const path = query < 0 ? url : url.slice(0, query);
  const method = req.method ?? 'GET';
  const read = method === 'GET' || method === 'HEAD';
  switch (path) {
    case '/metrics': {
      if (!read) return notAllowed(res, 'GET, HEAD');
      const { contentType, body, status } = await handlers.metrics();
      return send(res, status ?? 200, contentType, body, method === 'HEAD');
    }
    case '/status':
      if (!read) return notAllowed(res, 'GET, HEAD');
      return send(res, 200, 'application/json', `${JSON.stringify(handlers.status(), null, 2)}\n`, method === 'HEAD');
    case '/healthz':
      if (!read) return notAllowed(res, 'GET, HEAD');
      return send(res, 200, 'text/plain; charset=utf-8', 'ok\n', method === 'HEAD');
    case '/reload': {
      if (method !== 'POST') return notAllowed(res, 'POST');
      req.resume(); // no body is expected; drain any
      const result = await handlers.reload();
      const status = result.result === 'reloaded' ? 200 : result.result === 'refused' ? 422 : 500;
      return send(res, status, 'application/json', `${JSON.stringify(result)}\n`);
    }
    default:
      return send(res, 404, 'text/plain; charset=utf-8', 'not found: try /metrics, /status, POST /reload\n');
  }
}

function bearerMatches(header: string | undefined, token: string): boolean {
  if (header === undefined || !/^bearer /i.test(header)) return false;
  // Digests have equal length, so timingSafeEqual never throws and the length does not leak.
  const given = createHash('sha256').update(header.slice(7).trim()).digest();
  const expected = createHash('sha256').update(token).digest();
  return timingSafeEqual(given, expected);
}

function notAllowed(res: ServerResponse, allow: string): void {
  res.setHeader('allow', allow);
  send(res, 405, 'text/plain; charset=utf-8', 'method not allowed\n');
}

function send(res: ServerResponse, status: number, contentType: string, body: string, head = false): void {
  res.writeHead(status, {
    'content-type': contentType,
    'content-length': Buffer.byteLength(body),
    'cache-control': 'no-store',
  });
  res.end(head ? undefined : body);
}
