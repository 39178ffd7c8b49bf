import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ConfigError, EMBEDDED_DEFAULT_PATH, loadConfigFile, parseConfig } from '../src/config/load.ts';
import { quickConfig } from '../src/config/quick.ts';
import { parseDuration, parseSize } from '../src/config/units.ts';

const opts = { source: 'gatehouse.yaml', baseDir: '/etc/gatehouse' };

function errorOf(text: string): ConfigError {
  try {
    parseConfig(text, opts);
  } catch (error) {
    assert.ok(error instanceof ConfigError, `expected ConfigError, got ${String(error)}`);
    return error;
  }
  assert.fail('the config was accepted');
}

describe('config', () => {
  let dir: string;
  before(async () => { dir = await mkdtemp(join(tmpdir(), 'gh-config-')); });
  after(async () => { await rm(dir, { recursive: true, force: true }); });

  it('fills defaults: listeners, durations in ms, tls by host kind, redirect', () => {
    const config = parseConfig(`
tls: { acme: { agree_tos: true } }
sites:
  - hosts: [app.example.com]
    routes: [{ upstreams: [http://127.0.0.1:8081] }]
  - hosts: [localhost, 127.0.0.1]
    routes:
      - path: /api/
        upstreams: [{ url: "http://127.0.0.1:8082", weight: 3 }]
        timeouts: { connect: 250ms }
`, opts);
    assert.deepEqual(config.listen.http, { host: undefined, port: 80 });
    assert.deepEqual(config.listen.https, { host: undefined, port: 443 });
    assert.equal(config.listen.admin, undefined);
    assert.equal(config.grace_period, 10_000);
    assert.equal(config.tls.storage, '/etc/gatehouse/certs');
    assert.equal(config.sites[0]!.tls, 'acme');
    assert.equal(config.sites[1]!.tls, 'internal');
    assert.equal(config.sites[0]!.redirect, true);
    const route = config.sites[1]!.routes[0]!;
    assert.equal(route.path, '/api/');
    assert.deepEqual(route.upstreams, [{ url: 'http://127.0.0.1:8082', weight: 3 }]);
    assert.equal(route.timeouts.connect, 250);
    assert.equal(route.timeouts.response_header, 60_000);
    assert.equal(route.load_balancing, 'round_robin');
    assert.equal(config.sites[0]!.routes[0]!.path, '/');
    assert.ok(Object.isFrozen(config.sites[1]!.routes[0]!.upstreams));
  });

  it('reports every error with its option path and line', () => {
    const error = errorOf(`listen:
  http: 8080
sites:
  - hosts: [localhost]
    routes:
      - path: /api/
        upstreams: [ "localhost:80" ]
        bogus: 1
      - upstreams: [http://127.0.0.1:1]
        timeouts: { connect: 10 }
`);
    assert.equal(error.code, 'GH_CONFIG_INVALID');
    const lines = error.message.split('\n');
    assert.equal(lines.length, 3, error.message);
    assert.match(error.message, /^GH_CONFIG_INVALID: sites\[0\]\.routes\[0\]\.upstreams\[0\]: expected a URL such as "http:\/\/127\.0\.0\.1:8080", got "localhost:80" \(gatehouse\.yaml:7\)$/m);
    assert.match(error.message, /sites\[0\]\.routes\[0\]: unknown option "bogus" \(gatehouse\.yaml:8\)/);
    assert.match(error.message, /sites\[0\]\.routes\[1\]\.timeouts\.connect: expected a duration with a unit .* \(gatehouse\.yaml:10\)/);
  });

  it('refuses YAML syntax errors and duplicate keys with a line', () => {
    assert.match(errorOf('sites:\n  - hosts: [a\n').message, /YAML: .*gatehouse\.yaml:\d+\)/);
    assert.match(errorOf('log:\n  level: info\n  level: debug\n').message, /YAML: .*\(gatehouse\.yaml:3\)/);
  });

  it('refuses cross-option mistakes', () => {
    assert.match(errorOf(`sites:
  - hosts: [example.com]
    routes: [{ upstreams: [http://127.0.0.1:1] }]
`).message, /tls\.acme\.agree_tos: sites\[0\] uses ACME/);
    assert.match(errorOf(`sites:
  - { hosts: [localhost], routes: [{ upstreams: [http://127.0.0.1:1] }] }
  - { hosts: [LOCALHOST], routes: [{ upstreams: [http://127.0.0.1:2] }] }
`).message, /sites\[1\]\.hosts: host "localhost" is already served by sites\[0\] \(gatehouse\.yaml:3\)/);
    assert.match(errorOf(`tls: { on_demand: {} }\n`).message, /tls\.on_demand: on-demand TLS needs "ask"/);
    assert.match(errorOf(`sites:
  - { hosts: [localhost], tls: static, routes: [{ upstreams: [http://127.0.0.1:1] }] }
`).message, /tls: static needs at least one entry in tls\.certificates/);
    assert.match(errorOf(`sites:
  - { hosts: ["bad host"], routes: [{ upstreams: [http://127.0.0.1:1] }] }
`).message, /sites\[0\]\.hosts\[0\]: expected a host name/);
    assert.match(errorOf(`sites:
  - { hosts: [localhost], routes: [{ upstreams: [http://127.0.0.1:1/app] }] }
`).message, /an upstream URL is an origin/);
  });

  it('loads a file and names it in errors; the embedded default is valid', async () => {
    const file = join(dir, 'bad.yaml');
    await writeFile(file, 'listen:\n  https: "nope"\n');
    await assert.rejects(loadConfigFile(file), (error: Error) => error.message.includes(`listen.https: expected a port (0-65535) or "host:port", got "nope" (${file}:2)`));
    await assert.rejects(loadConfigFile(join(dir, 'missing.yaml')), /cannot read the config file/);
    const example = await loadConfigFile(new URL('../config/gatehouse.example.yaml', import.meta.url).pathname);
    assert.equal(example.sites[0]!.routes[0]!.upstreams[1]!.weight, 2);
    const config = await loadConfigFile(EMBEDDED_DEFAULT_PATH);
    assert.equal(config.listen.https?.port, 8443);
    assert.equal(config.sites[0]!.tls, 'internal');
  });

  it('quick mode builds one site', () => {
    const local = quickConfig({ from: 'localhost:9443', to: ['127.0.0.1:3000'], internalCerts: false });
    assert.equal(local.listen.https?.port, 9443);
    assert.equal(local.listen.http, null);
    assert.equal(local.sites[0]!.tls, 'internal');
    assert.equal(local.sites[0]!.routes[0]!.upstreams[0]!.url, 'http://127.0.0.1:3000');
    const pub = quickConfig({ from: 'example.com', to: ['http://10.0.0.1:80', 'http://10.0.0.2:80'], internalCerts: false });
    assert.equal(pub.sites[0]!.tls, 'acme');
    assert.equal(pub.listen.http?.port, 80);
    const plain = quickConfig({ from: 'http://localhost:8080', to: ['http://127.0.0.1:3000'], internalCerts: false });
    assert.equal(plain.sites[0]!.tls, 'off');
    assert.equal(plain.listen.https, null);
    assert.throws(() => quickConfig({ from: undefined, to: [], internalCerts: false }), /--to: at least one --to URL/);
  });

  it('parses units', () => {
    assert.equal(parseDuration('250ms'), 250);
    assert.equal(parseDuration('5m'), 300_000);
    assert.equal(parseDuration(0), 0);
    assert.throws(() => parseDuration('10'), RangeError);
    assert.throws(() => parseDuration(5), RangeError);
    assert.equal(parseSize('64KiB'), 65536);
    assert.equal(parseSize('10MB'), 10_000_000);
    assert.equal(parseSize('512'), 512);
    assert.throws(() => parseSize('3 parsecs'), RangeError);
  });
});
