import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { LOAD_BALANCING_POLICIES } from '../src/config/schema.js';
import {
  BalancerError, createSelector, policyNames, registerPolicy,
  type BalancedUpstream, type SelectionContext, type Selector,
} from '../src/upstream/balancer.js';

function upstreams(...weights: number[]): BalancedUpstream[] {
  return weights.map((weight, i) => ({ origin: `http://127.0.0.1:${8081 + i}`, weight, inFlight: 0, available: true }));
}

function context(overrides: Partial<SelectionContext> = {}): SelectionContext {
  return { clientIp: '203.0.113.7', cookieHeader: undefined, exclude: undefined, setCookie: undefined, ...overrides };
}

/** Counts how often each upstream is chosen in `n` selections. */
function distribution(selector: Selector, list: BalancedUpstream[], n: number, ctx = context()): number[] {
  const counts = list.map(() => 0);
  for (let i = 0; i < n; i++) {
    const chosen = selector.select(list, ctx);
    assert.ok(chosen, 'an upstream is chosen');
    counts[list.indexOf(chosen)]!++;
  }
  return counts;
}

/** mulberry32: a small seeded PRNG so random policies are reproducible. */
function seeded(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function ipv4(i: number): string {
  return `10.${(i >>> 16) & 255}.${(i >>> 8) & 255}.${i & 255}`;
}

describe('policy registry', () => {
  it('has every policy the config schema accepts', () => {
    for (const name of LOAD_BALANCING_POLICIES) assert.ok(policyNames().includes(name), name);
  });

  it('rejects an unknown name with GH_LB_UNKNOWN_POLICY and a list of known ones', () => {
    assert.throws(() => createSelector('fastest'), (error: unknown) =>
      error instanceof BalancerError && error.code === 'GH_LB_UNKNOWN_POLICY' && error.message.includes('round_robin'));
  });

  it('takes new policies by name and refuses to replace one', () => {
    registerPolicy('test_last', () => ({ select: (list) => list.at(-1) }));
    const list = upstreams(1, 1, 1);
    assert.equal(createSelector('test_last').select(list, context()), list[2]);
    assert.throws(() => registerPolicy('round_robin', () => createSelector('first')), { code: 'GH_LB_DUPLICATE_POLICY' });
  });
});

describe('round_robin', () => {
  it('takes each upstream in turn', () => {
    const list = upstreams(1, 5, 1);
    const selector = createSelector('round_robin');
    assert.deepEqual([0, 1, 2, 3, 4, 5].map(() => list.indexOf(selector.select(list, context())!)), [0, 1, 2, 0, 1, 2]);
    assert.deepEqual(distribution(selector, list, 9999), [3333, 3333, 3333]);
  });

  it('skips an unavailable upstream and shares its load evenly', () => {
    const list = upstreams(1, 1, 1);
    list[1]!.available = false;
    assert.deepEqual(distribution(createSelector('round_robin'), list, 10_000), [5000, 0, 5000]);
  });

  it('skips upstreams already tried, and returns undefined when none is left', () => {
    const list = upstreams(1, 1);
    const selector = createSelector('round_robin');
    assert.equal(selector.select(list, context({ exclude: [list[0]!] })), list[1]);
    assert.equal(selector.select(list, context({ exclude: [list[0]!] })), list[1]);
    assert.equal(selector.select(list, context({ exclude: list })), undefined);
    list[0]!.available = false;
    list[1]!.available = false;
    assert.equal(selector.select(list, context()), undefined);
    assert.equal(selector.select([], context()), undefined);
  });
});

describe('weighted_round_robin', () => {
  it('spreads picks smoothly, as nginx does (5:1:1 → a a b a c a a)', () => {
    const list = upstreams(5, 1, 1);
    const selector = createSelector('weighted_round_robin');
    const sequence = Array.from({ length: 7 }, () => 'abc'[list.indexOf(selector.select(list, context())!)]).join(' ');
    assert.equal(sequence, 'a a b a c a a');
  });

  it('honours weights 1:2:3 over 10 000 selections (within 3%)', () => {
    const list = upstreams(1, 2, 3);
    const counts = distribution(createSelector('weighted_round_robin'), list, 10_000);
    [1 / 6, 2 / 6, 3 / 6].forEach((share, i) => assert.ok(Math.abs(counts[i]! / 10_000 - share) < 0.03, `upstream ${i}: ${counts[i]}`));
  });

  it('leaves an unavailable upstream out and keeps the others in proportion', () => {
    const list = upstreams(1, 2, 3);
    list[2]!.available = false;
    const counts = distribution(createSelector('weighted_round_robin'), list, 9000);
    assert.deepEqual(counts, [3000, 6000, 0]);
  });
});

describe('least_conn', () => {
  it('prefers the idle upstream', () => {
    const list = upstreams(1, 1, 1);
    list[0]!.inFlight = 5;
    list[1]!.inFlight = 0;
    list[2]!.inFlight = 3;
    assert.deepEqual(distribution(createSelector('least_conn'), list, 1000), [0, 1000, 0]);
  });

  it('breaks ties round robin', () => {
    assert.deepEqual(distribution(createSelector('least_conn'), upstreams(1, 1, 1), 9999), [3333, 3333, 3333]);
  });

  it('counts in-flight requests relative to weight and skips unavailable upstreams', () => {
    const list = upstreams(1, 4);
    list[0]!.inFlight = 2;
    list[1]!.inFlight = 6; // 6/4 < 2/1
    const selector = createSelector('least_conn');
    assert.equal(selector.select(list, context()), list[1]);
    list[1]!.available = false;
    assert.equal(selector.select(list, context()), list[0]);
  });

  it('keeps in-flight requests level under load', () => {
    const list = upstreams(1, 1, 1, 1);
    const selector = createSelector('least_conn');
    for (let i = 0; i < 400; i++) selector.select(list, context())!.inFlight++;
    assert.deepEqual(list.map((u) => u.inFlight), [100, 100, 100, 100]);
  });
});

describe('random_two', () => {
  it('is balanced over 10 000 selections of idle upstreams (within 3%)', () => {
    const list = upstreams(1, 1, 1, 1);
    const counts = distribution(createSelector('random_two', { random: seeded(1) }), list, 10_000);
    for (const count of counts) assert.ok(Math.abs(count / 10_000 - 0.25) < 0.03, `${counts}`);
  });

  it('never picks the busiest of two, so a loaded upstream gets nothing', () => {
    const list = upstreams(1, 1, 1);
    list[2]!.inFlight = 50;
    const counts = distribution(createSelector('random_two', { random: seeded(2) }), list, 3000);
    assert.equal(counts[2], 0);
    assert.ok(Math.abs(counts[0]! - counts[1]!) < 300, `${counts}`);
  });

  it('keeps load close to level when every pick adds a request and random ones finish', () => {
    const random = seeded(3);
    const list = upstreams(1, 1, 1, 1, 1);
    const selector = createSelector('random_two', { random });
    for (let i = 0; i < 10_000; i++) {
      selector.select(list, context())!.inFlight++;
      const done = list[Math.floor(random() * list.length)]!;
      if (done.inFlight > 0) done.inFlight--;
    }
    const loads = list.map((u) => u.inFlight);
    assert.ok(Math.max(...loads) - Math.min(...loads) <= 3, `${loads}`);
  });

  it('returns the only available upstream, or undefined', () => {
    const list = upstreams(1, 1);
    list[0]!.available = false;
    const selector = createSelector('random_two');
    assert.equal(selector.select(list, context()), list[1]);
    list[1]!.available = false;
    assert.equal(selector.select(list, context()), undefined);
  });
});

describe('ip_hash', () => {
  it('sends the same client IP to the same upstream', () => {
    const list = upstreams(1, 1, 1, 1);
    const selector = createSelector('ip_hash');
    for (let i = 0; i < 100; i++) {
      const ip = ipv4(i * 7919);
      const first = selector.select(list, context({ clientIp: ip }));
      for (let k = 0; k < 5; k++) assert.equal(selector.select(list, context({ clientIp: ip })), first);
      assert.equal(selector.select(list, context({ clientIp: `::ffff:${ip}` })), first, 'IPv4-mapped IPv6 is the same client');
    }
  });

  it('spreads 10 000 clients evenly (within 3%), and by weight', () => {
    const list = upstreams(1, 1, 1, 1);
    const selector = createSelector('ip_hash');
    const counts = list.map(() => 0);
    for (let i = 0; i < 10_000; i++) counts[list.indexOf(selector.select(list, context({ clientIp: ipv4(i) }))!)]!++;
    for (const count of counts) assert.ok(Math.abs(count / 10_000 - 0.25) < 0.03, `${counts}`);

    const weighted = upstreams(1, 3);
    const byWeight = [0, 0];
    for (let i = 0; i < 10_000; i++) byWeight[weighted.indexOf(selector.select(weighted, context({ clientIp: ipv4(i) }))!)]!++;
    assert.ok(Math.abs(byWeight[1]! / 10_000 - 0.75) < 0.03, `${byWeight}`);
  });

  it('moves about 1/(n+1) of clients, all to the new upstream, when one is added', () => {
    const four = upstreams(1, 1, 1, 1);
    const five = [...four, ...upstreams(1, 1, 1, 1, 1).slice(4)];
    const selector = createSelector('ip_hash');
    let moved = 0;
    for (let i = 0; i < 10_000; i++) {
      const ctx = context({ clientIp: ipv4(i) });
      const before = selector.select(four, ctx);
      const after = selector.select(five, ctx);
      if (before !== after) {
        moved++;
        assert.equal(after, five[4], 'a client that moves goes to the new upstream');
      }
    }
    assert.ok(Math.abs(moved / 10_000 - 1 / 5) < 0.03, `moved ${moved} of 10000`);
  });

  it('sends only the clients of an unavailable upstream elsewhere, and back when it returns', () => {
    const list = upstreams(1, 1, 1);
    const selector = createSelector('ip_hash');
    const before = Array.from({ length: 3000 }, (_, i) => selector.select(list, context({ clientIp: ipv4(i) })));
    list[1]!.available = false;
    for (let i = 0; i < 3000; i++) {
      const now = selector.select(list, context({ clientIp: ipv4(i) }));
      if (before[i] === list[1]) assert.notEqual(now, list[1]);
      else assert.equal(now, before[i]);
    }
    list[1]!.available = true;
    for (let i = 0; i < 3000; i++) assert.equal(selector.select(list, context({ clientIp: ipv4(i) })), before[i]);
  });
});

describe('cookie', () => {
  const cookieValue = (setCookie: string | undefined) => /^gatehouse_upstream=([^;]+);/.exec(setCookie ?? '')?.[1];

  it('sets a signed cookie and sticks to its upstream', () => {
    const list = upstreams(1, 1, 1);
    const selector = createSelector('cookie', { cookieSecret: 'test secret' });
    const first = context();
    const chosen = selector.select(list, first);
    assert.ok(chosen);
    assert.match(first.setCookie!, /^gatehouse_upstream=[A-Za-z0-9_-]{43}; Path=\/; HttpOnly; SameSite=Lax$/);
    assert.ok(!first.setCookie!.includes('127.0.0.1'), 'the cookie does not reveal the origin');
    const value = cookieValue(first.setCookie);
    for (let i = 0; i < 50; i++) {
      const ctx = context({ cookieHeader: `theme=dark; gatehouse_upstream=${value}; lang=en` });
      assert.equal(selector.select(list, ctx), chosen);
      assert.equal(ctx.setCookie, undefined, 'no new cookie while the upstream is available');
    }
  });

  it('ignores a tampered cookie, a cookie signed with another secret and a look-alike name', () => {
    const list = upstreams(1, 1, 1);
    const selector = createSelector('cookie', { cookieSecret: 'secret A' });
    const other = createSelector('cookie', { cookieSecret: 'secret B' });
    const seed = context();
    const chosen = selector.select(list, seed)!;
    const value = cookieValue(seed.setCookie)!;
    const tampered = (value[0] === 'A' ? 'B' : 'A') + value.slice(1);
    const foreign = context();
    other.select(list, foreign);

    const headers = [
      `gatehouse_upstream=${tampered}`,
      `gatehouse_upstream=${value}x`,
      `x${`gatehouse_upstream=${value}`}`,
      `gatehouse_upstream=${cookieValue(foreign.setCookie)}`,
    ];
    // The fallback is round robin: over 3 requests, a valid cookie would always give `chosen`.
    for (const cookieHeader of headers) {
      const seen = new Set<BalancedUpstream>();
      for (let i = 0; i < 3; i++) {
        const ctx = context({ cookieHeader });
        seen.add(selector.select(list, ctx)!);
        assert.ok(ctx.setCookie, `a new cookie replaces ${cookieHeader}`);
      }
      assert.equal(seen.size, 3, `${cookieHeader} is ignored`);
    }
    const again = context({ cookieHeader: `gatehouse_upstream=${value}` });
    assert.equal(selector.select(list, again), chosen);
  });

  it('falls back and sets a new cookie when its upstream is unavailable or already tried', () => {
    const list = upstreams(1, 1, 1);
    const selector = createSelector('cookie', { cookieName: 'sticky', cookieSecure: true });
    const seed = context();
    const chosen = selector.select(list, seed)!;
    assert.match(seed.setCookie!, /^sticky=[^;]+; Path=\/; HttpOnly; SameSite=Lax; Secure$/);
    const cookieHeader = seed.setCookie!.split(';')[0]!;

    chosen.available = false;
    const ctx = context({ cookieHeader });
    const replacement = selector.select(list, ctx);
    assert.ok(replacement && replacement !== chosen);
    assert.ok(ctx.setCookie && ctx.setCookie !== seed.setCookie);
    const newHeader = ctx.setCookie.split(';')[0]!;
    assert.equal(selector.select(list, context({ cookieHeader: newHeader })), replacement, 'sticks to the replacement');

    chosen.available = true;
    const retry = context({ cookieHeader, exclude: [chosen] });
    assert.notEqual(selector.select(list, retry), chosen);
    assert.ok(retry.setCookie);
  });

  it('uses the configured fallback policy and refuses itself as fallback', () => {
    const list = upstreams(1, 1, 1);
    const selector = createSelector('cookie', { fallback: 'first' });
    assert.deepEqual(distribution(selector, list, 30), [30, 0, 0]);
    assert.throws(() => createSelector('cookie', { fallback: 'cookie' }), { code: 'GH_LB_INVALID_FALLBACK' });
  });
});

describe('first', () => {
  it('fails over in config order and back', () => {
    const list = upstreams(1, 1, 1);
    const selector = createSelector('first');
    assert.equal(selector.select(list, context()), list[0]);
    list[0]!.available = false;
    assert.equal(selector.select(list, context()), list[1]);
    list[1]!.available = false;
    assert.equal(selector.select(list, context()), list[2]);
    list[2]!.available = false;
    assert.equal(selector.select(list, context()), undefined);
    list[0]!.available = true;
    assert.equal(selector.select(list, context()), list[0]);
    assert.equal(selector.select(list, context({ exclude: [list[0]!] })), undefined);
  });
});
