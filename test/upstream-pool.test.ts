/**
 * UpstreamPool (`src/upstream/http1-pool.ts`), Gatehouse's keep-alive HTTP/1.1 client for
 * upstreams, against real servers on 127.0.0.1: `node:http`/`node:https` upstreams that count their
 * connections and record what they received, and raw `node:net` upstreams that write exact bytes.
 *
 * Covered: connection reuse and the `connections` limit, keep-alive expiry on either side, aborts
 * (and a stale handle's abort), response backpressure, response read buffers, request bodies and
 * their framing, an early answer to an upload, the connect/headers/body timeouts, refused
 * connections, TLS (verification and session resumption), close/destroy, and the request head.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { EventEmitter, once } from 'node:events';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import { Readable } from 'node:stream';
import { describe, it, type TestContext } from 'node:test';
import type { TLSSocket } from 'node:tls';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  UpstreamPool, type UpstreamCall, type UpstreamHandler, type UpstreamPoolOptions, type UpstreamRequestOptions,
} from '../src/upstream/http1-pool.js';
import { makeCertificate } from './helpers/certs.ts';
import { sizedBodyChunks, sizedBodySha256, startRawUpstream, startSilentUpstream, startSizedUpstream } from './helpers/upstreams.ts';

// ---- helpers ----

/** Every test is bounded, so a hanging request fails its test instead of the run. */
const LIMIT = { timeout: 5_000 };

/** Defaults of the pools built here: short bounds, no connection limit, plain HTTP. */
const POOL_DEFAULTS: UpstreamPoolOptions = {
  connections: null, connectTimeout: 500, headersTimeout: 1_000, bodyTimeout: 1_000, keepAliveTimeout: 2_000, tls: null,
};

const cleanups = new WeakMap<TestContext, (() => unknown)[]>();

/** Runs `fn` when the test ends, passed or failed; the last one registered runs first. */
function defer(t: TestContext, fn: () => unknown): void {
  let list = cleanups.get(t);
  if (list === undefined) {
    const created: (() => unknown)[] = [];
    list = created;
    cleanups.set(t, created);
    t.after(async () => {
      for (const cleanup of created.reverse()) await cleanup();
    });
  }
  list.push(fn);
}

/** A pool to 127.0.0.1:`port`, destroyed when the test ends. */
function makePool(t: TestContext, port: number, options: Partial<UpstreamPoolOptions> = {}, hostField = `127.0.0.1:${port}`): UpstreamPool {
  const pool = new UpstreamPool('127.0.0.1', port, { ...POOL_DEFAULTS, ...options }, hostField);
  defer(t, () => pool.destroy());
  return pool;
}

type CodedError = Error & { code?: string };

/** What one request's handler saw. */
interface Outcome {
  status: number;
  headers: string[];
  /** Copies of the onData chunks, in order. */
  readonly chunks: Buffer[];
  /** The chunks joined; set when the request ends. */
  body: Buffer;
  trailers: string[] | null;
  error: CodedError | null;
  /** Handler calls in order: connect, headers, data (once per run of chunks), complete, error. */
  readonly calls: string[];
  /** Sizes of the chunks onBodySent got. */
  readonly bodySent: number[];
}

/** Optional handler behaviour; `call` is the handle onConnect got. A hook returning undefined means true. */
interface Hooks {
  onConnect?(call: UpstreamCall): void;
  onBodySent?(chunk: Buffer): void;
  onHeaders?(call: UpstreamCall, status: number): boolean | void;
  onData?(call: UpstreamCall, chunk: Buffer): boolean | void;
}

/** A dispatched request: its handle, what its handler saw so far, and a promise of the end. */
interface Sent {
  readonly call: UpstreamCall;
  readonly seen: Outcome;
  readonly done: Promise<Outcome>;
}

/** Dispatches one request (default `GET /`, no fields, no body) and records what the handler sees. */
function send(pool: UpstreamPool, request: Partial<UpstreamRequestOptions> = {}, hooks: Hooks = {}): Sent {
  const seen: Outcome = { status: 0, headers: [], chunks: [], body: Buffer.alloc(0), trailers: null, error: null, calls: [], bodySent: [] };
  let settle!: (outcome: Outcome) => void;
  const done = new Promise<Outcome>((resolve) => { settle = resolve; });
  let call: UpstreamCall | null = null;
  const end = (kind: string): void => {
    seen.calls.push(kind);
    seen.body = Buffer.concat(seen.chunks);
    settle(seen);
  };
  const handler: UpstreamHandler = {
    onConnect(connected) {
      call = connected;
      seen.calls.push('connect');
      hooks.onConnect?.(connected);
    },
    onBodySent(chunk) {
      seen.bodySent.push(chunk.length);
      hooks.onBodySent?.(chunk);
    },
    onHeaders(status, rawHeaders) {
      seen.calls.push('headers');
      seen.status = status;
      seen.headers = rawHeaders;
      return hooks.onHeaders?.(call!, status) ?? true;
    },
    onData(chunk) {
      if (seen.calls.at(-1) !== 'data') seen.calls.push('data');
      seen.chunks.push(Buffer.from(chunk)); // a view, valid only during the call
      return hooks.onData?.(call!, chunk) ?? true;
    },
    onComplete(trailers) {
      seen.trailers = trailers;
      end('complete');
    },
    onError(error) {
      seen.error = error;
      end('error');
    },
  };
  const dispatched = pool.dispatch({ path: '/', method: 'GET', headers: [], body: null, ...request }, handler);
  return { call: dispatched, seen, done };
}

