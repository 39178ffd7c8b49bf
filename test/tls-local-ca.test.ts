import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TLSSocket } from 'node:tls';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import { CertificateStore } from '../src/tls/certificates.js';
import { LocalCA } from '../src/tls/local-ca.js';
import { splitPemChain } from '../src/tls/pem.js';
import { FileStorage } from '../src/tls/storage.js';

const run = promisify(execFile);

describe('LocalCA', () => {
  let folder = '';
  let ca: LocalCA;
  before(async () => {
    folder = await mkdtemp(join(tmpdir(), 'gatehouse-ca-'));
    ca = await LocalCA.load(new FileStorage(folder));
  });
  after(() => rm(folder, { recursive: true, force: true }));

  test('keeps root and intermediate in storage: keys 0600, reused by a second load', async () => {
    for (const key of ['ca/root.key', 'ca/intermediate.key']) {
      assert.equal((await stat(join(folder, key))).mode & 0o777, 0o600, key);
    }
    assert.equal((await stat(join(folder, 'ca/root.crt'))).mode & 0o777, 0o644);
    assert.equal(await readFile(join(folder, 'ca/root.crt'), 'utf8'), ca.rootCertificatePem);
    const rootKey = await readFile(join(folder, 'ca/root.key'), 'utf8');
    const intermediate = await readFile(join(folder, 'ca/intermediate.crt'), 'utf8');

    const again = await LocalCA.load(new FileStorage(folder));
    assert.equal(again.rootCertificatePem, ca.rootCertificatePem);
    assert.equal(await readFile(join(folder, 'ca/root.key'), 'utf8'), rootKey);
    assert.equal(await readFile(join(folder, 'ca/intermediate.crt'), 'utf8'), intermediate);
    // A leaf from the second instance chains to the first instance's root.
    const leaf = await again.obtain('reuse.localhost');
    const [leafPem, intermediatePem] = splitPemChain(leaf!.cert);
    assert.ok(new X509Certificate(leafPem!).verify(new X509Certificate(intermediatePem!).publicKey));
    assert.ok(new X509Certificate(intermediatePem!).verify(new X509Certificate(ca.rootCertificatePem).publicKey));
  });

  test('two loads racing on an empty folder end with one CA', async () => {
    const empty = await mkdtemp(join(tmpdir(), 'gatehouse-ca-race-'));
    try {
      const loaded = await Promise.all([1, 2, 3].map(() => LocalCA.load(new FileStorage(empty))));
      assert.equal(new Set(loaded.map((c) => c.rootCertificatePem)).size, 1);
      assert.equal(await readFile(join(empty, 'ca/root.crt'), 'utf8'), loaded[0]!.rootCertificatePem);
      const leaves = await Promise.all(loaded.map((c) => c.obtain('race.localhost')));
      const root = new X509Certificate(loaded[0]!.rootCertificatePem);
      for (const leaf of leaves) {
        assert.ok(new X509Certificate(splitPemChain(leaf!.cert)[1]!).verify(root.publicKey));
      }
    } finally {
      await rm(empty, { recursive: true, force: true });
    }
  });

  test('issues leaves: IP SANs for IP literals, 7-day lifetime, shared and cached obtain', async () => {
    const [a, b] = await Promise.all([ca.obtain('App.Localhost.'), ca.obtain('app.localhost')]);
    assert.equal(a, b, 'concurrent obtains for one name share one issuance');
    assert.equal(await ca.obtain('app.localhost'), a, 'cached until near expiry');
    assert.deepEqual(a!.names, ['app.localhost']);
    assert.equal(a!.source, 'internal');
    const lifetime = a!.notAfter.getTime() - Date.now();
    assert.ok(lifetime > 6.9 * 86_400_000 && lifetime <= 7 * 86_400_000, `lifetime ${lifetime} ms`);

    const ip = await ca.obtain('127.0.0.1');
    assert.equal(new X509Certificate(ip!.cert).subjectAltName, 'IP Address:127.0.0.1');
    const ipv6 = await ca.obtain('[::1]');
    assert.deepEqual(ipv6!.names, ['::1']);
    assert.equal(await ca.obtain(''), undefined);
    assert.equal(await ca.obtain('bad name!'), undefined);
  });

  test('an intermediate near its end is re-signed with the same key; leaves never outlive it', async () => {
    const short = await mkdtemp(join(tmpdir(), 'gatehouse-ca-short-'));
    try {
      // 2-minute intermediate renewed when 99.9% of its life is left: every issue re-signs it.
      const storage = new FileStorage(short);
      const shortCA = await LocalCA.load(storage, { intermediateLifetime: 60_000, renewWindow: 0.999 });
      const key = await readFile(join(short, 'ca/intermediate.key'), 'utf8');
      const first = await shortCA.issue(['one.localhost']);
      await new Promise((resolve) => setTimeout(resolve, 1_100)); // validity has 1 s resolution
      const second = await shortCA.issue(['two.localhost']);
      const [, firstIntermediate] = splitPemChain(first.cert);
      const [, secondIntermediate] = splitPemChain(second.cert);
      assert.notEqual(firstIntermediate, secondIntermediate);
      assert.equal(await readFile(join(short, 'ca/intermediate.key'), 'utf8'), key);
      assert.equal((await readFile(join(short, 'ca/intermediate.crt'), 'utf8')).trim(), secondIntermediate);
      const intermediate = new X509Certificate(secondIntermediate!);
      assert.ok(intermediate.verify(new X509Certificate(shortCA.rootCertificatePem).publicKey));
      assert.ok(second.notAfter.getTime() <= Date.parse(intermediate.validTo));
    } finally {
      await rm(short, { recursive: true, force: true });
    }
  });

  test('openssl verifies a leaf against root.crt', async () => {
    const leaf = await ca.issue(['svc.localhost', '10.0.0.1']);
    const chain = join(folder, 'chain.pem');
    await writeFile(chain, leaf.cert);
    const { stdout } = await run('openssl', ['verify', '-CAfile', join(folder, 'ca/root.crt'), '-untrusted', chain, '-purpose', 'sslserver', chain]);
    assert.match(stdout, /: OK/);
  });
});

