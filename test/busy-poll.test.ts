/**
 * Busy polling (src/busy-poll.ts, `busy_polling`): the option's parsing, and the event loop itself
 * (this process's, measured with `performance.eventLoopUtilization()`: the share of time spent
 * outside `epoll_wait`). After traffic a spinning loop never waits, so its utilization is near 1
 * with nothing to do; a loop that is not spinning waits, so it is near 0. Both through a real
 * Gatehouse in this process, proxying to a real upstream, with a reload and a stop.
 */
import assert from 'node:assert/strict';
import { Agent } from 'node:https';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { busyPollKick, busyPollingWindow, setBusyPolling } from '../src/busy-poll.ts';
import { ConfigError, parseConfig } from '../src/config/load.ts';
import { startGatehouse } from './helpers/gatehouse.ts';
import { h1Request } from './helpers/ops.ts';
import { startEchoUpstream } from './helpers/upstreams.ts';

const opts = { source: 'gatehouse.yaml', baseDir: '/etc/gatehouse' };

/** The loop's utilization over the next `ms` of doing nothing (0..1). */
async function utilizationOver(ms: number): Promise<number> {
  const start = performance.eventLoopUtilization();
  await sleep(ms);
  return performance.eventLoopUtilization(start).utilization;
}

// A spinning loop spends part of each turn in epoll_wait(0), and a descheduled process may be
// inside it: on a busy machine its utilization falls from ~1 but stays far above a waiting loop's.
const SPINNING = 0.3;
const WAITING = 0.15;

/**
 * The lowest utilization of up to `tries` windows of `ms` in a row, stopping at the first below
 * WAITING. A waiting loop's is ~0.01, but the test runner's own reporting, a GC or a process
 * descheduled between two of its turns (other test files share the 2 cores) can fill one window;
 * a loop that spins when it should wait stays near 1 in every window, so this still fails it.
 */
async function waitingUtilization(ms = 100, tries = 3): Promise<number> {
  let lowest = 1;
  for (let i = 0; i < tries && lowest >= WAITING; i++) lowest = Math.min(lowest, await utilizationOver(ms));
  return lowest;
}

describe('busy polling', () => {
  after(() => setBusyPolling(0));

  it('busy_polling: a duration, 0 (off) by default, at most 1s, refused with its line', () => {
    assert.equal(parseConfig('sites: []\n', opts).busy_polling, 0);
    assert.equal(parseConfig('busy_polling: 2ms\n', opts).busy_polling, 2);
    assert.equal(parseConfig('busy_polling: 0\n', opts).busy_polling, 0);
    for (const [text, message] of [
      ['log: { level: warn }\nbusy_polling: 2s\n', /busy_polling: at most 1s \(gatehouse\.yaml:2\)/],
      ['busy_polling: 5\n', /busy_polling: expected a duration with a unit .*\(gatehouse\.yaml:1\)/],
    ] as const) {
      assert.throws(() => parseConfig(text, opts), (error: unknown) => error instanceof ConfigError && message.test(error.message));
    }
    assert.throws(() => setBusyPolling(-1), RangeError);
    assert.throws(() => setBusyPolling(Number.NaN), RangeError);
  });

  it('spins for the window after a kick, then waits again; off, a kick changes nothing', async () => {
    setBusyPolling(0);
    busyPollKick();
    const off = await waitingUtilization();
    assert.ok(off < WAITING, `off: utilization ${off.toFixed(3)}`);

    setBusyPolling(300);
    busyPollKick();
    const spinning = await utilizationOver(100);
    assert.ok(spinning > SPINNING, `within the window: utilization ${spinning.toFixed(3)}`);
    await sleep(300); // the window has passed: the chain stopped
    const after = await waitingUtilization();
    assert.ok(after < WAITING, `after the window: utilization ${after.toFixed(3)}`);

    busyPollKick(); // a kick starts it again
    const again = await utilizationOver(100);
    assert.ok(again > SPINNING, `kicked again: utilization ${again.toFixed(3)}`);
    setBusyPolling(0); // a running chain stops at its next turn
    await sleep(10);
    const stopped = await waitingUtilization();
    assert.ok(stopped < WAITING, `turned off while spinning: utilization ${stopped.toFixed(3)}`);
  });

  it('a proxied request starts it; a reload changes the window; stop turns it off', async () => {
    const upstream = await startEchoUpstream();
    const config = (window: string) => `busy_polling: ${window}
log: { level: warn, access: false }
sites:
  - hosts: [localhost]
    routes: [{ upstreams: ["${upstream.url}"] }]
`;
    const gh = await startGatehouse(config('300ms'));
    // The same listen addresses as startGatehouse wrote (port 0: the listeners are kept).
    const reloaded = (window: string) => parseConfig(`listen: { http: "127.0.0.1:0", https: "127.0.0.1:0" }\n${config(window)}`, { source: join(gh.dir, 'gatehouse.yaml'), baseDir: gh.dir });
    const agent = new Agent({ keepAlive: false });
    try {
      assert.equal(busyPollingWindow(), 300);
      await sleep(400); // start-up traffic (none proxied) is behind us
      assert.ok(await waitingUtilization() < WAITING, 'idle before the request');
      const answer = await h1Request(gh.httpsPort, agent, '/spin');
      assert.equal(answer.status, 200);
      const spinning = await utilizationOver(100);
      assert.ok(spinning > SPINNING, `after a proxied request: utilization ${spinning.toFixed(3)}`);

      await gh.gatehouse.reload(reloaded('0'));
      assert.equal(busyPollingWindow(), 0);
      assert.equal((await h1Request(gh.httpsPort, agent, '/calm')).status, 200);
      await sleep(10);
      const calm = await waitingUtilization();
      assert.ok(calm < WAITING, `after the reload to 0: utilization ${calm.toFixed(3)}`);

      await gh.gatehouse.reload(reloaded('1s'));
      assert.equal(busyPollingWindow(), 1000);
    } finally {
      agent.destroy();
      await gh.stop();
      await upstream.close();
    }
    assert.equal(busyPollingWindow(), 0, 'stop turns it off');
    await sleep(10);
    assert.ok(await waitingUtilization() < WAITING, 'stopped: no spinning left');
  });
});