/** One request's outcome. */
function request(pool: UpstreamPool, options: Partial<UpstreamRequestOptions> = {}, hooks: Hooks = {}): Promise<Outcome> {
  return send(pool, options, hooks).done;
}

function assertOk(outcome: Outcome, body?: string): void {
  assert.equal(outcome.error, null, `the request failed: ${outcome.error?.stack}`);
  assert.equal(outcome.status, 200);
  if (body !== undefined) assert.equal(outcome.body.toString('latin1'), body);
}

function assertFailed(outcome: Outcome, code: string): void {
  assert.ok(outcome.error !== null, `expected ${code}, the request succeeded with ${outcome.status}`);
  assert.equal(outcome.error.code, code, `expected ${code}, got ${outcome.error.stack}`);
}

/** Waits (polling) until `condition()` holds; fails after `ms`. */
async function until(condition: () => boolean, what: string, ms = 2_000): Promise<void> {
  const deadline = performance.now() + ms;
  while (!condition()) {
    if (performance.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** Counts a server's TCP connections: accepted so far, open now, most open at once. */
class ConnectionCount {
  accepted = 0;
  open = 0;
  maxOpen = 0;
  readonly sockets = new Set<net.Socket>();

  add(socket: net.Socket): void {
    this.accepted++;
    this.open++;
    this.maxOpen = Math.max(this.maxOpen, this.open);
    this.sockets.add(socket);
    socket.once('close', () => {
      this.open--;
      this.sockets.delete(socket);
    });
  }
}

/** What the HTTP upstream received. */
interface Received {
  readonly method: string;
  readonly url: string;
  readonly rawHeaders: string[];
  readonly body: Buffer;
  readonly socket: net.Socket;
  /** TLS upstreams: the connection resumed a session. */
  readonly sessionReused: boolean | null;
}

interface HttpUpstream {
  readonly port: number;
  readonly connections: ConnectionCount;
  readonly requests: Received[];
}

/**
 * A `node:http` (or, with `tlsPair`, `node:https`) upstream closed when the test ends. It reads the
 * whole request, then answers `200` with the body `METHOD URL`, after `?delay=MS` if given.
 */
async function startHttpUpstream(t: TestContext, tlsPair?: { cert: string; key: string }): Promise<HttpUpstream> {
  const connections = new ConnectionCount();
  const requests: Received[] = [];
  const delays = new Set<NodeJS.Timeout>();
  const onRequest = (req: http.IncomingMessage, res: http.ServerResponse): void => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      requests.push({
        method: req.method ?? '',
        url: req.url ?? '',
        rawHeaders: req.rawHeaders,
        body: Buffer.concat(chunks),
        socket: req.socket,
        sessionReused: tlsPair === undefined ? null : (req.socket as TLSSocket).isSessionReused(),
      });
      const delay = Number(new URL(req.url ?? '/', 'http://upstream').searchParams.get('delay') ?? 0);
      const timer = setTimeout(() => {
        delays.delete(timer);
        res.end(`${req.method} ${req.url}`);
      }, delay);
      delays.add(timer);
    });
  };
  const server = tlsPair === undefined ? http.createServer(onRequest) : https.createServer(tlsPair, onRequest);
  server.on('connection', (socket: net.Socket) => connections.add(socket));
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  defer(t, async () => {
    for (const timer of delays) clearTimeout(timer);
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    for (const socket of connections.sockets) socket.destroy();
    await closed;
  });
  return { port: (server.address() as net.AddressInfo).port, connections, requests };
}

/** A raw upstream running `onConnection` for each connection; closed when the test ends. */
async function startRaw(t: TestContext, onConnection: (socket: net.Socket) => void): Promise<{ port: number; connections: ConnectionCount }> {
  const connections = new ConnectionCount();
  const upstream = await startRawUpstream((socket) => {
    connections.add(socket);
    onConnection(socket);
  });
  defer(t, () => upstream.close());
  return { port: upstream.port, connections };
}

const OK_RESPONSE = 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok';

/** Calls `onHead(n)` for the n-th request head (1-based) a raw connection receives; bodies are not expected. */
function onRequestHeads(socket: net.Socket, onHead: (n: number) => void): void {
  let pending = '';
  let count = 0;
  socket.on('data', (data: Buffer) => {
    pending += data.toString('latin1');
    for (let end = pending.indexOf('\r\n\r\n'); end >= 0; end = pending.indexOf('\r\n\r\n')) {
      pending = pending.slice(end + 4);
      onHead(++count);
    }
  });
}

