/**
 * proxyUpgrade(): a real node:http inbound server whose 'upgrade' event proxies to real upstreams
 * (a `ws` echo server, a refusing server, a plain HTTP server, silent and closed ports); real
 * clients (`ws`, raw TCP sockets).
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import http2 from 'node:http2';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import net, { type AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { WebSocket } from 'ws';
import { proxyUpgrade, type UpgradeOutcome } from '../src/proxy/upgrade.js';
import { Upstream } from '../src/upstream/pool.js';
import { startEchoUpstream, startSilentUpstream, startWsEchoUpstream } from './helpers/upstreams.js';

interface Inbound {
  url: string;
  port: number;
  upstream: Upstream;
  outcomes: UpgradeOutcome[];
  close(): Promise<void>;
}

async function startInbound(upstream: Upstream): Promise<Inbound> {
  const inbound = { upstream, outcomes: [] as UpgradeOutcome[] } as Inbound;
  const server = http.createServer((_req, res) => res.writeHead(404).end());
  server.on('upgrade', (req: http.IncomingMessage, socket: net.Socket, head: Buffer) => {
    proxyUpgrade(req, socket, head, {
      upstream: inbound.upstream,
      path: req.url ?? '/',
      clientIp: req.socket.remoteAddress ?? '',
      protocol: 'http',
      onDone: (outcome) => inbound.outcomes.push({ ...outcome }),
    });
  });
  const sockets = new Set<net.Socket>();
  server.on('connection', (s: net.Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  inbound.port = (server.address() as AddressInfo).port;
  inbound.url = `http://127.0.0.1:${inbound.port}`;
  inbound.close = async () => {
    const closed = new Promise<void>((r) => server.close(() => r()));
    for (const s of sockets) s.destroy();
    await closed;
  };
  return inbound;
}

/** Sends `request` on a raw TCP connection and collects everything until the server closes it. */
async function rawExchange(port: number, request: string, timeoutMs = 5_000): Promise<{ text: string; closedByServer: boolean }> {
  const socket = net.connect(port, '127.0.0.1');
  socket.on('error', () => {});
  const chunks: Buffer[] = [];
  socket.on('data', (c: Buffer) => chunks.push(c));
  await once(socket, 'connect');
  socket.write(request);
  const ended = once(socket, 'close').then(() => true);
  const timer = new Promise<boolean>((r) => setTimeout(() => r(false), timeoutMs).unref());
  const closedByServer = await Promise.race([ended, timer]);
  socket.destroy();
  return { text: Buffer.concat(chunks).toString('latin1'), closedByServer };
}

function openFds(): number {
  return readdirSync('/proc/self/fd').length;
}

