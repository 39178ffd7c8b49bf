/**
 * Response fields Gatehouse adds to proxied answers — the sticky cookie of the `cookie` policy and
 * the site's HSTS — over HTTP/2 and HTTP/1.1 on TLS: added next to the upstream's own
 * `Set-Cookie`, replacing the upstream's own `Strict-Transport-Security`.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import http2 from 'node:http2';
import https from 'node:https';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { startCountingUpstream, type CountingUpstream } from './helpers/counting-upstream.ts';
import { startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';

describe('headers added to proxied answers', () => {
  let upstream: CountingUpstream;
  let gh: TestGatehouse;
  let ca: string;

  before(async () => {
    upstream = await startCountingUpstream('app');
    gh = await startGatehouse(`
log: { access: false }
tls: { storage: "{{dir}}/certs" }
sites:
  - hosts: [localhost]
    tls: internal
    hsts: 1y                # 365.25 days: max-age=31557600
    routes: [{ load_balancing: cookie, upstreams: ["${upstream.url}"] }]
`);
    ca = await readFile(join(gh.dir, 'certs', 'ca', 'root.crt'), 'utf8');
  });
  after(async () => {
    await gh?.stop();
    await upstream?.close();
  });

  const path = '/?cookie=mine&hsts=max-age%3D60';

  it('HTTP/2: both cookies, the site HSTS', async () => {
    const session = http2.connect(`https://localhost:${gh.httpsPort}`, { ca });
    try {
      const headers = await new Promise<http2.IncomingHttpHeaders>((resolve, reject) => {
        const stream = session.request({ ':path': path });
        stream.on('response', (h) => { stream.resume(); stream.on('end', () => resolve(h)); });
        stream.on('error', reject);
        stream.end();
      });
      assert.equal(headers[':status'], 200);
      const cookies = headers['set-cookie'] ?? [];
      assert.equal(cookies.length, 2, String(cookies));
      assert.equal(cookies[0], 'app=mine; Path=/');
      assert.match(cookies[1]!, /^gatehouse_upstream=[\w-]+; Path=\/; HttpOnly; SameSite=Lax$/);
      assert.equal(headers['strict-transport-security'], 'max-age=31557600');
    } finally {
      session.close();
    }
  });

  it('HTTP/1.1 over TLS: both cookies, one HSTS field, the site one', async () => {
    const res = await new Promise<import('node:http').IncomingMessage>((resolve, reject) => {
      const req = https.get({ host: 'localhost', port: gh.httpsPort, path, ca, agent: false }, resolve);
      req.on('error', reject);
    });
    res.resume();
    assert.equal(res.statusCode, 200);
    assert.equal(res.headers['set-cookie']?.length, 2);
    const hsts = res.rawHeaders.filter((_, i) => i % 2 === 0 && res.rawHeaders[i]!.toLowerCase() === 'strict-transport-security');
    assert.equal(hsts.length, 1);
    assert.equal(res.headers['strict-transport-security'], 'max-age=31557600');
  });
});
