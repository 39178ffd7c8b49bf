/**
 * Hardening, HTTP/2 and TLS connections from clients: deadlines Node does not set by default,
 * SETTINGS limits, rapid reset (CVE-2023-44487), `:authority` against `host`, with raw frames where
 * a client library would not misbehave.
 */
import assert from 'node:assert/strict';
import { connect as http2Connect, constants, type ClientHttp2Session, type IncomingHttpHeaders, type ServerHttp2Stream } from 'node:http2';
import net from 'node:net';
import { after, before, describe, it } from 'node:test';
import { HttpsListener } from '../src/listeners/https.js';
import type { StreamRequest } from '../src/proxy/http2-stream.js';
import { CertificateStore } from '../src/tls/certificates.js';
import { makeCertificate } from './helpers/certs.ts';
import { startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';
import { collectFrames, frame, FRAME, getFields, goawayOf, h2Connect, headersFrame, NGHTTP2_REFUSES_USERINFO, rstStreamFrame } from './helpers/h2frames.ts';
import { startEchoUpstream, type EchoReport } from './helpers/upstreams.ts';

type Echo = Awaited<ReturnType<typeof startEchoUpstream>>;

/** A client session, once the server's SETTINGS arrived (the client acknowledges them at once: they apply from there). */
function session(port: number, servername = 'localhost'): Promise<ClientHttp2Session> {
  return new Promise((resolve, reject) => {
    const s = http2Connect(`https://127.0.0.1:${port}`, { servername, rejectUnauthorized: false });
    s.once('remoteSettings', () => resolve(s));
    s.once('error', reject);
  });
}

interface H2Answer { status: number; headers: IncomingHttpHeaders; body: string; rstCode: number | undefined }

function h2Request(s: ClientHttp2Session, headers: Record<string, string | string[]>, body?: string): Promise<H2Answer> {
  return new Promise((resolve) => {
    const stream = s.request(headers, { endStream: body === undefined });
    let text = '';
    let got: IncomingHttpHeaders = {};
    stream.setEncoding('utf8');
    stream.on('response', (h) => { got = h; });
    stream.on('data', (chunk: string) => { text += chunk; });
    stream.on('error', () => {});
    stream.on('close', () => resolve({ status: Number(got[':status'] ?? 0), headers: got, body: text, rstCode: stream.rstCode }));
    if (body !== undefined) stream.end(body);
  });
}

function waitClosed(socket: net.Socket, ms: number): Promise<boolean> {
  if (socket.destroyed) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), ms);
    socket.once('close', () => { clearTimeout(timer); resolve(true); });
  });
}

