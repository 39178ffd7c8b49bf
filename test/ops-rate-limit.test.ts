/**
 * Rate limiting per route: the token bucket lets `burst` through at once and then `rate` per
 * second (checked by counting over ~3 s, within 10%), answers 429 with Retry-After and the IETF
 * RateLimit headers, keys by client IP (X-Forwarded-For only from trusted proxies) or a header.
 */
import assert from 'node:assert/strict';
import type { ClientHttp2Session } from 'node:http2';
import { after, before, describe, it } from 'node:test';
import { ClientAddress } from '../src/middleware/client-ip.ts';
import { RateLimiter } from '../src/middleware/rate-limit.ts';
import { startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';
import { adminRequest, h2Request, h2Session, parsePrometheus } from './helpers/ops.ts';
import { startEchoUpstream } from './helpers/upstreams.ts';

type Echo = Awaited<ReturnType<typeof startEchoUpstream>>;

describe('rate limit through Gatehouse', () => {
  let echo: Echo;
  let gh: TestGatehouse;
  let session: ClientHttp2Session;
  before(async () => {
    echo = await startEchoUpstream();
    gh = await startGatehouse(`
listen: { http: "127.0.0.1:0", https: "127.0.0.1:0", admin: "127.0.0.1:0" }
tls: { storage: "{{dir}}/certs" }
trusted_proxies: [127.0.0.0/8]
sites:
  - hosts: [localhost]
    routes:
      - path: /paced/
        upstreams: ["${echo.url}"]
        rate_limit: { rate: 20, burst: 5 }
      - path: /small/
        upstreams: ["${echo.url}"]
        rate_limit: { rate: 1, per: 10s, burst: 2 }
      - path: /keyed/
        upstreams: ["${echo.url}"]
        rate_limit: { rate: 1, per: 10s, burst: 1, key: "header:X-Api-Key" }
      - path: /
        upstreams: ["${echo.url}"]
`);
    session = await h2Session(gh.httpsPort);
  });
  after(async () => {
    session?.close();
    await gh?.stop();
    await echo?.close();
  });

  it('lets burst + rate × time through, within 10%', async () => {
    const headers = { 'x-forwarded-for': '198.51.100.7' };
    let allowed = 0;
    let refused = 0;
    let first = 0;
    let last = 0;
    const stopAt = Date.now() + 3_000;
    // Four streams at a time, as fast as they go: far above 20/s.
    const worker = async () => {
      while (Date.now() < stopAt) {
        const sentAt = performance.now();
        const response = await h2Request(session, '/paced/x', headers);
        if (first === 0) first = sentAt;
        if (response.status === 200) {
          allowed++;
          last = sentAt;
        } else {
          assert.equal(response.status, 429);
          refused++;
        }
      }
    };
    await Promise.all([worker(), worker(), worker(), worker()]);
    const seconds = (last - first) / 1000;
    const expected = 5 + 20 * seconds;
    assert.ok(refused > allowed, `the limit was exceeded (${refused} refused)`);
    assert.ok(Math.abs(allowed - expected) <= expected * 0.1, `${allowed} allowed in ${seconds.toFixed(2)} s, expected ${expected.toFixed(1)} ± 10%`);
    const metrics = parsePrometheus((await adminRequest(gh.gatehouse.addresses.admin!.port, 'GET', '/metrics')).body);
    assert.equal(metrics.sum('gatehouse_http_rate_limited_total', { route: '/paced/' }), refused);
    assert.equal(metrics.sum('gatehouse_http_requests_total', { route: '/paced/', code: '4xx' }), refused);
  });

  it('answers 429 with Retry-After, RateLimit-Policy and RateLimit', async () => {
    const headers = { 'x-forwarded-for': '203.0.113.1' };
    const first = await h2Request(session, '/small/a', headers);
    assert.equal(first.status, 200);
    assert.equal(first.headers['ratelimit-policy'], '"gatehouse";q=1;w=10');
    assert.match(String(first.headers.ratelimit), /^"gatehouse";r=1;t=\d+$/);
    assert.equal((await h2Request(session, '/small/b', headers)).status, 200);
    const refused = await h2Request(session, '/small/c', headers);
    assert.equal(refused.status, 429);
    const retryAfter = Number(refused.headers['retry-after']);
    assert.ok(retryAfter >= 1 && retryAfter <= 10, `Retry-After ${retryAfter}`);
    assert.equal(refused.headers['ratelimit-policy'], '"gatehouse";q=1;w=10');
    assert.equal(refused.headers.ratelimit, `"gatehouse";r=0;t=${retryAfter}`);
    assert.equal(echo.requests.filter((r) => r.url.startsWith('/small/c')).length, 0, 'a refused request never reaches the upstream');
  });

  it('keys by the client IP from X-Forwarded-For of a trusted proxy', async () => {
    // Each client has its own bucket of 2.
    for (const client of ['192.0.2.10', '192.0.2.11']) {
      const headers = { 'x-forwarded-for': client };
      assert.equal((await h2Request(session, '/small/x', headers)).status, 200);
      assert.equal((await h2Request(session, '/small/x', headers)).status, 200);
      assert.equal((await h2Request(session, '/small/x', headers)).status, 429);
    }
    // A client cannot escape by prepending addresses: the rightmost untrusted hop is the client.
    assert.equal((await h2Request(session, '/small/x', { 'x-forwarded-for': '10.9.9.9, 192.0.2.10' })).status, 429);
  });

  it('keys by a header when configured, falling back to the IP', async () => {
    assert.equal((await h2Request(session, '/keyed/', { 'x-api-key': 'alpha' })).status, 200);
    assert.equal((await h2Request(session, '/keyed/', { 'x-api-key': 'alpha' })).status, 429);
    assert.equal((await h2Request(session, '/keyed/', { 'x-api-key': 'beta' })).status, 200);
  });

  it('keeps the buckets of unchanged routes across a reload', async () => {
    const headers = { 'x-forwarded-for': '192.0.2.99' };
    assert.equal((await h2Request(session, '/small/r', headers)).status, 200);
    assert.equal((await h2Request(session, '/small/r', headers)).status, 200);
    assert.equal((await gh.gatehouse.reloadFromFile('test')).result, 'reloaded');
    assert.equal((await h2Request(session, '/small/r', headers)).status, 429);
  });
});

describe('ClientAddress', () => {
  const req = (peer: string, xff?: string) => ({ socket: { remoteAddress: peer }, headers: xff === undefined ? {} : { 'x-forwarded-for': xff } }) as never;

  it('ignores X-Forwarded-For from an untrusted peer', () => {
    assert.equal(new ClientAddress([]).of(req('203.0.113.5', '1.2.3.4')), '203.0.113.5');
    assert.equal(new ClientAddress(['10.0.0.0/8']).of(req('203.0.113.5', '1.2.3.4')), '203.0.113.5');
  });

  it('walks X-Forwarded-For right to left past trusted hops', () => {
    const clients = new ClientAddress(['10.0.0.0/8', '::1']);
    assert.equal(clients.of(req('10.0.0.1', '1.2.3.4')), '1.2.3.4');
    assert.equal(clients.of(req('10.0.0.1', '6.6.6.6, 1.2.3.4, 10.0.0.2')), '1.2.3.4');
    assert.equal(clients.of(req('::1', '10.1.1.1')), '10.1.1.1'); // every hop trusted: the leftmost
    assert.equal(clients.of(req('::ffff:10.0.0.1', '1.2.3.4')), '1.2.3.4');
    assert.equal(clients.of(req('10.0.0.1', 'garbage, 1.2.3.4')), '1.2.3.4');
    assert.equal(clients.of(req('10.0.0.1', '1.2.3.4, garbage')), '10.0.0.1');
  });
});

describe('RateLimiter', () => {
  const res = () => {
    const headers: Record<string, string> = {};
    let status = 0;
    return {
      headers, get status() { return status; },
      headersSent: false, writableEnded: false,
      setHeader(name: string, value: string) { headers[name] = value; },
      writeHead(code: number, h: Record<string, string>) { status = code; Object.assign(headers, h); },
      end() {},
    };
  };
  const req = { socket: { remoteAddress: '192.0.2.1' }, headers: {}, httpVersionMajor: 2, method: 'GET' } as never;

  it('refills at rate per period up to burst', () => {
    const limiter = new RateLimiter({ rate: 10, per: 1000, burst: 3, key: 'ip', max_keys: 10 }, new ClientAddress([]));
    let t = 1000;
    for (let i = 0; i < 3; i++) assert.equal(limiter.admit(req, res() as never, t), 0);
    const refused = res();
    assert.equal(limiter.admit(req, refused as never, t), 429);
    assert.equal(refused.headers['retry-after'], '1');
    t += 100; // one token back
    assert.equal(limiter.admit(req, res() as never, t), 0);
    assert.equal(limiter.admit(req, res() as never, t), 429);
    t += 10_000; // full again, never above burst
    for (let i = 0; i < 3; i++) assert.equal(limiter.admit(req, res() as never, t), 0);
    assert.equal(limiter.admit(req, res() as never, t), 429);
  });

  it('keeps at most max_keys buckets', () => {
    const limiter = new RateLimiter({ rate: 1, per: 1000, burst: 1, key: 'ip', max_keys: 100 }, new ClientAddress([]));
    for (let i = 0; i < 1000; i++) {
      limiter.admit({ socket: { remoteAddress: `10.0.${i >> 8}.${i & 255}` }, headers: {}, httpVersionMajor: 2 } as never, res() as never, 0);
    }
    assert.equal(limiter.size, 100);
  });
});
