/**
 * forward(): a real inbound server (node:http plain, and http2.createSecureServer with allowHTTP1)
 * whose handler forwards to real upstreams; real clients (node:http, undici, node:http2).
 */
import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { EventEmitter, once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import http2 from 'node:http2';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { Client } from 'undici';
import { forward, type ForwardOutcome } from '../src/proxy/forward.js';
import { generateRequestId, toClientResponseHeaders, toUpstreamRequestHeaders, newRequestHeadFacts } from '../src/proxy/headers.js';
import { classifyUpstreamError } from '../src/proxy/errors.js';
import { Upstream } from '../src/upstream/pool.js';
import { readBlockStats } from '../src/upstream/read-blocks.js';
import {
  sizedBodyChunks, sizedBodySha256, startEchoUpstream, startRawUpstream, startSilentUpstream, startSizedUpstream,
  type EchoReport,
} from './helpers/upstreams.js';

const MiB = 1024 * 1024;

/** A self-signed certificate for 127.0.0.1/localhost, made with openssl (EC P-256, fast). */
function selfSigned(): { cert: string; key: string } {
  const dir = mkdtempSync(join(tmpdir(), 'gh-proxy-cert-'));
  try {
    execFileSync('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'), '-days', '1', '-subj', '/CN=localhost',
      '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    ], { stdio: 'ignore' });
    return { cert: readFileSync(join(dir, 'cert.pem'), 'utf8'), key: readFileSync(join(dir, 'key.pem'), 'utf8') };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** What the inbound handler forwards to; tests change it before sending. */
interface Route {
  upstream: Upstream;
  maxBody: number;
}

/** The inbound side: a plain HTTP/1.1 listener and a TLS listener speaking h2 and http/1.1. */
interface Harness {
  route: Route;
  outcomes: ForwardOutcome[];
  plainUrl: string;
  tlsUrl: string;
  ca: string;
  /** Called with each inbound connection (server side) as it is accepted, when set. */
  onConnection?: (socket: import('node:net').Socket) => void;
  close(): Promise<void>;
}

async function startHarness(route: Route): Promise<Harness> {
  const outcomes: ForwardOutcome[] = [];
  const harness = { route, outcomes } as Harness;
  const handler = (protocol: 'http' | 'https') => (req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse) => {
    forward(req, res, {
      upstream: harness.route.upstream,
      path: req.url ?? '/',
      maxBody: harness.route.maxBody,
      clientIp: req.socket.remoteAddress ?? '',
      protocol,
      onDone: (outcome) => outcomes.push({ ...outcome }),
    });
  };
  const { cert, key } = selfSigned();
  const plain = http.createServer(handler('http'));
  const secure = http2.createSecureServer({ cert, key, allowHTTP1: true }, handler('https'));
  const sockets = new Set<import('node:net').Socket>();
  for (const server of [plain, secure]) {
    server.on('connection', (s: import('node:net').Socket) => {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      harness.onConnection?.(s);
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
  }
  harness.plainUrl = `http://127.0.0.1:${(plain.address() as AddressInfo).port}`;
  harness.tlsUrl = `https://127.0.0.1:${(secure.address() as AddressInfo).port}`;
  harness.ca = cert;
  harness.close = async () => {
    const closed = Promise.all([plain, secure].map((s) => new Promise<void>((r) => s.close(() => r()))));
    for (const s of sockets) s.destroy();
    await closed;
  };
  return harness;
}

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
  trailers: Record<string, string | string[] | undefined>;
}

/** HTTP/1.1 request with node:http (it allows hop-by-hop request headers, unlike undici). */
function h1(url: string, options: { method?: string; headers?: Record<string, string | string[]>; body?: Iterable<Buffer> | Buffer } = {}): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: options.method ?? 'GET', headers: options.headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks), trailers: res.trailers }));
      res.on('error', reject);
      res.on('aborted', () => reject(new Error('aborted')));
    });
    req.on('error', reject);
    const body = options.body;
    if (body === undefined) req.end();
    else if (Buffer.isBuffer(body)) req.end(body);
    else void writeAll(req, body).catch(reject);
  });
}

/**
 * GET over HTTP/1.1 (plain or TLS, by the URL's scheme) on a connection of its own, reading the
 * body chunk by chunk: `onChunk` sees each one as it arrives (and may pause the response).
 */
function download(url: string, ca: string, onChunk?: (chunk: Buffer, res: http.IncomingMessage) => void): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const request = url.startsWith('https:') ? https.request : http.request;
    const req = request(url, { agent: false, ca }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => {
        chunks.push(chunk);
        onChunk?.(chunk, res);
      });
      res.on('end', () => resolve(Buffer.concat(chunks)));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
}

