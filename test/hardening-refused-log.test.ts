/**
 * Requests the guard refuses before routing are answered, never reach an upstream, and still get
 * an access log line and a metrics sample, as every other answer does.
 */
import assert from 'node:assert/strict';
import { connect as http2Connect, constants } from 'node:http2';
import { after, before, describe, it } from 'node:test';
import { startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';
import { NGHTTP2_REFUSES_USERINFO } from './helpers/h2frames.ts';
import { rawExchange } from './helpers/raw-http.ts';
import { startEchoUpstream } from './helpers/upstreams.ts';

describe('refused requests in the access log', () => {
  let echo: Awaited<ReturnType<typeof startEchoUpstream>>;
  let gh: TestGatehouse;
  before(async () => {
    echo = await startEchoUpstream();
    gh = await startGatehouse(`
tls: { storage: "{{dir}}/certs" }
sites:
  - hosts: [localhost]
    redirect: false
    routes: [{ upstreams: ["${echo.url}"] }]
`);
  });
  after(async () => {
    await gh?.stop();
    await echo?.close();
  });

  const accessLines = () => gh.logs.filter((line) => line.msg === 'request');

  it('logs an HTTP/1.1 request refused for a duplicate Host, and an unsupported Transfer-Encoding', async () => {
    const before = accessLines().length;
    const duplicate = await rawExchange(gh.httpPort, 'GET /dup HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n');
    assert.equal(duplicate.status, 400);
    const te = await rawExchange(gh.httpPort, 'POST /te HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n');
    assert.equal(te.status, 501);
    const lines = accessLines().slice(before);
    const dup = lines.find((line) => line.path === '/dup');
    assert.ok(dup, 'the duplicate-Host request has an access line');
    assert.equal(dup.status, 400);
    assert.equal(dup.error, 'GH_DUPLICATE_HOST');
    assert.equal(dup.method, 'GET');
    assert.equal(dup.upstream, undefined);
    const chunked = lines.find((line) => line.path === '/te');
    assert.ok(chunked, 'the Transfer-Encoding request has an access line');
    assert.equal(chunked.status, 501);
    assert.equal(echo.requests.length, 0, 'no refused request reached the upstream');
  });

  /** One HTTP/2 request: its status, or the code of the reset that ended it first. */
  async function h2Answer(headers: Record<string, string>): Promise<{ status?: number; rstCode?: number }> {
    const session = http2Connect(`https://127.0.0.1:${gh.httpsPort}`, { rejectUnauthorized: false, servername: 'localhost' });
    try {
      return await new Promise((resolve) => {
        const stream = session.request(headers);
        stream.on('response', (h) => resolve({ status: Number(h[':status']) }));
        stream.on('error', () => {});
        stream.on('close', () => resolve({ rstCode: stream.rstCode }));
        stream.resume();
        stream.end();
      });
    } finally {
      session.close();
    }
  }

  it('logs an HTTP/2 request refused for userinfo in :authority', async () => {
    const answer = await h2Answer({ ':path': '/userinfo', ':authority': 'user@localhost' });
    if (NGHTTP2_REFUSES_USERINFO) {
      // Node's nghttp2 resets the stream as malformed: the request never reaches Gatehouse, which
      // has nothing to log. The next test covers the HTTP/2 refusals Gatehouse makes itself.
      assert.deepEqual(answer, { rstCode: constants.NGHTTP2_PROTOCOL_ERROR });
    } else {
      assert.deepEqual(answer, { status: 400 });
      const line = accessLines().find((l) => l.path === '/userinfo');
      assert.ok(line, 'the refused HTTP/2 request has an access line');
      assert.equal(line.status, 400);
      assert.equal(line.protocol, 'h2');
    }
    assert.equal(echo.requests.length, 0);
  });

  it('logs an HTTP/2 request the guard refuses for a target over the limit', async () => {
    const path = `/long-target/${'a'.repeat(9 * 1024)}`; // target_length: 8KiB by default
    assert.deepEqual(await h2Answer({ ':path': path, ':authority': 'localhost' }), { status: 414 });
    const line = accessLines().find((l) => typeof l.path === 'string' && l.path.startsWith('/long-target/'));
    assert.ok(line, 'the refused HTTP/2 request has an access line');
    assert.equal(line.status, 414);
    assert.equal(line.error, 'GH_TARGET_TOO_LONG');
    assert.equal(line.protocol, 'h2');
    assert.equal(echo.requests.length, 0);
  });
});