async function waitFor(condition: () => boolean, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Opens a WebSocket through the proxy, sends `message`, resolves with the echo, then closes. */
async function echoOnce(url: string, message: string | Buffer): Promise<{ data: Buffer; isBinary: boolean }> {
  const ws = new WebSocket(url);
  try {
    await once(ws, 'open');
    ws.send(message);
    const [data, isBinary] = (await once(ws, 'message')) as [Buffer, boolean];
    return { data, isBinary };
  } finally {
    const closed = once(ws, 'close');
    ws.close();
    await closed;
  }
}

describe('proxyUpgrade', () => {
  let wsEcho: Awaited<ReturnType<typeof startWsEchoUpstream>>;
  let wsUpstream: Upstream;
  let inbound: Inbound;
  const cleanups: (() => Promise<void>)[] = [];

  before(async () => {
    wsEcho = await startWsEchoUpstream();
    wsUpstream = new Upstream(wsEcho.url);
    inbound = await startInbound(wsUpstream);
  });

  after(async () => {
    await inbound?.close();
    for (const cleanup of cleanups) await cleanup();
    await wsUpstream?.destroy();
    await wsEcho?.close();
  });

  test('WebSocket text and binary messages are echoed through the proxy; forwarding headers reach the upstream', async () => {
    inbound.upstream = wsUpstream;
    const text = await echoOnce(`ws://127.0.0.1:${inbound.port}/chat?room=1`, 'hello über');
    assert.equal(text.isBinary, false);
    assert.equal(text.data.toString('utf8'), 'hello über');
    const payload = Buffer.from(Array.from({ length: 70_000 }, (_, i) => i & 0xff));
    const binary = await echoOnce(`ws://127.0.0.1:${inbound.port}/chat`, payload);
    assert.equal(binary.isBinary, true);
    assert.ok(binary.data.equals(payload), 'binary payload is byte-identical');

    const seen = wsEcho.upgrades.at(-1)!;
    assert.equal(seen['x-forwarded-for'], '127.0.0.1');
    assert.equal(seen['x-forwarded-proto'], 'http');
    assert.equal(seen.via, '1.1 gatehouse');
    assert.equal(seen.upgrade, 'websocket');
    assert.equal(seen.connection, 'upgrade');
    assert.equal(seen.host, `127.0.0.1:${inbound.port}`);
    assert.ok(seen['sec-websocket-key'], 'the handshake key is forwarded');
    await waitFor(() => inbound.outcomes.length >= 2);
    assert.equal(inbound.outcomes[0]!.status, 101);
    assert.ok(inbound.outcomes[1]!.bytesOut > 70_000, `bytesOut ${inbound.outcomes[1]!.bytesOut}`);
  });

  test('WebSocket over TLS on the HTTP/2 listener (allowHTTP1) is proxied too', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'gh-upgrade-cert-'));
    let cert: string;
    let key: string;
    try {
      execFileSync('openssl', [
        'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', join(dir, 'key.pem'),
        '-out', join(dir, 'cert.pem'), '-days', '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1',
      ], { stdio: 'ignore' });
      cert = readFileSync(join(dir, 'cert.pem'), 'utf8');
      key = readFileSync(join(dir, 'key.pem'), 'utf8');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    const secure = http2.createSecureServer({ cert, key, allowHTTP1: true });
    secure.on('upgrade', (req: http.IncomingMessage, socket: net.Socket, head: Buffer) => {
      proxyUpgrade(req, socket, head, { upstream: wsUpstream, path: req.url ?? '/', clientIp: req.socket.remoteAddress ?? '', protocol: 'https' });
    });
    secure.listen(0, '127.0.0.1');
    await once(secure, 'listening');
    try {
      const ws = new WebSocket(`wss://127.0.0.1:${(secure.address() as AddressInfo).port}/tls`, { ca: cert });
      ws.on('error', () => {});
      await once(ws, 'open');
      ws.send('over tls');
      const [data] = (await once(ws, 'message')) as [Buffer];
      assert.equal(data.toString(), 'over tls');
      assert.equal(wsEcho.upgrades.at(-1)!['x-forwarded-proto'], 'https');
      const closed = once(ws, 'close');
      ws.close();
      await closed;
    } finally {
      await new Promise<void>((r) => secure.close(() => r()));
    }
  });

  test('an upstream refusing the upgrade (403) is relayed and the connection closes, never a tunnel', async () => {
    const refusing = await startWsEchoUpstream({ reject: { status: 403, body: 'no sockets for you' } });
    const upstream = new Upstream(refusing.url);
    cleanups.push(() => upstream.destroy(), () => refusing.close());
    inbound.upstream = upstream;

    const ws = new WebSocket(`ws://127.0.0.1:${inbound.port}/`);
    ws.on('error', () => {});
    const [, response] = (await once(ws, 'unexpected-response')) as [unknown, http.IncomingMessage];
    assert.equal(response.statusCode, 403);
    response.resume();
    ws.terminate();

    const { text, closedByServer } = await rawExchange(inbound.port,
      'GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n');
    assert.match(text, /^HTTP\/1\.1 403 /);
    assert.match(text, /\r\nConnection: close\r\n/i);
    assert.match(text, /no sockets for you$/);
    assert.ok(closedByServer, 'the proxy closed the client connection after the refusal');
    await waitFor(() => upstream.inFlight === 0);
  });

  test('an upstream answering 200 to an upgrade does not open a tunnel (no request smuggling)', async () => {
    const plain = await startEchoUpstream(); // node:http without an upgrade handler answers 200
    const upstream = new Upstream(plain.url);
    cleanups.push(() => upstream.destroy(), () => plain.close());
    inbound.upstream = upstream;
    const smuggled = 'GET /internal/admin HTTP/1.1\r\nHost: internal\r\n\r\n';
    const { text, closedByServer } = await rawExchange(inbound.port,
      `GET /public HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n${smuggled}`);
    assert.match(text, /^HTTP\/1\.1 200 /);
    assert.ok(closedByServer, 'closed after the relayed response');
    await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual(plain.requests.map((r) => r.url), ['/public'], 'the smuggled request never reached the upstream');
    assert.equal(text.match(/HTTP\/1\.1 /g)?.length, 1, 'one response only');
  });

  test('Upgrade: h2c is refused with 400 and not forwarded', async () => {
    inbound.upstream = wsUpstream;
    const before = wsEcho.upgrades.length;
    const { text, closedByServer } = await rawExchange(inbound.port,
      'GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n');
    assert.match(text, /^HTTP\/1\.1 400 /);
    assert.match(text, /GH_UPGRADE_REFUSED/);
    assert.ok(closedByServer, 'closed');
    assert.equal(wsEcho.upgrades.length, before);
  });

  test('connect refused gives 502; an upstream that never answers gives 504', async () => {
    const probe = net.createServer().listen(0, '127.0.0.1');
    await once(probe, 'listening');
    const freePort = (probe.address() as AddressInfo).port;
    await new Promise<void>((r) => probe.close(() => r()));
    const refused = new Upstream(`http://127.0.0.1:${freePort}`);
    cleanups.push(() => refused.destroy());
    inbound.upstream = refused;
    const request = 'GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n';
    const refusedAnswer = await rawExchange(inbound.port, request);
    assert.match(refusedAnswer.text, /^HTTP\/1\.1 502 /);
    assert.match(refusedAnswer.text, /GH_UPSTREAM_REFUSED/);

    const silent = await startSilentUpstream();
    const slow = new Upstream(silent.url, { timeouts: { connect: 1_000, response_header: 300, body_idle: 1_000, keepalive: 1_000 } });
    cleanups.push(() => slow.destroy(), () => silent.close());
    inbound.upstream = slow;
    const started = Date.now();
    const timedOut = await rawExchange(inbound.port, request);
    const elapsed = Date.now() - started;
    assert.match(timedOut.text, /^HTTP\/1\.1 504 /);
    assert.ok(elapsed >= 250 && elapsed < 4_000, `answered after ${elapsed} ms`);
    await waitFor(() => silent.connections() === 0);
    assert.equal(slow.inFlight, 0);
  });

  test('1000 WebSocket open/close cycles leave the open file descriptor count where it was', async () => {
    inbound.upstream = wsUpstream;
    await echoOnce(`ws://127.0.0.1:${inbound.port}/`, 'warm-up');
    await waitFor(() => wsEcho.openSockets() === 0 && wsUpstream.inFlight === 0);
    const baseline = openFds();
    const cycles = 1000;
    const parallel = 10;
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < cycles) {
        const i = next++;
        const echoed = await echoOnce(`ws://127.0.0.1:${inbound.port}/c${i}`, `m${i}`);
        assert.equal(echoed.data.toString(), `m${i}`);
      }
    };
    await Promise.all(Array.from({ length: parallel }, worker));
    await waitFor(() => wsEcho.openSockets() === 0 && wsUpstream.inFlight === 0, 10_000);
    let now = openFds();
    const deadline = Date.now() + 5_000;
    while (now > baseline + 3 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
      now = openFds();
    }
    assert.ok(now <= baseline + 3, `open FDs: ${baseline} before, ${now} after ${cycles} cycles`);
  });
});