async function writeAll(stream: NodeJS.WritableStream, chunks: Iterable<Buffer>): Promise<void> {
  for (const chunk of chunks) {
    if (!stream.write(chunk)) await once(stream, 'drain');
  }
  stream.end();
}

/** One HTTP/2 request on `session`. */
function h2(session: http2.ClientHttp2Session, headers: http2.OutgoingHttpHeaders, body?: Iterable<Buffer> | Buffer): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const stream = session.request({ ':method': 'GET', ...headers }, { endStream: body === undefined });
    const chunks: Buffer[] = [];
    let responseHeaders: Answer['headers'] = {};
    let trailers: Answer['trailers'] = {};
    stream.on('response', (h) => { responseHeaders = h; });
    stream.on('trailers', (t) => { trailers = t; });
    stream.on('data', (c: Buffer) => chunks.push(c));
    stream.on('end', () => resolve({ status: Number(responseHeaders[':status']), headers: responseHeaders, body: Buffer.concat(chunks), trailers }));
    stream.on('error', reject);
    stream.on('close', () => {
      if (stream.rstCode !== 0 && stream.rstCode !== undefined) reject(new Error(`stream reset ${stream.rstCode}`));
    });
    if (Buffer.isBuffer(body)) stream.end(body);
    else if (body !== undefined) void writeAll(stream, body).catch(reject);
  });
}

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

function report(answer: Answer): EchoReport {
  return JSON.parse(answer.body.toString('utf8')) as EchoReport;
}

async function freePort(): Promise<number> {
  const server = http.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as AddressInfo).port;
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

