/**
 * Reloads parse the config in a worker thread (`loadConfigFileOffThread`): the same config and the
 * same file:line errors as a parse on the serving thread, and the serving thread stays free.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ConfigError, loadConfigFile, loadConfigFileOffThread } from '../src/config/load.ts';

describe('config: parsed off the serving thread', () => {
  let dir: string;
  before(async () => { dir = await mkdtemp(join(tmpdir(), 'gh-offthread-')); });
  after(async () => { await rm(dir, { recursive: true, force: true }); });

  async function write(name: string, text: string): Promise<string> {
    const file = join(dir, name);
    await writeFile(file, text);
    return file;
  }

  async function offThread(file: string): Promise<{ where: string[]; result: unknown }> {
    const where: string[] = [];
    try {
      return { where, result: await loadConfigFileOffThread(file, { onParsed: (w) => where.push(w) }) };
    } catch (error) {
      return { where, result: error };
    }
  }

  test('a valid file: parsed in the worker, the same frozen config as loadConfigFile gives', async () => {
    const sites = Array.from({ length: 200 }, (_, i) => `  - hosts: [site-${i}.test]\n    tls: "off"\n    routes:\n      - path: /api\n        strip_prefix: true\n        upstreams: ["http://127.0.0.1:${9000 + (i % 7)}"]\n`).join('');
    const file = await write('valid.yaml', `tls: { storage: ./store, certificates: [{ cert: a.crt, key: a.key }] }\nlog: { access_file: ./access.log }\nsites:\n${sites}`);
    const { where, result } = await offThread(file);
    assert.deepEqual(where, ['worker']);
    assert.deepEqual(result, await loadConfigFile(file));
    const config = result as Awaited<ReturnType<typeof loadConfigFile>>;
    assert.equal(config.tls.storage, join(dir, 'store'), 'relative paths resolve against the file');
    assert.ok(Object.isFrozen(config) && Object.isFrozen(config.sites[199]!.routes[0]), 'frozen, as every parsed config');
  });

  test('YAML, schema and cross-option errors come back with their file:line', async () => {
    const cases: [string, string, RegExp][] = [
      ['yaml.yaml', 'sites:\n  - hosts: [a.test]\n    routes: [\n', /GH_CONFIG_INVALID: YAML: .*yaml\.yaml:\d+\)/],
      ['schema.yaml', 'sites:\n  - hosts: [a.test]\n    routes:\n      - upstreams: ["ftp://x"]\n', /upstreams.*schema\.yaml:4\)/],
      ['duplicate.yaml', 'sites:\n  - hosts: [a.test]\n    routes: [{ upstreams: ["http://127.0.0.1:1"] }]\n  - hosts: [a.test]\n    routes: [{ upstreams: ["http://127.0.0.1:1"] }]\n', /already served by sites\[0\] \(.*duplicate\.yaml:4\)/],
    ];
    for (const [name, text, message] of cases) {
      const file = await write(name, text);
      const { where, result } = await offThread(file);
      assert.deepEqual(where, ['worker'], name);
      assert.ok(result instanceof ConfigError, `${name}: ${String(result)}`);
      assert.match(result.message, message);
      const here = await loadConfigFile(file).catch((error: unknown) => error);
      assert.equal(result.message, (here as Error).message, `${name}: the same errors as a parse here`);
    }
  });

  test('an unreadable file: a ConfigError naming it, no thread started', async () => {
    const { where, result } = await offThread(join(dir, 'missing.yaml'));
    assert.deepEqual(where, []);
    assert.ok(result instanceof ConfigError);
    assert.match(result.message, /cannot read the config file/);
  });

  test('the serving thread keeps its turns while a large file is parsed', async () => {
    // 6 000 sites: ~0.5 s of YAML parsing, which on this thread would hold every timer that long.
    const sites = Array.from({ length: 6_000 }, (_, i) => `  - hosts: [s${i}.test]\n    tls: "off"\n    routes:\n      - upstreams: ["http://127.0.0.1:9"]\n`).join('');
    const file = await write('large.yaml', `sites:\n${sites}`);
    let ticks = 0;
    const timer = setInterval(() => { ticks++; }, 5);
    const { where, result } = await offThread(file);
    clearInterval(timer);
    assert.deepEqual(where, ['worker']);
    assert.equal((result as { sites: unknown[] }).sites.length, 6_000);
    // Counted, not timed: a parse on this thread would leave the interval a turn or two.
    assert.ok(ticks >= 10, `${ticks} timer turns while the worker parsed`);
  });
});
