/**
 * Real upstream servers for tests, each on 127.0.0.1 port 0. Every `start*` function resolves to an
 * object with `url` (origin), `port` and `close()`, which destroys every socket it accepted, so a
 * test's `after()` can always clean up, even when a request is still hanging.
 *
 * - `startEchoUpstream`: answers JSON describing what it received (method, url, headers, body hash).
 * - `startSizedUpstream`: `GET /bytes/<n>` streams n deterministic bytes (see `sizedBody`/`sizedBodySha256`)
 *   and reports when a response's connection closed before it finished.
 * - `startSilentUpstream`: accepts TCP connections and never answers.
 * - `startWsEchoUpstream`: WebSocket echo (text and binary) with the `ws` package.
 * - `startRawUpstream`: a `net` server running the test's own connection handler.
 */
import { createHash } from 'node:crypto';
import { EventEmitter, once } from 'node:events';
import http from 'node:http';
import net from 'node:net';
import { WebSocketServer, type WebSocket } from 'ws';

/** A running test server. */
export interface RunningUpstream {
  /** Origin, e.g. `http://127.0.0.1:34567`. */
  readonly url: string;
  readonly port: number;
  /** Stops accepting, destroys every accepted socket and waits for the server to close. */
  close(): Promise<void>;
}

/** What the echo upstream received, as JSON in its response body. */
export interface EchoReport {
  method: string;
  url: string;
  httpVersion: string;
  headers: http.IncomingHttpHeaders;
  rawHeaders: string[];
  bodyLength: number;
  bodySha256: string;
  trailers: Record<string, string>;
}

function trackSockets(server: net.Server): Set<net.Socket> {
  const sockets = new Set<net.Socket>();
  server.on('connection', (socket: net.Socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  return sockets;
}

async function listen(server: net.Server): Promise<number> {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return (server.address() as net.AddressInfo).port;
}

function closer(server: net.Server, sockets: Set<net.Socket>, extra?: () => void): () => Promise<void> {
  return async () => {
    extra?.();
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    for (const socket of sockets) socket.destroy();
    await closed;
  };
}

/**
 * Starts the echo upstream. The response is JSON (`EchoReport`). Query parameters change the answer:
 * - `status=NNN`: response status (default 200);
 * - `trailers=1`: chunked response with trailers `x-body-sha256` and `x-trailer-test: yes`;
 * - `header=Name:Value` (repeatable): extra response header fields (e.g. hop-by-hop ones);
 * - `delay=MS`: wait before answering.
 */
export async function startEchoUpstream(): Promise<RunningUpstream & { readonly requests: EchoReport[] }> {
  const requests: EchoReport[] = [];
  const server = http.createServer((req, res) => {
    const hash = createHash('sha256');
    let length = 0;
    req.on('data', (chunk: Buffer) => {
      hash.update(chunk);
      length += chunk.length;
    });
    req.on('end', () => {
      const url = new URL(req.url ?? '/', 'http://upstream');
      const report: EchoReport = {
        method: req.method ?? '',
        url: req.url ?? '',
        httpVersion: req.httpVersion,
        headers: req.headers,
        rawHeaders: req.rawHeaders,
        bodyLength: length,
        bodySha256: hash.digest('hex'),
        trailers: req.trailers as Record<string, string>,
      };
      requests.push(report);
      const answer = (): void => {
        const body = JSON.stringify(report);
        const status = Number(url.searchParams.get('status') ?? 200);
        const headers: [string, string][] = [['Content-Type', 'application/json']];
        for (const h of url.searchParams.getAll('header')) {
          const at = h.indexOf(':');
          headers.push([h.slice(0, at), h.slice(at + 1)]);
        }
        if (url.searchParams.get('trailers') === '1') {
          headers.push(['Trailer', 'x-body-sha256, x-trailer-test']);
          res.writeHead(status, headers.flat());
          res.write(body.slice(0, 10));
          res.write(body.slice(10));
          res.addTrailers({ 'x-body-sha256': report.bodySha256, 'x-trailer-test': 'yes' });
          res.end();
        } else {
          headers.push(['Content-Length', String(Buffer.byteLength(body))]);
          res.writeHead(status, headers.flat());
          res.end(body);
        }
      };
      const delay = Number(url.searchParams.get('delay') ?? 0);
      if (delay > 0) setTimeout(answer, delay);
      else answer();
    });
  });
  const sockets = trackSockets(server);
  const port = await listen(server);
  return { url: `http://127.0.0.1:${port}`, port, requests, close: closer(server, sockets) };
}

/** The deterministic body of `GET /bytes/<n>`, chunk by chunk (64 KiB chunks). */
export function* sizedBodyChunks(size: number): Generator<Buffer> {
  const block = Buffer.alloc(65_536);
  for (let i = 0; i < block.length; i++) block[i] = (i * 31 + 7) & 0xff;
  let sent = 0;
  let counter = 0;
  while (sent < size) {
    const n = Math.min(block.length, size - sent);
    const chunk = Buffer.from(block.subarray(0, n));
    if (n >= 4) chunk.writeUInt32BE(counter >>> 0, 0); // every chunk differs: a reordering shows
    counter++;
    yield chunk;
    sent += n;
  }
}

/** SHA-256 (hex) of the body `GET /bytes/<size>` returns. */
export function sizedBodySha256(size: number): string {
  const hash = createHash('sha256');
  for (const chunk of sizedBodyChunks(size)) hash.update(chunk);
  return hash.digest('hex');
}

/** Events of the sized upstream: `'response-closed'` with `{ completed: boolean, sent: number }`. */
export interface SizedUpstream extends RunningUpstream {
  readonly events: EventEmitter;
  /** Connections currently open to this server. */
  openConnections(): number;
}

/**
 * Starts the sized-body upstream: `GET /bytes/<n>` streams n bytes with backpressure, with
 * `Content-Length` (or chunked with `?chunked=1`). Emits `'response-closed'` on `events` when a
 * response ends or its connection closes early.
 */
export async function startSizedUpstream(): Promise<SizedUpstream> {
  const events = new EventEmitter();
  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://upstream');
    const match = /^\/bytes\/(\d+)$/.exec(url.pathname);
    req.resume();
    if (!match) {
      res.writeHead(404).end();
      return;
    }
    const size = Number(match[1]);
    const chunks = sizedBodyChunks(size);
    let sent = 0;
    let finished = false;
    const headers: Record<string, string> = { 'content-type': 'application/octet-stream' };
    if (url.searchParams.get('chunked') !== '1') headers['content-length'] = String(size);
    res.writeHead(200, headers);
    const pump = (): void => {
      for (;;) {
        const next = chunks.next();
        if (next.done) {
          res.end();
          return;
        }
        sent += next.value.length;
        if (!res.write(next.value)) {
          res.once('drain', pump);
          return;
        }
      }
    };
    res.on('finish', () => {
      finished = true;
      events.emit('response-closed', { completed: true, sent });
    });
    res.on('close', () => {
      if (!finished) events.emit('response-closed', { completed: false, sent });
    });
    pump();
  });
  const sockets = trackSockets(server);
  const port = await listen(server);
  return { url: `http://127.0.0.1:${port}`, port, events, openConnections: () => sockets.size, close: closer(server, sockets) };
}