describe('forward', () => {
  let echo: Awaited<ReturnType<typeof startEchoUpstream>>;
  let sized: Awaited<ReturnType<typeof startSizedUpstream>>;
  let echoUpstream: Upstream;
  let sizedUpstream: Upstream;
  let harness: Harness;
  let session: http2.ClientHttp2Session;
  const extra: Upstream[] = [];

  before(async () => {
    echo = await startEchoUpstream();
    sized = await startSizedUpstream();
    echoUpstream = new Upstream(echo.url);
    sizedUpstream = new Upstream(sized.url);
    harness = await startHarness({ upstream: echoUpstream, maxBody: 0 });
    session = http2.connect(harness.tlsUrl, { ca: harness.ca });
    session.on('error', () => {});
  });

  after(async () => {
    session?.destroy();
    await harness?.close();
    await Promise.all([echoUpstream, sizedUpstream, ...extra].filter(Boolean).map((u) => u.destroy()));
    await echo?.close();
    await sized?.close();
  });

  const use = (upstream: Upstream, maxBody = 0): void => {
    harness.route = { upstream, maxBody };
  };

  test('HTTP/1.1 and HTTP/2 clients reach the same upstream with X-Forwarded-*, Via and Host', async () => {
    use(echoUpstream);
    const viaH1 = await h1(`${harness.plainUrl}/a/b?c=1`, { headers: { 'x-forwarded-for': '198.51.100.9', Via: '1.0 corp-proxy' } });
    assert.equal(viaH1.status, 200);
    const r1 = report(viaH1);
    assert.equal(r1.url, '/a/b?c=1');
    assert.equal(r1.headers.host, new URL(harness.plainUrl).host);
    assert.equal(r1.headers['x-forwarded-for'], '198.51.100.9, 127.0.0.1');
    assert.equal(r1.headers['x-forwarded-proto'], 'http');
    assert.equal(r1.headers['x-forwarded-host'], new URL(harness.plainUrl).host);
    assert.equal(r1.headers.via, '1.0 corp-proxy, 1.1 gatehouse');
    assert.equal(viaH1.headers.via, '1.1 gatehouse');

    const viaH2 = await h2(session, { ':path': '/x?y=2', ':authority': 'app.example.test' });
    assert.equal(viaH2.status, 200);
    const r2 = report(viaH2);
    assert.equal(r2.url, '/x?y=2');
    assert.equal(r2.httpVersion, '1.1');
    assert.equal(r2.headers.host, 'app.example.test');
    assert.equal(r2.headers['x-forwarded-proto'], 'https');
    assert.equal(r2.headers['x-forwarded-host'], 'app.example.test');
    assert.equal(r2.headers['x-forwarded-for'], '127.0.0.1');
    assert.equal(r2.headers.via, '2 gatehouse');
    assert.ok(!r2.rawHeaders.some((name) => name.startsWith(':')), 'no pseudo-header reaches the upstream');
    assert.equal(viaH2.headers['content-type'], 'application/json');

    // HTTP/1.1 over TLS on the same listener (ALPN http/1.1), with undici.
    const client = new Client(harness.tlsUrl, { connect: { ca: harness.ca } });
    try {
      const res = await client.request({ path: '/tls-h1', method: 'GET' });
      const r3 = JSON.parse(await res.body.text()) as EchoReport;
      assert.equal(res.statusCode, 200);
      assert.equal(r3.headers['x-forwarded-proto'], 'https');
      assert.equal(r3.headers.via, '1.1 gatehouse');
    } finally {
      await client.close();
    }
  });

  test('hop-by-hop fields are removed in both directions; TE: trailers survives', async () => {
    use(echoUpstream);
    const responseFields = ['Connection:x-secret', 'X-Secret:1', 'Keep-Alive:timeout=99', 'Proxy-Connection:keep-alive', 'Upgrade:foo', 'X-Kept:yes']
      .map((h) => `header=${encodeURIComponent(h)}`).join('&');
    const answer = await h1(`${harness.plainUrl}/hop?${responseFields}`, {
      headers: {
        Connection: 'keep-alive, X-Private',
        'X-Private': 'secret',
        'Keep-Alive': 'timeout=5',
        'Proxy-Connection': 'keep-alive',
        TE: 'trailers, deflate',
        'X-Forwarded-Proto': 'forged',
        'X-Forwarded-Host': 'forged.example',
        'X-Normal': 'kept',
      },
    });
    assert.equal(answer.status, 200);
    const r = report(answer);
    for (const name of ['x-private', 'keep-alive', 'proxy-connection', 'trailer', 'upgrade', 'transfer-encoding', 'expect']) {
      assert.equal(r.headers[name], undefined, `${name} must not reach the upstream`);
    }
    assert.equal(r.headers.te, 'trailers');
    assert.equal(r.headers['x-normal'], 'kept');
    assert.equal(r.headers['x-forwarded-proto'], 'http');
    assert.equal(r.headers['x-forwarded-host'], new URL(harness.plainUrl).host);
    assert.equal(r.headers.connection, 'keep-alive', 'the pool sends its own keep-alive');
    // Response side: the client sees none of the upstream's hop-by-hop fields.
    assert.equal(answer.headers['x-secret'], undefined);
    assert.notEqual(answer.headers['keep-alive'], 'timeout=99');
    assert.equal(answer.headers['proxy-connection'], undefined);
    assert.equal(answer.headers.upgrade, undefined);
    assert.equal(answer.headers['x-kept'], 'yes');

    // An HTTP/2 client gets the same response without node:http2 throwing on connection headers.
    const viaH2 = await h2(session, { ':path': `/hop?${responseFields}`, te: 'trailers' });
    assert.equal(viaH2.status, 200);
    assert.equal(viaH2.headers['x-secret'], undefined);
    assert.equal(viaH2.headers['x-kept'], 'yes');
    assert.equal(report(viaH2).headers.te, 'trailers');
  });

  test('X-Request-Id: a sane client id is kept, a bad one replaced, a missing one generated; echoed back', async () => {
    use(echoUpstream);
    const kept = await h1(`${harness.plainUrl}/id`, { headers: { 'X-Request-Id': 'abc-123' } });
    assert.equal(report(kept).headers['x-request-id'], 'abc-123');
    assert.equal(kept.headers['x-request-id'], 'abc-123');

    const tooLong = 'x'.repeat(201);
    const replaced = await h1(`${harness.plainUrl}/id`, { headers: { 'X-Request-Id': tooLong } });
    const sent = report(replaced).headers['x-request-id'] as string;
    assert.notEqual(sent, tooLong);
    assert.match(sent, /^[\x21-\x7e]{1,200}$/);
    assert.equal(replaced.headers['x-request-id'], sent);

    const fresh = await h2(session, { ':path': '/id' });
    const generated = report(fresh).headers['x-request-id'] as string;
    assert.ok(generated && generated.length > 5, `generated ${generated}`);
    assert.equal(fresh.headers['x-request-id'], generated);
    assert.notEqual(generateRequestId(), generateRequestId());
  });

  test('20 MiB upload is byte-identical over HTTP/1.1 (chunked and sized) and HTTP/2', async () => {
    use(echoUpstream);
    const size = 20 * MiB;
    const expected = sizedBodySha256(size);
    const chunked = report(await h1(`${harness.plainUrl}/upload`, { method: 'POST', body: sizedBodyChunks(size) }));
    assert.equal(chunked.bodyLength, size);
    assert.equal(chunked.bodySha256, expected);
    const sizedUpload = report(await h1(`${harness.plainUrl}/upload`, {
      method: 'PUT', headers: { 'content-length': String(size) }, body: sizedBodyChunks(size),
    }));
    assert.equal(sizedUpload.bodySha256, expected);
    assert.equal(sizedUpload.headers['content-length'], String(size));
    const viaH2 = report(await h2(session, { ':method': 'POST', ':path': '/upload' }, sizedBodyChunks(size)));
    assert.equal(viaH2.bodyLength, size);
    assert.equal(viaH2.bodySha256, expected);
    const outcome = harness.outcomes.at(-1)!;
    assert.equal(outcome.bytesIn, size);
    assert.equal(outcome.error, undefined);
  });

  test('20 MiB download is byte-identical over HTTP/1.1 and HTTP/2', async () => {
    use(sizedUpstream);
    const size = 20 * MiB;
    const expected = sizedBodySha256(size);
    const viaH1 = await h1(`${harness.plainUrl}/bytes/${size}`);
    assert.equal(viaH1.body.length, size);
    assert.equal(sha256(viaH1.body), expected);
    assert.equal(viaH1.headers['content-length'], String(size));
    const viaH2 = await h2(session, { ':path': `/bytes/${size}?chunked=1` });
    assert.equal(viaH2.body.length, size);
    assert.equal(sha256(viaH2.body), expected);
    assert.equal(harness.outcomes.at(-1)!.bytesOut, size);
    // With a Content-Length the HTTP/2 response is written to the stream itself, not through the
    // compat response: same bytes, same backpressure, and the length goes out.
    const sizedH2 = await h2(session, { ':path': `/bytes/${size}` });
    assert.equal(sizedH2.status, 200);
    assert.equal(sizedH2.headers['content-length'], String(size));
    assert.equal(sizedH2.headers.via, '1.1 gatehouse');
    assert.equal(sizedH2.body.length, size);
    assert.equal(sha256(sizedH2.body), expected);
    assert.equal(harness.outcomes.at(-1)!.bytesOut, size);
    // HEAD: the header only, the stream ends without DATA.
    const head = await h2(session, { ':method': 'HEAD', ':path': '/bytes/1000' });
    assert.equal(head.status, 200);
    assert.equal(head.headers['content-length'], '1000');
    assert.equal(head.body.length, 0);
    assert.equal(harness.outcomes.at(-1)!.error, undefined);
  });

  // Large reads land in read blocks that are reused once the client write that carried them is
  // done (src/upstream/read-blocks.ts). Every body here has bytes of its own (a seed), so a block
  // reused while a slow client's queue still held it would show as another body's bytes.
  test('large bodies through reused read blocks arrive intact: distinct bodies, slow and fast clients, HTTP/1.1 plain and TLS, HTTP/2 (curl reading slowly too)', async () => {
    const SIZE = MiB;
    const bodyOf = (seed: number): Buffer => {
      const body = Buffer.allocUnsafe(SIZE);
      for (let i = 0; i < SIZE; i++) body[i] = (i * 131 + seed * 71 + (i >>> 12) * seed) & 0xff;
      return body;
    };
    const seeded = http.createServer((req, res) => {
      const seed = Number(/^\/seeded\/(\d+)$/.exec(req.url ?? '')?.[1] ?? 0);
      const body = bodyOf(seed);
      res.writeHead(200, { 'content-length': String(SIZE) });
      let at = 0;
      const pump = (): void => {
        while (at < SIZE) {
          const piece = body.subarray(at, at + 65_536);
          at += piece.length;
          if (!res.write(piece)) {
            res.once('drain', pump);
            return;
          }
        }
        res.end();
      };
      pump();
    });
    seeded.listen(0, '127.0.0.1');
    await once(seeded, 'listening');
    const upstream = new Upstream(`http://127.0.0.1:${(seeded.address() as AddressInfo).port}`);
    extra.push(upstream);
    const caDir = mkdtempSync(join(tmpdir(), 'gh-proxy-ca-'));
    try {
      use(upstream);
      /** GET over HTTP/1.1 (plain or TLS); a slow client waits 20 ms after each chunk it reads. */
      const get = (base: string, seed: number, slow: boolean): Promise<Buffer> => download(`${base}/seeded/${seed}`, harness.ca, slow
        ? (_chunk, res) => {
          res.pause();
          setTimeout(() => res.resume(), 20);
        }
        : undefined);
      const downloads: { seed: number; body: Promise<Buffer> }[] = [];
      for (let seed = 1; seed <= 12; seed++) downloads.push({ seed, body: get(harness.plainUrl, seed, seed % 4 === 0) });
      for (let seed = 13; seed <= 16; seed++) downloads.push({ seed, body: get(harness.tlsUrl, seed, seed === 16) });
      for (let seed = 17; seed <= 20; seed++) {
        downloads.push({ seed, body: h2(session, { ':path': `/seeded/${seed}` }).then((answer) => answer.body) });
      }
      // HTTP/2 clients that read their socket slowly (curl --limit-rate): the proxy's session
      // writes wait on the kernel while the other downloads take and give back blocks.
      const caFile = join(caDir, 'ca.pem');
      writeFileSync(caFile, harness.ca);
      for (let seed = 21; seed <= 22; seed++) {
        downloads.push({
          seed,
          body: new Promise<Buffer>((resolve, reject) => {
            execFile('curl', ['-sS', '--http2', '--cacert', caFile, '--limit-rate', '3M', '-o', '-', `${harness.tlsUrl}/seeded/${seed}`],
              { encoding: 'buffer', maxBuffer: 4 * SIZE, timeout: 20_000 }, (error, stdout) => (error ? reject(error) : resolve(stdout)));
          }),
        });
      }
      for (const { seed, body } of downloads) {
        const got = await within(body, 20_000, `download ${seed}`);
        assert.equal(got.length, SIZE, `body ${seed} length`);
        assert.equal(sha256(got), sha256(bodyOf(seed)), `body ${seed} is its own bytes, whole and in order`);
      }

      // Plain HTTP/1.1 clients alone: the blocks come back and are taken again, so far fewer are
      // made than large reads happen (each 1 MiB body takes at least 32 reads of at most 32 KiB).
      const before = readBlockStats().made;
      for (let round = 0; round < 4; round++) {
        const bodies = await Promise.all([1, 2, 3, 4].map((seed) => get(harness.plainUrl, seed, false)));
        for (const [i, got] of bodies.entries()) assert.equal(sha256(got), sha256(bodyOf(i + 1)), `round ${round}, body ${i + 1}`);
      }
      const made = readBlockStats().made - before;
      assert.ok(made < 16, `${made} read blocks made for 16 bodies of 1 MiB (at least 512 large reads): not reused`);
      assert.ok(readBlockStats().free > 0, 'released blocks wait in the free list');

      // HTTP/2 streams give their blocks back too (from the stream write's callback).
      const beforeH2 = readBlockStats().made;
      for (let round = 0; round < 4; round++) {
        const bodies = await Promise.all([1, 2, 3, 4].map((seed) => h2(session, { ':path': `/seeded/${seed}` }).then((answer) => answer.body)));
        for (const [i, got] of bodies.entries()) assert.equal(sha256(got), sha256(bodyOf(i + 1)), `HTTP/2 round ${round}, body ${i + 1}`);
      }
      const madeH2 = readBlockStats().made - beforeH2;
      assert.ok(madeH2 < 16, `${madeH2} read blocks made for 16 bodies of 1 MiB over HTTP/2: not reused`);
    } finally {
      await new Promise<void>((r) => seeded.close(() => r()));
      rmSync(caDir, { recursive: true, force: true });
    }
  });

  test('a large body read in one turn leaves for an HTTP/1.1 client in few writes, and a streamed one as it comes', async () => {
    const SIZE = MiB;
    const body = Buffer.alloc(SIZE);
    for (let i = 0; i < SIZE; i++) body[i] = (i * 7 + (i >>> 10)) & 0xff;
    // /burst: the whole body in one write, so the proxy finds it waiting and reads it 32 KiB at a
    // time, read after read. /lockstep: 64 KiB at a time, each only once the client has every
    // byte sent so far; it stalls if the proxy holds chunks past the turn they were read in.
    let clientGot = 0;
    const progress = new EventEmitter();
    const origin = http.createServer((req, res) => {
      res.writeHead(200, { 'content-length': String(SIZE) });
      if (req.url === '/burst') {
        res.end(body);
        return;
      }
      let at = 0;
      const next = (): void => {
        if (clientGot < at) return;
        if (at === SIZE) {
          progress.off('progress', next);
          res.end();
          return;
        }
        res.write(body.subarray(at, at + 65_536));
        at += 65_536;
      };
      progress.on('progress', next);
      next();
    });
    origin.listen(0, '127.0.0.1');
    await once(origin, 'listening');
    const upstream = new Upstream(`http://127.0.0.1:${(origin.address() as AddressInfo).port}`);
    extra.push(upstream);
    try {
      use(upstream);
      const get = (path: string): Promise<Buffer> => download(`${harness.plainUrl}${path}`, harness.ca, (chunk) => {
        clientGot += chunk.length;
        progress.emit('progress');
      });

      // Count the writes of the proxy's client socket (the stream implementer's _write/_writev).
      let writes = 0;
      harness.onConnection = (socket) => {
        const plainWrite = socket._write.bind(socket);
        const plainWritev = socket._writev!.bind(socket);
        socket._write = (chunk, encoding, callback) => { writes++; plainWrite(chunk, encoding, callback); };
        socket._writev = (chunks, callback) => { writes++; plainWritev(chunks, callback); };
      };
      const burst = await within(get('/burst'), 10_000, 'the burst download').finally(() => { harness.onConnection = undefined; });
      assert.equal(sha256(burst), sha256(body), 'the burst body arrives whole and in order');
      // The proxy reads 1 MiB in at least 32 reads of at most 32 KiB, each its own callback: with
      // one write per read that is 32 writes or more (38 seen). Coalesced per turn: 8-20 seen.
      assert.ok(writes > 0 && writes < 32, `${writes} writes to the client for 1 MiB read in at least 32 reads`);

      clientGot = 0;
      const streamed = await within(get('/lockstep'), 10_000, 'the lockstep download (chunks held back?)');
      assert.equal(sha256(streamed), sha256(body), 'the streamed body arrives whole and in order');
    } finally {
      await new Promise<void>((r) => origin.close(() => r()));
    }
  });

  test('upstream trailers reach HTTP/1.1 and HTTP/2 clients', async () => {
    use(echoUpstream);
    const viaH1 = await h1(`${harness.plainUrl}/t?trailers=1`, { method: 'POST', headers: { TE: 'trailers' }, body: Buffer.from('hello') });
    assert.equal(viaH1.status, 200);
    assert.equal(viaH1.trailers['x-trailer-test'], 'yes');
    assert.equal(viaH1.trailers['x-body-sha256'], sha256(Buffer.from('hello')));
    assert.equal(report(viaH1).headers.te, 'trailers');
    const viaH2 = await h2(session, { ':method': 'POST', ':path': '/t?trailers=1', te: 'trailers' }, Buffer.from('hello'));
    assert.equal(viaH2.trailers['x-trailer-test'], 'yes');
    assert.equal(viaH2.trailers['x-body-sha256'], sha256(Buffer.from('hello')));
  });

  test('Expect: 100-continue is answered by the edge and not forwarded', async () => {
    use(echoUpstream);
    const answer = await new Promise<Answer>((resolve, reject) => {
      const req = http.request(`${harness.plainUrl}/expect`, {
        method: 'POST', agent: false, headers: { Expect: '100-continue', 'Content-Length': '5' },
      }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks), trailers: {} }));
      });
      req.on('continue', () => req.end('12345'));
      req.on('error', reject);
    });
    assert.equal(answer.status, 200);
    const r = report(answer);
    assert.equal(r.bodyLength, 5);
    assert.equal(r.headers.expect, undefined);
  });

  test('the response is streamed with backpressure, not buffered', async () => {
    use(sizedUpstream);
    const size = 400 * MiB;
    const closed = once(sized.events, 'response-closed');
    const req = http.request(`${harness.plainUrl}/bytes/${size}`, { agent: false });
    req.on('error', () => {});
    req.end();
    const res = await new Promise<http.IncomingMessage>((resolve) => req.on('response', resolve));
    res.pause(); // stop reading: socket buffers fill up, the proxy must stop reading the upstream
    await new Promise((r) => setTimeout(r, 600));
    req.destroy();
    const [{ completed, sent }] = (await within(closed, 10_000, 'the upstream response to be cut')) as [{ completed: boolean; sent: number }];
    assert.equal(completed, false);
    assert.ok(sent < 64 * MiB, `the upstream sent only what buffers hold (${sent} bytes)`);
  });

  test('a client aborting mid-download aborts the upstream request and frees its connection (HTTP/1.1 and HTTP/2)', async () => {
    use(sizedUpstream);
    const size = 200 * MiB;
    for (const protocol of ['h1', 'h2'] as const) {
      const closed = once(sized.events, 'response-closed');
      let received = 0;
      await new Promise<void>((resolve) => {
        if (protocol === 'h1') {
          const req = http.request(`${harness.plainUrl}/bytes/${size}`, { agent: false }, (res) => {
            res.on('data', (c: Buffer) => {
              received += c.length;
              if (received > MiB) {
                req.destroy();
                resolve();
              }
            });
          });
          req.on('error', () => {});
          req.end();
        } else {
          const stream = session.request({ ':path': `/bytes/${size}` });
          stream.on('error', () => {});
          stream.on('data', (c: Buffer) => {
            received += c.length;
            if (received > MiB && !stream.destroyed) {
              stream.close(http2.constants.NGHTTP2_CANCEL);
              resolve();
            }
          });
        }
      });
      const [{ completed, sent }] = (await within(closed, 10_000, `${protocol}: the upstream response to be cut`)) as [{ completed: boolean; sent: number }];
      assert.equal(completed, false, `${protocol}: the upstream response was cut`);
      assert.ok(sent < size, `sent ${sent}`);
      // The aborted exchange reports the client's leaving, and nothing is left running on the pool.
      await waitFor(() => harness.outcomes.at(-1)?.error === 'GH_CLIENT_ABORTED' && sizedUpstream.inFlight === 0);
      await waitFor(() => sizedUpstream.pool.stats.running === 0);
    }
  });

  test('upstream refusing connections gives 502 (HTTP/1.1 and HTTP/2)', async () => {
    const refused = new Upstream(`http://127.0.0.1:${await freePort()}`);
    extra.push(refused);
    use(refused);
    const viaH1 = await h1(`${harness.plainUrl}/`);
    assert.equal(viaH1.status, 502);
    assert.match(viaH1.body.toString(), /GH_UPSTREAM_REFUSED/);
    assert.ok(viaH1.headers['x-request-id'], 'the error carries the request id');
    const viaH2 = await h2(session, { ':path': '/' });
    assert.equal(viaH2.status, 502);
    assert.equal(harness.outcomes.at(-1)!.error, 'GH_UPSTREAM_REFUSED');
    assert.equal(refused.inFlight, 0);
  });

  test('an upstream that never answers gives 504 at the response_header bound', async () => {
    const silent = await startSilentUpstream();
    const upstream = new Upstream(silent.url, { timeouts: { connect: 1_000, response_header: 400, body_idle: 1_000, keepalive: 1_000 } });
    extra.push(upstream);
    try {
      use(upstream);
      const started = Date.now();
      const viaH1 = await h1(`${harness.plainUrl}/`);
      const elapsed = Date.now() - started;
      assert.equal(viaH1.status, 504);
      assert.match(viaH1.body.toString(), /GH_UPSTREAM_HEADERS_TIMEOUT/);
      assert.ok(elapsed >= 350 && elapsed < 5_000, `answered after ${elapsed} ms`);
      const viaH2 = await h2(session, { ':path': '/' });
      assert.equal(viaH2.status, 504);
    } finally {
      await silent.close();
    }
  });

  test('an upstream failing after the response header makes the client response visibly incomplete', async () => {
    const broken = await startRawUpstream((socket) => {
      socket.once('data', () => {
        socket.write('HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n');
        socket.write(Buffer.alloc(1000, 97), () => setTimeout(() => socket.destroy(), 50));
      });
    });
    const upstream = new Upstream(broken.url);
    extra.push(upstream);
    try {
      use(upstream);
      await assert.rejects(h1(`${harness.plainUrl}/`));
      await assert.rejects(h2(session, { ':path': '/' }), /reset|aborted|closed/i);
      assert.equal(harness.outcomes.at(-1)!.error, 'GH_UPSTREAM_RESET');
    } finally {
      await broken.close();
    }
  });

  test('max_body: 413 on Content-Length before contacting the upstream, and on a streamed body', async () => {
    use(echoUpstream, MiB);
    const seen = echo.requests.length;
    const declared = await h1(`${harness.plainUrl}/big`, { method: 'POST', headers: { 'content-length': String(2 * MiB) }, body: Buffer.alloc(2 * MiB) })
      .catch((error: Error) => error);
    if (!(declared instanceof Error)) {
      assert.equal(declared.status, 413);
      assert.match(declared.body.toString(), /GH_BODY_TOO_LARGE/);
    }
    const viaH2 = await h2(session, { ':method': 'POST', ':path': '/big', 'content-length': String(2 * MiB) }, Buffer.alloc(2 * MiB)).catch((e: Error) => e);
    if (!(viaH2 instanceof Error)) assert.equal(viaH2.status, 413);
    assert.equal(echo.requests.length, seen, 'the upstream was never asked');
    assert.equal(harness.outcomes.filter((o) => o.status === 413).length >= 2, true);

    // No length: counted while streaming (HTTP/1.1 chunked, HTTP/2 without content-length).
    const statusOf = async (send: () => Promise<Answer>): Promise<number> => {
      try {
        return (await send()).status;
      } catch {
        return -1; // the connection may be closed while the client still writes
      }
    };
    const before413 = harness.outcomes.filter((o) => o.error === 'GH_BODY_TOO_LARGE').length;
    const chunkedStatus = await statusOf(() => h1(`${harness.plainUrl}/big`, { method: 'POST', body: sizedBodyChunks(3 * MiB) }));
    const h2Status = await statusOf(() => h2(session, { ':method': 'POST', ':path': '/big' }, sizedBodyChunks(3 * MiB)));
    assert.ok(chunkedStatus === 413 || chunkedStatus === -1, `chunked: ${chunkedStatus}`);
    assert.equal(h2Status, 413);
    assert.equal(harness.outcomes.filter((o) => o.error === 'GH_BODY_TOO_LARGE').length, before413 + 2);
    // A body under the limit still passes.
    assert.equal(report(await h1(`${harness.plainUrl}/small`, { method: 'POST', body: sizedBodyChunks(MiB - 1) })).bodyLength, MiB - 1);
  });
});

