import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import http2 from 'node:http2';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import { after, before, describe, test } from 'node:test';
import { CertificateStore, covers, loadStaticCertificates, type TlsLogger } from '../src/tls/certificates.js';
import { CertificateError } from '../src/tls/pem.js';
import type { Certificate, CertificateSource } from '../src/tls/source.js';
import { makeCertificate, writeCertificateFiles, type TestCertificate } from './helpers/certs.js';

/** An HTTPS listener as the HTTPS listener builds it: HTTP/2 + HTTP/1.1, the store's options. */
async function startServer(store: CertificateStore): Promise<{ server: http2.Http2SecureServer; port: number }> {
  const server = http2.createSecureServer({ ...store.serverOptions(), allowHTTP1: true }, (request, response) => {
    response.end(`ok ${request.headers[':authority'] ?? request.headers.host}`);
  });
  store.attach(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, port: (server.address() as AddressInfo).port };
}

async function stopServer(server: http2.Http2SecureServer | undefined): Promise<void> {
  if (!server?.listening) return;
  (server as unknown as { closeAllConnections?: () => void }).closeAllConnections?.();
  await new Promise<void>((resolve) => server.close(() => resolve()));
}

interface Exchange {
  /** The server's leaf (Node has none on a resumed session: it was checked when the session began). */
  certificate: X509Certificate;
  body: string;
  session: Buffer | undefined;
  reused: boolean;
  protocol: string | null;
  cipher: string;
}

/**
 * A real TLS client: handshake (SNI `servername` unless omitted), one HTTP/1.1 request, read the
 * response to the end. Rejects when the handshake fails.
 */
function exchange(port: number, options: tls.ConnectionOptions = {}): Promise<Exchange> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false, ...options });
    let body = '';
    let session: Buffer | undefined;
    let certificate: X509Certificate | undefined;
    let secured = false;
    let reused = false;
    let cipher = '';
    let protocol: string | null = null;
    const timer = setTimeout(() => socket.destroy(new Error('client timeout')), 15_000);
    socket.on('session', (s: Buffer) => { session = s; });
    socket.on('secureConnect', () => {
      secured = true;
      certificate = socket.getPeerX509Certificate();
      reused = socket.isSessionReused();
      cipher = socket.getCipher().name;
      protocol = socket.getProtocol();
      socket.write(`GET / HTTP/1.1\r\nHost: ${options.servername || '127.0.0.1'}\r\nConnection: close\r\n\r\n`);
    });
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => { body += chunk; });
    socket.on('error', (error) => { clearTimeout(timer); reject(error); });
    socket.on('end', () => {
      clearTimeout(timer);
      socket.destroy();
      if (!secured) reject(new Error('the server closed the connection during the handshake'));
      else resolve({ certificate: certificate!, body, session, reused, protocol, cipher });
    });
  });
}

function sanOf(x: X509Certificate): string {
  return x.subjectAltName ?? '';
}

