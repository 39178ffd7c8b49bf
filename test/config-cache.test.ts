import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import { CONFIG_CACHE_FOLDER, ConfigError, loadConfigFile, storageHint, type ConfigCacheResult } from '../src/config/load.js';

const run = promisify(execFile);
const CLI = join(import.meta.dirname, '..', 'dist', 'cli.js');

const configText = (storage: string, port: number) => [
  'tls:',
  `  storage: ${storage}`,
  'log: { level: warn }',
  'sites:',
  `  - { hosts: [a.localhost], routes: [{ path: /, upstreams: ["http://127.0.0.1:${port}"] }] }`,
  `  - { hosts: [b.localhost], routes: [{ path: /b/, upstreams: ["http://127.0.0.1:${port + 1}"] }] }`,
].join('\n') + '\n';

async function load(file: string) {
  let result: ConfigCacheResult | undefined;
  const config = await loadConfigFile(file, { cache: true, onCacheResult: (r) => { result = r; } });
  assert.ok(result);
  return { config, result };
}

describe('config: cache of the parsed config file', () => {
  let folder = '';
  before(async () => { folder = await mkdtemp(join(tmpdir(), 'gatehouse-config-cache-')); });
  after(() => rm(folder, { recursive: true, force: true }));

  test('an unchanged file is built from the cache, equal to a real parse; a changed byte is parsed again', async () => {
    const file = join(folder, 'a.yaml');
    await writeFile(file, configText('./store-a', 8000));
    const first = await load(file);
    assert.deepEqual(first.result, { hit: false, written: true });
    const cacheFiles = await readdir(join(folder, 'store-a', CONFIG_CACHE_FOLDER));
    assert.equal(cacheFiles.length, 1);

    const second = await load(file);
    assert.deepEqual(second.result, { hit: true, written: false });
    assert.deepEqual(second.config, first.config);
    assert.deepEqual(second.config, await loadConfigFile(file), 'the same as without the cache');
    assert.ok(Object.isFrozen(second.config.sites[0]));

    await writeFile(file, configText('./store-a', 9000));
    const third = await load(file);
    assert.deepEqual(third.result, { hit: false, written: true });
    assert.equal(third.config.sites[0]!.routes[0]!.upstreams[0]!.url, 'http://127.0.0.1:9000');
    assert.deepEqual((await load(file)).result, { hit: true, written: false });
  });

  test('a changed file with an error gets the file:line of the real YAML, and the cache is not used', async () => {
    const file = join(folder, 'b.yaml');
    await writeFile(file, configText('./store-b', 8000));
    await load(file);
    await writeFile(file, configText('./store-b', 8000).replace('path: /b/', 'path: b'));
    await assert.rejects(loadConfigFile(file, { cache: true }), (error: unknown) => {
      assert.ok(error instanceof ConfigError);
      assert.match(error.message, /sites\[1\]\.routes\[0\]\.path: .*\(.*b\.yaml:6\)/);
      return true;
    });
    await writeFile(file, configText('./store-b', 8000) + 'sites: []\n');
    await assert.rejects(loadConfigFile(file, { cache: true }), /YAML: .*(unique|duplicate).*b\.yaml:7/i);
  });

  test('a corrupt, tampered or foreign cache file is ignored and rebuilt', async () => {
    const file = join(folder, 'c.yaml');
    await writeFile(file, configText('./store-c', 8000));
    await load(file);
    const cacheDir = join(folder, 'store-c', CONFIG_CACHE_FOLDER);
    const [name] = await readdir(cacheDir);
    const path = join(cacheDir, name!);
    const original = await readFile(path, 'utf8');

    await writeFile(path, original.slice(0, 100));
    assert.deepEqual((await load(file)).result, { hit: false, written: true });

    // Another config in the cached value, same digest: it still has to validate, and does here,
    // so the digest is what protects: change it and the entry is not used.
    const entry = JSON.parse(original) as { sha256: string; yaml: string };
    await writeFile(path, JSON.stringify({ ...entry, sha256: '0'.repeat(64) }));
    assert.deepEqual((await load(file)).result, { hit: false, written: true });
    await writeFile(path, JSON.stringify({ ...entry, yaml: '0.0.1' }));
    assert.deepEqual((await load(file)).result, { hit: false, written: true });

    // A cached value that no longer validates is parsed again (errors need the real lines).
    await writeFile(path, JSON.stringify({ ...entry, config: { sites: 'nope' } }));
    const rebuilt = await load(file);
    assert.deepEqual(rebuilt.result, { hit: false, written: true });
    assert.equal(rebuilt.config.sites.length, 2);
  });

  test('the cache is written only where the next start looks for it', async () => {
    const file = join(folder, 'd.yaml');
    // tls.storage only after a long block the hint does not read: no cache file, the load still works.
    const filler = Array.from({ length: 3000 }, (_, i) => `  - { hosts: [f${i}.localhost], routes: [{ path: /, upstreams: ["http://127.0.0.1:8000"] }] }`).join('\n');
    await writeFile(file, `log: { level: warn }\nsites:\n${filler}\ntls:\n  storage: ./store-d\n`);
    assert.equal(storageHint(await readFile(file, 'utf8')), undefined);
    const { config, result } = await load(file);
    assert.deepEqual(result, { hit: false, written: false });
    assert.equal(config.sites.length, 3000);
    assert.equal(storageHint('tls:\n  storage: "./x y"\n  certificates: []\nsites: []\n'), './x y');
    assert.equal(storageHint('tls: { storage: ./z }\n'), './z');
    assert.equal(storageHint('tls:\n  # storage: /elsewhere\n  acme: {}\n'), undefined);
  });

  test('gatehouse validate parses every time and writes no cache; gatehouse run writes it', async () => {
    const file = join(folder, 'e.yaml');
    await writeFile(file, configText('./store-e', 8000));
    const { stdout } = await run(process.execPath, [CLI, 'validate', '--config', file]);
    assert.match(stdout, /valid \(2 sites\)/);
    await assert.rejects(readdir(join(folder, 'store-e', CONFIG_CACHE_FOLDER)), { code: 'ENOENT' });
    // run: a listen address that cannot be bound makes it exit after loading the config.
    await writeFile(file, configText('./store-e', 8000) + 'listen: { http: "192.0.2.1:1", https: "192.0.2.1:2" }\n');
    await run(process.execPath, [CLI, 'run', '--config', file]).catch(() => undefined);
    assert.equal((await readdir(join(folder, 'store-e', CONFIG_CACHE_FOLDER))).length, 1);
    // A broken file after a cached start: the CLI prints file:line from a real parse.
    await writeFile(file, configText('./store-e', 8000).replace('path: /b/', 'path: b'));
    const failed = await run(process.execPath, [CLI, 'run', '--config', file]).then(() => undefined, (error: { stderr: string; code: number }) => error);
    assert.ok(failed, 'refused');
    assert.equal(failed.code, 1);
    assert.match(failed.stderr, /GH_CONFIG_INVALID: sites\[1\]\.routes\[0\]\.path: .*e\.yaml:6\)/);
  });
});
