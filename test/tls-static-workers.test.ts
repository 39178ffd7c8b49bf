import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { loadStaticCertificates, type StaticCacheStats } from '../src/tls/certificates.js';
import { CertificateError } from '../src/tls/pem.js';
import { FileStorage } from '../src/tls/storage.js';
import { makeCA, makeCertificate, writeCertificateFiles } from './helpers/certs.js';

type Pair = { readonly cert: string; readonly key: string };

describe('static certificates: verification in worker processes', () => {
  let folder = '';
  const pairs: Pair[] = [];

  before(async () => {
    folder = await mkdtemp(join(tmpdir(), 'gatehouse-static-workers-'));
    const ca = makeCA({ name: 'Workers Test CA' });
    for (let i = 0; i < 12; i++) {
      const leaf = makeCertificate({ names: [`w${i}.test`], issuer: ca });
      const pair = { cert: join(folder, `w${i}.crt`), key: join(folder, `w${i}.key`) };
      await writeFile(pair.cert, leaf.cert + ca.cert); // the same chain block in every file
      await writeFile(pair.key, leaf.key);
      pairs.push(pair);
    }
  });
  after(() => rm(folder, { recursive: true, force: true }));

  test('two workers give the same certificates, in the same order, as this process', async () => {
    const inline = await loadStaticCertificates(pairs, { workers: 0 });
    const parallel = await loadStaticCertificates(pairs, { workers: 2 });
    assert.deepEqual(parallel, inline);
    assert.deepEqual(parallel.map((c) => c.names[0]), pairs.map((_, i) => `w${i}.test`));
    assert.equal(parallel[5]!.issuer, 'Workers Test CA');
  });

  test('a key that belongs to another certificate is refused by a worker, naming the key file', async () => {
    const wrong = { cert: pairs[7]!.cert, key: pairs[3]!.key };
    const list = [...pairs.slice(0, 7), wrong, ...pairs.slice(8)];
    await assert.rejects(loadStaticCertificates(list, { workers: 2 }), (error: unknown) => {
      assert.ok(error instanceof CertificateError);
      assert.equal(error.code, 'GH_TLS_KEY_MISMATCH');
      assert.equal(error.file, pairs[3]!.key);
      assert.match(error.message, /^GH_TLS_KEY_MISMATCH: .*w3\.key is not the private key of .*w7\.crt/);
      return true;
    });
  });

  test('with several bad pairs, the error is the first one in the list, as in this process', async () => {
    const broken = join(folder, 'broken.crt');
    await writeFile(broken, '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n');
    const list = [...pairs.slice(0, 9), { cert: broken, key: pairs[9]!.key }, { cert: pairs[10]!.cert, key: pairs[0]!.key }, pairs[11]!];
    const errorOf = async (workers: number) => {
      try {
        await loadStaticCertificates(list, { workers });
      } catch (error) {
        return error as CertificateError;
      }
      assert.fail('the load was accepted');
    };
    const inWorkers = await errorOf(2);
    const inProcess = await errorOf(0);
    assert.equal(inWorkers.code, 'GH_TLS_CERT_INVALID');
    assert.equal(inWorkers.file, broken);
    assert.equal(inWorkers.message, inProcess.message);
  });

  test('a bad pair before an unreadable file is the error reported; an unreadable file alone names itself', async () => {
    const missing = join(folder, 'missing.key');
    const wrong = { cert: pairs[1]!.cert, key: pairs[2]!.key };
    await assert.rejects(loadStaticCertificates([pairs[0]!, wrong, { cert: pairs[4]!.cert, key: missing }], { workers: 2 }), { code: 'GH_TLS_KEY_MISMATCH' });
    await assert.rejects(loadStaticCertificates([...pairs, { cert: pairs[4]!.cert, key: missing }], { workers: 2 }), (error: unknown) => {
      assert.ok(error instanceof CertificateError);
      assert.equal(error.code, 'GH_TLS_FILE_UNREADABLE');
      assert.equal(error.file, missing);
      return true;
    });
  });

  test('pairs verified in workers are recorded in the cache of verified pairs', async () => {
    const storage = new FileStorage(join(folder, 'storage'));
    let stats: StaticCacheStats | undefined;
    const first = await loadStaticCertificates(pairs, { storage, workers: 2, onCacheStats: (s) => { stats = s; } });
    assert.deepEqual(stats, { hits: 0, misses: 12, dropped: 0, written: true });
    const second = await loadStaticCertificates(pairs, { storage, workers: 2, onCacheStats: (s) => { stats = s; } });
    assert.deepEqual(stats, { hits: 12, misses: 0, dropped: 0, written: false });
    assert.deepEqual(second, first);
  });

  test('a single pair file written for the test helpers still loads with workers', async () => {
    const single = await writeCertificateFiles(folder, makeCertificate({ names: ['single.test'] }), 'single');
    const [certificate] = await loadStaticCertificates([single, single], { workers: 2 });
    assert.deepEqual(certificate!.names, ['single.test']);
  });
});
