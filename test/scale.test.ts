/**
 * Scale: 10 000 sites and a few thousand static certificates start and route, plain HTTP by Host
 * and HTTPS by SNI. (Speed is measured by bench/scale.mjs, never asserted here.)
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, X509Certificate } from 'node:crypto';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { request as httpRequest } from 'node:http';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { after, before, describe, it } from 'node:test';
import { signCertificate } from '../src/tls/local-ca.ts';
import { startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';
import { startEchoUpstream } from './helpers/upstreams.ts';

const SITES = 10_000;
const CERTIFICATES = 2_000;
const siteName = (i: number): string => `site${i}.scale.test`;

describe('10 000 sites, 2 000 static certificates', () => {
  let upstream: Awaited<ReturnType<typeof startEchoUpstream>>;
  let gh: TestGatehouse;

  before(async () => {
    upstream = await startEchoUpstream();
    // Certificate files in a dir of our own, named in the config by absolute path.
    const dir = join(process.env.TMPDIR ?? '/tmp', `gh-scale-${process.pid}`);
    await mkdir(dir, { recursive: true });
    const ca = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const now = Date.now();
    const caPem = signCertificate({ subject: { commonName: 'Scale Test CA' }, publicKey: ca.publicKey, notBefore: new Date(now - 60_000), notAfter: new Date(now + 86_400_000), ca: { pathLength: 0 } }, { privateKey: ca.privateKey });
    const issuer = { privateKey: ca.privateKey, certificate: new X509Certificate(caPem) };
    const lines: string[] = [];
    const writes: Promise<void>[] = [];
    for (let i = 0; i < CERTIFICATES; i++) {
      const keys = generateKeyPairSync('ec', { namedCurve: 'P-256' });
      const cert = signCertificate({ subject: {}, names: [siteName(i)], publicKey: keys.publicKey, notBefore: new Date(now - 60_000), notAfter: new Date(now + 86_400_000) }, issuer);
      writes.push(writeFile(join(dir, `${i}.crt`), cert), writeFile(join(dir, `${i}.key`), keys.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, { mode: 0o600 }));
      lines.push(`    - { cert: ${join(dir, `${i}.crt`)}, key: ${join(dir, `${i}.key`)} }`);
    }
    await Promise.all(writes);
    const sites: string[] = [];
    for (let i = 0; i < SITES; i++) {
      sites.push(`  - { hosts: [${siteName(i)}], tls: ${i < CERTIFICATES ? 'static' : 'internal'}, redirect: false, routes: [{ path: /, upstreams: ["${upstream.url}"] }] }`);
    }
    const config = [
      'tls:', '  storage: "{{dir}}/storage"', '  certificates:', ...lines,
      'log: { level: warn, access: false }',
      'sites:', ...sites,
    ].join('\n');
    try {
      gh = await startGatehouse(config);
    } finally {
      // The store keeps certificates in memory; the files are no longer needed.
      await rm(dir, { recursive: true, force: true });
    }
  });

  after(async () => {
    await gh?.stop();
    await upstream?.close();
  });

  it('routes plain HTTP by Host to the first, a middle and the last site; an unknown host gets 404', async () => {
    for (const i of [0, 1234, 5000, SITES - 1]) {
      const { status, body } = await plainGet(gh.httpPort, siteName(i));
      assert.equal(status, 200, `site ${i}`);
      assert.equal((JSON.parse(body) as { headers: Record<string, string> }).headers.host, siteName(i));
    }
    assert.equal((await plainGet(gh.httpPort, 'nowhere.scale.test')).status, 404);
  });

  it('serves each certificate by SNI (built lazily) and routes over HTTPS', async () => {
    for (const i of [0, 999, CERTIFICATES - 1]) {
      const { names, status } = await tlsGet(gh.httpsPort, siteName(i));
      assert.ok(names.includes(`DNS:${siteName(i)}`), names);
      assert.equal(status, 200);
    }
  });
});

function plainGet(port: number, host: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: '127.0.0.1', port, path: '/', headers: { host }, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => { body += chunk; });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

function tlsGet(port: number, servername: string): Promise<{ names: string; status: number }> {
  return new Promise((resolve, reject) => {
    const socket = tlsConnect({ host: '127.0.0.1', port, servername, rejectUnauthorized: false, ALPNProtocols: ['http/1.1'] }, () => {
      socket.write(`GET / HTTP/1.1\r\nHost: ${servername}\r\nConnection: close\r\n\r\n`);
    });
    const names = () => socket.getPeerCertificate().subjectaltname ?? '';
    let peer = '';
    let head = '';
    socket.once('secureConnect', () => { peer = names(); });
    socket.setEncoding('latin1');
    socket.on('data', (chunk: string) => { head += chunk; });
    socket.on('end', () => resolve({ names: peer, status: Number(/^HTTP\/1\.1 (\d{3})/.exec(head)?.[1] ?? 0) }));
    socket.on('error', reject);
  });
}
