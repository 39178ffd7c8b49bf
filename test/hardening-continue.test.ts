/**
 * `Expect: 100-continue` (RFC 9110 §10.1.1): Gatehouse sends `100 Continue` only once the request
 * is routed and its declared length fits the route's `max_body`; a request it refuses gets the
 * final status alone, so the client never sends a body nobody reads.
 */
import assert from 'node:assert/strict';
import { connect as http2Connect } from 'node:http2';
import { after, before, describe, it } from 'node:test';
import { startGatehouse, type TestGatehouse } from './helpers/gatehouse.ts';
import { rawExchange } from './helpers/raw-http.ts';
import { startEchoUpstream, type EchoReport } from './helpers/upstreams.ts';

describe('Expect: 100-continue', () => {
  let echo: Awaited<ReturnType<typeof startEchoUpstream>>;
  let gh: TestGatehouse;
  before(async () => {
    echo = await startEchoUpstream();
    gh = await startGatehouse(`
tls: { storage: "{{dir}}/certs" }
sites:
  - hosts: [localhost]
    redirect: false
    routes: [{ upstreams: ["${echo.url}"], max_body: 1KiB }]
`);
  });
  after(async () => {
    await gh?.stop();
    await echo?.close();
  });

  it('answers 413 without 100 when Content-Length is over max_body, and the upstream sees nothing', async () => {
    const answer = await rawExchange(gh.httpPort, 'POST /big HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n');
    assert.deepEqual(answer.statuses, [413]);
    assert.equal(answer.closed, true, 'the unread body must not be taken for a request');
    assert.equal(echo.requests.length, 0);
  });

  it('answers 404 without 100 for a host no site serves', async () => {
    const answer = await rawExchange(gh.httpPort, 'POST /x HTTP/1.1\r\nHost: nowhere.example\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n');
    assert.deepEqual(answer.statuses, [404]);
    assert.equal(echo.requests.length, 0);
  });

  it('sends 100, then relays the body and the answer, when the request fits', async () => {
    const answer = await rawExchange(gh.httpPort, 'POST /small HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\nhello');
    assert.deepEqual(answer.statuses, [100, 200]);
    const report = JSON.parse(answer.text.slice(answer.text.indexOf('{'))) as EchoReport;
    assert.equal(report.bodyLength, 5);
    assert.equal(report.headers.expect, undefined, 'Expect is not forwarded upstream');
  });

  it('does the same over HTTP/2', async () => {
    const session = http2Connect(`https://127.0.0.1:${gh.httpsPort}`, { rejectUnauthorized: false, servername: 'localhost' });
    try {
      const statuses = await new Promise<number[]>((resolve, reject) => {
        const seen: number[] = [];
        const stream = session.request({ ':method': 'POST', ':path': '/h2big', 'content-length': '5000', expect: '100-continue' });
        stream.on('continue', () => seen.push(100));
        stream.on('response', (headers) => { seen.push(Number(headers[':status'])); });
        stream.on('close', () => resolve(seen));
        stream.on('error', reject);
        stream.resume();
      });
      assert.deepEqual(statuses, [413]);
    } finally {
      session.close();
    }
  });
});