describe('CertificateStore: SNI over real TLS', () => {
  let server: http2.Http2SecureServer | undefined;
  let port = 0;
  let store: CertificateStore;
  let alpha: TestCertificate;
  let beta: TestCertificate;
  let wildcard: TestCertificate;

  before(async () => {
    alpha = makeCertificate({ names: ['alpha.test'] });
    beta = makeCertificate({ names: ['beta.test', 'www.beta.test'] });
    wildcard = makeCertificate({ names: ['*.apps.test'] });
    store = new CertificateStore();
    for (const c of [alpha, beta, wildcard]) store.put(c.certificate);
    ({ server, port } = await startServer(store));
  });
  after(() => stopServer(server));

  test('SNI picks the static certificate for each name, exact and wildcard, case-insensitive', async () => {
    assert.equal(sanOf((await exchange(port, { servername: 'alpha.test' })).certificate), 'DNS:alpha.test');
    assert.equal(sanOf((await exchange(port, { servername: 'www.beta.test' })).certificate), 'DNS:beta.test, DNS:www.beta.test');
    const viaWildcard = await exchange(port, { servername: 'One.Apps.Test' });
    assert.equal(sanOf(viaWildcard.certificate), 'DNS:*.apps.test');
    assert.match(viaWildcard.body, /^HTTP\/1\.1 200/);
  });

  test('a client trusting the certificate verifies it over HTTP/2', async () => {
    const client = http2.connect(`https://127.0.0.1:${port}`, { servername: 'beta.test', ca: beta.cert });
    try {
      const body = await new Promise<string>((resolve, reject) => {
        const request = client.request({ ':path': '/', ':authority': 'beta.test' });
        let text = '';
        request.setEncoding('utf8');
        request.on('data', (chunk: string) => { text += chunk; });
        request.on('end', () => resolve(text));
        request.on('error', reject);
        client.on('error', reject);
      });
      assert.equal(body, 'ok beta.test');
      assert.equal((client.socket as tls.TLSSocket).getPeerX509Certificate()?.subjectAltName, 'DNS:beta.test, DNS:www.beta.test');
    } finally {
      client.close();
    }
  });

  test('no SNI, an unknown name and a name two labels under a wildcard get the default (first static)', async () => {
    assert.equal(store.defaultCertificate, alpha.certificate);
    const noSni = await exchange(port); // host is an IP literal: Node sends no SNI
    assert.equal(sanOf(noSni.certificate), 'DNS:alpha.test');
    assert.equal(sanOf((await exchange(port, { servername: 'nobody.test' })).certificate), 'DNS:alpha.test');
    assert.equal(sanOf((await exchange(port, { servername: 'a.b.apps.test' })).certificate), 'DNS:alpha.test');
  });

  test('a certificate put at run time is served on the next handshake, without a restart', async () => {
    const before = await exchange(port, { servername: 'beta.test' });
    const renewed = makeCertificate({ names: ['beta.test', 'www.beta.test'] });
    store.put(renewed.certificate);
    const afterSwap = await exchange(port, { servername: 'beta.test' });
    assert.notEqual(afterSwap.certificate.fingerprint256, before.certificate.fingerprint256);
    assert.equal(afterSwap.certificate.fingerprint256, new X509Certificate(renewed.cert).fingerprint256);
    assert.equal(store.list().filter((c) => c.names.includes('beta.test')).length, 1, 'the old certificate is gone from the list');
  });

  test('swapping the default certificate updates handshakes without SNI', async () => {
    const replacement = makeCertificate({ names: ['alpha.test'] });
    store.put(replacement.certificate);
    const noSni = await exchange(port);
    assert.equal(noSni.certificate.fingerprint256, new X509Certificate(replacement.cert).fingerprint256);
  });

  test('TLS 1.1 is refused; TLS 1.2 works with AEAD ciphers only', async () => {
    await assert.rejects(exchange(port, { servername: 'alpha.test', minVersion: 'TLSv1', maxVersion: 'TLSv1.1', ciphers: 'DEFAULT@SECLEVEL=0' }));
    const aead = await exchange(port, { servername: 'alpha.test', maxVersion: 'TLSv1.2' });
    assert.equal(aead.protocol, 'TLSv1.2');
    assert.equal(aead.cipher, 'ECDHE-ECDSA-AES128-GCM-SHA256');
    // CBC with HMAC: accepted by Node's default cipher list, refused here.
    await assert.rejects(exchange(port, { servername: 'alpha.test', maxVersion: 'TLSv1.2', ciphers: 'ECDHE-ECDSA-AES128-SHA256' }));
  });

  test('TLS 1.3 and TLS 1.2 sessions resume on a second connection', async () => {
    for (const maxVersion of ['TLSv1.3', 'TLSv1.2'] as const) {
      const first = await exchange(port, { servername: 'www.beta.test', maxVersion });
      assert.ok(first.session, `${maxVersion}: a session ticket arrived`);
      assert.equal(first.reused, false);
      const second = await exchange(port, { servername: 'www.beta.test', maxVersion, session: first.session });
      assert.equal(second.reused, true, `${maxVersion}: second connection resumed`);
      assert.equal(second.protocol, maxVersion);
    }
  });

  test('a session resumes on a second listener of the same store (shared ticket keys)', async () => {
    const { server: other, port: otherPort } = await startServer(store);
    try {
      for (const maxVersion of ['TLSv1.3', 'TLSv1.2'] as const) {
        const first = await exchange(port, { servername: 'alpha.test', maxVersion });
        const second = await exchange(otherPort, { servername: 'alpha.test', maxVersion, session: first.session });
        assert.equal(second.reused, true, `${maxVersion}: resumed on the other listener`);
      }
    } finally {
      await stopServer(other);
    }
  });
});

