/**
 * glibc heap tuning (src/malloc.ts): the `GLIBC_TUNABLES` value, and the serving process started
 * again in place with it where Node can (`process.execve`, Node ≥ 22.15).
 */
import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { MALLOC_TRIM_THRESHOLD, mallocTunables } from '../src/malloc.ts';
import { spawnGatehouse, type SpawnedGatehouse } from './helpers/gatehouse.ts';
import { environOf, TUNABLES_APPLY } from './helpers/process.ts';

const ENTRY = `glibc.malloc.trim_threshold=${MALLOC_TRIM_THRESHOLD}`;
const CAN_EXECVE = typeof (process as { execve?: unknown }).execve === 'function';
const CONFIG = `
listen: { http: "127.0.0.1:0", https: "127.0.0.1:0" }
tls: { storage: "{{dir}}/certs" }
log: { access: false }
sites:
  - hosts: [localhost]
    routes: [{ upstreams: ["http://127.0.0.1:9"] }]
`;

describe('glibc heap tuning', { skip: TUNABLES_APPLY ? false : 'not Linux with glibc, or GLIBC_TUNABLES already set for the tests' }, () => {
  const started: SpawnedGatehouse[] = [];
  after(async () => { for (const gh of started) await gh.kill(); });

  it('adds the trim threshold (64 MiB) to GLIBC_TUNABLES, after the tunables already there', () => {
    assert.equal(MALLOC_TRIM_THRESHOLD, 67_108_864);
    assert.equal(mallocTunables({}), ENTRY);
    assert.equal(mallocTunables({ GLIBC_TUNABLES: '' }), ENTRY);
    assert.equal(mallocTunables({ GLIBC_TUNABLES: 'glibc.malloc.arena_max=2' }), `glibc.malloc.arena_max=2:${ENTRY}`);
  });

  it("keeps an operator's own trim threshold: nothing to change", () => {
    assert.equal(mallocTunables({ GLIBC_TUNABLES: 'glibc.malloc.trim_threshold=131072' }), undefined);
    assert.equal(mallocTunables({ GLIBC_TUNABLES: 'glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=0' }), undefined);
    // A name that only starts the same is another tunable.
    assert.equal(mallocTunables({ GLIBC_TUNABLES: 'glibc.malloc.trim_threshold_x=1' }), `glibc.malloc.trim_threshold_x=1:${ENTRY}`);
  });

  it(`the serving process ${CAN_EXECVE ? 'runs with the setting, under the pid it was started with' : 'is left as started (Node 20: no process.execve)'}`, async () => {
    const { GLIBC_TUNABLES: _none, ...env } = process.env;
    const gh = await spawnGatehouse(['run', '--config', '{{config}}'], CONFIG, { env });
    started.push(gh);
    const pid = gh.child.pid!;
    assert.equal(gh.logs.find((l) => l.msg === 'serving')?.pid, pid, 'the process that serves is the one spawned');
    const environ = environOf(pid);
    assert.equal(environ.GLIBC_TUNABLES, CAN_EXECVE ? ENTRY : undefined);
    // The mark that keeps it from starting itself a second time (removed from process.env at once).
    assert.equal(environ.GATEHOUSE_MALLOC_REEXEC, CAN_EXECVE ? '1' : undefined);
    // And it serves: 127.0.0.1 is no configured host, so the router's own 404.
    const res = await fetch(`http://127.0.0.1:${gh.httpPort}/`);
    assert.equal(res.status, 404);
    assert.match(await res.text(), /no site/);
  });

  it("an operator's GLIBC_TUNABLES with a trim threshold reaches the serving process unchanged", async () => {
    const own = 'glibc.malloc.trim_threshold=131072';
    const gh = await spawnGatehouse(['run', '--config', '{{config}}'], CONFIG, { env: { ...process.env, GLIBC_TUNABLES: own } });
    started.push(gh);
    assert.equal(environOf(gh.child.pid!).GLIBC_TUNABLES, own);
  });
});
