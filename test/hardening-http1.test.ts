/**
 * Hardening, HTTP/1.x from clients: the exact bytes of framing attacks, limits and slow clients,
 * on the plain listener and on the TLS listener (ALPN http/1.1), against a recording upstream that
 * must never see a rejected request.
 */
import assert from 'node:assert/strict';
import diagnostics from 'node:diagnostics_channel';
import type { IncomingMessage } from 'node:http';
import { after, before, describe, it } from 'node:test';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { request } from 'undici';
import { startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';
import { exchangeOn, rawConnect, rawExchange } from './helpers/raw-http.ts';
import { startEchoUpstream, type EchoReport } from './helpers/upstreams.ts';

// The idle keep-alive test needs to see what the garbage collector keeps.
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

type Echo = Awaited<ReturnType<typeof startEchoUpstream>>;

describe('hardening: HTTP/1 requests', () => {
  let echo: Echo;
  let gh: TestGatehouse;

  before(async () => {
    echo = await startEchoUpstream();
    gh = await startGatehouse(`
clients:
  timeouts: { headers: 600ms, body_idle: 600ms, keepalive: 600ms, handshake: 1s }
  limits: { header_size: 8KiB, header_count: 30, target_length: 2KiB }
sites:
  - hosts: [plain.test]
    tls: off
    routes:
      - path: /small/
        upstreams: [${echo.url}]
        max_body: 100
        retries: { count: 0 }
      - upstreams: [${echo.url}]
        retries: { count: 0 }
  - hosts: [localhost, other.localhost]
    tls: internal
    routes:
      - upstreams: [${echo.url}]
        retries: { count: 0 }
`);
  });

  after(async () => {
    await gh?.stop();
    await echo?.close();
  });

  /** Sends `bytes` on both listeners (plain and TLS, with the right Host) and returns both answers. */
  async function both(bytes: (host: string) => string, options: { waitMs?: number } = {}) {
    const plain = await rawExchange(gh.httpPort, bytes('plain.test'), options);
    const secure = await rawExchange(gh.httpsPort, bytes('localhost'), { ...options, tls: true });
    return [plain, secure];
  }

  function seen(marker: string): EchoReport[] {
    return echo.requests.filter((r) => r.url.includes(marker) || JSON.stringify(r.headers).includes(marker));
  }

  it('forwards a well-formed request (the baseline for the cases below)', async () => {
    for (const answer of await both((h) => `GET /ok-baseline HTTP/1.1\r\nHost: ${h}\r\nConnection: close\r\n\r\n`)) {
      assert.equal(answer.status, 200, answer.text);
    }
    assert.equal(seen('ok-baseline').length, 2);
  });

  const framing: [string, (h: string) => string, number][] = [
    ['Transfer-Encoding: gzip, chunked', (h) => `POST /te-gzip HTTP/1.1\r\nHost: ${h}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n`, 501],
    ['Transfer-Encoding split over two lines', (h) => `POST /te-split HTTP/1.1\r\nHost: ${h}\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n`, 501],
    ['Transfer-Encoding: chunked, gzip (chunked not last)', (h) => `POST /te-last HTTP/1.1\r\nHost: ${h}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n`, 400],
    ['Transfer-Encoding with Content-Length', (h) => `POST /te-cl HTTP/1.1\r\nHost: ${h}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n`, 400],
    ['Transfer-Encoding on HTTP/1.0', (h) => `POST /te-10 HTTP/1.0\r\nHost: ${h}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n`, 400],
    ['two Content-Length fields', (h) => `POST /cl-dup HTTP/1.1\r\nHost: ${h}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab`, 400],
    ['Content-Length: 1, 1', (h) => `POST /cl-list HTTP/1.1\r\nHost: ${h}\r\nContent-Length: 1, 1\r\n\r\na`, 400],
    ['duplicate Host', (h) => `GET /dup-host HTTP/1.1\r\nHost: ${h}\r\nHost: evil.test\r\n\r\n`, 400],
    ['no Host in HTTP/1.1', () => 'GET /no-host HTTP/1.1\r\n\r\n', 400],
    ['HTTP/1.2', (h) => `GET /v12 HTTP/1.2\r\nHost: ${h}\r\n\r\n`, 505],
    ['HTTP/2.0 on an HTTP/1 connection', (h) => `GET /v20 HTTP/2.0\r\nHost: ${h}\r\n\r\n`, 505],
    ['HTTP/0.9', (h) => `GET /v09 HTTP/0.9\r\nHost: ${h}\r\n\r\n`, 505],
    ['HTTP/3.0', (h) => `GET /v30 HTTP/3.0\r\nHost: ${h}\r\n\r\n`, 505],
    ['Expect: something-else', (h) => `POST /expect HTTP/1.1\r\nHost: ${h}\r\nExpect: something-else\r\nContent-Length: 2\r\n\r\nab`, 417],
    ['a target that is neither a path nor an absolute URL', (h) => `GET bad-target HTTP/1.1\r\nHost: ${h}\r\n\r\n`, 400],
    ['userinfo in an absolute-form target', (h) => `GET http://user:pw@${h}/userinfo-abs HTTP/1.1\r\nHost: ${h}\r\n\r\n`, 400],
    ['a space in a header name', (h) => `GET /ws-name HTTP/1.1\r\nHost : ${h}\r\n\r\n`, 400],
    ['obs-fold', (h) => `GET /obs-fold HTTP/1.1\r\nHost: ${h}\r\nX-A: a\r\n b\r\n\r\n`, 400],
    ['bare LF line endings', (h) => `GET /bare-lf HTTP/1.1\nHost: ${h}\n\n`, 400],
    ['a NUL in a header value', (h) => `GET /nul HTTP/1.1\r\nHost: ${h}\r\nX-A: a\0b\r\n\r\n`, 400],
  ];
  for (const [name, bytes, status] of framing) {
    it(`${name} → ${status}, connection closed, upstream never sees it`, async () => {
      const before = echo.requests.length;
      for (const answer of await both(bytes)) {
        assert.equal(answer.status, status, `${name}: ${answer.text}`);
        assert.equal(answer.closed, true, `${name}: the connection must close`);
        assert.equal(answer.statuses.length, 1, `${name}: one answer only: ${answer.text}`);
      }
      assert.equal(echo.requests.length, before, `${name} reached the upstream`);
    });
  }

  it('a request smuggled behind Transfer-Encoding: gzip, chunked never reaches the upstream', async () => {
    const smuggled = 'GET /smuggled-te HTTP/1.1\r\nHost: plain.test\r\n\r\n';
    const body = `${smuggled.length.toString(16)}\r\n${smuggled}\r\n0\r\n\r\n`;
    const answer = await rawExchange(gh.httpPort, `POST /front HTTP/1.1\r\nHost: plain.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n${body}${smuggled}`);
    assert.equal(answer.status, 501);
    assert.equal(answer.statuses.length, 1);
    assert.equal(seen('smuggled-te').length, 0);
    assert.equal(seen('/front').length, 0);
  });

  it('forwards Content-Length in canonical form', async () => {
    for (const answer of await both((h) => `POST /cl-canonical HTTP/1.1\r\nHost: ${h}\r\nContent-Length: 005\r\nConnection: close\r\n\r\nhello`)) {
      assert.equal(answer.status, 200, answer.text);
    }
    const got = seen('cl-canonical');
    assert.equal(got.length, 2);
    for (const report of got) {
      assert.equal(report.headers['content-length'], '5');
      assert.equal(report.bodyLength, 5);
    }
  });

  it('routes an absolute-form target by its authority and sends its path (RFC 9112 §3.2.2)', async () => {
    const answer = await rawExchange(gh.httpsPort, 'GET https://other.localhost/abs-form?q=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n', { tls: true, servername: 'other.localhost' });
    assert.equal(answer.status, 200, answer.text);
    const [report] = seen('abs-form');
    assert.ok(report);
    assert.equal(report.url, '/abs-form?q=1');
    assert.equal(report.headers.host, 'other.localhost');
    assert.equal(report.rawHeaders.filter((h) => h.toLowerCase() === 'host').length, 1);
    // On the plain listener an absolute-form target for a host with no site is a 404, whatever Host says.
    const plain = await rawExchange(gh.httpPort, 'GET http://nowhere.test/abs-404 HTTP/1.1\r\nHost: plain.test\r\n\r\n');
    assert.equal(plain.status, 404);
    assert.equal(seen('abs-404').length, 0);
  });

  it('keep-alive: requests with and without a body, pipelined on one connection, each answered in order; only those with one are read', async () => {
    // What node:http's server hands over, seen through its own diagnostics channel. The channel
    // also reports the echo upstream's requests (a node:http server too): each path reaches
    // Gatehouse first.
    const received = new Map<string, IncomingMessage>();
    const onStart = (message: unknown): void => {
      const req = (message as { request: IncomingMessage }).request;
      const marker = /\/keep-(\w+)/.exec(req.url ?? '')?.[1];
      if (marker !== undefined && !received.has(marker)) received.set(marker, req);
    };
    diagnostics.subscribe('http.server.request.start', onStart);
    try {
      for (const [port, host, tls] of [[gh.httpPort, 'plain.test', false], [gh.httpsPort, 'localhost', true]] as const) {
        received.clear();
        const before = echo.requests.length;
        const answer = await rawExchange(port, [
          `GET /keep-a HTTP/1.1\r\nHost: ${host}\r\n\r\n`,
          `POST /keep-b HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 5\r\n\r\nhello`,
          `GET /keep-c HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 0\r\n\r\n`,
          `POST /keep-d HTTP/1.1\r\nHost: ${host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nworld\r\n0\r\n\r\n`,
          `GET /keep-e?trailers=1 HTTP/1.1\r\nHost: ${host}\r\n\r\n`,
          `HEAD /keep-f HTTP/1.1\r\nHost: ${host}\r\n\r\n`,
          `GET /keep-g HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`,
        ].join(''), { tls });
        assert.deepEqual(answer.statuses, [200, 200, 200, 200, 200, 200, 200], answer.text);
        assert.equal(answer.closed, true);
        const seenNow = echo.requests.slice(before);
        assert.deepEqual(seenNow.map((r) => `${r.method} ${r.url.split('?')[0]} ${r.bodyLength}`), [
          'GET /keep-a 0', 'POST /keep-b 5', 'GET /keep-c 0', 'POST /keep-d 5', 'GET /keep-e 0', 'HEAD /keep-f 0', 'GET /keep-g 0',
        ]);
        // Each JSON answer names its own request: none was cut short or answered twice.
        const urls = [...answer.text.matchAll(/"url":"\/keep-(\w)/g)].map((m) => m[1]);
        assert.deepEqual(urls, ['a', 'b', 'c', 'd', 'e', 'g'], answer.text);
        await new Promise((resolve) => setImmediate(resolve));
        assert.deepEqual([...received.keys()].sort(), ['a', 'b', 'c', 'd', 'e', 'f', 'g']);
        for (const marker of ['b', 'd']) assert.equal(received.get(marker)!.readableEnded, true, `${marker}: its body was read to the end`);
        // A request without a body is never switched to flowing mode: node:http's dump of an
        // unread request (resume, end, destroy: six process.nextTicks) was skipped for it.
        for (const marker of ['a', 'c', 'e', 'f', 'g']) assert.equal(received.get(marker)!.readableFlowing, null, `${marker}: resumed`);
      }
    } finally {
      diagnostics.unsubscribe('http.server.request.start', onStart);
    }
  });

  it('keep-alive: a connection waiting for its next request holds none it has answered, with or without a body', async () => {
    // node:http's parser keeps its last request (`parser.incoming`) until the next one, unless
    // that request was read to its end; one without a body is never read (its dump is skipped).
    const seenNow = new Map<string, WeakRef<IncomingMessage>>();
    const onStart = (message: unknown): void => {
      const req = (message as { request: IncomingMessage }).request;
      const marker = /\/held-(\w+)/.exec(req.url ?? '')?.[1];
      if (marker !== undefined && !seenNow.has(marker)) seenNow.set(marker, new WeakRef(req));
    };
    diagnostics.subscribe('http.server.request.start', onStart);
    try {
      for (const [port, host, tls] of [[gh.httpPort, 'plain.test', false], [gh.httpsPort, 'localhost', true]] as const) {
        for (const [marker, bytes] of [
          ['get', `GET /held-get HTTP/1.1\r\nHost: ${host}\r\n\r\n`],
          ['post', `POST /held-post HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 5\r\n\r\nhello`],
        ] as const) {
          seenNow.clear();
          const socket = await rawConnect(port, { tls });
          try {
            let text = '';
            await new Promise<void>((resolve, reject) => {
              socket.on('data', (chunk: Buffer) => {
                text += chunk.toString('latin1');
                const head = text.indexOf('\r\n\r\n');
                const length = Number(/\r\ncontent-length: (\d+)/i.exec(text)?.[1] ?? NaN);
                if (head >= 0 && text.length - head - 4 >= length) resolve();
              });
              socket.once('close', () => reject(new Error(`closed before the answer: ${text}`)));
              socket.write(bytes);
            });
            assert.match(text, /^HTTP\/1\.1 200 /);
            assert.doesNotMatch(text, /\r\nconnection: close/i);
            for (let i = 0; i < 3; i++) await new Promise((resolve) => setImmediate(resolve));
            gc();
            assert.equal(socket.destroyed, false);
            assert.ok(seenNow.has(marker), `${marker}: request seen`);
            assert.ok(seenNow.get(marker)!.deref() === undefined, `${tls ? 'TLS' : 'plain'} ${marker}: the answered request is still held`);
          } finally {
            socket.destroy();
          }
        }
      }
    } finally {
      diagnostics.unsubscribe('http.server.request.start', onStart);
    }
  });

  it('answers 100-continue itself and forwards the body', async () => {
    const socket = await rawConnect(gh.httpPort);
    const answer = await exchangeOn(socket, ['POST /continue HTTP/1.1\r\nHost: plain.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n', 'hello']);
    assert.deepEqual(answer.statuses, [100, 200], answer.text);
    assert.equal(seen('/continue')[0]?.bodyLength, 5);
  });

  describe('limits', () => {
    it('a header section over header_size → 431', async () => {
      for (const answer of await both((h) => `GET /big-headers HTTP/1.1\r\nHost: ${h}\r\nX-Big: ${'a'.repeat(10_000)}\r\n\r\n`)) {
        assert.equal(answer.status, 431, answer.text);
        assert.equal(answer.closed, true);
      }
      assert.equal(seen('big-headers').length, 0);
    });

    it('a request target over target_length → 414 (also when the line alone overflows the header section)', async () => {
      for (const length of [3_000, 12_000]) {
        for (const answer of await both((h) => `GET /long-target-${'a'.repeat(length)} HTTP/1.1\r\nHost: ${h}\r\n\r\n`)) {
          assert.equal(answer.status, 414, `${length}: ${answer.text.slice(0, 100)}`);
          assert.equal(answer.closed, true);
        }
      }
      assert.equal(seen('long-target').length, 0);
    });

    it('more header fields than header_count → 431; exactly header_count passes', async () => {
      const fields = (n: number) => Array.from({ length: n }, (_, i) => `X-F${i}: v\r\n`).join('');
      for (const answer of await both((h) => `GET /many-headers HTTP/1.1\r\nHost: ${h}\r\n${fields(40)}\r\n`)) {
        assert.equal(answer.status, 431, answer.text);
        assert.equal(answer.closed, true);
      }
      assert.equal(seen('many-headers').length, 0);
      for (const answer of await both((h) => `GET /enough-headers HTTP/1.1\r\nHost: ${h}\r\nConnection: close\r\n${fields(28)}\r\n`)) {
        assert.equal(answer.status, 200, answer.text);
      }
    });

    it('max_body: 413 on Content-Length before the upstream is contacted, and while a chunked body streams', async () => {
      const before = echo.requests.length;
      const byLength = await rawExchange(gh.httpPort, `POST /small/cl HTTP/1.1\r\nHost: plain.test\r\nContent-Length: 101\r\n\r\n${'a'.repeat(101)}`);
      assert.equal(byLength.status, 413);
      assert.equal(byLength.closed, true);
      const chunk = 'a'.repeat(60);
      const chunked = await rawExchange(gh.httpPort, [
        'POST /small/chunked HTTP/1.1\r\nHost: plain.test\r\nTransfer-Encoding: chunked\r\n\r\n',
        `3c\r\n${chunk}\r\n`, `3c\r\n${chunk}\r\n`, `3c\r\n${chunk}\r\n0\r\n\r\n`,
      ]);
      assert.equal(chunked.status, 413, chunked.text);
      assert.equal(chunked.closed, true);
      assert.equal(echo.requests.length, before);
      const fits = await request(`http://127.0.0.1:${gh.httpPort}/small/fits`, { method: 'POST', body: 'a'.repeat(100), headers: { host: 'plain.test' } });
      assert.equal(fits.statusCode, 200);
      await fits.body.dump();
    });
  });

  describe('slow clients', () => {
    it('header deadline: a request head that never ends gets 408 and the connection closes', async () => {
      for (const tls of [false, true]) {
        const answer = await rawExchange(tls ? gh.httpsPort : gh.httpPort, 'GET /slow-head HTTP/1.1\r\nHost: plain.test\r\nX-Slow: ', { tls, waitMs: 5_000 });
        assert.equal(answer.closed, true, `tls=${tls}`);
        assert.equal(answer.status, 408, `tls=${tls}: ${answer.text}`);
      }
      assert.equal(seen('slow-head').length, 0);
    });

    it('header deadline: a connection that sends nothing is closed', async () => {
      const answer = await rawExchange(gh.httpPort, Buffer.alloc(0), { waitMs: 5_000 });
      assert.equal(answer.closed, true);
    });

    it('a request body that stops arriving: 408 and the connection closes; the upstream request is abandoned', async () => {
      for (const tls of [false, true]) {
        const answer = await rawExchange(tls ? gh.httpsPort : gh.httpPort, `POST /slow-body HTTP/1.1\r\nHost: ${tls ? 'localhost' : 'plain.test'}\r\nContent-Length: 100\r\n\r\nonly-part`, { tls, waitMs: 5_000 });
        assert.equal(answer.closed, true, `tls=${tls}`);
        assert.equal(answer.status, 408, `tls=${tls}: ${answer.text}`);
      }
      assert.equal(seen('slow-body').length, 0, 'the echo upstream records complete requests only');
    });

    it('keep-alive: an idle connection is closed 1 s after clients.timeouts.keepalive, which answers advertise in whole seconds', async () => {
      for (const tls of [false, true]) {
        const answer = await rawExchange(tls ? gh.httpsPort : gh.httpPort, `GET /keepalive HTTP/1.1\r\nHost: ${tls ? 'localhost' : 'plain.test'}\r\n\r\n`, { tls, waitMs: 6_000 });
        assert.equal(answer.status, 200, answer.text);
        assert.equal(answer.closed, true, `tls=${tls}: the idle connection stayed open`);
        // 600 ms, rounded down to whole seconds (README, clients.timeouts.keepalive).
        assert.match(answer.text, /\r\nKeep-Alive: timeout=0\r\n/i, `tls=${tls}`);
        // Closed keepalive + 1 s after the answer (the request and answer take a few ms of the
        // elapsed time): never before the keepalive itself, nor long after the margin.
        assert.ok(answer.elapsedMs >= 1_550, `tls=${tls}: closed after ${answer.elapsedMs} ms, before keepalive + 1 s`);
        assert.ok(answer.elapsedMs < 4_000, `tls=${tls}: closed after ${answer.elapsedMs} ms`);
      }
    });

    it('slowloris: 1000 connections dribbling headers do not stop a normal client', async () => {
      const { connect } = await import('node:net');
      const sockets: import('node:net').Socket[] = [];
      let closedByServer = 0;
      try {
        await Promise.all(Array.from({ length: 1000 }, () => new Promise<void>((resolve) => {
          const socket = connect({ host: '127.0.0.1', port: gh.httpPort }, () => {
            socket.write('GET /loris HTTP/1.1\r\nHost: plain.test\r\n');
            resolve();
          });
          socket.on('error', () => resolve());
          socket.on('close', () => { closedByServer++; });
          sockets.push(socket);
        })));
        const drip = setInterval(() => { for (const s of sockets) if (!s.destroyed) s.write('X-a: b\r\n'); }, 200);
        try {
          for (let i = 0; i < 5; i++) {
            const res = await request(`http://127.0.0.1:${gh.httpPort}/normal-${i}`, { headers: { host: 'plain.test' } });
            assert.equal(res.statusCode, 200);
            await res.body.dump();
          }
          // The header deadline ends every slow connection, dripping or not.
          const deadline = Date.now() + 8_000;
          while (closedByServer < 1000 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
          assert.equal(closedByServer, 1000);
        } finally {
          clearInterval(drip);
        }
      } finally {
        for (const s of sockets) s.destroy();
      }
      assert.equal(seen('/loris').length, 0);
    });
  });
});