describe('header translation', () => {
  test('Connection-listed names are removed; HTTP/2 responses get lowercase names and no connection fields', () => {
    const facts = newRequestHeadFacts();
    const out = toUpstreamRequestHeaders(
      ['Host', 'a.test', 'Connection', 'X-One, close', 'X-One', '1', 'x-two', '2', 'Upgrade', 'websocket', 'TE', 'gzip'],
      '1.1', { clientIp: '::1', protocol: 'https' }, facts,
    );
    assert.deepEqual(out.filter((_, i) => i % 2 === 0), ['x-two', 'host', 'x-forwarded-for', 'x-forwarded-proto', 'x-forwarded-host', 'via', 'x-request-id']);
    assert.equal(facts.teTrailers, false);
    assert.equal(facts.upgrade, 'websocket');
    const upgrade = toUpstreamRequestHeaders(['Host', 'a.test', 'Connection', 'Upgrade', 'Upgrade', 'websocket'], '1.1', { clientIp: '::1', protocol: 'http' }, newRequestHeadFacts(), true);
    const upgradeNames = upgrade.filter((_, i) => i % 2 === 0);
    assert.equal(upgrade[upgradeNames.indexOf('upgrade') * 2 + 1], 'websocket');
    assert.equal(upgrade[upgradeNames.indexOf('connection') * 2 + 1], 'upgrade');

    const response = toClientResponseHeaders(
      ['Content-Type', 'text/plain', 'Connection', 'x-a', 'X-A', '1', 'Transfer-Encoding', 'chunked', 'Set-Cookie', 'a=1', 'Set-Cookie', 'b=2', 'Bad Name', 'x', 'X-Ctl', 'a\u0001b', 'Content-Type', 'text/html'].map((s) => Buffer.from(s, 'latin1')),
      true, 'rid',
    ) as Record<string, string | string[]>;
    assert.deepEqual({ ...response }, { 'content-type': 'text/plain', 'set-cookie': ['a=1', 'b=2'], via: '1.1 gatehouse', 'x-request-id': 'rid' });
  });

  test('pool and net errors map to 502/504 codes', () => {
    assert.equal(classifyUpstreamError(Object.assign(new Error('x'), { code: 'ECONNREFUSED' })).status, 502);
    assert.equal(classifyUpstreamError(Object.assign(new Error('x'), { code: 'GH_UPSTREAM_CONNECT_TIMEOUT' })).status, 504);
    assert.equal(classifyUpstreamError(Object.assign(new Error('x'), { code: 'GH_UPSTREAM_HEADERS_TIMEOUT' })).status, 504);
    assert.equal(classifyUpstreamError(new AggregateError([Object.assign(new Error('x'), { code: 'ECONNREFUSED' })])).code, 'GH_UPSTREAM_REFUSED');
    assert.equal(classifyUpstreamError(new Error('?')).status, 502);
  });
});

/** Resolves like `promise`, or rejects after `ms` saying what did not happen. */
async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function waitFor(condition: () => boolean, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}
