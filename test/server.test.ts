/**
 * Gatehouse end to end in this process: real upstreams, real TLS clients (node:http2, undici, tls,
 * ws), the config as a user writes it.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { connect as http2Connect, type ClientHttp2Session, type IncomingHttpHeaders } from 'node:http2';
import { request as httpRequest } from 'node:http';
import { join } from 'node:path';
import { connect as tlsConnect, type PeerCertificate } from 'node:tls';
import { after, before, describe, it } from 'node:test';
import { Agent, request } from 'undici';
import WebSocket from 'ws';
import { makeCertificate } from './helpers/certs.ts';
import { startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';
import { startEchoUpstream, startWsEchoUpstream, type EchoReport } from './helpers/upstreams.ts';

type Echo = Awaited<ReturnType<typeof startEchoUpstream>>;

/** One HTTP/2 request; resolves with status, headers and body text. */
function h2Get(session: ClientHttp2Session, path: string, authority?: string): Promise<{ status: number; headers: IncomingHttpHeaders; body: string }> {
  return new Promise((resolve, reject) => {
    const stream = session.request({ ':path': path, ...(authority ? { ':authority': authority } : {}) });
    let body = '';
    let headers: IncomingHttpHeaders = {};
    stream.setEncoding('utf8');
    stream.on('response', (h) => { headers = h; });
    stream.on('data', (chunk: string) => { body += chunk; });
    stream.on('end', () => resolve({ status: Number(headers[':status']), headers, body }));
    stream.on('error', reject);
    stream.end();
  });
}

function h2Session(port: number, options: { servername?: string; ca?: string | string[]; rejectUnauthorized?: boolean }): Promise<ClientHttp2Session> {
  return new Promise((resolve, reject) => {
    const session = http2Connect(`https://127.0.0.1:${port}`, { ...options });
    session.once('connect', () => resolve(session));
    session.once('error', reject);
  });
}

/** The certificate a TLS handshake with `servername` (or none) gets. */
function peerCertificate(port: number, servername: string | undefined): Promise<PeerCertificate> {
  return new Promise((resolve, reject) => {
    const socket = tlsConnect({ host: '127.0.0.1', port, servername, rejectUnauthorized: false, ALPNProtocols: ['h2'] }, () => {
      const cert = socket.getPeerCertificate();
      socket.destroy();
      resolve(cert);
    });
    socket.once('error', reject);
  });
}

/** A plain HTTP/1.1 request to the plain listener. */
function plainRequest(port: number, method: string, path: string, host: string): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: '127.0.0.1', port, method, path, headers: { host }, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => { body += chunk; });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end(method === 'POST' ? 'x=1' : undefined);
  });
}

