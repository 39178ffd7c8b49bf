/**
 * The `gatehouse` command as a user runs it: a real child process, real signals, curl as the client.
 */
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readdirSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import { type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { Agent, request } from 'undici';
import WebSocket from 'ws';
import { freePort } from './helpers/pebble.ts';
import { CLI, spawnGatehouse, type SpawnedGatehouse } from './helpers/gatehouse.ts';
import { startWsEchoUpstream } from './helpers/upstreams.ts';

const run = promisify(execFile);

async function cli(args: string[], cwd?: string): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [CLI, ...args], { cwd, timeout: 20_000 });
    return { code: 0, stdout, stderr };
  } catch (error) {
    const e = error as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

describe('gatehouse CLI', () => {
  let dir: string;
  before(async () => { dir = await mkdtemp(join(tmpdir(), 'gh-cli-test-')); });
  after(async () => { await rm(dir, { recursive: true, force: true }); });

  it('prints its version and usage', async () => {
    const pkg = JSON.parse(await readFile(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };
    const version = await cli(['--version']);
    assert.equal(version.code, 0);
    assert.equal(version.stdout.trim(), `gatehouse ${pkg.version}`);
    const help = await cli(['--help']);
    assert.equal(help.code, 0);
    assert.match(help.stdout, /gatehouse validate --config FILE/);
    const bad = await cli(['frobnicate']);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /unknown command/);
  });

  it('validates a config: exit 0, or file:line errors and exit 1', async () => {
    const good = join(dir, 'good.yaml');
    await writeFile(good, 'sites:\n  - hosts: [localhost]\n    routes: [{ upstreams: [http://127.0.0.1:3000] }]\n');
    const ok = await cli(['validate', '--config', good]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /valid \(1 site\)/);
    const bad = join(dir, 'bad.yaml');
    await writeFile(bad, 'sites:\n  - hosts: [localhost]\n    routes:\n      - upstreams: ["localhost:3000"]\n');
    const refused = await cli(['validate', '--config', bad]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, new RegExp(`^GH_CONFIG_INVALID: sites\\[0\\]\\.routes\\[0\\]\\.upstreams\\[0\\]: .* \\(${bad.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}:4\\)$`, 'm'));
    const started = await cli(['run', '--config', bad]);
    assert.equal(started.code, 1, 'run refuses an invalid config too');
  });
});

describe('quick mode against a real app, with curl over HTTP/2', () => {
  let app: ChildProcess;
  let appPort: number;
  let gh: SpawnedGatehouse;
  before(async () => {
    appPort = await freePort();
    app = spawn('python3', ['-m', 'http.server', String(appPort), '--bind', '127.0.0.1'], { stdio: 'ignore' });
    // wait for the app to answer
    for (let i = 0; i < 100; i++) {
      try {
        const res = await request(`http://127.0.0.1:${appPort}/`);
        await res.body.dump();
        break;
      } catch {
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
    const port = await freePort();
    gh = await spawnGatehouse(['--from', `localhost:${port}`, '--to', `127.0.0.1:${appPort}`]);
  });
  after(async () => {
    await gh?.kill();
    app?.kill('SIGKILL');
  });

  it('serves https://localhost:PORT over h2 with a certificate curl verifies against the local CA', async () => {
    const ca = join(gh.dir, 'certs', 'ca', 'root.crt');
    const { stdout } = await run('curl', ['-sS', '--http2', '--cacert', ca, '-o', '/dev/null', '-w', '%{http_version} %{http_code}',
      '--resolve', `localhost:${gh.httpsPort}:127.0.0.1`, `https://localhost:${gh.httpsPort}/`], { timeout: 20_000 });
    assert.equal(stdout, '2 200');
  });
});

describe('signals and resources of the server process', () => {
  let slow: Server;
  let ws: Awaited<ReturnType<typeof startWsEchoUpstream>>;
  before(async () => {
    slow = createServer((req, res) => {
      setTimeout(() => res.end(`slow ${req.url}`), 1500);
    });
    slow.listen(0, '127.0.0.1');
    await once(slow, 'listening');
    ws = await startWsEchoUpstream();
  });
  after(async () => {
    slow?.closeAllConnections();
    slow?.close();
    await ws?.close();
  });

  it('finishes an in-flight slow request on SIGTERM, then exits 0', async () => {
    const port = (slow.address() as AddressInfo).port;
    const gh = await spawnGatehouse(['run', '--config', '{{config}}'], `
listen: { http: "127.0.0.1:0", https: "127.0.0.1:0" }
grace_period: 10s
tls: { storage: "{{dir}}/certs" }
sites:
  - hosts: [localhost]
    routes: [{ upstreams: ["http://127.0.0.1:${port}"] }]
`);
    const agent = new Agent({ connect: { rejectUnauthorized: false } });
    try {
      const pending = request(`https://127.0.0.1:${gh.httpsPort}/in-flight`, { dispatcher: agent, headers: { host: 'localhost' } });
      await new Promise((resolve) => setTimeout(resolve, 400));
      gh.child.kill('SIGTERM');
      const res = await pending;
      assert.equal(res.statusCode, 200);
      assert.equal(await res.body.text(), 'slow /in-flight');
      assert.equal(await gh.exited, 0);
      assert.ok(gh.logs.some((l) => l.msg === 'stopped'));
    } finally {
      await agent.close();
      await gh.kill();
    }
  });

  it('1000 WebSocket open/close cycles leave the open FD count where it started', async () => {
    const gh = await spawnGatehouse(['run', '--config', '{{config}}'], `
listen: { http: "127.0.0.1:0", https: "127.0.0.1:0" }
tls: { storage: "{{dir}}/certs" }
log: { access: false }
sites:
  - hosts: [localhost]
    routes: [{ upstreams: ["${ws.url}"] }]
`);
    const fds = () => readdirSync(`/proc/${gh.child.pid}/fd`).length;
    const cycle = async () => {
      const client = new WebSocket(`wss://localhost:${gh.httpsPort}/`, { rejectUnauthorized: false });
      await new Promise((resolve, reject) => { client.once('open', resolve); client.once('error', reject); });
      const echoed = new Promise((resolve) => client.once('message', resolve));
      client.send('ping');
      await echoed;
      const closed = new Promise((resolve) => client.once('close', resolve));
      client.close();
      await closed;
    };
    try {
      await cycle(); // warm: the leaf certificate, the first upstream connection
      await new Promise((resolve) => setTimeout(resolve, 300));
      const before = fds();
      for (let i = 0; i < 1000; i += 25) await Promise.all(Array.from({ length: 25 }, cycle));
      let afterCount = fds();
      for (let i = 0; i < 40 && afterCount > before; i++) {
        await new Promise((resolve) => setTimeout(resolve, 100));
        afterCount = fds();
      }
      assert.ok(afterCount <= before + 2, `open FDs went from ${before} to ${afterCount}`);
      for (let i = 0; i < 40 && ws.openSockets() > 0; i++) await new Promise((resolve) => setTimeout(resolve, 50));
      assert.equal(ws.openSockets(), 0, 'every upstream tunnel was closed');
    } finally {
      await gh.kill();
    }
  });
});
