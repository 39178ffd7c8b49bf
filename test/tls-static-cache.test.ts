import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { VERIFIED_PAIRS_KEY, loadStaticCertificates, type StaticCacheStats } from '../src/tls/certificates.js';
import { CertificateError } from '../src/tls/pem.js';
import { FileStorage } from '../src/tls/storage.js';
import { makeCA, makeCertificate, writeCertificateFiles } from './helpers/certs.js';

type Pair = { readonly cert: string; readonly key: string };

/** Load with the cache in `storage` and return the certificates and what the cache did. */
async function load(pairs: readonly Pair[], storage: FileStorage, warnings: string[] = []) {
  let stats: StaticCacheStats | undefined;
  const certificates = await loadStaticCertificates(pairs, {
    storage,
    logger: { warn: (_fields, message) => warnings.push(message) },
    onCacheStats: (s) => { stats = s; },
  });
  assert.ok(stats, 'onCacheStats was called');
  return { certificates, stats };
}

async function cachedDigests(storage: FileStorage): Promise<string[]> {
  const file = JSON.parse((await storage.load(VERIFIED_PAIRS_KEY))!.toString('utf8')) as { pairs: Record<string, unknown> };
  return Object.keys(file.pairs).sort();
}

describe('static certificates: cache of verified pairs', () => {
  let folder = '';
  let a: Pair;
  let b: Pair;
  let chained: Pair;

  before(async () => {
    folder = await mkdtemp(join(tmpdir(), 'gatehouse-static-cache-'));
    a = await writeCertificateFiles(folder, makeCertificate({ names: ['a.test', '*.a.test', '127.0.0.1'] }), 'a');
    b = await writeCertificateFiles(folder, makeCertificate({ names: ['b.test'] }), 'b');
    const ca = makeCA({ name: 'Cache Test CA' });
    const leaf = makeCertificate({ names: ['chain.test'], issuer: ca });
    chained = { cert: join(folder, 'chain.crt'), key: join(folder, 'chain.key') };
    await writeFile(chained.cert, leaf.cert + ca.cert);
    await writeFile(chained.key, leaf.key);
  });
  after(() => rm(folder, { recursive: true, force: true }));

  test('a restart builds every pair from the cache, equal to what OpenSSL read, and writes nothing', async () => {
    const storage = new FileStorage(join(folder, 'storage-restart'));
    const first = await load([a, b, chained], storage);
    assert.deepEqual(first.stats, { hits: 0, misses: 3, dropped: 0, written: true });
    const file = storage.pathOf(VERIFIED_PAIRS_KEY);
    assert.equal((await stat(file)).mode & 0o777, 0o600, 'owner-only, like the keys beside it');
    const written = await readFile(file, 'utf8');

    const second = await load([a, b, chained], storage);
    assert.deepEqual(second.stats, { hits: 3, misses: 0, dropped: 0, written: false });
    assert.deepEqual(second.certificates, first.certificates, 'names, dates, issuer, chain and key as verified');
    assert.ok(Object.isFrozen(second.certificates[0]) && Object.isFrozen(second.certificates[0]!.names));
    assert.equal(second.certificates[2]!.issuer, 'Cache Test CA');
    assert.equal(await readFile(file, 'utf8'), written, 'unchanged files: the cache is not rewritten');
  });

  test('a key file replaced by a mismatching key is verified again and refused, though the old pair was cached', async () => {
    const storage = new FileStorage(join(folder, 'storage-mismatch'));
    const pair = await writeCertificateFiles(folder, makeCertificate({ names: ['swap.test'] }), 'swap');
    assert.deepEqual((await load([pair, b], storage)).stats, { hits: 0, misses: 2, dropped: 0, written: true });
    const before = await cachedDigests(storage);

    await writeFile(pair.key, makeCertificate({ names: ['other.test'] }).key);
    await assert.rejects(load([pair, b], storage), (error: unknown) => {
      assert.ok(error instanceof CertificateError);
      assert.equal(error.code, 'GH_TLS_KEY_MISMATCH');
      assert.ok(error.message.includes(pair.key) && error.message.includes(pair.cert), error.message);
      return true;
    });
    assert.deepEqual(await cachedDigests(storage), before, 'a failed load writes nothing');
  });

  test('a corrupt cache file is ignored, reported, and rebuilt', async () => {
    const storage = new FileStorage(join(folder, 'storage-corrupt'));
    await load([a, b], storage);
    const file = storage.pathOf(VERIFIED_PAIRS_KEY);
    const good = JSON.parse(await readFile(file, 'utf8')) as { pairs: Record<string, { names: unknown }> };

    // Not JSON at all.
    await writeFile(file, '{"format":1,"pairs":{"ab');
    const warnings: string[] = [];
    const truncated = await load([a, b], storage, warnings);
    assert.deepEqual(truncated.stats, { hits: 0, misses: 2, dropped: 0, written: true });
    assert.equal(warnings.length, 1);
    assert.match(warnings[0]!, /corrupt/);
    assert.deepEqual(truncated.certificates.map((c) => c.names[0]), ['a.test', 'b.test']);

    // Valid JSON, one entry of the wrong shape: the whole file is distrusted, the good entry too.
    const [, second] = Object.keys(good.pairs);
    good.pairs[second!]!.names = 'b.test';
    await writeFile(file, JSON.stringify(good));
    const shape = await load([a, b], storage, warnings);
    assert.deepEqual(shape.stats, { hits: 0, misses: 2, dropped: 0, written: true });
    assert.equal(warnings.length, 2);

    // Rebuilt: the next load hits again.
    assert.deepEqual((await load([a, b], storage)).stats, { hits: 2, misses: 0, dropped: 0, written: false });
  });

  test('entries of certificates no longer configured are dropped', async () => {
    const storage = new FileStorage(join(folder, 'storage-drop'));
    await load([a, b, chained], storage);
    assert.equal((await cachedDigests(storage)).length, 3);

    const fewer = await load([a, chained], storage);
    assert.deepEqual(fewer.stats, { hits: 2, misses: 0, dropped: 1, written: true });
    assert.equal((await cachedDigests(storage)).length, 2);
    assert.deepEqual((await load([b], storage)).stats, { hits: 0, misses: 1, dropped: 2, written: true });
    assert.equal((await cachedDigests(storage)).length, 1);
  });
});