describe('internal TLS, HTTP/2 and HTTP/1.1 to one route', () => {
  let echo: Echo;
  let gh: TestGatehouse;
  let ca: string;
  before(async () => {
    echo = await startEchoUpstream();
    gh = await startGatehouse(`
tls: { storage: "{{dir}}/certs" }
sites:
  - hosts: [localhost, "*.localhost", 127.0.0.1]
    routes:
      - upstreams: ["${echo.url}"]
      - path: /strip/
        strip_prefix: true
        upstreams: ["${echo.url}"]
  - hosts: [plain.localhost.test]
    tls: off
    routes: [{ upstreams: ["${echo.url}"] }]
  - hosts: [noredirect.localhost]
    redirect: false
    routes: [{ upstreams: ["${echo.url}"] }]
`);
    ca = await readFile(join(gh.dir, 'certs', 'ca', 'root.crt'), 'utf8');
  });
  after(async () => {
    await gh?.stop();
    await echo?.close();
  });

  it('serves h2 with a certificate from the local CA that a client trusting only that CA verifies', async () => {
    const session = await h2Session(gh.httpsPort, { servername: 'localhost', ca });
    try {
      const res = await h2Get(session, '/hello?x=1');
      assert.equal(res.status, 200);
      const report = JSON.parse(res.body) as EchoReport;
      assert.equal(report.url, '/hello?x=1');
      assert.equal(report.headers.host, `localhost:${gh.httpsPort}`, 'Host is built from :authority');
      assert.equal(report.headers['x-forwarded-proto'], 'https');
      assert.equal(report.headers['x-forwarded-host'], `localhost:${gh.httpsPort}`);
      assert.match(String(report.headers['x-forwarded-for']), /127\.0\.0\.1$/);
      assert.match(String(report.headers.via), /^2 gatehouse$/);
      assert.equal(typeof report.headers['x-request-id'], 'string');
      assert.equal(res.headers['x-request-id'], report.headers['x-request-id']);
      assert.equal(res.headers.connection, undefined);
      assert.equal(session.alpnProtocol, 'h2');
    } finally {
      session.close();
    }
    const sub = await h2Session(gh.httpsPort, { servername: 'app.localhost', ca });
    try {
      assert.equal((await h2Get(sub, '/')).status, 200, 'a leaf for app.localhost is issued in the handshake');
    } finally {
      sub.close();
    }
  });

  it('serves http/1.1 over TLS on the same port and route, strips prefixes', async () => {
    const agent = new Agent({ connect: { ca, servername: 'localhost' } });
    try {
      const res = await request(`https://127.0.0.1:${gh.httpsPort}/strip/deeper?q=2`, { dispatcher: agent, headers: { host: 'localhost' } });
      assert.equal(res.statusCode, 200);
      const report = (await res.body.json()) as EchoReport;
      assert.equal(report.url, '/deeper?q=2');
      assert.equal(report.httpVersion, '1.1');
      assert.equal(report.headers.via, '1.1 gatehouse');
      const ip = await request(`https://127.0.0.1:${gh.httpsPort}/`, { dispatcher: new Agent({ connect: { ca } }) });
      assert.equal(ip.statusCode, 200, 'an IP literal without SNI gets the default certificate, which covers 127.0.0.1');
      await ip.body.dump();
    } finally {
      await agent.close();
    }
  });

  it('answers 404 for unknown hosts and routes, and 421 for a host the connection certificate does not cover', async () => {
    const session = await h2Session(gh.httpsPort, { servername: 'localhost', ca });
    try {
      assert.equal((await h2Get(session, '/', 'nowhere.example')).status, 421);
      assert.equal((await h2Get(session, '/', 'other.localhost')).status, 421, 'the leaf for localhost does not cover other.localhost');
      assert.equal((await h2Get(session, '/')).status, 200, 'the connection still serves its own host');
    } finally {
      session.close();
    }
    const noSni = await h2Session(gh.httpsPort, { ca, servername: '' });
    try {
      const echoBefore = echo.requests.length;
      assert.equal((await h2Get(noSni, '/', 'nowhere.example')).status, 404);
      assert.equal((await h2Get(noSni, '/', 'plain.localhost.test')).status, 404, 'a tls: off site is not served over HTTPS');
      assert.equal(echo.requests.length, echoBefore, 'rejected requests never reach the upstream');
    } finally {
      noSni.close();
    }
  });

  it('redirects plain HTTP with 308, same host, path and query, https port added', async () => {
    const get = await plainRequest(gh.httpPort, 'GET', '/a/b?x=1&y=%20', 'localhost:8080');
    assert.equal(get.status, 308);
    assert.equal(get.headers.location, `https://localhost:${gh.httpsPort}/a/b?x=1&y=%20`);
    const post = await plainRequest(gh.httpPort, 'POST', '/form', 'LOCALHOST');
    assert.equal(post.status, 308, '308 keeps the method and body (RFC 9110 §15.4.9)');
    assert.equal(post.headers.location, `https://localhost:${gh.httpsPort}/form`);
    const ip = await plainRequest(gh.httpPort, 'GET', '/', '127.0.0.1');
    assert.equal(ip.headers.location, `https://127.0.0.1:${gh.httpsPort}/`);
    const plain = await plainRequest(gh.httpPort, 'GET', '/p', 'plain.localhost.test');
    assert.equal(plain.status, 200, 'tls: off is served in plain HTTP');
    assert.equal((JSON.parse(plain.body) as EchoReport).headers['x-forwarded-proto'], 'http');
    const noRedirect = await plainRequest(gh.httpPort, 'GET', '/', 'noredirect.localhost');
    assert.equal(noRedirect.status, 200, 'redirect: false is served in plain HTTP');
    assert.equal((await plainRequest(gh.httpPort, 'GET', '/', 'unknown.example')).status, 404);
  });

  it('writes one access log line per request with the fields an operator needs', async () => {
    const session = await h2Session(gh.httpsPort, { servername: 'localhost', ca });
    try {
      const res = await h2Get(session, '/logged?secret=1');
      const line = await waitFor(() => gh.logs.find((l) => l.path === '/logged'));
      assert.equal(line.logger, 'http.log.access');
      assert.equal(line.request_id, res.headers['x-request-id']);
      assert.equal(line.protocol, 'h2');
      assert.equal(line.method, 'GET');
      assert.equal(line.host, 'localhost');
      assert.equal(line.status, 200);
      assert.equal(line.upstream, echo.url);
      assert.equal(line.sni, 'localhost');
      assert.equal(line.bytes_out, Buffer.byteLength(res.body));
      assert.equal(typeof line.duration_ms, 'number');
      assert.match(String(line.client_ip), /127\.0\.0\.1/);
    } finally {
      session.close();
    }
  });
});

