/**
 * Automatic HTTPS through the whole server: a real Pebble validates challenges on Gatehouse's own
 * listeners (HTTP-01 on the plain listener, TLS-ALPN-01 on the HTTPS listener), and TLS clients that
 * trust only Pebble's root check what Gatehouse serves by SNI.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import { connect as http2Connect } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect, type PeerCertificate } from 'node:tls';
import { after, before, describe, it } from 'node:test';
import pino from 'pino';
import { loadConfigFile } from '../src/config/load.ts';
import { Gatehouse } from '../src/gatehouse.ts';
import { freePort, startPebble, type Pebble } from './helpers/pebble.ts';
import { startEchoUpstream } from './helpers/upstreams.ts';

/** The leaf served for `servername`, verified against `root` only; rejects when it does not verify. */
function verifiedCertificate(port: number, servername: string, root: string): Promise<PeerCertificate> {
  return new Promise((resolve, reject) => {
    const socket = tlsConnect({ host: '127.0.0.1', port, servername, ca: [root] }, () => {
      const cert = socket.getPeerCertificate();
      socket.destroy();
      resolve(cert);
    });
    socket.once('error', reject);
  });
}

async function eventually<T>(what: string, probe: () => Promise<T>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      return await probe();
    } catch (error) {
      last = error;
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }
  throw new Error(`timed out waiting for ${what}: ${(last as Error)?.message}`);
}

describe('ACME through Gatehouse (Pebble)', () => {
  let pebble: Pebble;
  let echo: Awaited<ReturnType<typeof startEchoUpstream>>;
  let ask: Server;
  let dir: string;
  let httpPort: number;
  let tlsPort: number;
  const running: Gatehouse[] = [];

  async function start(yaml: string): Promise<Gatehouse> {
    // A test that failed left its server running: the ports are needed again.
    await Promise.allSettled(running.splice(0).map((g) => g.stop()));
    const file = join(dir, `gatehouse-${running.length}.yaml`);
    await writeFile(file, `listen: { http: "127.0.0.1:${httpPort}", https: "127.0.0.1:${tlsPort}" }
tls:
  storage: ${join(dir, 'storage')}
  acme:
    directory: ${pebble.directoryUrl}
    ca_bundle: ${pebble.caFile}
    agree_tos: true
    email: ops@example.com
${yaml}`);
    const gatehouse = await Gatehouse.start(await loadConfigFile(file), pino({ level: process.env.GH_TEST_LOG ?? 'silent' }, pino.destination(2)));
    running.push(gatehouse);
    return gatehouse;
  }

  before(async () => {
    [httpPort, tlsPort] = [await freePort(), await freePort()];
    dir = await mkdtemp(join(tmpdir(), 'gh-acme-server-'));
    // Two-minute certificates so a renew window of 0.9 makes them due within seconds.
    pebble = await startPebble({ httpPort, tlsPort, certificateValidityPeriod: 120 });
    echo = await startEchoUpstream();
    ask = createServer((req, res) => {
      const domain = new URL(req.url ?? '/', 'http://x').searchParams.get('domain');
      res.writeHead(domain === 'allowed.test' ? 200 : 403).end();
    });
    ask.listen(0, '127.0.0.1');
    await once(ask, 'listening');
  });
  after(async () => {
    await Promise.allSettled(running.map((g) => g.stop()));
    await echo?.close();
    ask?.close();
    await pebble?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('obtains two certificates over HTTP-01, serves each by SNI, and reuses them after a restart', async () => {
    const sites = `    challenges: [http-01]
sites:
  - hosts: [a.test, b.test]
    tls: acme   # .test names default to the local CA (RFC 6761: no public CA issues them)
    routes: [{ upstreams: ["${echo.url}"] }]
`;
    const first = await start(sites);
    const root = await pebble.issuingRoot();
    const a = await eventually('a.test from Pebble', () => verifiedCertificate(tlsPort, 'a.test', root));
    const b = await eventually('b.test from Pebble', () => verifiedCertificate(tlsPort, 'b.test', root));
    assert.match(a.subjectaltname ?? '', /DNS:a\.test/);
    assert.match(b.subjectaltname ?? '', /DNS:b\.test/);
    assert.notEqual(a.serialNumber, b.serialNumber);
    const orders = pebble.orderCount();
    assert.equal(orders, 2);

    await first.stop();
    running.pop();
    const second = await start(sites);
    const again = await verifiedCertificate(tlsPort, 'a.test', root);
    assert.equal(again.serialNumber, a.serialNumber, 'the stored certificate is served after a restart');
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.equal(pebble.orderCount(), orders, 'no new order after a restart');
    await second.stop();
    running.pop();
  });

  it('obtains a certificate over TLS-ALPN-01 on the HTTPS listener', async () => {
    const gatehouse = await start(`    challenges: [tls-alpn-01]
sites:
  - hosts: [alpn.test]
    tls: acme
    routes: [{ upstreams: ["${echo.url}"] }]
`);
    const root = await pebble.issuingRoot();
    const cert = await eventually('alpn.test from Pebble', () => verifiedCertificate(tlsPort, 'alpn.test', root));
    assert.match(cert.subjectaltname ?? '', /DNS:alpn\.test/);
    await gatehouse.stop();
    running.pop();
  });

  it('swaps a renewed certificate in while an HTTP/2 connection stays open', async () => {
    const gatehouse = await start(`    challenges: [http-01]
    renew_window: 0.9
sites:
  - hosts: [renew.test]
    tls: acme
    routes: [{ upstreams: ["${echo.url}"] }]
`);
    const root = await pebble.issuingRoot();
    const before = await eventually('renew.test from Pebble', () => verifiedCertificate(tlsPort, 'renew.test', root));
    const session = http2Connect(`https://127.0.0.1:${tlsPort}`, { servername: 'renew.test', ca: [root] });
    const get = () => new Promise<number>((resolve, reject) => {
      const stream = session.request({ ':path': '/', ':authority': 'renew.test' });
      stream.on('response', (headers) => resolve(Number(headers[':status'])));
      stream.on('error', reject);
      stream.resume();
      stream.end();
    });
    try {
      assert.equal(await get(), 200);
      const after = await eventually('a renewed certificate', async () => {
        const cert = await verifiedCertificate(tlsPort, 'renew.test', root);
        if (cert.serialNumber === before.serialNumber) throw new Error('not renewed yet');
        return cert;
      });
      assert.match(after.subjectaltname ?? '', /DNS:renew\.test/);
      assert.equal(await get(), 200, 'the connection opened before the renewal still serves');
    } finally {
      session.close();
      await gatehouse.stop();
      running.pop();
    }
  });

  it('issues on demand only for names the ask endpoint allows', async () => {
    const askUrl = `http://127.0.0.1:${(ask.address() as AddressInfo).port}/check`;
    const gatehouse = await start(`    challenges: [http-01]
  on_demand: { ask: "${askUrl}" }
sites:
  - hosts: ["*"]
    tls: acme
    routes: [{ upstreams: ["${echo.url}"] }]
`);
    const root = await pebble.issuingRoot();
    const allowed = await verifiedCertificate(tlsPort, 'allowed.test', root);
    assert.match(allowed.subjectaltname ?? '', /DNS:allowed\.test/, 'issued during the handshake');
    await assert.rejects(verifiedCertificate(tlsPort, 'refused.test', root), 'a refused name gets no certificate from Pebble');
    await gatehouse.stop();
    running.pop();
  });
});
