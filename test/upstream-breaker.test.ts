import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { BreakerGroup, CircuitBreaker, failureKind, type BreakerConfig, type BreakerState } from '../src/upstream/breaker.js';
import { ManualClock } from '../src/upstream/clock.js';

const config: BreakerConfig = { max_fails: 3, window: 1000, cooldown: 5000, fail_on_5xx: false, max_latency: undefined };

function setup(overrides: Partial<BreakerConfig> = {}) {
  const clock = new ManualClock(10_000);
  const upstream = { origin: 'http://127.0.0.1:8081', available: true };
  const changes: [BreakerState, string][] = [];
  const breaker = new CircuitBreaker({ ...config, ...overrides }, {
    clock, target: upstream, onChange: (state, reason) => changes.push([state, reason]),
  });
  return { clock, upstream, breaker, changes };
}

describe('circuit breaker', () => {
  it('opens after max_fails failures within the sliding window, not when they are spread out', () => {
    const { clock, upstream, breaker, changes } = setup();
    breaker.recordFailure('connect'); // t=0
    clock.advance(600);
    breaker.recordFailure('connect'); // t=600
    clock.advance(600);
    breaker.recordFailure('reset'); // t=1200: the first one is 1200ms old, outside the window
    assert.equal(breaker.state(), 'closed');
    assert.equal(upstream.available, true);
    assert.equal(breaker.failures(), 2);
    clock.advance(300);
    breaker.recordFailure('timeout'); // t=1500: 600, 1200, 1500 within 1000ms
    assert.equal(breaker.state(), 'open');
    assert.equal(upstream.available, false);
    assert.deepEqual(changes.map(([state]) => state), ['open']);
    assert.match(changes[0]![1], /3 failures within 1000ms \(last: timeout\)/);
  });

  it('successes do not erase failures; they age out of the window', () => {
    const { clock, breaker } = setup();
    breaker.recordFailure('connect');
    breaker.recordSuccess(5);
    breaker.recordFailure('connect');
    breaker.recordSuccess(5);
    breaker.recordFailure('connect');
    assert.equal(breaker.state(), 'open');

    const second = setup();
    second.breaker.recordFailure('connect');
    second.breaker.recordFailure('connect');
    second.clock.advance(1001);
    assert.equal(second.breaker.failures(), 0);
    second.breaker.recordFailure('connect');
    assert.equal(second.breaker.state(), 'closed');
  });

  it('walks open → half-open → one trial → open → half-open → closed on the clock', () => {
    const { clock, upstream, breaker, changes } = setup();
    const group = { refresh: () => breaker.refresh(clock.now()) };
    for (let i = 0; i < 3; i++) breaker.recordFailure('connect');
    assert.equal(breaker.tryAcquire(), false);
    assert.equal(breaker.retryAfterMs(), 5000);

    clock.advance(3500);
    group.refresh();
    assert.equal(breaker.state(), 'open');
    assert.equal(upstream.available, false);
    assert.equal(breaker.retryAfterMs(), 1500);
    assert.equal(breaker.tryAcquire(), false);

    clock.advance(1500);
    assert.equal(upstream.available, false, 'nothing changes without a read: no timers');
    group.refresh();
    assert.equal(breaker.state(), 'half-open');
    assert.equal(upstream.available, true, 'the selector may choose it for the trial');
    assert.equal(breaker.retryAfterMs(), 0);
    assert.equal(breaker.tryAcquire(), true, 'one trial');
    assert.equal(breaker.tryAcquire(), false, 'exactly one');
    assert.equal(upstream.available, false, 'out of rotation while the trial runs');
    clock.advance(200);
    breaker.recordFailure('reset');
    assert.equal(breaker.state(), 'open');
    assert.equal(breaker.retryAfterMs(), 5000, 'a failed trial starts a new cooldown');

    clock.advance(5000);
    assert.equal(breaker.tryAcquire(), true, 'tryAcquire itself notices the cooldown ended');
    breaker.recordSuccess(12);
    assert.equal(breaker.state(), 'closed');
    assert.equal(upstream.available, true);
    assert.equal(breaker.failures(), 0, 'closing forgets old failures');
    assert.equal(breaker.tryAcquire(), true);
    assert.equal(breaker.tryAcquire(), true);

    assert.deepEqual(changes.map(([state]) => state), ['open', 'half-open', 'open', 'half-open', 'closed']);
    assert.match(changes[2]![1], /trial request failed \(reset\)/);
  });

  it('ignores late outcomes while open', () => {
    const { clock, breaker } = setup();
    for (let i = 0; i < 3; i++) breaker.recordFailure('connect');
    breaker.recordSuccess(1);
    breaker.recordFailure('connect');
    assert.equal(breaker.state(), 'open');
    assert.equal(breaker.retryAfterMs(), 5000, 'a late failure does not extend the cooldown');
    clock.advance(5000);
    assert.equal(breaker.state(), 'half-open');
  });

  it('allows another trial when one is released or lost', () => {
    const { clock, upstream, breaker } = setup();
    for (let i = 0; i < 3; i++) breaker.recordFailure('connect');
    clock.advance(5000);
    assert.equal(breaker.tryAcquire(), true);
    breaker.release();
    assert.equal(upstream.available, true);
    assert.equal(breaker.tryAcquire(), true);
    clock.advance(4999);
    breaker.refresh(clock.now());
    assert.equal(breaker.tryAcquire(), false);
    assert.equal(breaker.retryAfterMs(), 1);
    clock.advance(1);
    breaker.refresh(clock.now());
    assert.equal(upstream.available, true, 'a trial that never reported back is considered lost');
    assert.equal(breaker.tryAcquire(), true);
  });

  it('counts slow responses with max_latency and 5xx with fail_on_5xx', () => {
    const slow = setup({ max_fails: 2, max_latency: 100 });
    slow.breaker.recordSuccess(100);
    slow.breaker.recordSuccess(101);
    slow.breaker.recordResponse(200, 150);
    assert.equal(slow.breaker.state(), 'open');
    assert.match(slow.changes[0]![1], /latency/);

    const lenient = setup({ max_fails: 1 });
    lenient.breaker.recordResponse(503, 1);
    assert.equal(lenient.breaker.state(), 'closed', 'a 5xx is the application\'s answer by default');

    const strict = setup({ max_fails: 1, fail_on_5xx: true });
    strict.breaker.recordResponse(499, 1);
    assert.equal(strict.breaker.state(), 'closed');
    strict.breaker.recordResponse(502, 1);
    assert.equal(strict.breaker.state(), 'open');
  });

  it('keeps available = active health AND breaker', () => {
    const { clock, upstream, breaker } = setup({ max_fails: 1 });
    breaker.setActiveHealthy(false);
    assert.equal(upstream.available, false);
    assert.equal(breaker.allowsTraffic(), true);
    breaker.setActiveHealthy(true);
    assert.equal(upstream.available, true);
    breaker.recordFailure('connect');
    breaker.setActiveHealthy(true);
    assert.equal(upstream.available, false, 'a healthy verdict does not override an open breaker');
    clock.advance(5000);
    breaker.setActiveHealthy(false);
    breaker.refresh(clock.now());
    assert.equal(breaker.state(), 'half-open');
    assert.equal(upstream.available, false, 'an unhealthy upstream stays out when the breaker half-opens');
    breaker.setActiveHealthy(true);
    assert.equal(upstream.available, true);
  });
});

