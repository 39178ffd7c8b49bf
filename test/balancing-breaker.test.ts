/**
 * The circuit breaker through the request path, on a timeline driven by a manual clock: a runtime
 * built with `buildRuntime(..., { clock })` behind a plain `node:http` server that dispatches every
 * request, and a real upstream that goes down and comes back.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Writable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import pino from 'pino';
import { Agent, request } from 'undici';
import { parseConfig } from '../src/config/load.ts';
import { dispatchRequest, type DispatchContext } from '../src/routing/dispatch.ts';
import { buildRuntime, type Runtime } from '../src/routing/runtime.ts';
import { ManualClock } from '../src/upstream/clock.ts';
import { startCountingUpstream, type CountingUpstream } from './helpers/counting-upstream.ts';

describe('circuit breaker timeline through the runtime', () => {
  const clock = new ManualClock(1_000);
  const logs: Record<string, unknown>[] = [];
  let upstream: CountingUpstream;
  let runtime: Runtime;
  let server: http.Server;
  let agent: Agent;
  let url: string;

  before(async () => {
    upstream = await startCountingUpstream('app');
    const config = parseConfig(`
sites:
  - hosts: [app.test]
    tls: off
    routes:
      - upstreams: ["${upstream.url}"]
        retries: { count: 0 }
        passive_health: { max_fails: 3, window: 10s, cooldown: 30s }
`, { source: 'test.yaml', baseDir: '/tmp' });
    const sink = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        for (const line of chunk.toString('utf8').split('\n')) if (line) logs.push(JSON.parse(line) as Record<string, unknown>);
        callback();
      },
    });
    runtime = buildRuntime(config.sites, pino(sink), { clock });
    runtime.start();
    const ctx: DispatchContext = { runtime, protocol: 'http', onComplete: () => {}, draining: () => false };
    server = http.createServer((req, res) => dispatchRequest(req, res, ctx));
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/`;
    agent = new Agent();
  });
  after(async () => {
    await agent?.close();
    server?.closeAllConnections();
    await new Promise((resolve) => server?.close(resolve));
    await runtime?.close();
    await upstream?.close();
  });

  const get = async () => {
    const res = await request(url, { dispatcher: agent, headers: { host: 'app.test' } });
    await res.body.dump();
    return { status: res.statusCode, retryAfter: res.headers['retry-after'] };
  };
  const breaker = () => runtime.upstreamStates()[0]!.upstreams[0]!.breaker;
  const breakerLogs = () => logs.filter((l) => l.logger === 'upstream.breaker').map((l) => `${l.breaker}: ${l.reason}`);

  it('opens after max_fails failures, answers 503 with Retry-After during the cooldown', async () => {
    assert.equal((await get()).status, 200);
    await upstream.kill();
    for (let i = 0; i < 3; i++) {
      assert.equal((await get()).status, 502);
      clock.advance(1_000);
    }
    assert.equal(breaker(), 'open');
    assert.deepEqual(await get(), { status: 503, retryAfter: '29' }, 'opened on the third failure for 30s, one second ago');
    clock.advance(27_500);
    assert.deepEqual(await get(), { status: 503, retryAfter: '2' }, 'rounded up');
  });

  it('half-opens after the cooldown: a failed trial re-opens it', async () => {
    clock.advance(1_500);
    assert.equal(breaker(), 'half-open');
    assert.equal((await get()).status, 502, 'the trial request fails');
    assert.equal(breaker(), 'open');
    assert.deepEqual(await get(), { status: 503, retryAfter: '30' });
  });

  it('closes when the trial succeeds', async () => {
    await upstream.restart();
    clock.advance(30_000);
    const before = upstream.count;
    assert.equal((await get()).status, 200, 'the trial request');
    assert.equal(breaker(), 'closed');
    for (let i = 0; i < 5; i++) assert.equal((await get()).status, 200);
    assert.equal(upstream.count - before, 6);
    const state = runtime.upstreamStates()[0]!.upstreams[0]!;
    assert.equal(state.available, true);
    assert.equal(state.healthy, true);
    assert.equal(state.lastError, 'ECONNREFUSED');
    assert.deepEqual(breakerLogs(), [
      'open: 3 failures within 10000ms (last: connect)',
      'half-open: cooldown elapsed',
      'open: trial request failed (connect)',
      'half-open: cooldown elapsed',
      'closed: trial request succeeded',
    ]);
  });
});
