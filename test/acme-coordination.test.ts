/**
 * One order per name: concurrent calls in a process, two processes on one storage folder (storage
 * lock), the on-demand gate (`ask` endpoint, `allow` list, cached decisions), stale locks.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import { tmpdir, hostname } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, describe, it } from 'node:test';
import { request } from 'undici';
import { Http01Responder, TlsAlpnResponder } from '../src/acme/challenges.js';
import { AcmeError } from '../src/acme/errors.js';
import { acquireLock } from '../src/acme/lock.js';
import { AcmeIssuer, type AcmeIssuerOptions } from '../src/acme/manager.js';
import { OnDemandPolicy } from '../src/acme/on-demand.js';
import { FileStorage } from '../src/tls/storage.js';
import { captureLogger, verifyServes } from './helpers/acme.js';
import { freePort, startPebble, type Pebble } from './helpers/pebble.js';

let pebble: Pebble;
let folder: string;
let httpServer: Server;
let askServer: Server;
let askUrl: string;
const asked: string[] = [];
const http01 = new Http01Responder();
/** Ports of worker processes' HTTP-01 servers; Pebble's requests are forwarded to them. */
const workerPorts: number[] = [];
const children = new Set<ChildProcess>();
const issuers: AcmeIssuer[] = [];

before(async () => {
  const [httpPort, tlsPort] = [await freePort(), await freePort()];
  folder = await mkdtemp(join(tmpdir(), 'gatehouse-acme-coordination-'));
  pebble = await startPebble({ httpPort, tlsPort });
  // HTTP-01: this process's tokens first, then each worker process's.
  httpServer = createServer(async (req, res) => {
    const local = http01.handle(req.url);
    if (local !== undefined) return void res.writeHead(200).end(local);
    for (const port of workerPorts) {
      const answer = await request(`http://127.0.0.1:${port}${req.url}`);
      const body = await answer.body.text();
      if (answer.statusCode === 200) return void res.writeHead(200).end(body);
    }
    res.writeHead(404).end();
  });
  httpServer.listen(httpPort, '127.0.0.1');
  askServer = createServer((req, res) => {
    const domain = new URL(req.url!, 'http://x').searchParams.get('domain') ?? '';
    asked.push(domain);
    if (domain === 'slow.example.com') return; // never answers
    res.writeHead(domain.startsWith('allowed') ? 200 : 403).end();
  });
  askServer.listen(0, '127.0.0.1');
  await Promise.all([once(httpServer, 'listening'), once(askServer, 'listening')]);
  askUrl = `http://127.0.0.1:${(askServer.address() as { port: number }).port}/check?token=abc`;
});