/** A port nothing listens on. */
async function closedPort(): Promise<number> {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** `size` bytes of the sized upstream's pattern, as a byte stream of 16 KiB chunks. */
function patternBody(size: number): { source: Buffer; stream: Readable } {
  const source = Buffer.concat([...sizedBodyChunks(size)]);
  const slices: Buffer[] = [];
  for (let at = 0; at < size; at += 16_384) slices.push(source.subarray(at, at + 16_384));
  return { source, stream: Readable.from(slices, { objectMode: false }) };
}

/** A body of `size` bytes made on demand in 64 KiB chunks (nothing is made while it is paused). */
function lazyBody(size: number): Readable {
  const chunk = Buffer.alloc(65_536, 0x61);
  let made = 0;
  return new Readable({
    read() {
      if (made >= size) {
        this.push(null);
        return;
      }
      made += chunk.length;
      this.push(chunk);
    },
  });
}

/** A body of `count` one-byte chunks, one every `everyMs`. */
function slowBody(count: number, everyMs: number): Readable {
  let made = 0;
  return new Readable({
    read() {
      setTimeout(() => this.push(made++ < count ? Buffer.from('x') : null), everyMs);
    },
  });
}

const site = makeCertificate({ names: ['localhost', '127.0.0.1'] });

// ---- tests ----

describe('UpstreamPool: keep-alive and connection limits', () => {
  it('sends sequential requests over one keep-alive connection; stats follow', LIMIT, async (t) => {
    const upstream = await startHttpUpstream(t);
    const pool = makePool(t, upstream.port);
    assert.deepEqual(pool.stats, { connected: 0, free: 0, pending: 0, running: 0 });
    for (const path of ['/one', '/two', '/three']) {
      const sent = send(pool, { path });
      assert.deepEqual(pool.stats, { connected: 1, free: 0, pending: 0, running: 1 }, `while ${path} runs`);
      assertOk(await sent.done, `GET ${path}`);
      assert.deepEqual(pool.stats, { connected: 1, free: 1, pending: 0, running: 0 }, `after ${path}`);
    }
    assert.equal(upstream.connections.accepted, 1);
    assert.equal(new Set(upstream.requests.map((r) => r.socket)).size, 1, 'every request came on the same socket');
  });

  it('connections: 2 runs two requests at a time; the others wait, then all complete', LIMIT, async (t) => {
    const upstream = await startHttpUpstream(t);
    const pool = makePool(t, upstream.port, { connections: 2 });
    const paths = ['/0', '/1', '/2', '/3', '/4'].map((p) => `${p}?delay=30`);
    const sent = paths.map((path) => send(pool, { path }));
    assert.deepEqual(pool.stats, { connected: 2, free: 0, pending: 3, running: 2 });
    const outcomes = await Promise.all(sent.map((s) => s.done));
    outcomes.forEach((outcome, i) => assertOk(outcome, `GET ${paths[i]}`));
    assert.equal(upstream.connections.maxOpen, 2);
    assert.equal(upstream.connections.accepted, 2, 'the waiting requests reused the two connections');
    assert.deepEqual(pool.stats, { connected: 2, free: 2, pending: 0, running: 0 });
  });

  it('an aborted queued request fails at once and never reaches the upstream', LIMIT, async (t) => {
    const upstream = await startHttpUpstream(t);
    const pool = makePool(t, upstream.port, { connections: 1 });
    const running = send(pool, { path: '/running?delay=50' });
    const queued = send(pool, { path: '/queued' });
    const after = send(pool, { path: '/after' });
    queued.call.abort();
    assert.deepEqual(queued.seen.calls, ['error'], 'onError is called synchronously, nothing else');
    assertFailed(queued.seen, 'GH_UPSTREAM_ABORTED');
    assertOk(await running.done);
    assertOk(await after.done, 'GET /after');
    assert.deepEqual(upstream.requests.map((r) => r.url), ['/running?delay=50', '/after']);
    assert.deepEqual(queued.seen.calls, ['error']);
  });

  it('stats.pending stops counting a queued request once it is aborted', LIMIT, async (t) => {
    const upstream = await startHttpUpstream(t);
    const pool = makePool(t, upstream.port, { connections: 1 });
    const running = send(pool, { path: '/running?delay=50' });
    const queued = [send(pool), send(pool)];
    assert.equal(pool.stats.pending, 2);
    queued[1]!.call.abort();
    assert.equal(pool.stats.pending, 1, 'one request still waits');
    await Promise.all([running.done, ...queued.map((s) => s.done)]);
  });

  it('closes a connection idle for keepAliveTimeout; a later request opens a new one', LIMIT, async (t) => {
    const KEEP_ALIVE = 200;
    const upstream = await startHttpUpstream(t);
    const pool = makePool(t, upstream.port, { keepAliveTimeout: KEEP_ALIVE });
    const first = await request(pool);
    assertOk(first);
    const idleAt = performance.now(); // just after the pool marked the connection idle
    await until(() => upstream.connections.open === 0, 'the upstream to see the idle connection close');
    const idleFor = performance.now() - idleAt;
    // 5 ms: the pool stamps the idle time just before onComplete, a little earlier than `idleAt`.
    assert.ok(idleFor >= KEEP_ALIVE - 5, `closed after ${idleFor.toFixed(1)} ms idle, before the ${KEEP_ALIVE} ms bound`);
    assertOk(await request(pool, { path: '/later' }), 'GET /later');
    assert.equal(upstream.connections.accepted, 2);
    assert.deepEqual(pool.stats, { connected: 1, free: 1, pending: 0, running: 0 });
  });

  it('an idle connection the upstream closes is not used again: the next request opens a new one', LIMIT, async (t) => {
    const upstream = await startHttpUpstream(t);
    const pool = makePool(t, upstream.port);
    assertOk(await request(pool));
    for (const socket of upstream.connections.sockets) socket.end(); // the upstream's keep-alive expiry
    await until(() => pool.stats.connected === 0, 'the pool to forget the closed connection');
    assertOk(await request(pool, { path: '/next' }), 'GET /next');
    assert.equal(upstream.connections.accepted, 2);
  });

  it('a request dispatched after the pool saw the upstream close, before the socket\'s close event, opens a new connection', LIMIT, async (t) => {
    const upstream = await startHttpUpstream(t);
    const pool = makePool(t, upstream.port);
    const sockets: net.Socket[] = [];
    assertOk(await request(pool, {}, { onConnect: (call) => { sockets.push(call.connection!.socket); } }));
    const socket = sockets[0]!; // the pool's side of the connection
    // The pool's own 'end' listener runs first and destroys the socket; 'close' comes later (libuv's
    // close phase), so a request sent from setImmediate falls in between.
    const next = new Promise<{ sent: Sent; destroyed: boolean }>((resolve) => {
      socket.once('end', () => setImmediate(() => resolve({ destroyed: socket.destroyed, sent: send(pool, { path: '/next' }) })));
    });
    for (const serverSide of upstream.connections.sockets) serverSide.end();
    const { sent, destroyed } = await next;
    assert.equal(destroyed, true, 'the pool had closed its socket when the request was dispatched');
    const outcome = await sent.done;
    assertOk(outcome, 'GET /next');
    assert.deepEqual(outcome.calls, ['connect', 'headers', 'data', 'complete']);
    assert.equal(upstream.connections.accepted, 2);
  });

  it('a chunked response with trailers completes with them, and its connection is reused', LIMIT, async (t) => {
    const upstream = await startRaw(t, (socket) => onRequestHeads(socket, () => {
      socket.write('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n');
    }));
    const pool = makePool(t, upstream.port);
    for (let i = 0; i < 2; i++) {
      const outcome = await request(pool);
      assertOk(outcome, 'hello world');
      assert.deepEqual(outcome.trailers, ['X-Checksum', 'abc']);
    }
    assert.equal(upstream.connections.accepted, 1);
  });

  it('an upstream that closes the connection as the next request arrives: GH_UPSTREAM_RESET, no hang', LIMIT, async (t) => {
    // The keep-alive race seen from the upstream: it closes the kept-alive connection just as the
    // next request arrives. Observed: that request fails with GH_UPSTREAM_RESET after onConnect
    // (the pool does not retry; proxy/forward.ts decides), and the pool opens a new connection after.
    const upstream = await startRaw(t, (socket) => onRequestHeads(socket, (n) => {
      if (n === 1) socket.write(OK_RESPONSE);
      else socket.end();
    }));
    const pool = makePool(t, upstream.port);
    assertOk(await request(pool), 'ok');
    const raced = await request(pool, { path: '/raced' });
    assertFailed(raced, 'GH_UPSTREAM_RESET');
    assert.deepEqual(raced.calls, ['connect', 'error']);
    assertOk(await request(pool, { path: '/after' }), 'ok');
    assert.equal(upstream.connections.accepted, 2);
  });
});

describe('UpstreamPool: aborts and backpressure', () => {
  const SIZE = 1024 * 1024;
  const cases = [
    { where: 'onHeaders', reason: new Error('stop in onHeaders'), calls: ['connect', 'headers', 'error'] },
    { where: 'onData', reason: undefined, calls: ['connect', 'headers', 'data', 'error'] },
  ] as const;
  for (const { where, reason, calls } of cases) {
    it(`call.abort() from ${where} closes the connection and calls onError once`, LIMIT, async (t) => {
      const upstream = await startSizedUpstream();
      defer(t, () => upstream.close());
      const pool = makePool(t, upstream.port);
      const abort = (call: UpstreamCall): boolean => {
        call.abort(reason);
        return true;
      };
      const outcome = await request(pool, { path: `/bytes/${SIZE}` }, where === 'onHeaders' ? { onHeaders: abort } : { onData: abort });
      if (reason === undefined) assertFailed(outcome, 'GH_UPSTREAM_ABORTED');
      else assert.equal(outcome.error, reason, 'onError gets the error given to abort()');
      await until(() => upstream.openConnections() === 0, 'the upstream to see the connection close');
      await until(() => pool.stats.connected === 0, 'the pool to forget the connection');
      assert.deepEqual(outcome.calls, calls, 'nothing is called after onError');
      assert.ok(outcome.body.length < SIZE);
    });
  }

  it('a stale handle: abort() and resume() of a completed call leave a later request on the same connection alone', LIMIT, async (t) => {
    const upstream = await startHttpUpstream(t);
    const pool = makePool(t, upstream.port);
    const connected: UpstreamCall[] = [];
    const first = await request(pool, { path: '/first' }, { onConnect: (call) => { connected.push(call); } });
    assertOk(first, 'GET /first');
    const stale = connected[0]!; // the first request's handle, kept past its end

    const second = send(pool, { path: '/second?delay=100' });
    assert.deepEqual(second.seen.calls, ['connect'], 'the second request took the idle connection at once');
    await until(() => upstream.requests.length === 2, 'the second request to reach the upstream');
    stale.abort();
    stale.abort(new Error('stale'));
    stale.resume();
    assertOk(await second.done, 'GET /second?delay=100');
    assert.deepEqual(first.calls, ['connect', 'headers', 'data', 'complete'], 'the first handler heard nothing more');
    assert.equal(upstream.connections.accepted, 1);
    assert.equal(upstream.requests[1]!.socket, upstream.requests[0]!.socket, 'both requests used one connection');
    assert.deepEqual(pool.stats, { connected: 1, free: 1, pending: 0, running: 0 });
  });

  it('onData returning false pauses reading until call.resume(); the 5 MiB body arrives whole', LIMIT, async (t) => {
    const BIG = 5 * 1024 * 1024;
    const BODY_TIMEOUT = 150;
    const upstream = await startSizedUpstream();
    defer(t, () => upstream.close());
    // The first pause outlasts bodyTimeout: time spent paused is not counted.
    const pool = makePool(t, upstream.port, { bodyTimeout: BODY_TIMEOUT });
    const pauses = new EventEmitter();
    const sent = send(pool, { path: `/bytes/${BIG}` }, {
      onData(call) {
        const n = sent.seen.chunks.length;
        if (n !== 1 && n % 16 !== 0) return true;
        pauses.emit('pause', call);
        return false;
      },
    });
    let paused = 0;
    for (;;) {
      const event = await Promise.race([once(pauses, 'pause'), sent.done]);
      if (!Array.isArray(event)) break; // the response ended
      const call = event[0] as UpstreamCall;
      const chunks = sent.seen.chunks.length;
      await sleep(paused === 0 ? 2 * BODY_TIMEOUT : 10);
      assert.equal(sent.seen.chunks.length, chunks, 'no onData while paused');
      paused++;
      call.resume();
    }
    const outcome = await sent.done;
    assertOk(outcome);
    assert.ok(paused >= 2, `paused ${paused} times`);
    assert.equal(outcome.body.length, BIG);
    assert.equal(createHash('sha256').update(outcome.body).digest('hex'), sizedBodySha256(BIG));
  });

  it('onData returning false stops reading, but the read in hand is still delivered (chunked, one write)', LIMIT, async (t) => {
    const upstream = await startRaw(t, (socket) => onRequestHeads(socket, () => {
      socket.write('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n');
    }));
    const pool = makePool(t, upstream.port);
    const pausedCalls: UpstreamCall[] = [];
    const sent = send(pool, {}, {
      onData(call) {
        pausedCalls.push(call);
        return false;
      },
    });
    // The documented contract (UpstreamHandler.onData): false stops the socket being read; the
    // bytes of the read in hand (at most 64 KiB) still arrive, and here they end the response.
    await sent.done;
    assert.deepEqual(sent.seen.chunks.map(String), ['hello', 'world']);
    assert.deepEqual(sent.seen.calls, ['connect', 'headers', 'data', 'complete']); // consecutive data calls are recorded once
    pausedCalls[0]!.resume(); // a no-op once the request is over
  });
});

describe('UpstreamPool: response reads', () => {
  it('a large body trickled in small writes arrives whole, each chunk in a buffer at most twice its size', LIMIT, async (t) => {
    const SIZE = 200 * 1024;
    const PIECE = 2_000;
    const source = Buffer.alloc(SIZE);
    for (let i = 0; i < SIZE; i++) source[i] = (i * 7) & 0xff;
    const timers = new Set<NodeJS.Timeout>();
    defer(t, () => { for (const timer of timers) clearTimeout(timer); });
    const upstream = await startRaw(t, (socket) => onRequestHeads(socket, () => {
      socket.write(`HTTP/1.1 200 OK\r\nContent-Length: ${SIZE}\r\n\r\n`);
      let at = 0;
      const next = (): void => {
        socket.write(source.subarray(at, at + PIECE));
        at += PIECE;
        if (at < SIZE) {
          const timer = setTimeout(() => { timers.delete(timer); next(); }, 1);
          timers.add(timer);
        }
      };
      next();
    }));
    const pool = makePool(t, upstream.port);
    // Each chunk handed on may wait in a slow client's queue: the memory it holds stays within
    // twice its own size, or within the slab Node takes small buffers from (Buffer.poolSize:
    // 8 KiB, 64 KiB on Node 24).
    const held: string[] = [];
    const outcome = await request(pool, {}, {
      onData(_call, chunk) {
        if (chunk.buffer.byteLength > Math.max(2 * chunk.length, Buffer.poolSize)) held.push(`${chunk.length} in ${chunk.buffer.byteLength}`);
      },
    });
    assertOk(outcome);
    assert.ok(outcome.chunks.length > 10, `the body came in ${outcome.chunks.length} reads: not trickled`);
    assert.ok(outcome.body.equals(source), 'the body arrives whole and in order');
    assert.deepEqual(held, [], 'chunks holding buffers over twice their size');
  });
  it('call.lastChunk is true in onData for the last bytes of a Content-Length body only; never for chunked or close-delimited bodies', LIMIT, async (t) => {
    const timers = new Set<NodeJS.Timeout>();
    defer(t, () => { for (const timer of timers) clearTimeout(timer); });
    /** Writes `pieces` one per 20 ms, so that each reaches the pool in a read of its own. */
    const paced = (socket: net.Socket, pieces: string[], end = false): void => {
      const next = (i: number): void => {
        if (i === pieces.length) {
          if (end) socket.end();
          return;
        }
        socket.write(pieces[i]!);
        const timer = setTimeout(() => { timers.delete(timer); next(i + 1); }, 20);
        timers.add(timer);
      };
      next(0);
    };
    const answers: Record<string, { pieces: string[]; end?: boolean }> = {
      '/sized': { pieces: ['HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc', 'def', 'ghi'] },
      // The head and the whole body in one read: one chunk, the last.
      '/sized-one': { pieces: ['HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc'] },
      '/chunked': { pieces: ['HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n', '3\r\ndef\r\n0\r\n\r\n'] },
      '/until-close': { pieces: ['HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc', 'def'], end: true },
    };
    const upstream = await startRaw(t, (socket) => {
      let pending = '';
      socket.on('data', (data: Buffer) => {
        pending += data.toString('latin1');
        const end = pending.indexOf('\r\n\r\n');
        if (end < 0) return;
        const path = pending.split(' ')[1]!;
        pending = pending.slice(end + 4);
        const answer = answers[path]!;
        paced(socket, answer.pieces, answer.end);
      });
    });
    const pool = makePool(t, upstream.port);
    const expected: Record<string, boolean[]> = {
      '/sized': [false, false, true], '/sized-one': [true], '/chunked': [false, false], '/until-close': [false, false],
    };
    for (const [path, flags] of Object.entries(expected)) {
      const last: boolean[] = [];
      const outcome = await request(pool, { path }, { onData(call) { last.push(call.lastChunk); } });
      assertOk(outcome);
      assert.deepEqual(last, flags, `${path}: lastChunk per chunk (${outcome.chunks.map((c) => c.toString()).join('|')})`);
      assert.equal(outcome.calls.at(-1), 'complete');
    }
  });
});

describe('UpstreamPool: request bodies', () => {
  const MIB = 1024 * 1024;
  const framings = [
    { name: 'with content-length it is sent as is', headers: ['content-length', String(MIB)], expect: { 'content-length': String(MIB) } },
    { name: 'without content-length it is sent chunked', headers: [], expect: { 'transfer-encoding': 'chunked' } },
  ];
  for (const { name, headers, expect } of framings) {
    it(`a 1 MiB Readable body ${name}`, LIMIT, async (t) => {
      const upstream = await startHttpUpstream(t);
      const pool = makePool(t, upstream.port);
      const { source, stream } = patternBody(MIB);
      const outcome = await request(pool, { method: 'PUT', path: '/upload', headers, body: stream });
      assertOk(outcome, 'PUT /upload');
      const received = upstream.requests[0]!;
      const fields = received.rawHeaders.map((v, i) => (i % 2 === 0 ? v.toLowerCase() : v));
      const framing = Object.fromEntries(['content-length', 'transfer-encoding']
        .filter((f) => fields.includes(f))
        .map((f) => [f, fields[fields.indexOf(f) + 1]]));
      assert.deepEqual(framing, expect);
      assert.equal(received.body.length, MIB);
      assert.ok(received.body.equals(source), 'the upstream received the body byte for byte');
      assert.equal(outcome.bodySent.reduce((a, b) => a + b, 0), MIB, 'onBodySent saw every byte');
    });
  }

  for (const [name, actual] of [['shorter', 50], ['longer', 150]] as const) {
    it(`a body ${name} than its content-length fails with GH_REQUEST_BODY_LENGTH`, LIMIT, async (t) => {
      const upstream = await startHttpUpstream(t);
      const pool = makePool(t, upstream.port);
      const body = Readable.from([Buffer.alloc(actual, 0x78)], { objectMode: false });
      const outcome = await request(pool, { method: 'POST', headers: ['content-length', '100'], body });
      assertFailed(outcome, 'GH_REQUEST_BODY_LENGTH');
      assert.deepEqual(outcome.calls, ['connect', 'error']);
      await until(() => upstream.connections.open === 0, 'the connection to close');
      assert.equal(upstream.requests.length, 0, 'the upstream never got a whole request');
    });
  }

  it('onBodySent throwing aborts the request with the error thrown', LIMIT, async (t) => {
    const upstream = await startHttpUpstream(t);
    const pool = makePool(t, upstream.port);
    const thrown = new Error('body too large');
    const outcome = await request(pool, { method: 'POST', body: patternBody(MIB).stream }, {
      onBodySent() { throw thrown; },
    });
    assert.equal(outcome.error, thrown);
    assert.deepEqual(outcome.calls, ['connect', 'error']);
    assert.equal(outcome.bodySent.length, 1, 'no more body after the throw');
    await until(() => pool.stats.connected === 0, 'the connection to close');
  });

  it('an early 413 to a large upload completes, and its connection is not reused', LIMIT, async (t) => {
    // Answers 413 once part of a PUT body came, then stops reading without closing anything; GETs get 200.
    const upstream = await startRaw(t, (socket) => {
      let received = '';
      socket.on('data', function onData(data: Buffer) {
        received += data.toString('latin1');
        const headEnd = received.indexOf('\r\n\r\n');
        if (headEnd < 0) return;
        if (received.startsWith('GET ')) {
          received = '';
          socket.write(OK_RESPONSE);
        } else if (received.length > headEnd + 4) {
          socket.write('HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo much');
          socket.removeListener('data', onData);
          socket.pause();
        }
      });
    });
    const pool = makePool(t, upstream.port);
    const SIZE = 64 * 1024 * 1024;
    const body = lazyBody(SIZE);
    defer(t, () => body.destroy());
    const outcome = await request(pool, { method: 'PUT', headers: ['content-length', String(SIZE)], body });
    body.destroy();
    assert.equal(outcome.error, null, `the request failed: ${outcome.error?.stack}`);
    assert.equal(outcome.status, 413);
    assert.equal(outcome.body.toString(), 'too much');
    assert.ok(outcome.bodySent.reduce((a, b) => a + b, 0) < SIZE, 'only part of the body was sent');
    await until(() => pool.stats.connected === 0, 'the pool to close the out-of-step connection');
    assertOk(await request(pool), 'ok');
    assert.equal(upstream.connections.accepted, 2, 'the next request used a new connection');
  });

  it('headersTimeout counts from the end of the request body, not from its start', LIMIT, async (t) => {
    const upstream = await startHttpUpstream(t);
    const pool = makePool(t, upstream.port, { headersTimeout: 200 });
    // 5 bytes, one every 100 ms: the upload takes ~500 ms; the upstream answers as soon as it ends.
    const outcome = await request(pool, { method: 'POST', headers: ['content-length', '5'], body: slowBody(5, 100) });
    assertOk(outcome, 'POST /');
  });
});

describe('UpstreamPool: timeouts and connection failures', () => {
  it('headersTimeout: an upstream that never answers fails with GH_UPSTREAM_HEADERS_TIMEOUT, not before the bound', LIMIT, async (t) => {
    const HEADERS_TIMEOUT = 200;
    const upstream = await startSilentUpstream();
    defer(t, () => upstream.close());
    const pool = makePool(t, upstream.port, { headersTimeout: HEADERS_TIMEOUT });
    const started = performance.now();
    const outcome = await request(pool);
    const elapsed = performance.now() - started;
    assertFailed(outcome, 'GH_UPSTREAM_HEADERS_TIMEOUT');
    assert.deepEqual(outcome.calls, ['connect', 'error']);
    assert.ok(elapsed >= HEADERS_TIMEOUT, `failed after ${elapsed.toFixed(1)} ms`);
  });

  it('bodyTimeout: a head then silence fails with GH_UPSTREAM_BODY_TIMEOUT after onHeaders', LIMIT, async (t) => {
    const BODY_TIMEOUT = 200;
    const upstream = await startRaw(t, (socket) => onRequestHeads(socket, () => {
      socket.write('HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst part');
    }));
    const pool = makePool(t, upstream.port, { bodyTimeout: BODY_TIMEOUT });
    const started = performance.now();
    const outcome = await request(pool);
    const elapsed = performance.now() - started;
    assertFailed(outcome, 'GH_UPSTREAM_BODY_TIMEOUT');
    assert.deepEqual(outcome.calls, ['connect', 'headers', 'data', 'error']);
    assert.equal(outcome.body.toString(), 'first part');
    assert.ok(elapsed >= BODY_TIMEOUT, `failed after ${elapsed.toFixed(1)} ms`);
  });

  it('a request\'s headersTimeout overrides the pool\'s, longer or shorter', LIMIT, async (t) => {
    const upstream = await startHttpUpstream(t);
    const short = makePool(t, upstream.port, { headersTimeout: 100 });
    assertOk(await request(short, { path: '/?delay=300', headersTimeout: 1_000 }), 'GET /?delay=300');
    const silent = await startSilentUpstream();
    defer(t, () => silent.close());
    const long = makePool(t, silent.port, { headersTimeout: 60_000 });
    const started = performance.now();
    const outcome = await request(long, { headersTimeout: 150 });
    assertFailed(outcome, 'GH_UPSTREAM_HEADERS_TIMEOUT');
    assert.ok(performance.now() - started >= 150);
  });

  it('connectTimeout: a listener that never accepts fails with GH_UPSTREAM_CONNECT_TIMEOUT', LIMIT, async (t) => {
    if (spawnSync('python3', ['--version']).status !== 0) return t.skip('python3 is needed for a listening socket that never accepts');
    // A listening socket with a backlog of 0 that never accepts: once one connection fills the
    // queue, the kernel drops further SYNs and connects hang (Node's own servers always accept).
    const child = spawn('python3', ['-c', "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen(0)\nprint(s.getsockname()[1],flush=True)\ntime.sleep(120)"]);
    defer(t, () => child.kill('SIGKILL'));
    const port = await new Promise<number>((resolve, reject) => {
      child.stdout.once('data', (data: Buffer) => resolve(Number(data.toString().trim())));
      child.once('error', reject);
    });
    const filler = net.connect(port, '127.0.0.1');
    defer(t, () => filler.destroy());
    await once(filler, 'connect');
    const CONNECT_TIMEOUT = 200;
    const pool = makePool(t, port, { connectTimeout: CONNECT_TIMEOUT });
    const started = performance.now();
    const outcome = await request(pool);
    const elapsed = performance.now() - started;
    assertFailed(outcome, 'GH_UPSTREAM_CONNECT_TIMEOUT');
    assert.deepEqual(outcome.calls, ['error'], 'onConnect is never called');
    assert.ok(elapsed >= CONNECT_TIMEOUT, `failed after ${elapsed.toFixed(1)} ms`);
    await until(() => pool.stats.connected === 0, 'the pool to drop the connection attempt');
  });

  it('a refused connection fails with ECONNREFUSED; onConnect is never called', LIMIT, async (t) => {
    const pool = makePool(t, await closedPort());
    const outcome = await request(pool);
    assertFailed(outcome, 'ECONNREFUSED');
    assert.deepEqual(outcome.calls, ['error']);
    await until(() => pool.stats.connected === 0, 'the pool to forget the connection');
    assert.deepEqual(pool.stats, { connected: 0, free: 0, pending: 0, running: 0 });
  });
});

describe('UpstreamPool: TLS upstreams', () => {
  const trusts = [
    { name: 'a trusted CA and servername', tls: { ca: site.cert, servername: 'localhost' } },
    { name: 'rejectUnauthorized: false', tls: { rejectUnauthorized: false } },
  ];
  for (const { name, tls } of trusts) {
    it(`a GET works over TLS with ${name}`, LIMIT, async (t) => {
      const upstream = await startHttpUpstream(t, site);
      const pool = makePool(t, upstream.port, { tls });
      assertOk(await request(pool, { path: '/secure' }), 'GET /secure');
      assertOk(await request(pool, { path: '/again' }), 'GET /again');
      assert.equal(upstream.connections.accepted, 1);
    });
  }

  it('a second connection resumes the TLS session of the first (TLS 1.3 tickets)', LIMIT, async (t) => {
    const upstream = await startHttpUpstream(t, site);
    const pool = makePool(t, upstream.port, { tls: { ca: site.cert, servername: 'localhost' } });
    assertOk(await request(pool, { path: '/first' }));
    assert.ok(pool.tlsSession !== undefined, 'the pool kept the session');
    // Two at once: one takes the idle connection, the other opens a second with the session.
    const outcomes = await Promise.all([request(pool, { path: '/a' }), request(pool, { path: '/b' })]);
    outcomes.forEach((outcome) => assertOk(outcome));
    assert.equal(upstream.connections.accepted, 2);
    const bySocket = new Map(upstream.requests.map((r) => [r.socket, r.sessionReused]));
    assert.deepEqual([...bySocket.values()], [false, true], 'first connection: full handshake; second: resumed');
  });

  const untrusted = [
    { name: 'a self-signed certificate without ca', tls: { servername: 'localhost' } },
    { name: 'a servername the certificate does not name', tls: { ca: site.cert, servername: 'other.test' } },
  ];
  for (const { name, tls } of untrusted) {
    it(`a certificate that does not verify (${name}) fails with a certificate error`, LIMIT, async (t) => {
      const upstream = await startHttpUpstream(t, site);
      const pool = makePool(t, upstream.port, { tls });
      const outcome = await request(pool);
      assert.ok(outcome.error !== null, 'the request succeeded');
      assert.match(outcome.error.code ?? '', /CERT|^ERR_TLS|^ERR_SSL/, outcome.error.stack);
      assert.deepEqual(outcome.calls, ['error'], 'onConnect is never called');
      assert.equal(upstream.requests.length, 0);
    });
  }
});

describe('UpstreamPool: close and destroy', () => {
  it('close() lets the running and queued requests finish, then resolves with no connection left', LIMIT, async (t) => {
    const upstream = await startHttpUpstream(t);
    const pool = makePool(t, upstream.port, { connections: 1 });
    const running = send(pool, { path: '/running?delay=100' });
    const queued = send(pool, { path: '/queued' });
    let closed = false;
    const closing = pool.close().then(() => { closed = true; });
    assertOk(await running.done, 'GET /running?delay=100');
    assert.equal(closed, false, 'close() waits for the queued request');
    assertOk(await queued.done, 'GET /queued');
    await closing;
    assert.deepEqual(pool.stats, { connected: 0, free: 0, pending: 0, running: 0 });
    await until(() => upstream.connections.open === 0, 'the upstream to see the connection close');
    assert.equal(upstream.connections.accepted, 1);
  });

  it('destroy() fails the running and the queued requests with GH_UPSTREAM_CLOSED', LIMIT, async (t) => {
    const upstream = await startSilentUpstream();
    defer(t, () => upstream.close());
    const pool = makePool(t, upstream.port, { connections: 1, headersTimeout: 60_000 });
    const running = send(pool);
    const queued = send(pool);
    await until(() => running.seen.calls.length > 0, 'the first request to be written');
    await pool.destroy();
    const [r, q] = await Promise.all([running.done, queued.done]);
    assertFailed(r, 'GH_UPSTREAM_CLOSED');
    assert.deepEqual(r.calls, ['connect', 'error']);
    assertFailed(q, 'GH_UPSTREAM_CLOSED');
    assert.deepEqual(q.calls, ['error']);
    assert.deepEqual(pool.stats, { connected: 0, free: 0, pending: 0, running: 0 });
  });

  for (const ending of ['close', 'destroy'] as const) {
    it(`dispatch after ${ending}() fails synchronously with GH_UPSTREAM_CLOSED`, LIMIT, async (t) => {
      const upstream = await startHttpUpstream(t);
      const pool = makePool(t, upstream.port);
      assertOk(await request(pool));
      await pool[ending]();
      const sent = send(pool);
      assert.deepEqual(sent.seen.calls, ['error'], 'onError ran before dispatch returned');
      assertFailed(sent.seen, 'GH_UPSTREAM_CLOSED');
      assert.equal(pool.stats.connected, 0);
      assert.equal(upstream.requests.length, 1);
    });
  }
});

describe('UpstreamPool: request head', () => {
  const hostCases = [
    { name: 'is added from hostField when absent', headers: [] as string[], expected: 'upstream.test:8080' },
    { name: 'is sent once, as given, when present', headers: ['Host', 'given.test'], expected: 'given.test' },
  ];
  for (const { name, headers, expected } of hostCases) {
    it(`host ${name}`, LIMIT, async (t) => {
      const upstream = await startHttpUpstream(t);
      const pool = makePool(t, upstream.port, {}, 'upstream.test:8080');
      assertOk(await request(pool, { headers: [...headers, 'x-test', 'yes'] }));
      const raw = upstream.requests[0]!.rawHeaders;
      const hosts = raw.filter((_, i) => i % 2 === 1 && raw[i - 1]!.toLowerCase() === 'host');
      assert.deepEqual(hosts, [expected]);
      assert.equal(raw[raw.findIndex((v, i) => i % 2 === 0 && v === 'x-test') + 1], 'yes');
    });
  }

  it('an invalid path (empty, space, control byte, DEL, CR LF) fails with GH_UPSTREAM_BAD_REQUEST without connecting', LIMIT, async (t) => {
    const upstream = await startHttpUpstream(t);
    const pool = makePool(t, upstream.port);
    for (const path of ['', '/a b', '/a\x01b', '/a\x7fb', '/a\tb', '/a\r\nx-smuggled: 1', '/\u20ac']) {
      const sent = send(pool, { path });
      assert.deepEqual(sent.seen.calls, ['error'], `${JSON.stringify(path)}: onError ran before dispatch returned`);
      assertFailed(sent.seen, 'GH_UPSTREAM_BAD_REQUEST');
    }
    assert.deepEqual(pool.stats, { connected: 0, free: 0, pending: 0, running: 0 });
    await sleep(20);
    assert.equal(upstream.connections.accepted, 0);
  });
});
