/**
 * ACME failure handling: a CA rejecting half the nonces (Pebble's PEBBLE_WFE_NONCEREJECT=50), an
 * unreachable CA (Pebble stopped) with backoff and recovery, and a rate-limited CA (429 with
 * Retry-After and a problem document).
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer as createHttpsServer, type Server as HttpsServer } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Backoff } from '../src/acme/backoff.js';
import { Http01Responder, TlsAlpnResponder } from '../src/acme/challenges.js';
import { AcmeError } from '../src/acme/errors.js';
import { AcmeIssuer, type AcmeIssuerOptions } from '../src/acme/manager.js';
import { parseRetryAfter } from '../src/acme/transport.js';
import type { Certificate } from '../src/tls/source.js';
import { FileStorage } from '../src/tls/storage.js';
import { captureLogger, selfSigned, startChallengeListeners, verifyServes, type ChallengeListeners } from './helpers/acme.js';
import { startPebble, type Pebble } from './helpers/pebble.js';

let pebble: Pebble;
let listeners: ChallengeListeners;
let folder: string;
const http01 = new Http01Responder();
const tlsAlpn = new TlsAlpnResponder();
const issuers: AcmeIssuer[] = [];
const servers: HttpsServer[] = [];

before(async () => {
  listeners = await startChallengeListeners(0, 0, http01, tlsAlpn);
  const { httpPort, tlsPort } = listeners;
  folder = await mkdtemp(join(tmpdir(), 'gatehouse-acme-resilience-'));
  pebble = await startPebble({ httpPort, tlsPort, env: { PEBBLE_WFE_NONCEREJECT: '50' } });
});

after(async () => {
  await Promise.allSettled(issuers.map((issuer) => issuer.close()));
  for (const server of servers) {
    server.closeAllConnections();
    server.close();
  }
  await listeners?.close();
  await pebble?.close();
  if (folder) await rm(folder, { recursive: true, force: true });
});

function issuer(storage: string, options: Partial<AcmeIssuerOptions> = {}): AcmeIssuer {
  const created = new AcmeIssuer({
    directory: pebble.directoryUrl,
    caBundle: pebble.caPem,
    agreeTos: true,
    storage: new FileStorage(join(folder, storage)),
    http01,
    tlsAlpn,
    challenges: ['http-01'],
    pollIntervalMs: 50,
    ...options,
  });
  issuers.push(created);
  return created;
}

describe('ACME failure handling', () => {
  it('issues while the CA rejects half of the nonces (badNonce is retried with a fresh nonce)', async () => {
    assert.match(pebble.logs(), /reject 50% of good nonces/);
    // acme-client fetches one nonce (HEAD /nonce-plz) per signed request and re-signs a rejected
    // one with the nonce of the error answer: more POSTs than HEADs means rejections were retried.
    // One issuance signs 8 requests, so with Pebble rejecting each at random with p = 1/2, one in
    // 256 issuances sees no rejection at all: issue again (new name, same account) until one was
    // rejected, at most 4 times (all four clean: p = 2^-32). Every issuance must succeed.
    const acme = issuer('nonces');
    const counts = () => {
      const lines = pebble.logs().split('\n');
      return {
        posts: lines.filter((line) => / POST \//.test(line)).length,
        heads: lines.filter((line) => / HEAD \/nonce-plz/.test(line)).length,
      };
    };
    let seen = counts();
    for (let round = 1; round <= 4 && seen.posts <= seen.heads; round++) {
      const name = `nonce${round}.example.com`;
      await acme.manage([name]);
      const cert = await acme.obtain(name);
      assert.ok(cert);
      await verifyServes(cert, await pebble.issuingRoot(), name);
      seen = counts();
    }
    assert.ok(seen.posts > seen.heads, `expected badNonce retries (${seen.posts} POSTs, ${seen.heads} nonces fetched)`);
  });

  it('backs off while the CA is unreachable, then recovers when it is back', async () => {
    await pebble.stop();
    const logger = captureLogger();
    const delivered: Certificate[] = [];
    const acme = issuer('unreachable', { logger, backoff: { baseMs: 150, maxMs: 600 }, onCertificate: (cert) => delivered.push(cert) });
    await acme.manage(['back.example.com']);
    acme.start();
    const failures = () => logger.lines.filter((line) => line.msg === 'could not get certificate');
    const deadline = Date.now() + 20_000;
    while (failures().length < 3 && Date.now() < deadline) await sleep(20);
    const seen = failures();
    assert.ok(seen.length >= 3, `expected 3 failed attempts, saw ${seen.length}`);
    assert.equal(seen[0]!.code, 'GH_ACME_UNREACHABLE');
    assert.deepEqual(seen[0]!.names, ['back.example.com']);
    assert.deepEqual(seen.slice(0, 3).map((line) => line.attempt), [1, 2, 3]);
    const delays = seen.slice(0, 3).map((line) => line.retry_in_ms as number);
    assert.ok(delays[0]! <= 150 && delays[0]! > 100, `first delay ${delays[0]}`);
    assert.ok(delays[1]! > 250 && delays[1]! <= 300, `second delay ${delays[1]}`);
    assert.ok(delays[2]! > 550 && delays[2]! <= 600, `third delay ${delays[2]}`);
    // While backing off, a handshake does not hammer the CA.
    await assert.rejects(acme.obtain('back.example.com'), (error: AcmeError) => error.code === 'GH_ACME_BACKOFF' || error.code === 'GH_ACME_UNREACHABLE');

    await pebble.start();
    const recovered = Date.now() + 20_000;
    while (delivered.length === 0 && Date.now() < recovered) await sleep(20);
    assert.equal(delivered.length, 1, 'the loop obtained the certificate once the CA was back');
    await verifyServes(delivered[0]!, await pebble.issuingRoot(), 'back.example.com');
    acme.stop();
  });

  it('honours Retry-After and logs the problem document of a rate-limited CA', async () => {
    const tlsCert = await selfSigned('localhost');
    let requests = 0;
    const server = createHttpsServer(tlsCert, (req, res) => {
      requests++;
      res.writeHead(429, { 'content-type': 'application/problem+json', 'retry-after': '3600' });
      res.end(JSON.stringify({ type: 'urn:ietf:params:acme:error:rateLimited', detail: 'too many new orders recently' }));
    });
    servers.push(server);
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const { port } = server.address() as { port: number };
    const logger = captureLogger();
    const acme = issuer('ratelimited', {
      directory: `https://localhost:${port}/directory`,
      caBundle: tlsCert.cert,
      logger,
      backoff: { baseMs: 100, maxMs: 1000 },
    });
    await acme.manage(['limited.example.com']);
    await assert.rejects(acme.obtain('limited.example.com'), (error: AcmeError) => {
      assert.equal(error.code, 'GH_ACME_PROBLEM');
      assert.ok(error.is('rateLimited'));
      assert.equal(error.retryAfterMs, 3_600_000);
      return true;
    });
    const failure = logger.lines.find((line) => line.msg === 'could not get certificate')!;
    assert.deepEqual(failure.problem, { type: 'urn:ietf:params:acme:error:rateLimited', detail: 'too many new orders recently', status: 429 });
    assert.ok((failure.retry_in_ms as number) > 3_590_000, 'Retry-After beats the 100 ms backoff');
    const seen = requests;
    await assert.rejects(acme.obtain('limited.example.com'), (error: AcmeError) => error.code === 'GH_ACME_BACKOFF' && error.retryAt! > Date.now() + 3_500_000);
    assert.equal(requests, seen, 'no request during the backoff');
  });

  it('backoff doubles from the base to the maximum, then stays there', () => {
    const backoff = new Backoff({ baseMs: 60_000, maxMs: 6 * 3_600_000 });
    const delays = Array.from({ length: 12 }, () => backoff.fail('a.example.com', undefined, 0).retryAt);
    assert.deepEqual(delays.slice(0, 4), [60_000, 120_000, 240_000, 480_000]);
    assert.equal(delays[9], 6 * 3_600_000);
    assert.equal(delays[11], 6 * 3_600_000);
    backoff.succeed('a.example.com');
    assert.equal(backoff.get('a.example.com'), undefined);
    assert.equal(parseRetryAfter('120'), 120_000);
    assert.equal(parseRetryAfter(new Date(Date.now() + 60_000).toUTCString())! > 58_000, true);
    assert.equal(parseRetryAfter('soon'), undefined);
  });
});
