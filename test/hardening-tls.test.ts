/**
 * Hardening, TLS through the running server: protocol versions, AEAD-only cipher suites, the
 * server's cipher order, HSTS per site (HTTPS answers only, next to the upstream's Set-Cookie), and
 * a certificate lookup that throws ending that one handshake only.
 */
import assert from 'node:assert/strict';
import { connect as http2Connect, type IncomingHttpHeaders } from 'node:http2';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';
import { rawExchange } from './helpers/raw-http.ts';
import { startEchoUpstream } from './helpers/upstreams.ts';

type Echo = Awaited<ReturnType<typeof startEchoUpstream>>;

/** Handshake with the given client options; resolves with the protocol and cipher, or the error. */
function handshake(port: number, options: tls.ConnectionOptions): Promise<{ ok: true; protocol: string; cipher: string } | { ok: false; error: string }> {
  return new Promise((resolve) => {
    const socket = tls.connect({ host: '127.0.0.1', port, servername: 'localhost', rejectUnauthorized: false, ...options }, () => {
      const result = { ok: true as const, protocol: socket.getProtocol() ?? '', cipher: socket.getCipher().name };
      socket.destroy();
      resolve(result);
    });
    socket.once('error', (error: Error & { code?: string }) => {
      socket.destroy();
      resolve({ ok: false, error: error.code ?? error.message });
    });
  });
}

describe('hardening: TLS', () => {
  let echo: Echo;
  let gh: TestGatehouse;
  const cookies = 'header=Set-Cookie:a%3D1%3B%20Path%3D%2F&header=Set-Cookie:b%3D2%3B%20Secure';

  before(async () => {
    echo = await startEchoUpstream();
    gh = await startGatehouse(`
sites:
  - hosts: [localhost]
    tls: internal
    redirect: false
    hsts: { max_age: 1y, include_subdomains: true, preload: true }
    routes:
      - upstreams: [${echo.url}]
  - hosts: [nohsts.localhost]
    tls: internal
    routes:
      - upstreams: [${echo.url}]
  - hosts: [plain.test]
    tls: off
    hsts: 1y
    routes:
      - upstreams: [${echo.url}]
`);
  });

  after(async () => {
    await gh?.stop();
    await echo?.close();
  });

  it('TLS 1.2 and 1.3 are served; TLS 1.0 and 1.1 are refused', async () => {
    const v13 = await handshake(gh.httpsPort, { minVersion: 'TLSv1.3' });
    assert.equal(v13.ok && v13.protocol, 'TLSv1.3');
    const v12 = await handshake(gh.httpsPort, { maxVersion: 'TLSv1.2' });
    assert.equal(v12.ok && v12.protocol, 'TLSv1.2');
    for (const version of ['TLSv1', 'TLSv1.1'] as const) {
      const old = await handshake(gh.httpsPort, { minVersion: version, maxVersion: version, ciphers: 'DEFAULT@SECLEVEL=0' });
      assert.equal(old.ok, false, `${version} was accepted`);
    }
  });

  it('only AEAD suites: a TLS 1.2 client offering only CBC or non-ECDHE suites is refused', async () => {
    for (const ciphers of ['ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA', 'AES128-GCM-SHA256:AES256-SHA256']) {
      const result = await handshake(gh.httpsPort, { maxVersion: 'TLSv1.2', ciphers });
      assert.equal(result.ok, false, `${ciphers} was accepted`);
    }
  });

  it("the server's cipher order wins over the client's", async () => {
    const result = await handshake(gh.httpsPort, { maxVersion: 'TLSv1.2', ciphers: 'ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256' });
    assert.equal(result.ok && result.cipher, 'ECDHE-ECDSA-AES128-GCM-SHA256');
  });

  // 1y = 365.25 days (31 557 600 s), as the duration parser counts a year.
  it('HSTS on HTTPS answers of the site that sets it (h2 and h1), next to every upstream Set-Cookie', async () => {
    const session = http2Connect(`https://127.0.0.1:${gh.httpsPort}`, { servername: 'localhost', rejectUnauthorized: false });
    try {
      const headers = await new Promise<IncomingHttpHeaders>((resolve, reject) => {
        const stream = session.request({ ':path': `/hsts?${cookies}`, ':authority': 'localhost' });
        stream.on('response', resolve);
        stream.on('error', reject);
        stream.resume();
      });
      assert.equal(headers['strict-transport-security'], 'max-age=31557600; includeSubDomains; preload');
      assert.deepEqual(headers['set-cookie'], ['a=1; Path=/', 'b=2; Secure']);
    } finally {
      session.close();
    }
    const h1 = await rawExchange(gh.httpsPort, `GET /hsts?${cookies} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`, { tls: true });
    assert.equal(h1.status, 200);
    assert.match(h1.text, /\r\nstrict-transport-security: max-age=31557600; includeSubDomains; preload\r\n/i);
    assert.match(h1.text, /\r\nSet-Cookie: a=1; Path=\/\r\n/);
    assert.match(h1.text, /\r\nSet-Cookie: b=2; Secure\r\n/);
  });

  it('no HSTS on plain HTTP answers, nor for a site without it', async () => {
    // The HSTS site also answers on plain HTTP (redirect: false): never with HSTS there (RFC 6797 §7.2).
    const plainSameSite = await rawExchange(gh.httpPort, 'GET /plain HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
    assert.equal(plainSameSite.status, 200, plainSameSite.text);
    assert.doesNotMatch(plainSameSite.text, /strict-transport-security/i);
    const plainSite = await rawExchange(gh.httpPort, 'GET /plain HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n');
    assert.equal(plainSite.status, 200);
    assert.doesNotMatch(plainSite.text, /strict-transport-security/i);
    const other = await rawExchange(gh.httpsPort, 'GET /other HTTP/1.1\r\nHost: nohsts.localhost\r\nConnection: close\r\n\r\n', { tls: true, servername: 'nohsts.localhost' });
    assert.equal(other.status, 200);
    assert.doesNotMatch(other.text, /strict-transport-security/i);
  });

  it('a certificate lookup that throws ends that handshake only', async () => {
    const store = gh.gatehouse.certificates;
    store.setPolicy((name) => {
      if (name.startsWith('boom')) throw new Error('lookup exploded');
      return undefined;
    });
    const failed = await Promise.all(Array.from({ length: 5 }, () => handshake(gh.httpsPort, { servername: 'boom.localhost' })));
    for (const result of failed) assert.equal(result.ok, false);
    const fine = await handshake(gh.httpsPort, { servername: 'localhost' });
    assert.equal(fine.ok, true);
    const answer = await rawExchange(gh.httpsPort, 'GET /after-boom HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n', { tls: true });
    assert.equal(answer.status, 200);
  });
});