describe('CertificateStore: RSA certificates', () => {
  let server: http2.Http2SecureServer | undefined;
  after(() => stopServer(server));

  test('ECDHE-RSA with AES-GCM works; AES128-SHA256 (static RSA, CBC) is refused', async () => {
    const rsa = makeCertificate({ names: ['rsa.test'], keyType: 'rsa' });
    const store = new CertificateStore();
    store.put(rsa.certificate);
    let port: number;
    ({ server, port } = await startServer(store));
    const ok = await exchange(port, { servername: 'rsa.test', maxVersion: 'TLSv1.2', ca: rsa.cert, rejectUnauthorized: true });
    assert.equal(ok.cipher, 'ECDHE-RSA-AES128-GCM-SHA256');
    await assert.rejects(exchange(port, { servername: 'rsa.test', maxVersion: 'TLSv1.2', ciphers: 'AES128-SHA256' }));
    await assert.rejects(exchange(port, { servername: 'rsa.test', maxVersion: 'TLSv1.2', ciphers: 'ECDHE-RSA-AES128-SHA256' }));
  });
});

describe('CertificateStore: obtaining missing certificates', () => {
  let server: http2.Http2SecureServer | undefined;
  after(() => stopServer(server));

  test('policy sources: throwing, slow and shared obtains fail or wait for their handshake only', async () => {
    const fallback = makeCertificate({ names: ['default.test'] });
    const logged: object[] = [];
    const logger: TlsLogger = { warn: (fields) => logged.push(fields), error: (fields) => logged.push(fields) };
    const store = new CertificateStore({ obtainTimeout: 800, logger });
    store.put(fallback.certificate);

    const throwing: CertificateSource = { name: 'broken', obtain: () => { throw new Error('issuer exploded'); } };
    const rejecting: CertificateSource = { name: 'rejecting', obtain: async () => { throw new Error('issuer said no'); } };
    const never: CertificateSource = { name: 'stuck', obtain: () => new Promise(() => {}) };
    let calls = 0;
    let release!: () => void;
    const gate = new Promise<void>((resolve) => { release = resolve; });
    const issued = makeCertificate({ names: ['shared.test'], source: 'demo' });
    const shared: CertificateSource = {
      name: 'demo',
      obtain: async (name) => {
        calls++;
        await gate;
        return name === 'shared.test' ? issued.certificate : undefined;
      },
    };
    store.setPolicy((name) => {
      if (name === 'throw.test') return { source: throwing, waitInHandshake: true };
      if (name === 'reject.test') return { source: rejecting, waitInHandshake: true };
      if (name === 'slow.test') return { source: never, waitInHandshake: true };
      if (name === 'shared.test') return { source: shared, waitInHandshake: true };
      if (name === 'policy-throws.test') throw new Error('policy bug');
      return undefined;
    });
    let port: number;
    ({ server, port } = await startServer(store));

    await assert.rejects(exchange(port, { servername: 'throw.test' }));
    await assert.rejects(exchange(port, { servername: 'reject.test' }));
    await assert.rejects(exchange(port, { servername: 'policy-throws.test' }));
    assert.ok(logged.length >= 3, 'failures are logged');

    // Five handshakes wait for one obtain; meanwhile other names are served at once.
    const waiting = Array.from({ length: 5 }, () => exchange(port, { servername: 'shared.test' }));
    const slow = exchange(port, { servername: 'slow.test' }).then(() => 'served', () => 'failed');
    const started = Date.now();
    const other = await exchange(port, { servername: 'default.test' });
    assert.equal(sanOf(other.certificate), 'DNS:default.test');
    assert.ok(Date.now() - started < 700, 'a pending obtain holds up no other name');
    release();
    for (const result of await Promise.all(waiting)) assert.equal(sanOf(result.certificate), 'DNS:shared.test');
    assert.equal(await slow, 'failed', 'a stuck obtain fails its handshake after obtainTimeout');
    assert.equal(calls, 1, 'concurrent handshakes share one obtain');
    assert.equal(store.forServerName('shared.test'), issued.certificate);
    // The server still serves after all of that.
    assert.match((await exchange(port, { servername: 'default.test' })).body, /^HTTP\/1\.1 200/);
  });

  test('waitInHandshake false: the temporary certificate is served, then the real one swapped in', async () => {
    const store = new CertificateStore();
    let release!: () => void;
    const gate = new Promise<void>((resolve) => { release = resolve; });
    const real = makeCertificate({ names: ['bg.test'], source: 'acme' });
    const acme: CertificateSource = { name: 'acme', obtain: async () => { await gate; return real.certificate; } };
    const temporary: CertificateSource = { name: 'internal', obtain: async (name) => makeCertificate({ names: [name], source: 'internal' }).certificate };
    store.setPolicy(() => ({ source: acme, temporary, waitInHandshake: false }));
    await stopServer(server);
    let port: number;
    ({ server, port } = await startServer(store));

    const first = await exchange(port, { servername: 'bg.test' });
    assert.equal(sanOf(first.certificate), 'DNS:bg.test');
    assert.notEqual(first.certificate.fingerprint256, new X509Certificate(real.cert).fingerprint256);
    assert.equal(store.list().find((c) => c.names.includes('bg.test'))?.temporary, true);
    release();
    await gate;
    await new Promise((resolve) => setTimeout(resolve, 50));
    const second = await exchange(port, { servername: 'bg.test' });
    assert.equal(second.certificate.fingerprint256, new X509Certificate(real.cert).fingerprint256);
    assert.equal(store.forServerName('bg.test')?.source, 'acme');
  });
});

