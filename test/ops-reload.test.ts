/**
 * Zero-downtime reload: 20 reloads under continuous mixed HTTP/1.1 and HTTP/2 load with no failed
 * request and one WebSocket open throughout; an invalid config refused with file:line while
 * traffic continues; tunnels of a removed route closed, others kept; a changed listen address
 * opened and the old one closed; the file watch.
 */
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { request as httpRequest } from 'node:http';
import type { ClientHttp2Session } from 'node:http2';
import { createServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import WebSocket from 'ws';
import { startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';
import { adminRequest, h1Agent, h1Request, h2Request, h2Session, waitFor } from './helpers/ops.ts';
import { startEchoUpstream, startWsEchoUpstream } from './helpers/upstreams.ts';

type Echo = Awaited<ReturnType<typeof startEchoUpstream>>;
type WsEcho = Awaited<ReturnType<typeof startWsEchoUpstream>>;

function openWebSocket(port: number, path: string): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`wss://127.0.0.1:${port}${path}`, { headers: { host: 'localhost' }, rejectUnauthorized: false, servername: 'localhost' } as WebSocket.ClientOptions);
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
  });
}

function echoOnce(ws: WebSocket, text: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no echo within 5 s')), 5_000);
    ws.once('message', (data) => { clearTimeout(timer); resolve(data.toString()); });
    ws.send(text);
  });
}

/** Status of `GET /x` with `Host: localhost` on a plain listener. */
function plainStatus(port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: '127.0.0.1', port, path: '/x', headers: { host: 'localhost' }, agent: false }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('error', reject);
    req.end();
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

const siteYaml = (echo: Echo, ws: WsEcho, extra = '') => `
sites:
  - hosts: [localhost]
    routes:
      - path: /ws/
        upstreams: ["${ws.url}"]
      - path: /chat/
        upstreams: ["${ws.url}"]
${extra}      - path: /
        upstreams: ["${echo.url}"]
`;

