/**
 * `workers: 2`: the real CLI forks two workers that share the listeners, a killed worker is
 * restarted, and SIGTERM stops every worker and exits 0.
 */
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Agent, request } from 'undici';
import { spawnGatehouse, type SpawnedGatehouse } from './helpers/gatehouse.ts';
import { startEchoUpstream } from './helpers/upstreams.ts';
import { environOf, TUNABLES_APPLY } from './helpers/process.ts';
import { MALLOC_TRIM_THRESHOLD } from '../src/malloc.ts';

async function waitFor(what: string, probe: () => boolean, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!probe()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe('workers', () => {
  let echo: Awaited<ReturnType<typeof startEchoUpstream>>;
  let gh: SpawnedGatehouse | undefined;
  before(async () => { echo = await startEchoUpstream(); });
  after(async () => {
    await gh?.kill();
    await echo?.close();
  });

  it('two workers serve one port, a killed worker comes back, SIGTERM stops them all with exit 0', async () => {
    gh = await spawnGatehouse(['run', '--config', '{{config}}'], `
workers: 2
listen: { http: "127.0.0.1:0", https: "127.0.0.1:0", admin: "127.0.0.1:0" }
tls: { storage: "{{dir}}/certs" }
log: { access: false }
sites:
  - hosts: [localhost]
    routes: [{ upstreams: ["${echo.url}"] }]
`);
    const serving = () => [...new Set(gh!.logs.filter((l) => l.msg === 'serving').map((l) => Number(l.pid)))];
    await waitFor('two workers serving', () => serving().length === 2);
    const [first, second] = serving() as [number, number];
    assert.notEqual(first, gh.child.pid);
    assert.equal(gh.logs.find((l) => l.pid === first && l.msg === 'serving')?.https, gh.httpsPort, 'the workers share one port');
    if (TUNABLES_APPLY) {
      // The primary forks its workers with glibc's heap trimming tuned (src/malloc.ts), on every Node.
      for (const pid of [first, second]) assert.equal(environOf(pid).GLIBC_TUNABLES, `glibc.malloc.trim_threshold=${MALLOC_TRIM_THRESHOLD}`);
    }

    const agent = new Agent({ connect: { rejectUnauthorized: false } });
    const get = async () => {
      const res = await request(`https://127.0.0.1:${gh!.httpsPort}/`, { dispatcher: agent, headers: { host: 'localhost' }, reset: true });
      await res.body.dump();
      return res.statusCode;
    };
    try {
      for (let i = 0; i < 20; i++) assert.equal(await get(), 200);

      // /metrics adds up the counters of both workers, whichever worker the scrape reaches.
      const adminPort = Number(gh.logs.find((l) => l.pid === first && l.msg === 'serving')?.admin);
      assert.ok(adminPort > 0);
      const requestsOf = (text: string) => [...text.matchAll(/^gatehouse_http_requests_total\{[^}]*code="2xx"[^}]*\} (\d+)$/gm)].reduce((sum, m) => sum + Number(m[1]), 0);
      for (const pid of [first, second]) {
        const line: Record<string, unknown> | undefined = gh.logs.find((l) => l.pid === pid && l.msg === 'serving');
        assert.equal(Number(line?.admin), adminPort, 'one admin port for both workers');
      }
      for (let i = 0; i < 6; i++) {
        const res = await request(`http://127.0.0.1:${adminPort}/metrics`, { reset: true });
        const text = await res.body.text();
        assert.equal(res.statusCode, 200, text);
        assert.equal(requestsOf(text), 20, 'the 20 requests of both workers, counted once each');
        assert.match(text, /^gatehouse_config_version 1$/m, 'the lowest version any worker serves');
      }

      // POST /reload on the admin API reaches every worker, not only the one that answers it.
      await writeFile(join(gh.dir, 'gatehouse.yaml'), (await readFile(join(gh.dir, 'gatehouse.yaml'), 'utf8')).replace('hosts: [localhost]', 'hosts: [localhost, added.localhost]'));
      const reload = await request(`http://127.0.0.1:${adminPort}/reload`, { method: 'POST', reset: true });
      assert.equal(reload.statusCode, 200, await reload.body.text());
      const reloaded = () => new Set(gh!.logs.filter((l) => l.msg === 'config reloaded' && l.version === 2).map((l) => Number(l.pid)));
      await waitFor('both workers on version 2', () => reloaded().size === 2);
      assert.deepEqual([...reloaded()].sort(), [first, second].sort());

      process.kill(first, 'SIGKILL');
      await waitFor('a replacement worker', () => serving().length === 3);
      assert.ok(gh.logs.some((l) => l.msg === 'worker exited; restarting it' && l.worker_pid === first));
      for (let i = 0; i < 20; i++) assert.equal(await get(), 200);

      const workers = serving().filter((pid) => pid !== first);
      gh.child.kill('SIGTERM');
      assert.equal(await gh.exited, 0);
      await waitFor('every worker gone', () => workers.every((pid) => !isAlive(pid)), 5_000);
    } finally {
      await agent.close();
    }
  });
});
