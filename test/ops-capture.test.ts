/**
 * Debug capture: request and response bodies up to the cap, with timings, in `http.log.capture`
 * lines; Authorization, Cookie and Set-Cookie redacted there and in the access log; the proxied
 * exchange itself unchanged.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import type { ClientHttp2Session } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';
import { h1Agent, h1Request, h2Request, h2Session, waitFor } from './helpers/ops.ts';

const SECRETS = { authorization: 'Bearer secret-token-AAA', cookie: 'session=secret-cookie-BBB', setCookie: 'id=secret-set-cookie-CCC; HttpOnly' };
const RESPONSE_BODY = 'the upstream answer, long enough to be cut by the capture cap';

describe('debug capture and redaction', () => {
  let upstream: Server;
  let url: string;
  const received: { length: number; sha256: string }[] = [];
  let gh: TestGatehouse;
  let session: ClientHttp2Session;
  const agent = h1Agent();

  before(async () => {
    upstream = createServer((req, res) => {
      const hash = createHash('sha256');
      let length = 0;
      req.on('data', (chunk: Buffer) => { hash.update(chunk); length += chunk.length; });
      req.on('end', () => {
        received.push({ length, sha256: hash.digest('hex') });
        res.writeHead(200, { 'content-type': 'text/plain', 'set-cookie': SECRETS.setCookie });
        res.end(req.url === '/debug/binary' ? Buffer.from([0xff, 0xfe, 0x00, 0x80]) : RESPONSE_BODY);
      });
    });
    await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
    url = `http://127.0.0.1:${(upstream.address() as AddressInfo).port}`;
    gh = await startGatehouse(`
tls: { storage: "{{dir}}/certs" }
log: { access_headers: true }
sites:
  - hosts: [localhost]
    routes:
      - path: /debug/
        upstreams: ["${url}"]
        capture: { max_body: 16 }
      - path: /
        upstreams: ["${url}"]
`);
    session = await h2Session(gh.httpsPort);
  });
  after(async () => {
    session?.close();
    agent.destroy();
    await gh?.stop();
    upstream?.closeAllConnections();
    await new Promise((resolve) => upstream?.close(resolve));
  });

  const captures = () => gh.logs.filter((l) => l.logger === 'http.log.capture');

  it('logs bodies up to the cap, timings, and redacted credentials (HTTP/2)', async () => {
    const body = 'request body of more than sixteen bytes';
    const response = await h2Request(session, '/debug/items?x=1', { authorization: SECRETS.authorization, cookie: SECRETS.cookie }, body);
    assert.equal(response.status, 200);
    assert.equal(response.body, RESPONSE_BODY, 'the client gets the whole answer');
    assert.equal(response.headers['set-cookie']?.[0], SECRETS.setCookie, 'the client gets its cookie');
    assert.equal(received.at(-1)!.length, Buffer.byteLength(body), 'the upstream gets the whole body');
    await waitFor(() => captures().length === 1, 2_000, 'the capture line');
    const line = captures()[0] as {
      route: string; request_id: string;
      request: { method: string; url: string; headers: Record<string, string>; body: string; bytes: number; truncated: boolean; encoding: string };
      response: { status: number; headers: Record<string, unknown>; body: string; bytes: number; truncated: boolean };
      timings: { headers_ms: number; total_ms: number };
    };
    assert.equal(line.route, '/debug/');
    assert.equal(line.request.method, 'POST');
    assert.equal(line.request.url, '/debug/items?x=1');
    assert.equal(line.request.body, body.slice(0, 16));
    assert.equal(line.request.bytes, Buffer.byteLength(body));
    assert.equal(line.request.truncated, true);
    assert.equal(line.request.encoding, 'utf8');
    assert.equal(line.request.headers.authorization, '[REDACTED]');
    assert.equal(line.request.headers.cookie, '[REDACTED]');
    assert.equal(line.response.status, 200);
    assert.equal(line.response.headers['set-cookie'], '[REDACTED]');
    assert.equal(line.response.body, RESPONSE_BODY.slice(0, 16));
    assert.equal(line.response.bytes, RESPONSE_BODY.length);
    assert.ok(line.timings.headers_ms >= 0 && line.timings.total_ms >= line.timings.headers_ms);
    assert.equal(line.request_id, response.headers['x-request-id']);
  });

  it('captures HTTP/1.1 too, binary bodies as base64', async () => {
    const before = captures().length;
    const response = await h1Request(gh.httpsPort, agent, '/debug/binary', { authorization: SECRETS.authorization }, 'tiny');
    assert.equal(response.status, 200);
    await waitFor(() => captures().length === before + 1, 2_000, 'the capture line');
    const line = captures().at(-1) as { request: { body: string; truncated: boolean; headers: Record<string, string> }; response: { body: string; encoding: string } };
    assert.equal(line.request.body, 'tiny');
    assert.equal(line.request.truncated, false);
    assert.equal(line.request.headers.authorization, '[REDACTED]');
    assert.equal(line.response.encoding, 'base64');
    assert.equal(line.response.body, Buffer.from([0xff, 0xfe, 0x00, 0x80]).toString('base64'));
  });

  it('captures nothing on routes without capture; the access log redacts too', async () => {
    const before = captures().length;
    assert.equal((await h2Request(session, '/plain', { authorization: SECRETS.authorization, cookie: SECRETS.cookie })).status, 200);
    await waitFor(() => gh.logs.some((l) => l.logger === 'http.log.access' && l.path === '/plain'), 2_000, 'the access line');
    assert.equal(captures().length, before);
    const access = gh.logs.find((l) => l.logger === 'http.log.access' && l.path === '/plain') as { headers: Record<string, string>; route: string };
    assert.equal(access.headers.authorization, '[REDACTED]');
    assert.equal(access.headers.cookie, '[REDACTED]');
    assert.equal(access.route, '/');
  });

  it('never writes a credential anywhere in the log', () => {
    const all = JSON.stringify(gh.logs);
    for (const secret of ['secret-token-AAA', 'secret-cookie-BBB', 'secret-set-cookie-CCC']) assert.ok(!all.includes(secret), `${secret} leaked`);
  });
});