describe('loadStaticCertificates', () => {
  let folder = '';
  before(async () => { folder = await mkdtemp(join(tmpdir(), 'gatehouse-tls-')); });
  after(() => rm(folder, { recursive: true, force: true }));

  test('reads files, names from DNS and IP SANs, and rejects a key of another certificate naming the file', async () => {
    const site = await writeCertificateFiles(folder, makeCertificate({ names: ['Site.Test', '*.site.test', '127.0.0.1', '::1'] }), 'site');
    const other = await writeCertificateFiles(folder, makeCertificate({ names: ['other.test'] }), 'other');
    const [certificate] = await loadStaticCertificates([site]);
    assert.deepEqual(certificate!.names, ['site.test', '*.site.test', '127.0.0.1', '::1']);
    assert.equal(certificate!.source, 'static');
    assert.ok(certificate!.notAfter.getTime() > Date.now());

    await assert.rejects(loadStaticCertificates([{ cert: site.cert, key: other.key }]), (error: unknown) => {
      assert.ok(error instanceof CertificateError);
      assert.equal(error.code, 'GH_TLS_KEY_MISMATCH');
      assert.ok(error.message.includes(other.key) && error.message.includes(site.cert), error.message);
      return true;
    });
    await assert.rejects(loadStaticCertificates([{ cert: join(folder, 'missing.crt'), key: site.key }]), { code: 'GH_TLS_FILE_UNREADABLE' });
    await assert.rejects(loadStaticCertificates([{ cert: site.key, key: site.key }]), { code: 'GH_TLS_CERT_INVALID' });
    const store = await CertificateStore.fromFiles([site]);
    assert.equal(store.forServerName('127.0.0.1')?.names[0], 'site.test');
    assert.equal(store.forServerName('[0:0::1]'), certificate === undefined ? undefined : store.forServerName('::1'));
  });
});

describe('name matching', () => {
  const cert = makeCertificate({ names: ['example.test', '*.apps.example.test'] }).certificate;

  test('covers: exact or one label under a wildcard, case and trailing dot ignored', () => {
    assert.equal(covers(cert, 'example.test'), true);
    assert.equal(covers(cert, 'EXAMPLE.test.'), true);
    assert.equal(covers(cert, 'a.apps.example.test'), true);
    assert.equal(covers(cert, 'apps.example.test'), false);
    assert.equal(covers(cert, 'a.b.apps.example.test'), false);
    assert.equal(covers(cert, 'other.test'), false);
    assert.equal(CertificateStore.covers(cert, 'x.apps.example.test'), true);
  });

  test('10 000 certificates: put and look up every name quickly', () => {
    const store = new CertificateStore();
    const base = cert;
    const many: Certificate[] = [];
    for (let i = 0; i < 10_000; i++) many.push({ ...base, names: [`host${i}.test`, `*.zone${i}.test`] });
    const started = performance.now();
    for (const c of many) store.put(c);
    for (let i = 0; i < 10_000; i++) {
      assert.equal(store.forServerName(`host${i}.test`), many[i]);
      assert.equal(store.forServerName(`x.zone${i}.test`), many[i]);
    }
    assert.equal(store.forServerName('x.y.zone1.test'), undefined);
    assert.ok(performance.now() - started < 2_000, `took ${performance.now() - started} ms`);
    assert.equal(store.list().length, 10_000);
  });
});
