/**
 * ACME issuance against a real Pebble: HTTP-01, TLS-ALPN-01 (after a failing HTTP-01), reuse of
 * stored certificates across instances, renewal by the background loop.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Http01Responder, TlsAlpnResponder } from '../src/acme/challenges.js';
import { AcmeIssuer, type AcmeIssuerOptions } from '../src/acme/manager.js';
import type { Certificate } from '../src/tls/source.js';
import { FileStorage } from '../src/tls/storage.js';
import { captureLogger, startChallengeListeners, verifyServes, type ChallengeListeners } from './helpers/acme.js';
import { startPebble, type Pebble } from './helpers/pebble.js';

let pebble: Pebble;
let listeners: ChallengeListeners;
let folder: string;
const http01 = new Http01Responder();
const tlsAlpn = new TlsAlpnResponder();
const issuers: AcmeIssuer[] = [];

before(async () => {
  listeners = await startChallengeListeners(0, 0, http01, tlsAlpn);
  const { httpPort, tlsPort } = listeners;
  folder = await mkdtemp(join(tmpdir(), 'gatehouse-acme-issuance-'));
  // One-hour certificates: a renew window of 0.9999 makes a fresh one due within a second.
  pebble = await startPebble({ httpPort, tlsPort, certificateValidityPeriod: 3600 });
});

after(async () => {
  await Promise.allSettled(issuers.map((issuer) => issuer.close()));
  await listeners?.close();
  await pebble?.close();
  if (folder) await rm(folder, { recursive: true, force: true });
});

function issuer(options: Partial<AcmeIssuerOptions> = {}): AcmeIssuer {
  const created = new AcmeIssuer({
    directory: pebble.directoryUrl,
    caBundle: pebble.caPem,
    agreeTos: true,
    email: 'ops@example.com',
    storage: new FileStorage(join(folder, 'storage')),
    http01,
    tlsAlpn,
    pollIntervalMs: 50,
    backoff: { baseMs: 200, maxMs: 1000 },
    ...options,
  });
  issuers.push(created);
  return created;
}

async function waitFor(what: string, predicate: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
  }
}

describe('ACME issuance against Pebble', () => {
  let first: Certificate;

  it('obtains a certificate over HTTP-01 and stores it (key 0600, metadata)', async () => {
    const logger = captureLogger();
    const acme = issuer({ challenges: ['http-01'], logger });
    const name = 'http.example.com';
    assert.equal(await acme.obtain(name), undefined, 'a name no site manages is refused without on-demand');
    await acme.manage([name]);
    first = (await acme.obtain(name))!;
    assert.ok(first);
    assert.deepEqual(first.names, [name]);
    assert.equal(first.source, 'acme');
    assert.match(first.issuer, /Pebble Intermediate/);
    await verifyServes(first, await pebble.issuingRoot(), name);
    assert.ok(listeners.http01Answers > 0);
    assert.equal(acme.handleHttp01('/.well-known/acme-challenge/unknown'), undefined, 'tokens are removed after validation');
    assert.equal(acme.orderCount, 1);
    assert.equal(pebble.orderCount(), 1);

    const host = new URL(pebble.directoryUrl).host.replace(':', '-');
    const base = join(folder, 'storage', 'certificates', host, name, name);
    assert.equal((await stat(`${base}.key`)).mode & 0o777, 0o600);
    assert.equal((await stat(join(folder, 'storage', 'acme', host, 'account.key'))).mode & 0o777, 0o600);
    const storage = new FileStorage(join(folder, 'storage'));
    const meta = JSON.parse((await storage.load(`certificates/${host}/${name}/${name}.json`))!.toString());
    assert.deepEqual(meta.names, [name]);
    assert.equal(meta.directory, pebble.directoryUrl);
    assert.equal(meta.not_after, first.notAfter.toISOString());

    const messages = logger.lines.filter((line) => line.name === 'tls.obtain').map((line) => line.msg);
    assert.ok(messages.includes('obtaining certificate'));
    assert.ok(messages.includes('certificate obtained'));
    assert.ok(logger.lines.some((line) => line.msg === 'renewal scheduled' && line.name === 'tls.renew'));
    assert.ok(logger.lines.every((line) => line.msg === undefined || !('names' in line) || Array.isArray(line.names)));
  });

  it('a second instance on the same storage reuses the stored certificate without an order', async () => {
    const delivered: Certificate[] = [];
    const acme = issuer({ onCertificate: (cert) => delivered.push(cert) });
    const ordersBefore = pebble.orderCount();
    await acme.manage(['http.example.com']);
    assert.equal(delivered.length, 1, 'manage() hands the stored certificate to onCertificate');
    const again = await acme.obtain('HTTP.example.com.');
    assert.equal(again?.cert, first.cert);
    assert.equal(acme.orderCount, 0);
    assert.equal(pebble.orderCount(), ordersBefore);
  });

  it('falls back to TLS-ALPN-01 when HTTP-01 fails, and passes other TLS clients through', async () => {
    const logger = captureLogger();
    // HTTP-01 tokens go to a responder no listener consults: Pebble gets 404 and fails the challenge.
    const acme = issuer({ challenges: ['http-01', 'tls-alpn-01'], http01: new Http01Responder(), logger });
    const name = 'alpn.example.com';
    await acme.manage([name]);
    const passedBefore = listeners.passedThrough;
    const cert = (await acme.obtain(name))!;
    await verifyServes(cert, await pebble.issuingRoot(), name);
    assert.equal(acme.orderCount, 2, 'one order per challenge type');
    const failed = logger.lines.find((line) => line.msg === 'http-01 challenge failed; trying tls-alpn-01');
    assert.ok(failed, 'the failed challenge is logged');
    const problem = failed.problem as { type: string; detail: string; status: number };
    assert.match(problem.type, /^urn:ietf:params:acme:error:/);
    assert.ok(problem.detail);
    assert.equal(tlsAlpn.hasPending(), false, 'challenge certificates are removed afterwards');
    assert.equal(listeners.passedThrough, passedBefore, 'validation connections never reached the real server');
  });

  it('renews a due certificate in the background and hands the new one to onCertificate', async () => {
    const delivered: Certificate[] = [];
    const logger = captureLogger();
    const acme = issuer({ renewWindow: 0.9999, onCertificate: (cert) => delivered.push(cert), logger, checkIntervalMs: 60_000 });
    await acme.manage(['http.example.com']); // the stored certificate is now due
    assert.equal(delivered.length, 1);
    assert.equal(delivered[0]!.cert, first.cert);
    acme.start();
    await waitFor('the renewed certificate', () => delivered.length >= 2);
    acme.stop();
    const renewed = delivered[1]!;
    assert.notEqual(renewed.cert, first.cert);
    assert.ok(renewed.notBefore.getTime() >= first.notBefore.getTime());
    await verifyServes(renewed, await pebble.issuingRoot(), 'http.example.com');
    assert.ok(logger.lines.some((line) => line.msg === 'certificate renewed' && (line.names as string[])[0] === 'http.example.com'));
    // The renewal is stored: a fresh instance with the default window loads it.
    const later = issuer();
    await later.manage(['http.example.com']);
    const loaded = await later.obtain('http.example.com');
    assert.ok(loaded && loaded.notBefore.getTime() >= renewed.notBefore.getTime());
    assert.equal(later.orderCount, 0);
  });
});