describe('hardening: HTTP/2 and TLS connections', () => {
  let echo: Echo;
  let gh: TestGatehouse;

  before(async () => {
    echo = await startEchoUpstream();
    gh = await startGatehouse(`
clients:
  timeouts: { handshake: 500ms, headers: 600ms, idle: 1s, body_idle: 600ms }
  limits: { header_size: 8KiB, header_count: 30, target_length: 2KiB, concurrent_streams: 110 }
sites:
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

  function seen(marker: string): EchoReport[] {
    return echo.requests.filter((r) => r.url.includes(marker));
  }

  it('TLS handshake deadline: a TCP connection that never says hello is closed', async () => {
    const socket = net.connect({ host: '127.0.0.1', port: gh.httpsPort });
    socket.on('error', () => {});
    const started = Date.now();
    assert.equal(await waitClosed(socket, 5_000), true);
    assert.ok(Date.now() - started >= 400);
  });

  it('TLS handshake deadline runs from the accept: a first byte just before it buys no more time', async () => {
    const socket = net.connect({ host: '127.0.0.1', port: gh.httpsPort });
    socket.on('error', () => {});
    const started = Date.now();
    await new Promise((resolve) => setTimeout(resolve, 400));
    socket.write(Buffer.from([0x16, 0x03, 0x01])); // the start of a TLS record header, then nothing
    assert.equal(await waitClosed(socket, 5_000), true);
    const closedAfter = Date.now() - started;
    assert.ok(closedAfter >= 400, `closed after ${closedAfter} ms`);
    // A deadline restarted by that byte would close it at ~900 ms.
    assert.ok(closedAfter < 850, `closed after ${closedAfter} ms: the deadline restarted at the first byte`);
  });

  it('a connection whose handshake is done outlives the handshake deadline', async () => {
    const s = await session(gh.httpsPort);
    try {
      assert.equal((await h2Request(s, { ':path': '/after-handshake-1' })).status, 200);
      await new Promise((resolve) => setTimeout(resolve, 800)); // past the 500 ms deadline, under the 1 s idle one
      assert.equal((await h2Request(s, { ':path': '/after-handshake-2' })).status, 200);
    } finally {
      s.close();
    }
  });

  it('advertises bounded SETTINGS: maxConcurrentStreams and maxHeaderListSize', async () => {
    const s = await session(gh.httpsPort);
    try {
      assert.equal(s.remoteSettings.maxConcurrentStreams, 110);
      assert.equal(s.remoteSettings.maxHeaderListSize, 8 * 1024);
      assert.equal(s.remoteSettings.enablePush, false);
    } finally {
      s.close();
    }
  });

  it('idle session: no stream for clients.timeouts.idle → GOAWAY and close', async () => {
    const s = await session(gh.httpsPort);
    const answer = await h2Request(s, { ':path': '/idle-first' });
    assert.equal(answer.status, 200);
    const goaway = new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), 5_000);
      s.once('goaway', () => { clearTimeout(timer); resolve(true); });
      s.once('close', () => { clearTimeout(timer); resolve(true); });
    });
    assert.equal(await goaway, true);
    s.destroy();
  });

  it('stream header deadline: a HEADERS frame without END_HEADERS and no CONTINUATION ends the session', async () => {
    const socket = await h2Connect(gh.httpsPort);
    // A PING ACK inside a header block would be a protocol error of its own: leave PINGs unanswered.
    const frames = collectFrames(socket, { answerPings: false });
    // The server's SETTINGS first (the ACK, too, must not land inside the header block).
    while (!frames.some((f) => f.type === FRAME.SETTINGS)) await new Promise((resolve) => setTimeout(resolve, 10));
    socket.write(headersFrame(1, getFields('localhost', '/never-ending-headers'), { endHeaders: false }));
    const started = Date.now();
    assert.equal(await waitClosed(socket, 5_000), true);
    assert.ok(Date.now() - started < 4_000);
    const goaway = frames.find((f) => f.type === FRAME.GOAWAY);
    assert.equal(goaway === undefined ? undefined : goawayOf(goaway).code, constants.NGHTTP2_ENHANCE_YOUR_CALM, 'ended by the header deadline');
    assert.equal(seen('never-ending-headers').length, 0);
  });

  it('a connection preface that never comes ends the session', async () => {
    const socket = await h2Connect(gh.httpsPort, { preface: false });
    socket.on('error', () => {});
    socket.resume(); // read, or the close is never seen
    assert.equal(await waitClosed(socket, 5_000), true);
  });

  it('a request body that stops arriving: 408, the upstream never gets a complete request', async () => {
    const s = await session(gh.httpsPort);
    try {
      const answer = await new Promise<H2Answer>((resolve) => {
        const stream = s.request({ ':path': '/h2-slow-body', ':method': 'POST', 'content-length': '100' });
        let got: IncomingHttpHeaders = {};
        stream.on('response', (h) => { got = h; });
        stream.on('error', () => {});
        stream.resume();
        stream.write('only part');
        stream.on('close', () => resolve({ status: Number(got[':status'] ?? 0), headers: got, body: '', rstCode: stream.rstCode }));
      });
      assert.equal(answer.status, 408);
      assert.equal(seen('h2-slow-body').length, 0);
    } finally {
      s.destroy();
    }
  });

  it('header list over header_size, and more fields than header_count, are refused and never forwarded', async () => {
    const s = await session(gh.httpsPort);
    try {
      const big = await h2Request(s, { ':path': '/h2-big-headers', 'x-big': 'a'.repeat(10_000) });
      assert.notEqual(big.status, 200);
      const fields: Record<string, string> = { ':path': '/h2-many-headers' };
      for (let i = 0; i < 40; i++) fields[`x-f${i}`] = 'v';
      const many = await h2Request(s, fields);
      assert.notEqual(many.status, 200);
      const long = await h2Request(s, { ':path': `/h2-long-${'a'.repeat(3_000)}` });
      assert.equal(long.status, 414);
    } finally {
      s.destroy();
    }
    assert.equal(seen('h2-big-headers').length + seen('h2-many-headers').length + seen('h2-long').length, 0);
  });

  it('rapid reset: streams reset right after HEADERS open no upstream request; a flood gets GOAWAY', async () => {
    const socket = await h2Connect(gh.httpsPort);
    const frames = collectFrames(socket);
    const before = echo.requests.length;
    // A few pairs first: each reset stream must not reach the upstream.
    const burst: Buffer[] = [];
    let id = 1;
    for (let i = 0; i < 50; i++, id += 2) burst.push(headersFrame(id, getFields('localhost', `/rapid-${i}`), { endStream: true }), rstStreamFrame(id));
    socket.write(Buffer.concat(burst));
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(echo.requests.length, before, 'a reset stream reached the upstream');
    // Then a flood.
    const flood: Buffer[] = [];
    for (let i = 0; i < 3_000; i++, id += 2) flood.push(headersFrame(id, getFields('localhost', `/flood-${i}`), { endStream: true }), rstStreamFrame(id));
    socket.write(Buffer.concat(flood));
    const deadline = Date.now() + 5_000;
    while (!frames.some((f) => f.type === FRAME.GOAWAY) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    const goaway = frames.find((f) => f.type === FRAME.GOAWAY);
    assert.ok(goaway, 'no GOAWAY after 3000 reset streams');
    assert.notEqual(goawayOf(goaway).code, 0, 'the GOAWAY names an error');
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(echo.requests.length, before, 'reset streams reached the upstream');
    socket.destroy();
    // The server still serves others.
    const s = await session(gh.httpsPort);
    assert.equal((await h2Request(s, { ':path': '/after-flood' })).status, 200);
    s.close();
  });

  it('streams the client resets with an error code, waiting or mid-answer, leave the server serving every kind of request', async () => {
    const s = await session(gh.httpsPort);
    try {
      // Reset while the upstream is still answering (a GET: served from its stream), and right
      // after the response HEADERS arrived; INTERNAL_ERROR and PROTOCOL_ERROR, not a plain CANCEL.
      for (const code of [constants.NGHTTP2_INTERNAL_ERROR, constants.NGHTTP2_PROTOCOL_ERROR]) {
        const waiting = s.request({ ':path': `/reset-waiting-${code}?delay=300` });
        waiting.on('error', () => {});
        setTimeout(() => waiting.close(code), 50);
        const answered = s.request({ ':path': `/reset-answered-${code}` });
        answered.on('error', () => {});
        answered.once('response', () => answered.close(code));
        // (events.once would reject on the 'error' these streams emit for their own reset.)
        await Promise.all([waiting, answered].map((stream) => new Promise((resolve) => stream.once('close', resolve))));
      }
      await new Promise((r) => setTimeout(r, 400));
      // Still serving, on the same session: without a body, HEAD, with a body, and with trailers.
      const get = await h2Request(s, { ':path': '/after-reset' });
      assert.equal(get.status, 200);
      assert.equal(JSON.parse(get.body).url, '/after-reset');
      const head = await h2Request(s, { ':method': 'HEAD', ':path': '/after-reset-head' });
      assert.equal(head.status, 200);
      assert.equal(head.body, '');
      assert.equal(head.rstCode, constants.NGHTTP2_NO_ERROR);
      const post = await h2Request(s, { ':method': 'POST', ':path': '/after-reset-post' }, 'a body');
      assert.equal(post.status, 200);
      assert.equal(JSON.parse(post.body).bodyLength, 6);
      const created = await h2Request(s, { ':path': '/after-reset-status?status=201&header=x-answer:yes' });
      assert.equal(created.status, 201);
      assert.equal(created.headers['x-answer'], 'yes');
    } finally {
      s.close();
    }
  });

  it(':authority wins over a conflicting host, and Host is regenerated from it', async () => {
    const s = await session(gh.httpsPort, 'other.localhost');
    try {
      const answer = await h2Request(s, { ':path': '/authority-wins', ':authority': 'other.localhost', host: 'evil.test' });
      assert.equal(answer.status, 200, answer.body);
      const [report] = seen('authority-wins');
      assert.equal(report?.headers.host, 'other.localhost');
      assert.equal(report?.rawHeaders.filter((h) => h.toLowerCase() === 'host').length, 1);
      assert.equal(report?.headers['x-forwarded-host'], 'other.localhost');
    } finally {
      s.close();
    }
  });

  it('userinfo in :authority → 400 (nghttp2 >= 1.64: stream reset), never forwarded', async () => {
    const s = await session(gh.httpsPort);
    try {
      const answer = await h2Request(s, { ':path': '/userinfo-authority', ':authority': 'user:pw@localhost' });
      if (NGHTTP2_REFUSES_USERINFO) {
        // Node's nghttp2 resets the stream as malformed before Gatehouse sees the request.
        assert.equal(answer.status, 0, 'no response before the reset');
        assert.equal(answer.rstCode, constants.NGHTTP2_PROTOCOL_ERROR);
      } else {
        assert.equal(answer.status, 400, answer.body);
      }
    } finally {
      s.close();
    }
    assert.equal(seen('userinfo-authority').length, 0);
  });

  it('header values HTTP/2 forbids (CR, LF, NUL, leading space) never reach the upstream', async () => {
    for (const [i, value] of ['a\r\nx-injected: 1', 'a\nb', 'a\0b', ' padded'].entries()) {
      const socket = await h2Connect(gh.httpsPort);
      const frames = collectFrames(socket);
      socket.write(headersFrame(1, getFields('localhost', `/bad-value-${i}`, [['x-bad', value]]), { endStream: true }));
      const deadline = Date.now() + 2_000;
      while (!frames.some((f) => f.streamId === 1 && (f.type === FRAME.HEADERS || f.type === FRAME.RST_STREAM)) && !socket.destroyed && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 20));
      }
      socket.destroy();
    }
    await new Promise((r) => setTimeout(r, 100));
    // nghttp2 drops such a field and keeps the request (RFC 9113 §8.2.1 allows either); the
    // guard refuses what would be left. Either way the value never reaches the upstream.
    for (const report of echo.requests) {
      for (const [name, value] of Object.entries(report.headers)) {
        assert.ok(!/[\r\n\0]/.test(String(value)), `${name} carried a forbidden character`);
      }
      assert.equal(report.headers['x-injected'], undefined);
      assert.equal(report.headers['x-bad'], undefined);
    }
  });

  it('sessions the server ended left nothing behind', async () => {
    // Every earlier session is closed: a new one still works, and the GOAWAY code constant is sane.
    const s = await session(gh.httpsPort);
    assert.equal((await h2Request(s, { ':path': '/still-serving' })).status, 200);
    s.close();
    assert.equal(constants.NGHTTP2_ENHANCE_YOUR_CALM, 11);
  });
});

describe('hardening: HTTP/2 sessions without streams are not pinged while they stay quiet', () => {
  let echo: Echo;
  let gh: TestGatehouse;
  const PING_ACK = 0x1;
  const pingsOf = (frames: readonly { type: number; flags: number }[]) => frames.filter((f) => f.type === FRAME.PING && (f.flags & PING_ACK) === 0).length;
  const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

  before(async () => {
    echo = await startEchoUpstream();
    // Header deadline 400 ms: a session without streams is due a PING every 200 ms; idle close far away.
    gh = await startGatehouse(`
clients:
  timeouts: { headers: 400ms, idle: 30s }
sites:
  - hosts: [localhost]
    tls: internal
    routes:
      - upstreams: [${echo.url}]
`);
  });

  after(async () => {
    await gh?.stop();
    await echo?.close();
  });

  it('a session whose PING was answered by the ACK alone gets no further PING while it sends nothing', async () => {
    const socket = await h2Connect(gh.httpsPort);
    const frames = collectFrames(socket); // answers each PING at once, in a write of its own
    // The first PING goes out at the watch's next check, 0-100 ms after the session starts. When
    // that is before the client's SETTINGS ACK was read, the ACK of the PING does not arrive alone
    // (the SETTINGS ACK counts with it) and the server pings once more: one or two PINGs, then quiet.
    await sleep(500);
    const settled = pingsOf(frames);
    assert.ok(settled === 1 || settled === 2, `${settled} PINGs while the session started`);
    await sleep(2_000); // ten PING periods
    assert.equal(socket.destroyed, false, 'the session is still open');
    assert.equal(pingsOf(frames), settled, 'a PING answered by its ACK alone proved the peer outside a header block; none after it');
    socket.destroy();
  });

  it('bytes after a quiet period bring the PING back: a header block then left open ends the session on time', async () => {
    const socket = await h2Connect(gh.httpsPort);
    const frames = collectFrames(socket, { answerPings: false });
    // Answer the PINGs by hand until none came for 1 s (five PING periods). Usually one PING; two
    // when the client's SETTINGS ACK was read after the first, which then did not count as answered
    // alone (see the test before).
    let answered = 0;
    let quietSince = Date.now();
    while (Date.now() - quietSince < 1_000) {
      const pings = frames.filter((f) => f.type === FRAME.PING && (f.flags & PING_ACK) === 0);
      if (pings.length > answered) {
        socket.write(frame(FRAME.PING, PING_ACK, 0, pings[answered]!.payload));
        answered++;
        quietSince = Date.now();
      }
      await sleep(20);
    }
    assert.ok(answered === 1 || answered === 2, `${answered} PINGs before the session went quiet`);
    assert.equal(pingsOf(frames), answered);
    socket.write(headersFrame(1, getFields('localhost', '/quiet-then-open-header-block'), { endHeaders: false }));
    const started = Date.now();
    assert.equal(await waitClosed(socket, 5_000), true);
    const elapsed = Date.now() - started;
    // Due: a PING within one check of the bytes (≤ 100 ms + 200 ms), unanswered for 400 ms.
    assert.ok(elapsed < 1_500, `closed after ${elapsed} ms`);
    assert.equal(pingsOf(frames), answered + 1, 'the new bytes brought a PING');
    const goaway = frames.find((f) => f.type === FRAME.GOAWAY);
    assert.ok(goaway !== undefined, 'GOAWAY sent');
    assert.equal(goawayOf(goaway).code, constants.NGHTTP2_ENHANCE_YOUR_CALM, 'ended by the header deadline, not the idle one');
    assert.equal(echo.requests.filter((r) => r.url.includes('quiet-then-open-header-block')).length, 0);
  });

  it('an answer that arrives with other bytes does not count as quiet: the PINGs go on', async () => {
    const socket = await h2Connect(gh.httpsPort);
    const frames = collectFrames(socket, { answerPings: false });
    let answered = 0;
    socket.on('data', () => {
      for (const f of frames.slice(answered)) {
        answered++;
        // The ACK and a WINDOW_UPDATE in one write: the parser reads more than the ACK.
        if (f.type === FRAME.PING && (f.flags & PING_ACK) === 0) {
          const increment = Buffer.alloc(4);
          increment.writeUInt32BE(1);
          socket.write(Buffer.concat([frame(FRAME.PING, PING_ACK, 0, f.payload), frame(FRAME.WINDOW_UPDATE, 0, 0, increment)]));
        }
      }
    });
    await sleep(1_500);
    assert.equal(socket.destroyed, false);
    assert.ok(pingsOf(frames) >= 3, `${pingsOf(frames)} PINGs in 1.5 s`);
    socket.destroy();
  });
});

describe('HttpsListener: an HTTP/2 request without a body', () => {
  it('reaches the handler with its stream already ended, and the stream is destroyed once answered', async () => {
    const site = makeCertificate({ names: ['localhost'] });
    const store = new CertificateStore();
    store.put(site.certificate);
    const seen: { path: string; endedAtDispatch: boolean; stream: ServerHttp2Stream }[] = [];
    const listener = new HttpsListener({
      address: { host: '127.0.0.1', port: 0 },
      store,
      onRequest: (req, res) => {
        const stream = (req as StreamRequest).stream;
        seen.push({ path: req.url ?? '', endedAtDispatch: stream.readableEnded, stream });
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.end('ok');
      },
      onUpgrade: (_req, socket) => socket.destroy(),
    });
    const { port } = await listener.listen();
    const s = await session(port);
    try {
      for (const path of ['/a', '/b', '/c']) {
        const answer = await h2Request(s, { ':path': path });
        assert.equal(answer.status, 200);
        assert.equal(answer.body, 'ok');
      }
      assert.deepEqual(seen.map((r) => r.path), ['/a', '/b', '/c']);
      // Node ended the readable side with the HEADERS; the listener read it, so 'end' was emitted
      // before dispatch and Node destroys each stream as it closes instead of resuming it first.
      for (const r of seen) assert.equal(r.endedAtDispatch, true, `${r.path}: its stream was not read to its end before dispatch`);
      await new Promise((resolve) => setImmediate(resolve));
      for (const r of seen) assert.equal(r.stream.destroyed, true, `${r.path}: its stream is not destroyed`);
    } finally {
      s.close();
      await listener.close(0);
    }
  });
});