after(async () => {
  for (const child of children) {
    try {
      if (child.pid !== undefined && child.exitCode === null) process.kill(child.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  await Promise.allSettled(issuers.map((issuer) => issuer.close()));
  for (const server of [httpServer, askServer]) {
    server?.closeAllConnections();
    server?.close();
  }
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
    tlsAlpn: new TlsAlpnResponder(),
    challenges: ['http-01'],
    pollIntervalMs: 50,
    ...options,
  });
  issuers.push(created);
  return created;
}

interface Worker {
  readonly child: ChildProcess;
  next(): Promise<Record<string, unknown>>;
}

function spawnWorker(settings: object): Worker {
  const child = spawn(process.execPath, ['--import', 'tsx', join(import.meta.dirname, 'helpers', 'acme-worker.ts'), JSON.stringify(settings)], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  children.add(child);
  const lines = createInterface({ input: child.stdout! });
  const queue: string[] = [];
  const waiting: Array<(line: string) => void> = [];
  lines.on('line', (line) => {
    const waiter = waiting.shift();
    if (waiter) waiter(line);
    else queue.push(line);
  });
  return {
    child,
    next: () => new Promise((resolve, reject) => {
      const line = queue.shift();
      if (line !== undefined) return resolve(JSON.parse(line));
      const onExit = (code: number | null) => reject(new Error(`worker exited with ${code} before answering`));
      child.once('exit', onExit);
      waiting.push((text) => {
        child.removeListener('exit', onExit);
        resolve(JSON.parse(text));
      });
    }),
  };
}

describe('one order per name', () => {
  it('concurrent obtain() calls for a name share one order', async () => {
    const acme = issuer('concurrent');
    await acme.manage(['together.example.com']);
    const results = await Promise.all(Array.from({ length: 8 }, () => acme.obtain('together.example.com')));
    assert.equal(acme.orderCount, 1);
    assert.ok(results.every((cert) => cert && cert.cert === results[0]!.cert));
  });

  it('two processes on one storage folder place exactly one order and serve the same certificate', async () => {
    const settings = { directory: pebble.directoryUrl, caFile: pebble.caFile, storage: join(folder, 'shared'), name: 'shared.example.com' };
    const ordersBefore = pebble.orderCount();
    const workers = [spawnWorker(settings), spawnWorker(settings)];
    for (const worker of workers) {
      const ready = await worker.next();
      workerPorts.push(ready.port as number);
    }
    for (const worker of workers) worker.child.stdin!.write('go\n');
    const results = await Promise.all(workers.map((worker) => worker.next()));
    await Promise.all(workers.map((worker) => (worker.child.exitCode === null ? once(worker.child, 'exit') : undefined)));
    assert.equal(results.reduce((sum, result) => sum + (result.orders as number), 0), 1, JSON.stringify(results));
    assert.equal(pebble.orderCount() - ordersBefore, 1);
    assert.ok(results[0]!.fingerprint);
    assert.equal(results[0]!.fingerprint, results[1]!.fingerprint);
    // Usually one of them logged that it waited for the other's lock; if the second started only
    // after the first had finished, it found the certificate in storage. Either way: one order.
  });

  it('a lock whose holder died (pid gone) or went silent (stale) is broken', async () => {
    const storage = new FileStorage(join(folder, 'locks'));
    const dead = spawn(process.execPath, ['-e', '0']);
    await once(dead, 'exit');
    const now = Date.now();
    await storage.store('locks/a.lock', JSON.stringify({ pid: dead.pid, hostname: hostname(), token: 'x', created: now, updated: now }));
    const started = Date.now();
    const lock = await acquireLock(storage, 'locks/a.lock', { pollIntervalMs: 20, timeoutMs: 5000 });
    assert.ok(Date.now() - started < 1000);
    await lock.release();
    assert.equal(await storage.load('locks/a.lock'), undefined, 'released locks are removed');

    await storage.store('locks/b.lock', JSON.stringify({ pid: process.ppid, hostname: 'elsewhere', token: 'y', created: now, updated: now - 500 }));
    const stale = await acquireLock(storage, 'locks/b.lock', { staleAfterMs: 300, pollIntervalMs: 20, timeoutMs: 5000 });
    await stale.release();

    await storage.store('locks/c.lock', JSON.stringify({ pid: process.ppid, hostname: 'elsewhere', token: 'z', created: now, updated: now }));
    await assert.rejects(acquireLock(storage, 'locks/c.lock', { pollIntervalMs: 20, timeoutMs: 200 }), (error: AcmeError) => error.code === 'GH_ACME_LOCK_TIMEOUT');
  });
});

describe('on-demand TLS', () => {
  it('orders names the ask endpoint allows, refuses the others, shares one order per name', async () => {
    const logger = captureLogger();
    const onDemand = new OnDemandPolicy({ ask: askUrl, askTimeoutMs: 300 });
    const acme = issuer('on-demand', { onDemand, logger });
    asked.length = 0;
    const handshakes = await Promise.all(Array.from({ length: 5 }, () => acme.obtain('allowed.example.com')));
    assert.ok(handshakes[0]);
    assert.ok(handshakes.every((cert) => cert?.cert === handshakes[0]!.cert));
    await verifyServes(handshakes[0]!, await pebble.issuingRoot(), 'allowed.example.com');
    assert.deepEqual(asked, ['allowed.example.com'], 'one ask for five concurrent handshakes');
    assert.equal(acme.orderCount, 1);

    assert.equal(await acme.obtain('refused.example.com'), undefined);
    assert.equal(await acme.obtain('refused.example.com'), undefined);
    assert.deepEqual(asked, ['allowed.example.com', 'refused.example.com'], 'the refusal is cached');
    assert.equal(acme.orderCount, 1, 'nothing ordered for a refused name');
    assert.ok(logger.lines.some((line) => line.msg === 'on-demand certificate refused'));

    const started = Date.now();
    assert.equal(await acme.obtain('slow.example.com'), undefined, 'an ask that times out refuses');
    assert.ok(Date.now() - started < 2000);
  });

  it('the allow list needs no ask endpoint; without any gate, unlisted names are refused', async () => {
    const policy = new OnDemandPolicy({ allow: ['*.apps.example.com', 'exact.example.com'] });
    assert.equal(await policy.allows('one.apps.example.com'), true);
    assert.equal(await policy.allows('exact.example.com'), true);
    assert.equal(await policy.allows('two.levels.apps.example.com'), false);
    assert.equal(await policy.allows('other.example.com'), false);
    const ungated = issuer('ungated');
    assert.equal(await ungated.obtain('anything.example.com'), undefined);
    assert.equal(await ungated.obtain('10.0.0.1'), undefined);
    assert.equal(ungated.orderCount, 0);
  });
});
