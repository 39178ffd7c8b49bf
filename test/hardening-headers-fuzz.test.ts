/**
 * Property-based tests (fast-check) of the header translation (`src/proxy/headers.ts`): for
 * arbitrary header lists — hop-by-hop names in any case, Connection lists naming other fields,
 * pseudo-headers, invalid names and values, repeated Content-Length — no hop-by-hop, connection-
 * listed or invalid field reaches the other side, the output is always a well-formed list Node and
 * undici accept, and nothing throws.
 */
import assert from 'node:assert/strict';
import { validateHeaderName, validateHeaderValue } from 'node:http';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import {
  HOP_BY_HOP_HEADERS, newRequestHeadFacts, toClientResponseHeaders, toClientTrailers, toUpstreamRequestHeaders,
} from '../src/proxy/headers.ts';

const RUNS = 2_000;

/** Names that matter, in random case, plus arbitrary strings (tokens or not). */
const interestingName = fc.constantFrom(
  ...HOP_BY_HOP_HEADERS, 'host', ':authority', ':path', ':method', 'content-length', 'expect', 'http2-settings',
  'x-forwarded-for', 'x-forwarded-proto', 'x-forwarded-host', 'via', 'x-request-id', 'set-cookie', 'x-custom', 'cookie',
).chain((name) => fc.boolean().map((upper) => (upper ? name.toUpperCase() : name)));
const anyName = fc.oneof(interestingName, fc.string({ minLength: 0, maxLength: 12 }), fc.stringMatching(/^[a-z0-9-]{1,10}$/));

/** Values: plain text, lists of names (for Connection), and strings with controls and non-latin1 characters. */
const anyValue = fc.oneof(
  fc.string({ maxLength: 20 }),
  fc.stringMatching(/^[ -~]{0,20}$/),
  fc.array(interestingName, { maxLength: 4 }).map((names) => names.join(', ')),
  fc.constantFrom('close', 'keep-alive', 'upgrade', 'chunked', 'trailers', 'websocket', 'h2c', '007', '-1', '1, 1', 'a\r\nx-injected: 1', 'a\0b', '\x7f'),
  fc.string({ unit: 'binary', maxLength: 10 }),
);

const headerList = fc.array(fc.tuple(anyName, anyValue), { maxLength: 25 });

const HOP = new Set(HOP_BY_HOP_HEADERS);
/** Fields the proxy writes itself (never copied from the input as such). */
const GENERATED = new Set(['host', 'x-forwarded-for', 'x-forwarded-proto', 'x-forwarded-host', 'via', 'x-request-id', 'te', 'connection', 'upgrade']);

function connectionListed(pairs: readonly (readonly [string, string])[]): Set<string> {
  const listed = new Set<string>();
  for (const [name, value] of pairs) {
    if (name.toLowerCase() !== 'connection') continue;
    for (const token of value.toLowerCase().split(',')) if (token.trim() !== '') listed.add(token.trim());
  }
  return listed;
}

/** Throws when Node would refuse the field (the check `res.writeHead` and `http.request` apply). */
function assertAcceptedByNode(name: string, value: string): void {
  validateHeaderName(name);
  validateHeaderValue(name, value);
  assert.doesNotMatch(value, /[^\t\x20-\x7e\x80-\xff]/, `${name}: a character undici refuses`);
}

describe('hardening: header translation under arbitrary input', () => {
  it('request direction: no hop-by-hop, connection-listed, pseudo or invalid field goes upstream; never throws', () => {
    fc.assert(fc.property(headerList, fc.constantFrom('1.0', '1.1', '2.0'), fc.boolean(), (pairs, version, upgrade) => {
      const raw = pairs.flat();
      const facts = newRequestHeadFacts();
      const out = toUpstreamRequestHeaders(raw, version, { clientIp: '203.0.113.7', protocol: 'https' }, facts, upgrade);
      assert.equal(out.length % 2, 0);
      const listed = connectionListed(pairs);
      let contentLengths = 0;
      let hosts = 0;
      for (let i = 0; i < out.length; i += 2) {
        const name = out[i]!;
        const value = out[i + 1]!;
        const lower = name.toLowerCase();
        assertAcceptedByNode(name, value);
        assert.notEqual(lower.charCodeAt(0), 58, `pseudo-header ${name} forwarded`);
        assert.notEqual(lower, 'expect');
        assert.notEqual(lower, 'http2-settings');
        if (HOP.has(lower)) {
          // Only what the proxy itself writes: te: trailers, and connection/upgrade for an upgrade.
          if (lower === 'te') assert.equal(value, 'trailers');
          else if (lower === 'connection') assert.ok(upgrade && value === 'upgrade', `connection: ${value}`);
          else assert.ok(upgrade && lower === 'upgrade', `${name} forwarded`);
        }
        if (listed.has(lower) && !GENERATED.has(lower)) assert.fail(`${name} was listed in Connection and forwarded`);
        if (lower === 'content-length') {
          contentLengths++;
          assert.match(value, /^(0|[1-9]\d*)$/, 'Content-Length not canonical');
        }
        if (lower === 'host') hosts++;
      }
      assert.ok(contentLengths <= 1, 'more than one Content-Length');
      assert.ok(hosts <= 1, 'more than one Host');
    }), { numRuns: RUNS });
  });

  it('response direction (HTTP/1 list and HTTP/2 object): no hop-by-hop or invalid field reaches the client; never throws', () => {
    fc.assert(fc.property(headerList, fc.boolean(), fc.constantFrom(200, 204, 304, 404, 502), (pairs, http2, status) => {
      const raw = pairs.flatMap(([n, v]) => [Buffer.from(n, 'latin1'), Buffer.from(v, 'latin1')]);
      const out = toClientResponseHeaders(raw, http2, 'req-1', status);
      const listed = connectionListed(pairs.map(([n, v]) => [Buffer.from(n, 'latin1').toString('latin1'), Buffer.from(v, 'latin1').toString('latin1')] as const));
      const entries: [string, string][] = [];
      if (Array.isArray(out)) {
        assert.equal(out.length % 2, 0);
        for (let i = 0; i < out.length; i += 2) entries.push([out[i] as string, out[i + 1] as string]);
      } else {
        for (const [name, value] of Object.entries(out)) for (const v of Array.isArray(value) ? value : [value]) entries.push([name, v]);
      }
      for (const [name, value] of entries) {
        const lower = name.toLowerCase();
        assertAcceptedByNode(name, value);
        assert.ok(!HOP.has(lower), `${name} reached the client`);
        if (listed.has(lower) && lower !== 'via' && lower !== 'x-request-id') assert.fail(`${name} was listed in Connection and reached the client`);
        if (http2) assert.equal(name, lower);
        if (status === 204) assert.notEqual(lower, 'content-length');
      }
      assert.equal(entries.filter(([n]) => n.toLowerCase() === 'x-request-id').length, 1);
    }), { numRuns: RUNS });
  });

  it('trailers: no hop-by-hop, framing or invalid field; never throws', () => {
    fc.assert(fc.property(headerList, (pairs) => {
      const out = toClientTrailers(pairs.flatMap(([n, v]) => [Buffer.from(n, 'latin1'), Buffer.from(v, 'latin1')]));
      if (out === undefined) return;
      for (const [name, value] of Object.entries(out)) {
        assert.ok(!HOP.has(name) && name !== 'content-length' && name !== 'host', `${name} in trailers`);
        for (const v of Array.isArray(value) ? value : [value]) assertAcceptedByNode(name, v);
      }
    }), { numRuns: RUNS });
  });
});