describe('static certificates chosen by SNI', () => {
  let echo: Echo;
  let gh: TestGatehouse;
  const a = makeCertificate({ names: ['a.test'], commonName: 'a.test' });
  const wild = makeCertificate({ names: ['*.b.test'], commonName: 'wildcard b' });
  const both = makeCertificate({ names: ['c.test', 'd.test'], commonName: 'c and d' });
  before(async () => {
    echo = await startEchoUpstream();
    gh = await startGatehouse(`
tls:
  storage: "{{dir}}/certs"
  certificates:
    - { cert: a.pem, key: a.key }
    - { cert: wild.pem, key: wild.key }
    - { cert: both.pem, key: both.key }
sites:
  - hosts: [a.test, "*.b.test", c.test, d.test]
    tls: static
    routes: [{ upstreams: ["${echo.url}"] }]
`, { 'a.pem': a.cert, 'a.key': a.key, 'wild.pem': wild.cert, 'wild.key': wild.key, 'both.pem': both.cert, 'both.key': both.key });
  });
  after(async () => {
    await gh?.stop();
    await echo?.close();
  });

  it('picks the certificate for each name, the wildcard, and the first one without SNI', async () => {
    assert.equal((await peerCertificate(gh.httpsPort, 'a.test')).subject.CN, 'a.test');
    assert.equal((await peerCertificate(gh.httpsPort, 'x.b.test')).subject.CN, 'wildcard b');
    assert.equal((await peerCertificate(gh.httpsPort, 'd.test')).subject.CN, 'c and d');
    assert.equal((await peerCertificate(gh.httpsPort, undefined)).subject.CN, 'a.test');
    assert.equal((await peerCertificate(gh.httpsPort, 'unknown.test')).subject.CN, 'a.test');
  });

  it('lets HTTP/2 reuse a connection for a host its certificate covers, and only then', async () => {
    const session = await h2Session(gh.httpsPort, { servername: 'c.test', rejectUnauthorized: false });
    try {
      assert.equal((await h2Get(session, '/', 'd.test')).status, 200);
      assert.equal((await h2Get(session, '/', 'a.test')).status, 421);
    } finally {
      session.close();
    }
  });
});

describe('WebSocket over TLS through Gatehouse', () => {
  let ws: Awaited<ReturnType<typeof startWsEchoUpstream>>;
  let gh: TestGatehouse;
  let ca: string;
  before(async () => {
    ws = await startWsEchoUpstream();
    gh = await startGatehouse(`
tls: { storage: "{{dir}}/certs" }
sites:
  - hosts: [localhost]
    routes: [{ path: /ws/, upstreams: ["${ws.url}"] }]
`);
    ca = await readFile(join(gh.dir, 'certs', 'ca', 'root.crt'), 'utf8');
  });
  after(async () => {
    await gh?.stop();
    await ws?.close();
  });

  it('echoes text and binary messages', async () => {
    const client = new WebSocket(`wss://localhost:${gh.httpsPort}/ws/echo`, { ca });
    try {
      await new Promise((resolve, reject) => { client.once('open', resolve); client.once('error', reject); });
      const next = () => new Promise<{ data: Buffer; binary: boolean }>((resolve) => client.once('message', (data: Buffer, binary: boolean) => resolve({ data, binary })));
      let reply = next();
      client.send('hello');
      const text = await reply;
      assert.equal(text.binary, false);
      assert.equal(text.data.toString(), 'hello');
      const bytes = Buffer.from([0, 1, 2, 254, 255]);
      reply = next();
      client.send(bytes);
      const binary = await reply;
      assert.equal(binary.binary, true);
      assert.deepEqual(binary.data, bytes);
    } finally {
      client.terminate();
    }
  });
});

async function waitFor<T>(probe: () => T | undefined, timeoutMs = 3000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) assert.fail('timed out waiting');
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