describe('reload under load', () => {
  let echo: Echo;
  let wsEcho: WsEcho;
  let gh: TestGatehouse;
  let file: string;
  const sessions: ClientHttp2Session[] = [];
  const agent = h1Agent();
  const sockets: WebSocket[] = [];
  const header = 'listen: { http: "127.0.0.1:0", https: "127.0.0.1:0", admin: "127.0.0.1:0" }\ntls: { storage: "{{dir}}/certs" }\n';

  before(async () => {
    echo = await startEchoUpstream();
    wsEcho = await startWsEchoUpstream();
    gh = await startGatehouse(header + siteYaml(echo, wsEcho));
    file = join(gh.dir, 'gatehouse.yaml');
  });
  after(async () => {
    for (const ws of sockets) ws.terminate();
    for (const session of sessions) session.destroy();
    agent.destroy();
    await gh?.stop();
    await echo?.close();
    await wsEcho?.close();
  });

  it('20 reloads during 5 s of mixed h1/h2 traffic: no failed request, the WebSocket stays open', async () => {
    const ws = await openWebSocket(gh.httpsPort, '/ws/');
    sockets.push(ws);
    let wsClosed = false;
    ws.once('close', () => { wsClosed = true; });
    for (let i = 0; i < 2; i++) sessions.push(await h2Session(gh.httpsPort));

    const stopAt = Date.now() + 5_000;
    const failures: string[] = [];
    let ok = 0;
    const h2Loop = async (session: ClientHttp2Session, n: number) => {
      for (let i = 0; Date.now() < stopAt; i++) {
        try {
          const response = await h2Request(session, `/h2/${n}/${i}`, {}, i % 3 === 0 ? `body ${i}` : undefined);
          if (response.status === 200) ok++;
          else failures.push(`h2 ${response.status} ${response.body}`);
        } catch (error) {
          failures.push(`h2 ${(error as Error).message}`);
        }
      }
    };
    const h1Loop = async (n: number) => {
      for (let i = 0; Date.now() < stopAt; i++) {
        try {
          const response = await h1Request(gh.httpsPort, agent, `/h1/${n}/${i}`, {}, i % 3 === 0 ? `body ${i}` : undefined);
          if (response.status === 200) ok++;
          else failures.push(`h1 ${response.status} ${response.body}`);
        } catch (error) {
          failures.push(`h1 ${(error as Error).message}`);
        }
      }
    };
    const reloads = async () => {
      const original = await readFile(file, 'utf8');
      const versions: number[] = [];
      for (let i = 0; i < 20; i++) {
        await new Promise((resolve) => setTimeout(resolve, 200));
        // Alternate between two configs that differ (an extra route), so each reload builds new pools.
        await writeFile(file, i % 2 === 0 ? original.replace('      - path: /\n', `      - path: /extra-${i}/\n        upstreams: ["${echo.url}"]\n      - path: /\n`) : original);
        const result = await gh.gatehouse.reloadFromFile('test');
        assert.equal(result.result, 'reloaded', JSON.stringify(result));
        versions.push(result.version);
        assert.equal(await echoOnce(ws, `during reload ${i}`), `during reload ${i}`);
      }
      return versions;
    };

    const [versions] = await Promise.all([reloads(), h2Loop(sessions[0]!, 0), h2Loop(sessions[1]!, 1), h1Loop(0), h1Loop(1)]);
    assert.deepEqual(failures, []);
    assert.ok(ok > 100, `${ok} requests succeeded`);
    assert.equal(versions.length, 20);
    assert.equal(gh.gatehouse.configVersion, 21);
    assert.equal(wsClosed, false, 'the WebSocket stayed open');
    assert.equal(await echoOnce(ws, 'after'), 'after');
    assert.equal(gh.gatehouse.tunnelCount, 1);
    assert.ok(gh.logs.filter((l) => l.msg === 'config reloaded').length >= 20);
  });

  it('refuses an invalid config with file:line and keeps serving the old one', async () => {
    const original = await readFile(file, 'utf8');
    const version = gh.gatehouse.configVersion;
    const session = sessions[0]!;
    await writeFile(file, original.replace(`upstreams: ["${echo.url}"]`, 'upstreams: ["localhost:80"]'));
    try {
      const response = await adminRequest(gh.gatehouse.addresses.admin!.port, 'POST', '/reload');
      assert.equal(response.status, 422);
      const result = JSON.parse(response.body) as { result: string; version: number; errors: string[] };
      assert.equal(result.result, 'refused');
      assert.equal(result.version, version);
      assert.match(result.errors.join('\n'), /GH_CONFIG_INVALID: sites\[0\]\.routes\[2\]\.upstreams\[0\]: .* \(.*gatehouse\.yaml:\d+\)/);
      const logged = gh.logs.find((l) => l.msg === 'reload refused: the old config keeps serving');
      assert.ok(logged, 'the refusal is logged');
      assert.match(JSON.stringify(logged.errors), /gatehouse\.yaml:\d+/);

      // Traffic continues on the old config.
      assert.equal((await h2Request(session, '/still/here')).status, 200);
      assert.equal((await h1Request(gh.httpsPort, agent, '/still/here')).status, 200);
      assert.equal(gh.gatehouse.configVersion, version);

      // Broken YAML too.
      await writeFile(file, `${original}\n  - hosts: [broken\n`);
      const broken = await adminRequest(gh.gatehouse.addresses.admin!.port, 'POST', '/reload');
      assert.equal(broken.status, 422);
      assert.match(broken.body, /gatehouse\.yaml:\d+/);
      assert.equal((await h2Request(session, '/still/here')).status, 200);
    } finally {
      await writeFile(file, original);
    }
  });

  it('closes the tunnels of a removed route and keeps the others', async () => {
    const kept = await openWebSocket(gh.httpsPort, '/ws/');
    const removed = await openWebSocket(gh.httpsPort, '/chat/room');
    sockets.push(kept, removed);
    assert.equal(await echoOnce(removed, 'hi'), 'hi');
    const removedClosed = new Promise<void>((resolve) => removed.once('close', () => resolve()));
    let keptClosed = false;
    kept.once('close', () => { keptClosed = true; });
    const original = await readFile(file, 'utf8');
    try {
      await writeFile(file, original.replace(`      - path: /chat/\n        upstreams: ["${wsEcho.url}"]\n`, ''));
      assert.equal((await gh.gatehouse.reloadFromFile('test')).result, 'reloaded');
      await removedClosed;
      assert.equal(keptClosed, false);
      assert.equal(await echoOnce(kept, 'still open'), 'still open');
      const line = gh.logs.findLast((l) => l.msg === 'config reloaded');
      assert.equal(line?.tunnels_closed, 1);
    } finally {
      await writeFile(file, original);
      assert.equal((await gh.gatehouse.reloadFromFile('test')).result, 'reloaded');
    }
  });

  it('opens a listener whose address changed and closes the old one; unchanged ones are kept', async () => {
    const original = await readFile(file, 'utf8');
    const oldHttp = gh.gatehouse.addresses.http!.port;
    const httpsPort = gh.gatehouse.addresses.https!.port;
    const port = await freePort();
    try {
      await writeFile(file, original.replace('http: "127.0.0.1:0"', `http: "127.0.0.1:${port}"`));
      assert.equal((await gh.gatehouse.reloadFromFile('test')).result, 'reloaded');
      assert.equal(gh.gatehouse.addresses.http!.port, port);
      assert.equal(gh.gatehouse.addresses.https!.port, httpsPort);
      assert.equal(await plainStatus(port), 308);
      await waitFor(async () => {
        try {
          await plainStatus(oldHttp);
          return false;
        } catch {
          return true; // refused: the old listener is closed
        }
      }, 5_000, 'the old HTTP listener to close');
      // A taken port is refused at build time and the old config keeps serving.
      await writeFile(file, original.replace('http: "127.0.0.1:0"', `http: "127.0.0.1:${httpsPort}"`));
      const result = await gh.gatehouse.reloadFromFile('test');
      assert.equal(result.result, 'failed');
      assert.match(result.errors!.join(' '), /EADDRINUSE/);
      assert.equal(gh.gatehouse.addresses.http!.port, port);
      assert.equal(await plainStatus(port), 308);
    } finally {
      await writeFile(file, original);
    }
  });
});

describe('reload on file change (reload.watch)', () => {
  let echo: Echo;
  let gh: TestGatehouse;
  before(async () => {
    echo = await startEchoUpstream();
    gh = await startGatehouse(`
tls: { storage: "{{dir}}/certs" }
reload: { watch: true, debounce: 100ms }
sites:
  - hosts: [localhost]
    routes:
      - upstreams: ["${echo.url}"]
`);
  });
  after(async () => {
    await gh?.stop();
    await echo?.close();
  });

  it('reloads once the file changed', async () => {
    const file = join(gh.dir, 'gatehouse.yaml');
    const text = await readFile(file, 'utf8');
    await writeFile(file, text.replace('      - upstreams:', '      - path: /new/\n        upstreams: ["http://127.0.0.1:1"]\n      - upstreams:'));
    await waitFor(() => gh.gatehouse.configVersion === 2, 5_000, 'the watched file to be reloaded');
    assert.deepEqual(gh.gatehouse.config.sites[0]!.routes.map((r) => r.path), ['/new/', '/']);
  });
});
