import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { CircuitBreaker } from '../src/upstream/breaker.js';
import { HealthChecker, parseStatusRange, type HealthCheckSettings, type HealthState } from '../src/upstream/health.js';

interface TestUpstream {
  readonly origin: string;
  available: boolean;
  inFlight: number;
}

interface Backend {
  readonly upstream: TestUpstream;
  /** Status the health endpoint answers; `hang` holds the request without answering. */
  status: number | 'hang';
  /** Health requests received. */
  checks: number;
  readonly server: Server;
}

const servers: Server[] = [];
after(async () => {
  for (const server of servers) {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
});

async function backend(status: number | 'hang' = 200): Promise<Backend> {
  const server = createServer((req, res) => {
    state.checks++;
    assert.equal(req.url, '/healthz');
    assert.equal(req.method, 'GET');
    if (state.status === 'hang') return;
    res.writeHead(state.status, { 'content-type': 'text/plain' }).end('ok');
  });
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  const state: Backend = { upstream: { origin: `http://127.0.0.1:${port}`, available: true, inFlight: 0 }, status, checks: 0, server };
  return state;
}

const settings: HealthCheckSettings = { path: '/healthz', interval: 50, timeout: 500, status: '2xx', passes: 2, fails: 3 };

/** Resolves with the next state change of `upstream`, or rejects after `ms`. */
function changes() {
  const events: { origin: string; healthy: boolean; reason: string }[] = [];
  const waiters: (() => void)[] = [];
  const onChange = (upstream: TestUpstream, state: Readonly<HealthState>, reason: string) => {
    events.push({ origin: upstream.origin, healthy: state.healthy, reason });
    waiters.splice(0).forEach((wake) => wake());
  };
  const next = async (count: number, ms = 3000) => {
    const deadline = Date.now() + ms;
    while (events.length < count) {
      if (Date.now() > deadline) throw new Error(`expected ${count} state changes within ${ms}ms, got ${JSON.stringify(events)}`);
      await Promise.race([new Promise<void>((resolve) => waiters.push(resolve)), sleep(50)]);
    }
    return events[count - 1]!;
  };
  return { events, onChange, next };
}

function activeTimeouts(): number {
  return process.getActiveResourcesInfo().filter((kind) => kind === 'Timeout').length;
}

describe('active health checks', () => {
  it('marks an upstream down after `fails` failing checks and back up after `passes`', async () => {
    const a = await backend(200);
    const b = await backend(200);
    const events = changes();
    const checker = new HealthChecker([a.upstream, b.upstream], settings, { onChange: events.onChange });
    try {
      checker.start();
      await sleep(200);
      assert.equal(events.events.length, 0, 'healthy upstreams cause no events');
      assert.ok(a.checks >= 2 && a.checks <= 8, `about one check per 50ms, got ${a.checks} in 200ms`);

      a.status = 500;
      const checksBefore = a.checks;
      const down = await events.next(1);
      assert.deepEqual(down, { origin: a.upstream.origin, healthy: false, reason: 'status 500' });
      assert.equal(a.upstream.available, false);
      assert.ok(a.checks - checksBefore >= 3, `down only after 3 failing checks (saw ${a.checks - checksBefore})`);
      assert.equal(b.upstream.available, true, 'the other upstream is untouched');
      const state = checker.stateOf(a.upstream)!;
      assert.ok(state.fails >= 3);
      assert.equal(state.lastError, 'status 500');

      a.status = 204;
      const passingFrom = a.checks;
      const up = await events.next(2);
      assert.deepEqual(up, { origin: a.upstream.origin, healthy: true, reason: 'status 204' });
      assert.equal(a.upstream.available, true);
      assert.ok(a.checks - passingFrom >= 2, 'up only after 2 passing checks');

      const [snapA, snapB] = checker.snapshot();
      assert.equal(snapA!.origin, a.upstream.origin);
      assert.equal(snapA!.healthy, true);
      assert.equal(snapA!.failures, 0);
      assert.equal(snapA!.lastError, 'status 500');
      assert.ok(snapA!.lastCheck! > Date.now() - 1000);
      assert.equal(snapB!.inFlight, 0);
      assert.equal(snapB!.lastError, undefined);
    } finally {
      await checker.stop();
    }
  });

  it('counts a check that times out, and a refused connection, as failures', async () => {
    const slow = await backend('hang');
    const refused = await backend(200);
    refused.server.close();
    await new Promise((resolve) => setImmediate(resolve));
    const events = changes();
    const checker = new HealthChecker([slow.upstream, refused.upstream], { ...settings, timeout: 100, fails: 1 }, { onChange: events.onChange });
    try {
      checker.start();
      await events.next(2);
      const reasons = Object.fromEntries(events.events.map((event) => [event.origin, event.reason]));
      assert.equal(reasons[slow.upstream.origin], 'timeout after 100ms');
      assert.equal(reasons[refused.upstream.origin], 'ECONNREFUSED');
      assert.equal(slow.upstream.available, false);
      assert.equal(refused.upstream.available, false);
    } finally {
      await checker.stop();
    }
  });

  it('accepts the configured status range only', async () => {
    const redirect = await backend(302);
    const events = changes();
    const lenient = new HealthChecker([redirect.upstream], { ...settings, status: '200-399', fails: 1 }, { onChange: events.onChange });
    lenient.start();
    await sleep(150);
    await lenient.stop();
    assert.equal(events.events.length, 0, '302 is within 200-399');
    const strict = new HealthChecker([redirect.upstream], { ...settings, status: '200', fails: 1 }, { onChange: events.onChange });
    try {
      strict.start();
      assert.equal((await events.next(1)).reason, 'status 302');
    } finally {
      await strict.stop();
    }
  });

  it('reports through the circuit breaker when the upstream has one', async () => {
    const a = await backend(503);
    const breaker = new CircuitBreaker({ max_fails: 1, window: 1000, cooldown: 60_000, fail_on_5xx: false, max_latency: undefined }, { target: a.upstream });
    const events = changes();
    const checker = new HealthChecker([a.upstream], { ...settings, fails: 1, passes: 1 }, { onChange: events.onChange, breakerOf: () => breaker });
    try {
      checker.start();
      await events.next(1);
      assert.equal(a.upstream.available, false);
      breaker.recordFailure('connect');
      a.status = 200;
      await events.next(2);
      assert.equal(checker.stateOf(a.upstream)!.healthy, true);
      assert.equal(a.upstream.available, false, 'healthy again, but the breaker is open');
      assert.equal(checker.snapshot()[0]!.breaker, 'open');
    } finally {
      await checker.stop();
    }
  });

  it('stop() clears every timer and aborts checks in flight', async () => {
    const hanging = await backend('hang');
    const healthy = await backend(200);
    // Timers of earlier tests (their servers' sockets) may still be expiring: count from a
    // moment when the number holds still, or one expiring later would hide the checker's own.
    const timeoutsBefore = await steadyTimeouts();
    const checker = new HealthChecker([hanging.upstream, healthy.upstream], { ...settings, timeout: 10_000, interval: 30 });
    checker.start();
    let stopping = 0;
    try {
      await settle(() => hanging.checks === 1);
      assert.equal(hanging.checks, 1, 'the hanging check is in flight');
      assert.ok(activeTimeouts() > timeoutsBefore, 'the checker has timers while running');
    } finally {
      // Stopped even when an assertion above failed: a checker left running keeps the file alive.
      stopping = Date.now();
      await checker.stop();
    }
    assert.ok(Date.now() - stopping < 1000, 'stop() does not wait for the 10s check timeout');
    // The backends' own socket timers go once the aborted connections' close reaches them, which
    // can take a few turns of the event loop on a loaded machine.
    await settle(() => activeTimeouts() <= timeoutsBefore);
    assert.ok(activeTimeouts() <= timeoutsBefore, 'no timer is left behind');
    const checks = healthy.checks;
    await sleep(120);
    assert.equal(healthy.checks, checks, 'no check runs after stop()');
    assert.equal(checker.stateOf(hanging.upstream)!.fails, 0, 'an aborted check does not count');
  });

  it('lets the process exit after stop(), with a check in flight and its interval pending', async () => {
    const hanging = await backend('hang');
    const healthy = await backend(200);
    const script = `
      import { HealthChecker } from ${JSON.stringify(new URL('../src/upstream/health.ts', import.meta.url).href)};
      const checker = new HealthChecker(
        [{ origin: ${JSON.stringify(hanging.upstream.origin)}, available: true, inFlight: 0 },
         { origin: ${JSON.stringify(healthy.upstream.origin)}, available: true, inFlight: 0 }],
        { path: '/healthz', interval: 60000, timeout: 60000, status: '2xx', passes: 1, fails: 1 });
      checker.start();
      setTimeout(() => checker.stop().then(() => console.log('stopped')), 300);
    `;
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => { output += chunk.toString(); });
    const killer = setTimeout(() => child.kill('SIGKILL'), 8000);
    try {
      const [code, signal] = (await once(child, 'exit')) as [number | null, string | null];
      assert.equal(signal, null, 'the child exited by itself; it had to be killed');
      assert.equal(code, 0);
      assert.equal(output.trim(), 'stopped');
      assert.equal(hanging.checks, 1);
      assert.equal(healthy.checks, 1);
    } finally {
      clearTimeout(killer);
      child.kill('SIGKILL');
    }
  });
});

describe('parseStatusRange', () => {
  it('parses 2xx, single codes and ranges', () => {
    assert.deepEqual(parseStatusRange('2xx'), [200, 299]);
    assert.deepEqual(parseStatusRange('200'), [200, 200]);
    assert.deepEqual(parseStatusRange('200-399'), [200, 399]);
    assert.throws(() => parseStatusRange('399-200'), RangeError);
    assert.throws(() => parseStatusRange('ok'), RangeError);
  });
});

/** Wait until `condition` holds, for at most `ms` (the assertion that follows decides). */
/** The number of active timeouts once it has not changed for 100 ms (at most 2 s of waiting). */
async function steadyTimeouts(): Promise<number> {
  const deadline = Date.now() + 2000;
  let count = activeTimeouts();
  let since = Date.now();
  while (Date.now() - since < 100 && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 10));
    const now = activeTimeouts(); // the 10 ms timer of this wait has fired: it is not counted
    if (now !== count) {
      count = now;
      since = Date.now();
    }
  }
  return count;
}

async function settle(condition: () => boolean, ms = 2000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!condition() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
}