describe('breaker group', () => {
  it('refreshes every breaker before selection and tells the shortest Retry-After', () => {
    const clock = new ManualClock();
    const list = [0, 1, 2].map((i) => ({ origin: `http://127.0.0.1:${8081 + i}`, available: true }));
    const changes: string[] = [];
    const group = new BreakerGroup(list, { ...config, max_fails: 1 }, {
      clock, onChange: (upstream, state) => changes.push(`${upstream.origin} ${state}`),
    });
    assert.equal(group.retryAfterMs(), undefined);
    group.breakerOf(list[0]!)!.recordFailure('connect');
    clock.advance(2000);
    group.breakerOf(list[1]!)!.recordFailure('connect');
    assert.deepEqual(list.map((u) => u.available), [false, false, true]);
    assert.equal(group.retryAfterMs(), 3000);
    clock.advance(3000);
    group.refresh();
    assert.deepEqual(list.map((u) => u.available), [true, false, true]);
    assert.equal(group.retryAfterMs(), 2000);
    assert.deepEqual(changes, ['http://127.0.0.1:8081 open', 'http://127.0.0.1:8082 open', 'http://127.0.0.1:8081 half-open']);
    assert.equal(group.breakerOf({ origin: 'http://elsewhere', available: true }), undefined);
  });
});

describe('failureKind', () => {
  it('classifies by error code and ignores client aborts', () => {
    const coded = (code: string) => Object.assign(new Error('x'), { code });
    assert.equal(failureKind(coded('ECONNREFUSED')), 'connect');
    assert.equal(failureKind(coded('GH_UPSTREAM_CONNECT_TIMEOUT')), 'connect');
    assert.equal(failureKind(coded('GH_UPSTREAM_RESET')), 'reset');
    assert.equal(failureKind(coded('GH_UPSTREAM_HEADERS_TIMEOUT')), 'timeout');
    assert.equal(failureKind(coded('GH_UPSTREAM_ABORTED')), undefined);
    assert.equal(failureKind(new TypeError('fetch failed', { cause: coded('ECONNRESET') })), 'reset');
    assert.equal(failureKind(new Error('no code')), 'other');
  });
});
