/**
 * Route timeouts through a real Gatehouse: no response head in `response_header` gives 504, a
 * response body that stalls for `body_idle` is cut off, a connect that never completes gives 504
 * after `connect`. Each test checks the answer came after the bound and before the upstream would
 * have answered anyway — never how fast the machine is.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import net from 'node:net';
import { afterEach, describe, it } from 'node:test';
import { Agent, request } from 'undici';
import { startCountingUpstream } from './helpers/counting-upstream.ts';
import { startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';
import { startRawUpstream } from './helpers/upstreams.ts';

const cleanup: (() => Promise<unknown> | unknown)[] = [];
afterEach(async () => {
  while (cleanup.length > 0) await Promise.resolve(cleanup.pop()!()).catch(() => {});
});

async function gatehouse(route: string): Promise<TestGatehouse> {
  const gh = await startGatehouse(`
log: { access: false }
sites:
  - hosts: [app.test]
    tls: off
    routes:
      - ${route}
`);
  cleanup.push(() => gh.stop());
  return gh;
}

async function get(gh: TestGatehouse, path = '/') {
  const agent = new Agent();
  cleanup.push(() => agent.destroy());
  const res = await request(`http://127.0.0.1:${gh.httpPort}${path}`, { dispatcher: agent, headers: { host: 'app.test' } });
  return res;
}

describe('route timeouts', () => {
  it('response_header: 504 once the bound passes without a response head', async () => {
    const slow = await startCountingUpstream('slow');
    cleanup.push(() => slow.close());
    const gh = await gatehouse(`{ upstreams: ["${slow.url}"], retries: { count: 0 }, timeouts: { response_header: 300ms } }`);
    const started = performance.now();
    const res = await get(gh, '/?delay=3000');
    const body = await res.body.text();
    const elapsed = performance.now() - started;
    assert.equal(res.statusCode, 504);
    assert.match(body, /GH_UPSTREAM_HEADERS_TIMEOUT/);
    assert.ok(elapsed >= 290 && elapsed < 3000, `answered after ${Math.round(elapsed)} ms`);
  });

  it('response_header: a GET that times out on one upstream is retried on another', async () => {
    const slow = await startCountingUpstream('slow');
    const fast = await startCountingUpstream('fast');
    cleanup.push(() => slow.close(), () => fast.close());
    const gh = await gatehouse(`{ load_balancing: first, upstreams: ["${slow.url}", "${fast.url}"], timeouts: { response_header: 500ms } }`);
    // `delay` slows down both, but only the slow one is tried first; the fast one gets it after the timeout.
    const res = await get(gh, '/?delay=20');
    assert.equal(res.statusCode, 200);
    assert.equal(await res.body.text(), 'slow', 'within the bound the first upstream answers');
    const timedOut = await get(gh, '/?delay=3000');
    assert.equal(timedOut.statusCode, 504, 'both upstreams are slow: the last timeout is the answer');
    await timedOut.body.dump();
    assert.equal(fast.count, 1, 'the retry went to the other upstream');
  });

  it('body_idle: a body that stalls is cut off, so the client never sees it as complete', async () => {
    const stalling = await startRawUpstream((socket) => {
      socket.once('data', () => socket.write('HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst part'));
    });
    cleanup.push(() => stalling.close());
    const gh = await gatehouse(`{ upstreams: ["${stalling.url}"], timeouts: { body_idle: 300ms } }`);
    const res = await get(gh);
    assert.equal(res.statusCode, 200, 'the head was relayed before the body stalled');
    const started = performance.now();
    await assert.rejects(res.body.text(), 'the body ends in an error, not as if complete');
    const elapsed = performance.now() - started;
    assert.ok(elapsed >= 250, `cut off after ${Math.round(elapsed)} ms`);
  });

  it('connect: 504 when the upstream never completes the handshake', async (t) => {
    if (spawnSync('python3', ['--version']).status !== 0) return t.skip('python3 is needed for a listening socket that never accepts');
    // A listening socket with a backlog of 0 that never accepts: once one connection fills the
    // queue, the kernel drops further SYNs and connects hang (Node's own servers always accept).
    const child = spawn('python3', ['-c', "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen(0)\nprint(s.getsockname()[1],flush=True)\ntime.sleep(120)"]);
    cleanup.push(() => child.kill('SIGKILL'));
    const port = await new Promise<number>((resolve, reject) => {
      child.stdout.once('data', (data: Buffer) => resolve(Number(data.toString().trim())));
      child.once('error', reject);
    });
    const filler = net.connect(port, '127.0.0.1');
    cleanup.push(() => filler.destroy());
    await new Promise((resolve) => filler.once('connect', resolve));
    const gh = await gatehouse(`{ upstreams: ["http://127.0.0.1:${port}"], retries: { count: 0 }, timeouts: { connect: 300ms } }`);
    const started = performance.now();
    const res = await get(gh);
    const body = await res.body.text();
    const elapsed = performance.now() - started;
    assert.equal(res.statusCode, 504);
    assert.match(body, /GH_UPSTREAM_CONNECT_TIMEOUT/);
    assert.ok(elapsed >= 290 && elapsed < 5000, `answered after ${Math.round(elapsed)} ms`);
  });
});
