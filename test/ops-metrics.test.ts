/**
 * The admin API: /metrics in Prometheus text (parsed strictly) whose counters move with traffic,
 * /status with config version, routes, upstream states and certificates, the bearer token, and
 * browser requests refused.
 */
import assert from 'node:assert/strict';
import type { ClientHttp2Session } from 'node:http2';
import { after, before, describe, it } from 'node:test';
import { startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';
import { adminRequest, h1Agent, h1Request, h2Request, h2Session, parsePrometheus } from './helpers/ops.ts';
import { startEchoUpstream } from './helpers/upstreams.ts';

type Echo = Awaited<ReturnType<typeof startEchoUpstream>>;
const TOKEN = 'test-token-0123456789abcdef';

describe('admin API: /metrics and /status', () => {
  let echo: Echo;
  let gh: TestGatehouse;
  let session: ClientHttp2Session;
  const agent = h1Agent();
  const auth = { authorization: `Bearer ${TOKEN}` };
  const metrics = async () => {
    const response = await adminRequest(gh.gatehouse.addresses.admin!.port, 'GET', '/metrics', auth);
    assert.equal(response.status, 200);
    assert.match(String(response.headers['content-type']), /^text\/plain; version=0\.0\.4/);
    return parsePrometheus(response.body);
  };

  before(async () => {
    echo = await startEchoUpstream();
    gh = await startGatehouse(`
listen: { http: "127.0.0.1:0", https: "127.0.0.1:0", admin: 0 }
admin: { token: "${TOKEN}" }
tls: { storage: "{{dir}}/certs" }
sites:
  - hosts: [localhost]
    routes:
      - path: /api/
        upstreams: ["${echo.url}"]
      - path: /
        upstreams: ["${echo.url}"]
`);
    session = await h2Session(gh.httpsPort);
  });
  after(async () => {
    session?.close();
    agent.destroy();
    await gh?.stop();
    await echo?.close();
  });

  it('binds the admin listener on loopback when only a port is given', () => {
    assert.equal(gh.gatehouse.addresses.admin?.address, '127.0.0.1');
  });

  it('serves Prometheus text whose counters move as requests are made', async () => {
    const before = await metrics();
    for (const [name, type] of before.types) assert.match(name, /^gatehouse_/, `${name} (${type}) has the prefix`);
    const labels = { site: 'localhost', route: '/api/', code: '2xx' };
    const start = before.sum('gatehouse_http_requests_total', labels);

    for (let i = 0; i < 3; i++) assert.equal((await h2Request(session, `/api/items/${i}?q=${i}`)).status, 200);
    for (let i = 0; i < 2; i++) assert.equal((await h1Request(gh.httpsPort, agent, `/api/other/${i}`, {}, 'hello')).status, 200);
    assert.equal((await h2Request(session, '/nowhere')).status, 200); // the "/" route

    const after = await metrics();
    assert.equal(after.sum('gatehouse_http_requests_total', labels) - start, 5);
    assert.equal(after.sum('gatehouse_http_requests_total', { route: '/' }), 1);
    // Keyed by route, never by raw path.
    assert.ok(!after.samples.some((s) => Object.values(s.labels).some((v) => v.includes('/api/items'))));
    assert.equal(after.sum('gatehouse_http_request_duration_seconds_count', { route: '/api/' }), 5);
    assert.ok(after.sum('gatehouse_http_request_duration_seconds_bucket', { route: '/api/', le: '+Inf' }) >= 5);
    assert.ok(after.sum('gatehouse_http_request_body_bytes_total', { route: '/api/' }) >= 10);
    assert.ok(after.sum('gatehouse_http_response_body_bytes_total', { route: '/api/' }) > 0);
    assert.equal(after.sum('gatehouse_http_requests_in_flight'), 0);
    assert.equal(after.sum('gatehouse_upstream_healthy', { upstream: echo.url, route: '/api/' }), 1);
    assert.equal(after.sum('gatehouse_upstream_requests_in_flight', { upstream: echo.url }), 0);
    // One h2 and one http/1.1 TLS connection so far (the agent keeps its connection alive).
    assert.ok(after.sum('gatehouse_tls_handshakes_total', { protocol: 'h2' }) >= 1);
    assert.ok(after.sum('gatehouse_tls_handshakes_total', { protocol: 'http/1.1' }) >= 1);
    assert.ok(after.samples.some((s) => s.name === 'gatehouse_tls_handshakes_total' && /^TLSv1\.[23]$/.test(s.labels.version ?? '')));
    const expiry = after.samples.find((s) => s.name === 'gatehouse_tls_certificate_expiry_timestamp_seconds' && s.labels.name === 'localhost');
    assert.ok(expiry && expiry.value * 1000 > Date.now(), 'the certificate for localhost expires in the future');
    assert.ok(after.has('gatehouse_acme_orders_total'));
    assert.ok(after.has('gatehouse_process_cpu_user_seconds_total'));
    assert.equal(after.sum('gatehouse_config_version'), 1);
  });

  it('counts upstream failures by origin and code', async () => {
    const dead = 'http://127.0.0.1:9'; // discard port: nothing listens
    const file = `${gh.dir}/gatehouse.yaml`;
    const { writeFile, readFile } = await import('node:fs/promises');
    const original = await readFile(file, 'utf8');
    await writeFile(file, original.replace('      - path: /\n', `      - path: /dead/\n        upstreams: ["${dead}"]\n        retries: { count: 0 }\n      - path: /\n`));
    try {
      const reload = await adminRequest(gh.gatehouse.addresses.admin!.port, 'POST', '/reload', auth);
      assert.equal(reload.status, 200, reload.body);
      assert.equal((await h2Request(session, '/dead/x')).status, 502);
      const after = await metrics();
      assert.equal(after.sum('gatehouse_upstream_failures_total', { upstream: dead, code: 'GH_UPSTREAM_REFUSED' }), 1);
      assert.equal(after.sum('gatehouse_http_requests_total', { route: '/dead/', code: '5xx' }), 1);
      assert.equal(after.sum('gatehouse_config_reloads_total', { result: 'success' }), 1);
    } finally {
      await writeFile(file, original);
    }
  });

  it('serves /status with config version, routes, upstream states and certificates', async () => {
    const response = await adminRequest(gh.gatehouse.addresses.admin!.port, 'GET', '/status', auth);
    assert.equal(response.status, 200);
    const status = JSON.parse(response.body) as {
      config: { version: number; source: string };
      sites: { hosts: string[]; routes: { path: string; upstreams: { origin: string; available: boolean; inFlight: number }[] }[] }[];
      certificates: { names: string[]; source: string; issuer: string; not_after: string }[];
    };
    assert.equal(status.config.version, gh.gatehouse.configVersion);
    assert.match(status.config.source, /gatehouse\.yaml$/);
    assert.deepEqual(status.sites[0]!.hosts, ['localhost']);
    const api = status.sites[0]!.routes.find((r) => r.path === '/api/')!;
    assert.equal(api.upstreams[0]!.origin, echo.url);
    assert.equal(api.upstreams[0]!.available, true);
    assert.equal(api.upstreams[0]!.inFlight, 0);
    const certificate = status.certificates.find((c) => c.names.includes('localhost'));
    assert.ok(certificate, 'the certificate served for localhost is listed');
    assert.ok(certificate.issuer.length > 0);
    assert.ok(Date.parse(certificate.not_after) > Date.now());
  });

  it('requires the bearer token, refuses browsers, and names the methods allowed', async () => {
    const port = gh.gatehouse.addresses.admin!.port;
    const none = await adminRequest(port, 'GET', '/metrics');
    assert.equal(none.status, 401);
    assert.match(String(none.headers['www-authenticate']), /^Bearer/);
    assert.equal((await adminRequest(port, 'GET', '/metrics', { authorization: 'Bearer wrong-token-0123456789' })).status, 401);
    assert.equal((await adminRequest(port, 'POST', '/reload', { ...auth, origin: 'https://evil.example' })).status, 403);
    const wrongMethod = await adminRequest(port, 'GET', '/reload', auth);
    assert.equal(wrongMethod.status, 405);
    assert.equal(wrongMethod.headers.allow, 'POST');
    assert.equal((await adminRequest(port, 'GET', '/nothing', auth)).status, 404);
    assert.equal((await adminRequest(port, 'GET', '/healthz', auth)).status, 200);
  });
});