describe('LocalCA behind the HTTPS listener', () => {
  let folder = '';
  let server: https.Server | undefined;
  let port = 0;
  let root = '';

  before(async () => {
    folder = await mkdtemp(join(tmpdir(), 'gatehouse-ca-https-'));
    const ca = await LocalCA.load(new FileStorage(folder));
    root = await readFile(join(folder, 'ca/root.crt'), 'utf8');
    const store = new CertificateStore();
    store.setPolicy((name) => (name === 'localhost' || name.endsWith('.localhost') ? { source: ca, waitInHandshake: true } : undefined));
    store.setDefault(() => ca.issue(['localhost', '127.0.0.1', '::1']));
    await store.refreshDefault();
    server = https.createServer(store.serverOptions(), (request, response) => response.end(`hello ${request.headers.host}`));
    store.attach(server);
    await new Promise<void>((resolve) => server!.listen(0, '127.0.0.1', resolve));
    port = (server.address() as AddressInfo).port;
  });
  after(async () => {
    if (server?.listening) {
      server.closeAllConnections();
      await new Promise((resolve) => server!.close(resolve));
    }
    await rm(folder, { recursive: true, force: true });
  });

  /** GET with a client that trusts only the local CA's root and checks the name (Node's default
   * check, RFC 6125: against the SNI name, or the IP address when there is none). */
  function get(host: string): Promise<{ status: number; body: string; names: string }> {
    return new Promise((resolve, reject) => {
      const request = https.get({ host: '127.0.0.1', port, servername: host === '127.0.0.1' ? undefined : host, headers: { host }, ca: root, agent: false, rejectUnauthorized: true }, (response) => {
        let body = '';
        response.setEncoding('utf8');
        response.on('data', (chunk: string) => { body += chunk; });
        response.on('end', () => resolve({ status: response.statusCode!, body, names: (response.socket as TLSSocket).getPeerX509Certificate()?.subjectAltName ?? '' }));
      });
      request.on('error', reject);
    });
  }

  test('a client trusting only the root verifies localhost, app.localhost and 127.0.0.1', async () => {
    const plain = await get('localhost');
    assert.equal(plain.status, 200);
    assert.equal(plain.body, 'hello localhost');
    const app = await get('app.localhost');
    assert.equal(app.body, 'hello app.localhost');
    assert.equal(app.names, 'DNS:app.localhost');
    const ip = await get('127.0.0.1'); // no SNI: the default certificate, with IP SANs
    assert.equal(ip.body, 'hello 127.0.0.1');
    assert.match(ip.names, /IP Address:127\.0\.0\.1/);
  });

  test('a client trusting another root refuses the leaf', async () => {
    const other = await mkdtemp(join(tmpdir(), 'gatehouse-ca-other-'));
    try {
      const stranger = await LocalCA.load(new FileStorage(other));
      await assert.rejects(new Promise((resolve, reject) => {
        https.get({ host: '127.0.0.1', port, servername: 'localhost', ca: stranger.rootCertificatePem, agent: false }, resolve).on('error', reject);
      }), { code: 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY' });
    } finally {
      await rm(other, { recursive: true, force: true });
    }
  });
});
