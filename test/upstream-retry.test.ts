import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { describe, it } from 'node:test';
import { UpstreamPool, type UpstreamHandler } from '../src/upstream/http1-pool.js';
import { errorCode, isIdempotent, retryVerdict, shouldRetry, type RetryInput, type RetryVerdict } from '../src/upstream/retry.js';

const budget = { count: 2, try_duration: 5000 };
const coded = (code: string) => Object.assign(new Error('message text is never read'), { code });

function input(overrides: Partial<RetryInput>): RetryInput {
  return { method: 'GET', attempt: 1, startedAt: 1000, now: 1100, error: coded('ECONNREFUSED'), requestBodyReplayable: true, bytesSent: 0, ...overrides };
}

describe('isIdempotent', () => {
  it('follows RFC 9110 §9.2.2', () => {
    for (const method of ['GET', 'HEAD', 'OPTIONS', 'TRACE', 'PUT', 'DELETE']) assert.equal(isIdempotent(method), true, method);
    for (const method of ['POST', 'PATCH', 'CONNECT', 'get', 'PROPFIND']) assert.equal(isIdempotent(method), false, method);
  });
});

describe('retry decision', () => {
  const table: [string, Partial<RetryInput>, RetryVerdict][] = [
    ['connection refused, GET', {}, 'retry_connect_failure'],
    ['connection refused, POST with a streamed body', { method: 'POST', requestBodyReplayable: false }, 'retry_connect_failure'],
    ['connect timeout (the pool), POST', { method: 'POST', error: coded('GH_UPSTREAM_CONNECT_TIMEOUT') }, 'retry_connect_failure'],
    ['DNS failure, PATCH', { method: 'PATCH', error: coded('ENOTFOUND') }, 'retry_connect_failure'],
    ['happy-eyeballs AggregateError', { method: 'POST', error: new AggregateError([coded('ECONNREFUSED'), coded('ECONNREFUSED')]) }, 'retry_connect_failure'],
    ['socket died before a byte was written, POST', { method: 'POST', error: coded('GH_UPSTREAM_RESET') }, 'retry_connect_failure'],
    ['stale keep-alive reset after sending, GET', { error: coded('ECONNRESET'), bytesSent: 120 }, 'retry_stale_connection'],
    ['stale keep-alive, closed by the upstream, DELETE', { method: 'DELETE', error: coded('GH_UPSTREAM_RESET'), bytesSent: 80 }, 'retry_stale_connection'],
    ['reset after sending, PUT with a buffered body', { method: 'PUT', error: coded('EPIPE'), bytesSent: 4000 }, 'retry_stale_connection'],
    ['headers timeout, GET', { error: coded('GH_UPSTREAM_HEADERS_TIMEOUT'), bytesSent: 100 }, 'retry_idempotent'],
    ['reset after sending, POST: never sent twice', { method: 'POST', error: coded('ECONNRESET'), bytesSent: 300 }, 'no_not_idempotent'],
    ['headers timeout, POST', { method: 'POST', error: coded('GH_UPSTREAM_HEADERS_TIMEOUT'), bytesSent: 300 }, 'no_not_idempotent'],
    ['reset after sending, PUT with a streamed body', { method: 'PUT', error: coded('ECONNRESET'), bytesSent: 300, requestBodyReplayable: false }, 'no_body_not_replayable'],
    ['reset after the response started', { error: coded('ECONNRESET'), bytesSent: 100, responseStarted: true }, 'no_response_started'],
    ['client aborted', { error: coded('GH_UPSTREAM_ABORTED'), bytesSent: 100 }, 'no_error_not_retryable'],
    ['body timeout', { error: coded('GH_UPSTREAM_BODY_TIMEOUT'), bytesSent: 100 }, 'no_error_not_retryable'],
    ['error without a code', { error: new Error('ECONNREFUSED'), bytesSent: 0 }, 'no_error_not_retryable'],
    ['second attempt of 2 retries', { attempt: 2 }, 'retry_connect_failure'],
    ['third attempt of 2 retries', { attempt: 3 }, 'no_attempts_left'],
    ['try_duration spent', { now: 6000 }, 'no_time_left'],
    ['just inside try_duration', { now: 5999 }, 'retry_connect_failure'],
  ];
  for (const [name, overrides, expected] of table) {
    it(`${name} → ${expected}`, () => {
      assert.equal(retryVerdict(input(overrides), budget), expected);
      assert.equal(shouldRetry(input(overrides), budget), expected.startsWith('retry_'));
    });
  }

  it('count 0 means no retry; try_duration 0 means no time bound', () => {
    assert.equal(shouldRetry(input({}), { count: 0, try_duration: 5000 }), false);
    assert.equal(shouldRetry(input({ now: 1e9 }), { count: 2, try_duration: 0 }), true);
  });
});

/** The error one GET through a real upstream pool to 127.0.0.1:`port` ends with. */
function poolError(port: number): Promise<Error> {
  const pool = new UpstreamPool('127.0.0.1', port, {
    connections: null, connectTimeout: 2000, headersTimeout: 2000, bodyTimeout: 2000, keepAliveTimeout: 1000, tls: null,
  }, `127.0.0.1:${port}`);
  return new Promise<Error>((resolve, reject) => {
    const handler: UpstreamHandler = {
      onConnect() {},
      onBodySent() {},
      onHeaders() { return true; },
      onData() { return true; },
      onComplete() { reject(new Error('the request succeeded')); },
      onError(error) { resolve(error); },
    };
    pool.dispatch({ path: '/', method: 'GET', headers: [], body: null }, handler);
  }).finally(() => pool.destroy());
}

describe('errorCode with real upstream pool errors', () => {
  it('reads the code of a refused connection and of a socket closed mid-request', async () => {
    const closed = createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const refusedPort = (closed.address() as AddressInfo).port;
    await new Promise<void>((resolve) => closed.close(() => resolve()));
    const refused = await poolError(refusedPort);
    assert.equal(errorCode(refused), 'ECONNREFUSED');
    assert.equal(retryVerdict(input({ method: 'POST', error: refused }), budget), 'retry_connect_failure');

    const server: Server = createServer((req) => req.socket.destroy());
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    try {
      const port = (server.address() as AddressInfo).port;
      const reset = await poolError(port);
      assert.equal(errorCode(reset), 'GH_UPSTREAM_RESET');
      assert.equal(retryVerdict(input({ error: reset, bytesSent: 60 }), budget), 'retry_stale_connection');
      assert.equal(retryVerdict(input({ method: 'POST', error: reset, bytesSent: 60 }), budget), 'no_not_idempotent');
    } finally {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });
});
