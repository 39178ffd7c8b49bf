/**
 * A named `node:http` upstream for balancing tests: answers every request with its name, counts
 * requests per method, answers `GET /health` with 200, and can be killed (stop accepting, destroy
 * every socket) and restarted on the same port.
 *
 * Query parameters: `delay=MS` waits before answering; `cookie=VALUE` adds the upstream's own
 * `Set-Cookie: app=VALUE`; `hsts=VALUE` adds `Strict-Transport-Security: VALUE`.
 */
import { once } from 'node:events';
import http from 'node:http';
import type net from 'node:net';

/** A running (or killed) counting upstream. */
export interface CountingUpstream {
  readonly name: string;
  /** Origin, stable across restarts. */
  readonly url: string;
  readonly port: number;
  /** Requests answered (health checks excluded). */
  count: number;
  /** Requests per method (health checks excluded). */
  readonly methods: Record<string, number>;
  /** Health checks received. */
  healthChecks: number;
  /** Body bytes of the last request answered. */
  lastBodyLength: number;
  /** Stop accepting and destroy every open connection (a crash, as the proxy sees it). */
  kill(): Promise<void>;
  /** Listen again on the same port. */
  restart(): Promise<void>;
  /** Kill, for `after()`; safe when already killed. */
  close(): Promise<void>;
}

/**
 * Start a counting upstream on 127.0.0.1 (port 0 unless given).
 * @param options `keepAliveTimeout` of the server (ms), default Node's.
 */
export async function startCountingUpstream(name: string, options: { port?: number; keepAliveTimeout?: number } = {}): Promise<CountingUpstream> {
  let server: http.Server | undefined;
  let sockets = new Set<net.Socket>();
  const state: CountingUpstream = {
    name,
    url: '',
    port: 0,
    count: 0,
    methods: {},
    healthChecks: 0,
    lastBodyLength: 0,
    kill,
    restart,
    close: kill,
  };

  function handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    let length = 0;
    req.on('data', (chunk: Buffer) => { length += chunk.length; });
    req.on('end', () => {
      const url = new URL(req.url ?? '/', 'http://upstream');
      if (url.pathname === '/health') {
        state.healthChecks++;
        res.end('ok');
        return;
      }
      state.count++;
      state.lastBodyLength = length;
      state.methods[req.method ?? ''] = (state.methods[req.method ?? ''] ?? 0) + 1;
      const answer = (): void => {
        const cookie = url.searchParams.get('cookie');
        if (cookie !== null) res.setHeader('set-cookie', `app=${cookie}; Path=/`);
        const hsts = url.searchParams.get('hsts');
        if (hsts !== null) res.setHeader('strict-transport-security', hsts);
        res.setHeader('content-type', 'text/plain');
        res.end(name);
      };
      const delay = Number(url.searchParams.get('delay') ?? 0);
      if (delay > 0) setTimeout(answer, delay);
      else answer();
    });
  }

  async function listen(port: number): Promise<number> {
    const s = http.createServer(handle);
    if (options.keepAliveTimeout !== undefined) s.keepAliveTimeout = options.keepAliveTimeout;
    const tracked = new Set<net.Socket>();
    s.on('connection', (socket: net.Socket) => {
      tracked.add(socket);
      socket.on('close', () => tracked.delete(socket));
    });
    s.listen(port, '127.0.0.1');
    await once(s, 'listening');
    server = s;
    sockets = tracked;
    return (s.address() as net.AddressInfo).port;
  }

  async function kill(): Promise<void> {
    const s = server;
    if (s === undefined) return;
    server = undefined;
    const closed = new Promise<void>((resolve) => s.close(() => resolve()));
    for (const socket of sockets) socket.destroy();
    await closed;
  }

  async function restart(): Promise<void> {
    if (server === undefined) await listen(state.port);
  }

  const port = await listen(options.port ?? 0);
  Object.assign(state, { port, url: `http://127.0.0.1:${port}` });
  return state;
}

/**
 * Send `total` requests with `concurrency` in flight, each made by `send`; resolves with the
 * statuses seen (status → count) and the bodies seen (body → count).
 */
export async function load(
  total: number, concurrency: number, send: (i: number) => Promise<{ status: number; body: string }>,
): Promise<{ statuses: Map<number, number>; bodies: Map<string, number> }> {
  const statuses = new Map<number, number>();
  const bodies = new Map<string, number>();
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < total) {
      const i = next++;
      let status: number;
      let body: string;
      try {
        ({ status, body } = await send(i));
      } catch (error) {
        status = -1;
        body = String((error as { code?: string }).code ?? error);
      }
      statuses.set(status, (statuses.get(status) ?? 0) + 1);
      bodies.set(body, (bodies.get(body) ?? 0) + 1);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return { statuses, bodies };
}