/** Starts a TCP server that accepts connections, reads everything and never answers. */
export async function startSilentUpstream(): Promise<RunningUpstream & { connections(): number }> {
  const server = net.createServer((socket) => {
    socket.on('error', () => {});
    socket.resume();
  });
  const sockets = trackSockets(server);
  const port = await listen(server);
  return { url: `http://127.0.0.1:${port}`, port, connections: () => sockets.size, close: closer(server, sockets) };
}

/** Options of `startWsEchoUpstream`. */
export interface WsEchoOptions {
  /** Answer upgrade requests with this status and body instead of 101 (e.g. 403). */
  readonly reject?: { readonly status: number; readonly body: string };
}

/**
 * Starts a WebSocket echo upstream (the `ws` package): every message comes back with the same
 * type (text or binary). Plain HTTP requests get `200 plain http` with the request's `Upgrade`
 * header echoed in `x-saw-upgrade`. With `reject`, upgrades are refused with that status.
 */
export async function startWsEchoUpstream(options: WsEchoOptions = {}): Promise<RunningUpstream & {
  /** Headers of the upgrade requests received. */
  readonly upgrades: http.IncomingHttpHeaders[];
  /** WebSocket connections currently open on the server side. */
  openSockets(): number;
}> {
  const upgrades: http.IncomingHttpHeaders[] = [];
  const server = http.createServer((req, res) => {
    req.resume();
    res.writeHead(200, { 'content-type': 'text/plain', 'x-saw-upgrade': String(req.headers.upgrade ?? '') });
    res.end('plain http');
  });
  const wss = new WebSocketServer({ noServer: true });
  const open = new Set<WebSocket>();
  server.on('upgrade', (req: http.IncomingMessage, socket: net.Socket, head: Buffer) => {
    upgrades.push(req.headers);
    socket.on('error', () => {});
    if (options.reject) {
      const body = options.reject.body;
      socket.end(`HTTP/1.1 ${options.reject.status} ${http.STATUS_CODES[options.reject.status]}\r\n`
        + `Content-Type: text/plain\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      open.add(ws);
      ws.on('close', () => open.delete(ws));
      ws.on('error', () => {});
      ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
    });
  });
  const sockets = trackSockets(server);
  const port = await listen(server);
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    upgrades,
    openSockets: () => open.size,
    close: closer(server, sockets, () => {
      for (const ws of open) ws.terminate();
      wss.close();
    }),
  };
}

/** Starts a raw TCP server whose connections are handled by `onConnection` (e.g. hand-written HTTP). */
export async function startRawUpstream(onConnection: (socket: net.Socket) => void): Promise<RunningUpstream> {
  const server = net.createServer((socket) => {
    socket.on('error', () => {});
    onConnection(socket);
  });
  const sockets = trackSockets(server);
  const port = await listen(server);
  return { url: `http://127.0.0.1:${port}`, port, close: closer(server, sockets) };
}
