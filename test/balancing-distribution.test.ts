/**
 * Balancing policies through a real Gatehouse: three real upstreams, thousands of requests per
 * policy over keep-alive connections, and the share each upstream got, read from the answers.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, describe, it } from 'node:test';
import { Agent, request } from 'undici';
import { load, startCountingUpstream, type CountingUpstream } from './helpers/counting-upstream.ts';
import { startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';

const N = 10_000;
const CONCURRENCY = 16;

describe('balancing policies through the server', () => {
  let a: CountingUpstream;
  let b: CountingUpstream;
  let c: CountingUpstream;
  let gh: TestGatehouse;
  let agent: Agent;
  const site = (host: string, policy: string, upstreams: string): string => `
  - hosts: [${host}]
    tls: off
    routes: [{ load_balancing: ${policy}, upstreams: ${upstreams} }]`;

  before(async () => {
    [a, b, c] = await Promise.all([startCountingUpstream('a'), startCountingUpstream('b'), startCountingUpstream('c')]);
    const three = `["${a.url}", "${b.url}", "${c.url}"]`;
    gh = await startGatehouse(`
log: { access: false }
sites:${site('rr.test', 'round_robin', three)}${site('wrr.test', 'weighted_round_robin', `[{ url: "${a.url}", weight: 1 }, { url: "${b.url}", weight: 2 }, { url: "${c.url}", weight: 3 }]`)}${site('lc.test', 'least_conn', three)}${site('r2.test', 'random_two', three)}${site('ip.test', 'ip_hash', three)}${site('cookie.test', 'cookie', three)}${site('first.test', 'first', three)}
`);
    agent = new Agent({ connections: CONCURRENCY });
  });
  after(async () => {
    await agent?.close();
    await gh?.stop();
    await Promise.all([a?.close(), b?.close(), c?.close()]);
  });

  const get = async (host: string, path = '/', headers: Record<string, string> = {}, dispatcher: Agent = agent) => {
    const res = await request(`http://127.0.0.1:${gh.httpPort}${path}`, { dispatcher, headers: { host, ...headers } });
    return { status: res.statusCode, body: await res.body.text(), headers: res.headers };
  };

  /** Shares of a, b, c among N requests to `host`; every answer must be a 200. */
  async function shares(host: string): Promise<[number, number, number]> {
    const { statuses, bodies } = await load(N, CONCURRENCY, () => get(host));
    assert.deepEqual([...statuses], [[200, N]]);
    return [(bodies.get('a') ?? 0) / N, (bodies.get('b') ?? 0) / N, (bodies.get('c') ?? 0) / N];
  }

  it('round_robin: every upstream gets a third', async () => {
    for (const share of await shares('rr.test')) assert.ok(Math.abs(share - 1 / 3) < 0.01, `share ${share}`);
  });

  it('weighted_round_robin: weights 1:2:3 are honoured', async () => {
    const [sa, sb, sc] = await shares('wrr.test');
    assert.ok(Math.abs(sa - 1 / 6) < 0.01, `a ${sa}`);
    assert.ok(Math.abs(sb - 2 / 6) < 0.01, `b ${sb}`);
    assert.ok(Math.abs(sc - 3 / 6) < 0.01, `c ${sc}`);
  });

  it('least_conn and random_two: equal upstreams share the load', async () => {
    for (const host of ['lc.test', 'r2.test']) {
      for (const share of await shares(host)) assert.ok(Math.abs(share - 1 / 3) < 0.1, `${host} share ${share}`);
    }
  });

  it('first: everything goes to the first available upstream', async () => {
    assert.deepEqual(await shares('first.test'), [1, 0, 0]);
  });

  it('ip_hash: each client address always reaches the same upstream; addresses spread', async () => {
    const seen = new Map<string, Set<string>>();
    for (let i = 1; i <= 24; i++) {
      const address = `127.0.0.${i}`;
      const bodies = new Set<string>();
      for (let k = 0; k < 25; k++) {
        const res = await getFrom(address, 'ip.test');
        assert.equal(res.status, 200);
        bodies.add(res.body);
      }
      seen.set(address, bodies);
    }
    for (const [address, bodies] of seen) assert.equal(bodies.size, 1, `${address} reached ${[...bodies]}`);
    const used = new Set([...seen.values()].map((s) => [...s][0]));
    assert.equal(used.size, 3, '24 addresses reach all three upstreams');
  });

  /** A GET from a given loopback source address (undici's Agent cannot bind one). */
  function getFrom(localAddress: string, host: string): Promise<{ status: number; body: string }> {
    return new Promise((resolve, reject) => {
      const req = http.get({ host: '127.0.0.1', port: gh.httpPort, path: '/', localAddress, headers: { host }, agent: false }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => { body += chunk; });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      });
      req.on('error', reject);
    });
  }

  it('cookie: a client that sends back its cookie sticks to one upstream; the upstream keeps its own Set-Cookie', async () => {
    const clients = new Map<string, string>();
    for (let i = 0; i < 6; i++) {
      const first = await get('cookie.test', '/?cookie=app' + i);
      assert.equal(first.status, 200);
      const setCookies = ([] as string[]).concat(first.headers['set-cookie'] ?? []);
      assert.ok(setCookies.includes(`app=app${i}; Path=/`), `upstream cookie kept: ${setCookies}`);
      const sticky = setCookies.find((v) => v.startsWith('gatehouse_upstream='));
      assert.ok(sticky, `sticky cookie set: ${setCookies}`);
      assert.match(sticky, /; Path=\/; HttpOnly; SameSite=Lax$/);
      const cookie = sticky.split(';')[0]!;
      for (let k = 0; k < 50; k++) {
        const res = await get('cookie.test', '/', { cookie: `other=1; ${cookie}` });
        assert.equal(res.body, first.body, 'same upstream as the first answer');
        assert.equal(res.headers['set-cookie'], undefined, 'a valid cookie is not set again');
      }
      clients.set(cookie, first.body);
    }
    assert.equal(new Set(clients.values()).size, 3, 'new clients are spread by the fallback policy');
    const forged = await get('cookie.test', '/', { cookie: 'gatehouse_upstream=forged' });
    assert.equal(forged.status, 200);
    assert.match(String(forged.headers['set-cookie']), /^gatehouse_upstream=/, 'an invalid cookie is replaced');
  });
});
