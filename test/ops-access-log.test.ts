/**
 * The real CLI: the access log goes to `log.access_file` and SIGUSR1 reopens it after logrotate
 * moved it; SIGHUP with an invalid file is refused and traffic continues, then a valid one applies.
 */
import assert from 'node:assert/strict';
import { readFile, rename, writeFile } from 'node:fs/promises';
import type { ClientHttp2Session } from 'node:http2';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { spawnGatehouse, type SpawnedGatehouse } from './helpers/gatehouse.ts';
import { adminRequest, h2Request, h2Session, parsePrometheus, waitFor } from './helpers/ops.ts';
import { startEchoUpstream } from './helpers/upstreams.ts';

type Echo = Awaited<ReturnType<typeof startEchoUpstream>>;

async function linesOf(file: string): Promise<Record<string, unknown>[]> {
  let text = '';
  try {
    text = await readFile(file, 'utf8');
  } catch {
    return [];
  }
  return text.split('\n').filter(Boolean).map((line) => JSON.parse(line) as Record<string, unknown>);
}

describe('CLI: access log file, SIGUSR1 and SIGHUP', () => {
  let echo: Echo;
  let gh: SpawnedGatehouse;
  let session: ClientHttp2Session;
  let config: string;
  let yaml: string;
  before(async () => {
    echo = await startEchoUpstream();
    yaml = `
listen: { http: "127.0.0.1:0", https: "127.0.0.1:0", admin: "127.0.0.1:0" }
tls: { storage: "{{dir}}/certs" }
log: { access_file: access.log }
sites:
  - hosts: [localhost]
    routes:
      - upstreams: ["${echo.url}"]
`;
    gh = await spawnGatehouse(['run', '--config', '{{config}}'], yaml);
    config = join(gh.dir, 'gatehouse.yaml');
    session = await h2Session(gh.httpsPort);
  });
  after(async () => {
    session?.destroy();
    await gh?.kill();
    await echo?.close();
  });

  it('writes the access log to the file and reopens it on SIGUSR1', async () => {
    const file = join(gh.dir, 'access.log');
    assert.equal((await h2Request(session, '/first')).status, 200);
    await waitFor(async () => (await linesOf(file)).some((l) => l.path === '/first'), 5_000, 'the first access line');
    assert.ok(!gh.logs.some((l) => l.logger === 'http.log.access'), 'access lines are not on stdout');

    await rename(file, `${file}.1`); // what logrotate does
    assert.equal((await h2Request(session, '/before-reopen')).status, 200);
    await waitFor(async () => (await linesOf(`${file}.1`)).some((l) => l.path === '/before-reopen'), 5_000, 'a line in the moved file');

    gh.child.kill('SIGUSR1');
    await waitFor(() => gh.logs.some((l) => l.msg === 'access log reopened'), 5_000, 'the reopen');
    assert.equal((await h2Request(session, '/after-reopen')).status, 200);
    await waitFor(async () => (await linesOf(file)).some((l) => l.path === '/after-reopen'), 5_000, 'a line in the new file');
    assert.ok(!(await linesOf(`${file}.1`)).some((l) => l.path === '/after-reopen'));
    assert.equal(gh.child.exitCode, null, 'SIGUSR1 does not stop the process');
  });

  it('refuses an invalid file on SIGHUP, keeps serving, then applies a valid one', async () => {
    const serving = gh.logs.find((l) => l.msg === 'serving')!;
    const adminPort = Number(serving.admin);
    await writeFile(config, yaml.replaceAll('{{dir}}', gh.dir).replace('routes:', 'routes:\n      - path: nope\n        upstreams: []'));
    gh.child.kill('SIGHUP');
    await waitFor(() => gh.logs.some((l) => l.msg === 'reload refused: the old config keeps serving'), 5_000, 'the refusal');
    const refusal = gh.logs.find((l) => l.msg === 'reload refused: the old config keeps serving')!;
    assert.match(JSON.stringify(refusal.errors), /gatehouse\.yaml:\d+/);
    assert.equal((await h2Request(session, '/still-serving')).status, 200);

    await writeFile(config, yaml.replaceAll('{{dir}}', gh.dir).replace('      - upstreams:', `      - path: /added/\n        upstreams: ["${echo.url}"]\n      - upstreams:`));
    gh.child.kill('SIGHUP');
    await waitFor(() => gh.logs.some((l) => l.msg === 'config reloaded'), 5_000, 'the reload');
    assert.equal((await h2Request(session, '/added/x')).status, 200);
    const metrics = parsePrometheus((await adminRequest(adminPort, 'GET', '/metrics')).body);
    assert.equal(metrics.sum('gatehouse_config_reloads_total', { result: 'failure' }), 1);
    assert.equal(metrics.sum('gatehouse_config_reloads_total', { result: 'success' }), 1);
    assert.equal(metrics.sum('gatehouse_config_version'), 2);
    assert.equal(metrics.sum('gatehouse_http_requests_total', { route: '/added/', code: '2xx' }), 1);
  });
});
