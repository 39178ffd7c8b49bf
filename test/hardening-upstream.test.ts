/**
 * Hardening, upstreams that misbehave: a raw-socket upstream writes exactly the bytes of each case;
 * the client (HTTP/1.1 over TLS and HTTP/2) gets a defined result — the right answer, 502/504
 * before the response header, an aborted response after it — the access log says what happened,
 * and no upstream socket is left open. Also the Upgrade cases (smuggling, h2c, method, version).
 */
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { connect as http2Connect, type ClientHttp2Session, type IncomingHttpHeaders } from 'node:http2';
import type { Socket } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { spawnGatehouse, startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';
import { rawExchange } from './helpers/raw-http.ts';
import { startRawUpstream, type RunningUpstream } from './helpers/upstreams.ts';

/** What the raw upstream writes for each path, on a connection that serves that one request. */
const CASES: Record<string, (socket: Socket) => void> = {
  '/204-with-length': (s) => s.end('HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello'),
  '/304-with-length': (s) => s.end('HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nETag: "x"\r\n\r\n'),
  '/unsolicited-100': (s) => s.end('HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok'),
  '/early-hints': (s) => s.end('HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok'),
  '/longer-than-length': (s) => s.end('HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled'),
  '/shorter-than-length': (s) => {
    s.write('HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n');
    s.end(Buffer.alloc(40_010, 0x61));
  },
  '/closed-mid-headers': (s) => s.end('HTTP/1.1 200 OK\r\nContent-Ty'),
  '/closed-before-answer': (s) => s.end(),
  '/invalid-header-bytes': (s) => s.end('HTTP/1.1 200 OK\r\nX Bad\x01: a\r\nContent-Length: 2\r\n\r\nok'),
  '/invalid-status-line': (s) => s.end('HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok'),
  '/control-in-value': (s) => s.end('HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nX-Del: a\x7fb\r\nX-Good: yes\r\nContent-Length: 2\r\n\r\nok'),
  // obs-text (RFC 9110 §5.5): the byte 0xE9 ('é' in latin1), written as a byte, not as UTF-8.
  '/obs-text-in-value': (s) => s.end(Buffer.from('HTTP/1.1 200 OK\r\nX-Latin: caf\u00e9\r\nContent-Length: 2\r\n\r\nok', 'latin1')),
  '/never-answers': () => {},
};

interface Expected {
  /** Status before headers (502/504) or the upstream's; 0 = aborted after the header. */
  readonly status: number;
  readonly body?: string;
  /** The response must look incomplete (HTTP/1.1 connection closed early, HTTP/2 stream reset). */
  readonly aborted?: boolean;
}

const EXPECTED: Record<string, Expected> = {
  '/204-with-length': { status: 204, body: '' },
  '/304-with-length': { status: 304, body: '' },
  // undici refuses a 100 it did not ask for (Gatehouse never forwards Expect): 502, never a hang.
  '/unsolicited-100': { status: 502 },
  '/early-hints': { status: 200, body: 'ok' },
  '/longer-than-length': { status: 200, body: 'hello' },
  '/shorter-than-length': { status: 200, aborted: true },
  '/closed-mid-headers': { status: 502 },
  '/closed-before-answer': { status: 502 },
  '/invalid-header-bytes': { status: 502 },
  '/invalid-status-line': { status: 502 },
  // A value with a control character is dropped, the rest of the response served (see the next test).
  '/control-in-value': { status: 200, body: 'ok' },
  '/obs-text-in-value': { status: 200, body: 'ok' },
  '/never-answers': { status: 504 },
};

/**
 * An HTTP/2 session to Gatehouse's HTTPS port with SNI `localhost`. Rejects when it cannot connect;
 * later session errors are ignored (each stream reports its own end through its `rstCode`).
 */
function connectH2(port: number): Promise<ClientHttp2Session> {
  return new Promise((resolve, reject) => {
    const s = http2Connect(`https://127.0.0.1:${port}`, { servername: 'localhost', rejectUnauthorized: false });
    s.once('error', reject);
    s.once('connect', () => {
      s.off('error', reject);
      s.on('error', () => {});
      resolve(s);
    });
  });
}

function fdCount(): number {
  return readdirSync('/proc/self/fd').length;
}

describe('hardening: upstreams that misbehave', () => {
  let upstream: RunningUpstream;
  let gh: TestGatehouse;
  const open = new Set<Socket>();

  before(async () => {
    upstream = await startRawUpstream((socket) => {
      open.add(socket);
      socket.on('close', () => open.delete(socket));
      let head = '';
      socket.on('data', (chunk: Buffer) => {
        if (head.includes('\r\n\r\n')) return;
        head += chunk.toString('latin1');
        if (!head.includes('\r\n\r\n')) return;
        const path = head.slice(head.indexOf(' ') + 1, head.indexOf(' ', head.indexOf(' ') + 1));
        const handler = CASES[path];
        if (handler) handler(socket);
        else socket.end('HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok');
      });
    });
    gh = await startGatehouse(`
sites:
  - hosts: [localhost]
    tls: internal
    routes:
      - upstreams: [${upstream.url}]
        retries: { count: 0 }
        timeouts: { response_header: 700ms, body_idle: 1s }
        passive_health: { max_fails: 1000 }
`);
  });

  after(async () => {
    await gh?.stop();
    await upstream?.close();
  });

  async function h1(path: string): Promise<{ status: number; body: string; complete: boolean; closed: boolean }> {
    const answer = await rawExchange(gh.httpsPort, `GET ${path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`, { tls: true, waitMs: 4_000 });
    const split = answer.text.indexOf('\r\n\r\n');
    const head = answer.text.slice(0, split);
    const body = split < 0 ? '' : answer.text.slice(split + 4);
    const length = /\r\ncontent-length: (\d+)/i.exec(head);
    const chunked = /\r\ntransfer-encoding: chunked/i.test(head);
    let complete: boolean;
    // 204 and 304 end with their header, whatever Content-Length says (RFC 9110 §6.4.1).
    if (answer.status === 204 || answer.status === 304) complete = body === '';
    else if (length) complete = body.length === Number(length[1]);
    else if (chunked) complete = body.endsWith('0\r\n\r\n');
    else complete = false;
    return { status: answer.status, body: chunked ? decodeChunked(body) : body, complete, closed: answer.closed };
  }

  function h2(session: ClientHttp2Session, path: string): Promise<{ status: number; body: string; rstCode: number | undefined; headers: IncomingHttpHeaders }> {
    return new Promise((resolve) => {
      const stream = session.request({ ':path': path, ':authority': 'localhost' });
      let body = '';
      let headers: IncomingHttpHeaders = {};
      stream.setEncoding('latin1');
      stream.on('response', (h) => { headers = h; });
      stream.on('data', (chunk: string) => { body += chunk; });
      stream.on('error', () => {});
      const timer = setTimeout(() => stream.close(), 4_000);
      stream.on('close', () => {
        clearTimeout(timer);
        resolve({ status: Number(headers[':status'] ?? 0), body, rstCode: stream.rstCode, headers });
      });
    });
  }

  for (const [path, expected] of Object.entries(EXPECTED)) {
    it(`${path}: HTTP/1.1 and HTTP/2 clients get ${expected.aborted ? 'an aborted response' : expected.status}, and a log line`, async () => {
      const one = await h1(path);
      assert.equal(one.status, expected.status, `h1 ${path}`);
      if (expected.aborted) {
        assert.equal(one.complete, false, 'the HTTP/1.1 response must not look complete');
        assert.equal(one.closed, true, 'the HTTP/1.1 connection must be closed');
      } else {
        assert.equal(one.complete, true, `h1 ${path}: incomplete answer`);
        if (expected.body !== undefined) assert.equal(one.body, expected.body);
      }
      const session = await connectH2(gh.httpsPort);
      try {
        const two = await h2(session, path);
        assert.equal(two.status, expected.status, `h2 ${path}`);
        if (expected.aborted) {
          assert.notEqual(two.rstCode, 0, 'the HTTP/2 stream must be reset');
          assert.ok(two.body.length < 100_000);
        } else {
          assert.equal(two.rstCode, 0, `h2 ${path}: stream reset ${two.rstCode}`);
          if (expected.body !== undefined) assert.equal(two.body, expected.body);
          if (expected.status === 204) assert.equal(two.headers['content-length'], undefined);
        }
      } finally {
        session.close();
      }
      const lines = gh.logs.filter((l) => l.msg === 'request' && l.path === path);
      assert.equal(lines.length, 2, `${path}: one access log line per request`);
      if (expected.status >= 500 || expected.aborted) for (const line of lines) assert.match(String(line.error), /^GH_/);
    });
  }

  it('/control-in-value: the fields whose values hold a control character are dropped, the others kept', async () => {
    const answer = await rawExchange(gh.httpsPort, 'GET /control-in-value HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n', { tls: true, waitMs: 4_000 });
    const head = answer.text.slice(0, answer.text.indexOf('\r\n\r\n'));
    assert.doesNotMatch(head, /x-bad|x-del/i);
    assert.match(head, /\r\nX-Good: yes\r\n/);
    const session = await connectH2(gh.httpsPort);
    try {
      const two = await h2(session, '/control-in-value');
      assert.equal(two.headers['x-bad'], undefined);
      assert.equal(two.headers['x-del'], undefined);
      assert.equal(two.headers['x-good'], 'yes');
    } finally {
      session.close();
    }
  });

  it('/obs-text-in-value: a value byte 0x80-0xFF reaches HTTP/1.1 and HTTP/2 clients as that byte, not re-encoded', async () => {
    // rawExchange decodes latin1: the byte 0xE9 reads as 'é', its UTF-8 form (C3 A9) as 'Ã©'.
    const answer = await rawExchange(gh.httpsPort, 'GET /obs-text-in-value HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n', { tls: true, waitMs: 4_000 });
    const head = answer.text.slice(0, answer.text.indexOf('\r\n\r\n'));
    assert.match(head, /\r\nX-Latin: caf\u00e9\r\n/);
    const session = await connectH2(gh.httpsPort);
    try {
      // Node's HTTP/2 client gives field values as latin1 strings, one char per octet.
      const two = await h2(session, '/obs-text-in-value');
      assert.equal(Buffer.from(String(two.headers['x-latin']), 'latin1').toString('hex'), Buffer.from('caf\u00e9', 'latin1').toString('hex'));
    } finally {
      session.close();
    }
  });

  it('a body cut short over HTTP/2, 1 500 times, 25 at a time, through the CLI process: every stream is reset, none ends as if complete', async () => {
    // Closing a stream ends its writable side before the RST_STREAM: unless the response waits
    // for trailers, the client could get END_STREAM first and take the short body for the answer
    // (~8% of tries against the CLI process before the fix; the in-process server never showed it).
    const cut = await startRawUpstream((socket) => {
      socket.on('data', () => {
        socket.write('HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n');
        socket.write(Buffer.alloc(40_010, 0x61));
        setTimeout(() => socket.destroy(), 5);
      });
    });
    const cli = await spawnGatehouse(['run', '--config', '{{config}}'], `
listen: { http: "127.0.0.1:0", https: "127.0.0.1:0" }
tls: { storage: "{{dir}}/certs" }
log: { access: false }
sites:
  - hosts: [localhost]
    tls: internal
    routes:
      - upstreams: [${cut.url}]
        retries: { count: 0 }
        passive_health: { max_fails: 100000 }
`);
    let session = await connectH2(cli.httpsPort);
    try {
      const ended: number[] = [];
      let reset = 0;
      for (let round = 0; round < 60; round++) {
        // A session the server ends (GOAWAY after many reset streams) is replaced, as a browser would.
        if (session.closed || session.destroyed) session = await connectH2(cli.httpsPort);
        const answers = await Promise.all(Array.from({ length: 25 }, () => h2(session, '/cut')));
        for (const answer of answers) {
          if (answer.rstCode === 0) ended.push(answer.body.length);
          else reset++;
        }
      }
      assert.deepEqual(ended, [], `${ended.length} streams ended without a reset, body lengths: ${ended.slice(0, 10).join(', ')}`);
      assert.ok(reset >= 1_000, `only ${reset} streams were reset`);
    } finally {
      session.close();
      await cli.kill();
      await cut.close();
    }
  });

  it('no upstream socket and no descriptor is left behind', async () => {
    const before = fdCount();
    for (let round = 0; round < 3; round++) {
      for (const path of Object.keys(EXPECTED)) await h1(path);
    }
    const deadline = Date.now() + 5_000;
    while (open.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    assert.equal(open.size, 0, `${open.size} upstream sockets still open`);
    assert.ok(fdCount() <= before + 5, `descriptors: ${before} → ${fdCount()}`);
  });
});

describe('hardening: Upgrade', () => {
  let upstream: RunningUpstream;
  let gh: TestGatehouse;
  const received: string[] = [];

  before(async () => {
    // Refuses every upgrade with 426 and records every byte of every connection.
    upstream = await startRawUpstream((socket) => {
      let text = '';
      socket.on('data', (chunk: Buffer) => {
        text += chunk.toString('latin1');
        received.push(chunk.toString('latin1'));
        if (text.includes('\r\n\r\n') && !text.includes('answered')) {
          text += 'answered';
          socket.write('HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\nContent-Length: 7\r\n\r\nrefused');
        }
      });
    });
    gh = await startGatehouse(`
sites:
  - hosts: [localhost]
    tls: internal
    routes:
      - upstreams: [${upstream.url}]
        retries: { count: 0 }
`);
  });

  after(async () => {
    await gh?.stop();
    await upstream?.close();
  });

  const upgradeHead = (method: string, version: string, protocol = 'websocket') =>
    `${method} /ws HTTP/${version}\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: ${protocol}\r\nSec-WebSocket-Version: 1\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`;

  it('an upgrade refused by the upstream (426) never becomes a tunnel: the smuggled request goes nowhere', async () => {
    received.length = 0;
    const smuggled = 'GET /internal-admin HTTP/1.1\r\nHost: internal\r\n\r\n';
    const answer = await rawExchange(gh.httpsPort, [upgradeHead('GET', '1.1'), smuggled], { tls: true });
    assert.equal(answer.status, 426, answer.text);
    assert.equal(answer.statuses.length, 1, 'one answer, then the connection closes');
    assert.equal(answer.closed, true);
    await new Promise((r) => setTimeout(r, 100));
    assert.ok(!received.join('').includes('internal-admin'), 'the smuggled request reached the upstream');
  });

  it('Upgrade: h2c is never forwarded', async () => {
    received.length = 0;
    const answer = await rawExchange(gh.httpsPort, `GET /h2c HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n`, { tls: true });
    assert.equal(answer.status, 400, answer.text);
    assert.equal(answer.closed, true);
    assert.equal(received.length, 0);
  });

  for (const [method, version] of [['POST', '1.1'], ['PUT', '1.1'], ['GET', '1.0']] as const) {
    it(`an upgrade with ${method} and HTTP/${version} → 400, never forwarded`, async () => {
      received.length = 0;
      const body = method === 'GET' ? '' : 'Content-Length: 0\r\n';
      const answer = await rawExchange(gh.httpsPort, upgradeHead(method, version).replace('\r\n\r\n', `\r\n${body}\r\n`), { tls: true });
      assert.equal(answer.status, 400, answer.text);
      assert.equal(answer.closed, true);
      assert.equal(received.length, 0);
    });
  }
});

function decodeChunked(body: string): string {
  let out = '';
  let rest = body;
  for (;;) {
    const line = rest.indexOf('\r\n');
    if (line < 0) return out;
    const size = parseInt(rest.slice(0, line), 16);
    if (!(size > 0)) return out;
    out += rest.slice(line + 2, line + 2 + size);
    rest = rest.slice(line + 4 + size);
  }
}
