/**
 * Tests of the upstream HTTP/1.1 response parser (`src/upstream/response-parser.ts`): body framing
 * (Content-Length, chunked with extensions and trailers, close-delimited, HEAD/204/304), skipped
 * 1xx responses, `keepAlive`, everything its strict rules refuse, bytes past the end of a
 * response, two responses on one connection, and (fast-check) that how the bytes are split across
 * reads never changes what is reported.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { MAX_HEAD_BYTES, ResponseParseError, ResponseParser, type ResponseSink } from '../src/upstream/response-parser.ts';

type Event =
  | { type: 'head'; status: number; headers: string[]; statusText: string }
  | { type: 'data'; bytes: Buffer }
  | { type: 'end'; trailers: string[] | null };

const head = (status: number, headers: string[], statusText: string): Event => ({ type: 'head', status, headers, statusText });
const data = (bytes: string | Buffer): Event => ({ type: 'data', bytes: Buffer.from(bytes) });
const end = (trailers: string[] | null = null): Event => ({ type: 'end', trailers });

/** Records what the parser reports; consecutive body pieces are merged (copied: they are views). */
class Recorder implements ResponseSink {
  readonly events: Event[] = [];
  /** The `validated` flag of every head reported. */
  readonly validated: boolean[] = [];
  onResponseHead(status: number, rawHeaders: string[], statusText: string, validated: boolean): void {
    this.events.push(head(status, [...rawHeaders], statusText));
    this.validated.push(validated);
  }
  onResponseData(chunk: Buffer): void {
    const last = this.events.at(-1);
    if (last?.type === 'data') last.bytes = Buffer.concat([last.bytes, chunk]);
    else this.events.push(data(chunk));
  }
  onResponseEnd(trailers: string[] | null): void {
    this.events.push(end(trailers === null ? null : [...trailers]));
  }
}

const latin1 = (text: string) => Buffer.from(text, 'latin1');
/** The bytes of `input` one at a time. */
const bytewise = (input: string | Buffer) => [...(typeof input === 'string' ? latin1(input) : input)].map((byte) => Buffer.of(byte));

/** Feeds `pieces` to a new parser after `expect(head)`, then `finish()` when asked. */
function run(pieces: (string | Buffer)[], options: { head?: boolean; finish?: boolean } = {}) {
  const sink = new Recorder();
  const parser = new ResponseParser(sink);
  parser.expect(options.head ?? false);
  let consumed = 0;
  for (const piece of pieces) consumed += parser.execute(typeof piece === 'string' ? latin1(piece) : piece);
  if (options.finish) parser.finish();
  return { parser, events: sink.events, consumed, validated: sink.validated };
}

const isBadResponse = (error: unknown) =>
  error instanceof ResponseParseError && error.code === 'GH_UPSTREAM_BAD_RESPONSE' && error.message.startsWith('invalid upstream response');

/** `execute` refuses `input`, whether it arrives in one read or one byte per read. */
function assertRefused(input: string): void {
  assert.throws(() => run([input]), isBadResponse, 'in one read');
  assert.throws(() => run(bytewise(input)), isBadResponse, 'one byte per read');
}

const OK_HEAD = 'HTTP/1.1 200 OK\r\n';
const CHUNKED = `${OK_HEAD}Transfer-Encoding: chunked\r\n\r\n`;
/** A response head with these field lines. */
const withFields = (...lines: string[]) => `${OK_HEAD}${lines.map((line) => `${line}\r\n`).join('')}\r\n`;

describe('body framing', () => {
  it('reads a Content-Length body', () => {
    const input = withFields('Content-Length: 5') + 'hello';
    const { parser, events, consumed } = run([input]);
    assert.deepEqual(events, [head(200, ['Content-Length', '5'], 'OK'), data('hello'), end()]);
    assert.equal(consumed, input.length);
    assert.equal(parser.busy, false);
  });

  it('reads a chunked body, ignoring chunk extensions, with trailers', () => {
    const input = `${CHUNKED}5;name=value\r\nhello\r\n6 ; q="a b"\r\n world\r\nA\r\n0123456789\r\n0;last\r\nServer-Timing: db;dur=53\r\nx-checksum:  abc \r\n\r\n`;
    const { events, consumed } = run([input]);
    assert.deepEqual(events, [
      head(200, ['Transfer-Encoding', 'chunked'], 'OK'),
      data('hello world0123456789'),
      end(['Server-Timing', 'db;dur=53', 'x-checksum', 'abc']),
    ]);
    assert.equal(consumed, input.length);
  });

  it('reports null trailers for a chunked body without any, and an empty chunked body', () => {
    assert.deepEqual(run([`${CHUNKED}3\r\nabc\r\n0\r\n\r\n`]).events, [head(200, ['Transfer-Encoding', 'chunked'], 'OK'), data('abc'), end(null)]);
    assert.deepEqual(run([`${CHUNKED}0\r\n\r\n`]).events, [head(200, ['Transfer-Encoding', 'chunked'], 'OK'), end(null)]);
  });

  it('reads chunked when it is the last transfer coding, up to 13 hex digits of chunk size', () => {
    const input = withFields('Transfer-Encoding: gzip, chunked') + '0000000000005\r\nhello\r\n0\r\n\r\n';
    assert.deepEqual(run([input]).events, [head(200, ['Transfer-Encoding', 'gzip, chunked'], 'OK'), data('hello'), end()]);
  });

  it('reads a body without a length up to the end of the connection', () => {
    const { parser, events } = run([withFields('Server: x') + 'part one, ', 'part two']);
    assert.deepEqual(events, [head(200, ['Server', 'x'], 'OK'), data('part one, part two')]);
    assert.equal(parser.bodyLeft, Infinity);
    assert.equal(parser.headDone, true);
    parser.finish();
    assert.deepEqual(events.at(-1), end());
    assert.equal(parser.busy, false);
  });

  it('reads a body to the end of the connection when chunked is not the last coding', () => {
    const { events } = run([withFields('Transfer-Encoding: chunked, gzip') + '5\r\nhello'], { finish: true });
    assert.deepEqual(events, [head(200, ['Transfer-Encoding', 'chunked, gzip'], 'OK'), data('5\r\nhello'), end()]);
  });

  const noBody: [string, string, boolean][] = [
    ['a HEAD response with Content-Length', withFields('Content-Length: 5'), true],
    ['a HEAD response with Transfer-Encoding: chunked', withFields('Transfer-Encoding: chunked'), true],
    ['204 with Content-Length', 'HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n', false],
    ['304 with Content-Length', 'HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n', false],
    ['Content-Length: 0', withFields('Content-Length: 0'), false],
  ];
  for (const [name, input, isHead] of noBody) {
    it(`ends ${name} after the head`, () => {
      const { parser, events, consumed } = run([input + 'HTTP/1.1 200 OK\r\n'], { head: isHead });
      assert.deepEqual(events.map((event) => event.type), ['head', 'end']);
      assert.equal(consumed, input.length);
      assert.equal(parser.busy, false);
    });
  }

  it('accepts a repeated Content-Length when the values agree', () => {
    assert.deepEqual(run([withFields('Content-Length: 2, 2', 'content-length: 2') + 'hi']).events.slice(1), [data('hi'), end()]);
  });
});

describe('the head', () => {
  it('trims OWS around values and keeps the case of names', () => {
    const input = withFields('X-Custom-Name: \t value  with  inner  spaces \t', 'x-lower:plain', 'MiXeD-CaSe:\t', 'Content-Length: 0');
    assert.deepEqual(run([input]).events[0], head(200, ['X-Custom-Name', 'value  with  inner  spaces', 'x-lower', 'plain', 'MiXeD-CaSe', '', 'Content-Length', '0'], 'OK'));
  });

  it('reports the reason phrase as statusText, or an empty one when there is none', () => {
    const statusOf = (statusLine: string) => run([`${statusLine}\r\nContent-Length: 0\r\n\r\n`]).events[0];
    assert.deepEqual(statusOf('HTTP/1.1 404 Not Found'), head(404, ['Content-Length', '0'], 'Not Found'));
    assert.deepEqual(statusOf('HTTP/1.1 200'), head(200, ['Content-Length', '0'], ''));
    assert.deepEqual(statusOf('HTTP/1.1 599 '), head(599, ['Content-Length', '0'], ''));
    assert.deepEqual(statusOf('HTTP/1.0 502 Bad  Gateway\xe9'), head(502, ['Content-Length', '0'], 'Bad  Gateway\xe9'));
  });

  it('accepts a head of exactly MAX_HEAD_BYTES in one read', () => {
    const { events } = run([`${headOfLength(MAX_HEAD_BYTES)}\r\n\r\n`], { finish: true });
    assert.equal(events[0]?.type, 'head');
  });

  it('accepts a head of exactly MAX_HEAD_BYTES however it is split', () => {
    const text = headOfLength(MAX_HEAD_BYTES);
    const { events } = run([`${text}\r\n\r`, '\n'], { finish: true });
    assert.equal(events[0]?.type, 'head');
  });
});

/** A head (status line and fields, without the final CRLFCRLF) of exactly `length` bytes. */
function headOfLength(length: number): string {
  const start = `${OK_HEAD}X-Padding: `;
  return start + 'a'.repeat(length - start.length);
}

describe('1xx responses', () => {
  it('skips 103 Early Hints (and other 1xx) and reports the final response', () => {
    const input = 'HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n' + withFields('Content-Length: 2') + 'ok';
    const expected = [head(200, ['Content-Length', '2'], 'OK'), data('ok'), end()];
    assert.deepEqual(run([input]).events, expected);
    assert.deepEqual(run(bytewise(input)).events, expected);
    assert.equal(run([input]).consumed, input.length);
  });

  it('keeps a HEAD request bodiless across a 103', () => {
    const { events } = run(['HTTP/1.1 103 Early Hints\r\n\r\n' + withFields('Content-Length: 5')], { head: true });
    assert.deepEqual(events, [head(200, ['Content-Length', '5'], 'OK'), end()]);
  });

  it('refuses 100 Continue and 101 Switching Protocols', () => {
    assertRefused('HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n');
    assertRefused('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n');
  });
});

describe('keepAlive', () => {
  const cases: [string, string, boolean][] = [
    ['HTTP/1.1', withFields('Content-Length: 0'), true],
    ['HTTP/1.1, Connection: close', withFields('Content-Length: 0', 'Connection: close'), false],
    ['HTTP/1.1, connection: Keep-Alive, close', withFields('Content-Length: 0', 'connection: Keep-Alive, close'), false],
    ['HTTP/1.1, close in a second Connection field', withFields('Connection: keep-alive', 'Content-Length: 0', 'Connection: CLOSE'), false],
    ['HTTP/1.1, chunked', `${CHUNKED}0\r\n\r\n`, true],
    ['HTTP/1.0', 'HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n', false],
    ['HTTP/1.0, Connection: keep-alive', 'HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: Keep-Alive\r\n\r\n', true],
    ['HTTP/1.1, close-delimited body', withFields('Server: x') + 'body', false],
    ['HTTP/1.0, Connection: keep-alive, close-delimited body', 'HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\nbody', false],
  ];
  for (const [name, input, expected] of cases) {
    it(`${name} → ${expected}`, () => {
      const { parser } = run([input], { finish: true });
      assert.equal(parser.keepAlive, expected);
    });
  }

  it('HTTP/1.0 with Transfer-Encoding → false (RFC 9112 §6.1: close after it)', () => {
    const { parser } = run(['HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n0\r\n\r\n'], { finish: true });
    assert.equal(parser.keepAlive, false);
  });
});

describe('refused responses', () => {
  const cases: [string, string][] = [
    ['bare LF line endings', 'HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n'],
    ['a bare LF ending a field line', withFields('X: a\nContent-Length: 0')],
    ['a bare CR in a value', withFields('X: a\rb', 'Content-Length: 0')],
    ['a NUL in a value', withFields('X: a\0b', 'Content-Length: 0')],
    ['a NUL in the status line', 'HTTP/1.1 200 O\0K\r\nContent-Length: 0\r\n\r\n'],
    ['whitespace before the colon', withFields('Content-Length : 5') + 'hello'],
    ['an obs-fold line', withFields('X: a', '  b', 'Content-Length: 0')],
    ['an obs-fold line with a colon', withFields('X: a', '\tb: c', 'Content-Length: 0')],
    ['a field line without a colon in a 103 Early Hints', 'HTTP/1.1 103 Early Hints\r\nbad line\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n'],
    ['an invalid field name', withFields('X(y): a', 'Content-Length: 0')],
    ['an empty field name', withFields(': a', 'Content-Length: 0')],
    ['a field line without a colon', withFields('Content-Length 0')],
    ['status 2OO', 'HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n'],
    ['HTTP/2', 'HTTP/2 200\r\nContent-Length: 0\r\n\r\n'],
    ['HTTP/1.2', 'HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n'],
    ['a lower-case protocol name', 'http/1.1 200 OK\r\nContent-Length: 0\r\n\r\n'],
    ['status 600', 'HTTP/1.1 600 Nope\r\nContent-Length: 0\r\n\r\n'],
    ['a two-digit status', 'HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n'],
    ['no space after the status', 'HTTP/1.1 200OK\r\nContent-Length: 0\r\n\r\n'],
    ['a leading empty line', '\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n'],
    ['Transfer-Encoding with Content-Length', withFields('Transfer-Encoding: chunked', 'Content-Length: 5') + '5\r\nhello\r\n0\r\n\r\n'],
    ['two different Content-Length fields', withFields('Content-Length: 5', 'Content-Length: 6') + 'hello!'],
    ['a Content-Length list "5, 6"', withFields('Content-Length: 5, 6') + 'hello!'],
    ['a Content-Length list with an empty element', withFields('Content-Length: 5,') + 'hello'],
    ['a non-digit Content-Length', withFields('Content-Length: 5a') + 'hello'],
    ['a signed Content-Length', withFields('Content-Length: +5') + 'hello'],
    ['a hex Content-Length', withFields('Content-Length: 0x5') + 'hello'],
    ['an empty Content-Length', withFields('Content-Length:') + 'hello'],
    ['a chunk size that is not hex', `${CHUNKED}g\r\n`],
    ['a chunk-size line without a size', `${CHUNKED};ext\r\nhello\r\n0\r\n\r\n`],
    ['an empty chunk-size line', `${CHUNKED}\r\n`],
    ['a chunk-size line ended by a bare LF', `${CHUNKED}5\nhello\r\n0\r\n\r\n`],
    ['a control byte in a chunk extension', `${CHUNKED}5;a\x01b\r\nhello\r\n0\r\n\r\n`],
    ['chunk data not followed by CRLF', `${CHUNKED}5\r\nhelloX\r\n0\r\n\r\n`],
    ['chunk data followed by CR and not LF', `${CHUNKED}5\r\nhello\r\r\n0\r\n\r\n`],
    ['a chunk size of 14 hex digits', `${CHUNKED}00000000000005\r\nhello\r\n0\r\n\r\n`],
    ['a malformed trailer field', `${CHUNKED}0\r\nno colon here\r\n\r\n`],
    ['a bare LF in the trailers', `${CHUNKED}0\r\nX: a\nY: b\r\n\r\n`],
  ];
  for (const [name, input] of cases) it(`refuses ${name}`, () => assertRefused(input));

  it('refuses a head of MAX_HEAD_BYTES + 1 in one read', () => {
    assert.throws(() => run([`${headOfLength(MAX_HEAD_BYTES + 1)}\r\n\r\n`]), isBadResponse);
  });

  it('refuses a head that keeps growing past MAX_HEAD_BYTES without waiting for its end', () => {
    const sink = new Recorder();
    const parser = new ResponseParser(sink);
    parser.expect(false);
    const piece = latin1(`X-Padding: ${'a'.repeat(1000)}\r\n`);
    parser.execute(latin1(OK_HEAD));
    let reads = 0;
    assert.throws(() => {
      for (; reads < 100; reads++) parser.execute(piece);
    }, isBadResponse);
    assert.ok(reads * piece.length <= MAX_HEAD_BYTES + piece.length, `refused after ${reads} reads`);
  });

  it('refuses a head with bare LF line endings as soon as the bare LF arrives', () => {
    assertRefused('HTTP/1.1 200 OK\nContent-Length: 0\n\n');
  });

  it('refuses a Content-Length with whitespace other than OWS (digits only)', () => {
    for (const value of ['5\x0b', '\xa05', '5,\x0c5']) assertRefused(withFields(`Content-Length: ${value}`) + 'hello');
  });

  it('refuses a chunk-size line with text after the size that is not a ;-extension', () => {
    assertRefused(`${CHUNKED}5 6\r\nhello\r\n0\r\n\r\n`);
  });

  const unfinished: [string, string][] = [
    ['in the middle of the head', 'HTTP/1.1 200 OK\r\nContent-Le'],
    ['before the first byte of the head', ''],
    ['in the middle of a Content-Length body', withFields('Content-Length: 10') + 'hello'],
    ['in the middle of a chunk', `${CHUNKED}5\r\nhel`],
    ['after a chunk, before the last chunk', `${CHUNKED}5\r\nhello\r\n`],
    ['in the middle of the trailers', `${CHUNKED}0\r\nX: a\r\n`],
  ];
  for (const [name, input] of unfinished) {
    it(`refuses a connection that ends ${name}`, () => {
      const { parser } = run([input]);
      assert.equal(parser.busy, true);
      assert.throws(() => parser.finish(), isBadResponse);
    });
  }
});

describe('bytes past the end of a response', () => {
  const next = 'HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n';
  const complete: [string, string, boolean][] = [
    ['a Content-Length body', withFields('Content-Length: 5') + 'hello', false],
    ['a chunked body', `${CHUNKED}5\r\nhello\r\n0\r\n\r\n`, false],
    ['a chunked body with trailers', `${CHUNKED}5\r\nhello\r\n0\r\nX: y\r\n\r\n`, false],
    ['a HEAD response', withFields('Content-Length: 5'), true],
  ];
  for (const [name, input, isHead] of complete) {
    it(`are not consumed after ${name}`, () => {
      assert.equal(run([input + next], { head: isHead }).consumed, input.length);
      const split = run([input.slice(0, -1), input.slice(-1) + next, next], { head: isHead });
      assert.equal(split.consumed, input.length);
      assert.equal(split.events.filter((event) => event.type === 'head').length, 1);
    });
  }

  it('consume exactly through "hello" in "...Content-Length: 5\\r\\n\\r\\nhelloHTTP/1.1 200 OK..."', () => {
    const input = withFields('Content-Length: 5') + 'helloHTTP/1.1 200 OK\r\n';
    const { events, consumed } = run([input]);
    assert.equal(input.slice(0, consumed).endsWith('\r\n\r\nhello'), true);
    assert.deepEqual(events.slice(1), [data('hello'), end()]);
  });
});

describe('two responses on one connection', () => {
  it('reads them one after the other from the leftover bytes', () => {
    const first = withFields('Content-Length: 5') + 'hello';
    const second = `${CHUNKED}3\r\nabc\r\n0\r\nX-Done: yes\r\n\r\n`;
    const input = latin1(first + second);
    const sink = new Recorder();
    const parser = new ResponseParser(sink);

    parser.expect(false);
    const used = parser.execute(input);
    assert.equal(used, first.length);
    assert.equal(parser.keepAlive, true);
    parser.expect(false);
    assert.equal(parser.execute(input.subarray(used)), second.length);
    parser.finish();
    assert.deepEqual(sink.events, [
      head(200, ['Content-Length', '5'], 'OK'), data('hello'), end(),
      head(200, ['Transfer-Encoding', 'chunked'], 'OK'), data('abc'), end(['X-Done', 'yes']),
    ]);
  });

  it('forgets HEAD for the next request, and a head split across reads', () => {
    const sink = new Recorder();
    const parser = new ResponseParser(sink);
    parser.expect(true);
    parser.execute(latin1('HTTP/1.1 200 OK\r\nContent-Le'));
    parser.execute(latin1('ngth: 5\r\n\r\n'));
    parser.expect(false);
    parser.execute(latin1(withFields('Content-Length: 5') + 'hello'));
    assert.deepEqual(sink.events, [head(200, ['Content-Length', '5'], 'OK'), end(), head(200, ['Content-Length', '5'], 'OK'), data('hello'), end()]);
  });
});

describe('the validated flag', () => {
  it('is true for a head of tokens and clean values, with or without a reason phrase or fields', () => {
    for (const input of [withFields('Content-Length: 0', 'X-A: b\tc \xe9\xff'), 'HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n', 'HTTP/1.0 204 No Content\r\n\r\n']) {
      const { validated, events } = run([input], { finish: true });
      assert.deepEqual(validated, [true], JSON.stringify(input));
      assert.equal(events[0]!.type, 'head');
    }
  });

  it('is false, and the field passed on, when a value holds a control character other than HTAB', () => {
    for (const control of ['\x01', '\x0b', '\x1f', '\x7f']) {
      const { validated, events } = run([withFields(`X-Bad: a${control}b`, 'Content-Length: 0')], { finish: true });
      assert.deepEqual(validated, [false]);
      assert.deepEqual(events[0], head(200, ['X-Bad', `a${control}b`, 'Content-Length', '0'], 'OK'));
    }
  });

  it('is false for a reason phrase with a control character, which is still reported', () => {
    const { validated, events } = run(['HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n'], { finish: true });
    assert.deepEqual(validated, [false]);
    assert.deepEqual(events[0], head(200, ['Content-Length', '0'], 'O\x01K'));
  });

  it('agrees with a field-by-field check of arbitrary heads (fast-check), and refusals do not change', () => {
    const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
    const CLEAN_VALUE = /^[\t\x20-\x7e\x80-\xff]*$/;
    // Every byte but CR, LF and NUL (those are refused in any head): names and values of any other kind.
    const char = fc.integer({ min: 1, max: 255 }).filter((code) => code !== 0x0d && code !== 0x0a).map((code) => String.fromCharCode(code));
    const name = fc.oneof(fc.string({ unit: fc.constantFrom(...'abcXYZ09-_!~'), minLength: 1, maxLength: 8 }), fc.string({ unit: char, minLength: 1, maxLength: 8 }));
    const value = fc.oneof(fc.string({ unit: fc.constantFrom(...'ab 9\t,;=\xe9'), maxLength: 10 }), fc.string({ unit: char, maxLength: 10 }));
    const fields = fc.array(fc.tuple(name, value), { maxLength: 5 });
    fc.assert(
      fc.property(fields, fc.option(fc.string({ unit: char, maxLength: 8 })), (list, reason) => {
        const lines = list.map(([n, v]) => `X-${n}: ${v}`);
        const input = `HTTP/1.1 200${reason === null ? '' : ` ${reason}`}\r\n${lines.map((line) => `${line}\r\n`).join('')}Content-Length: 0\r\n\r\n`;
        // What the parser did before it had the whole-head test: refuse a name that is not a token.
        const names = list.map(([n]) => `X-${n}`.split(':')[0]!); // a name ends at the line's first colon
        const refused = names.some((n) => !TOKEN.test(n));
        let outcome: ReturnType<typeof run> | undefined;
        try {
          outcome = run([input], { finish: true });
        } catch (error) {
          assert.ok(isBadResponse(error), String(error));
        }
        assert.equal(outcome === undefined, refused, `refused ${JSON.stringify(input)}`);
        if (outcome === undefined) return;
        const clean = (reason === null || CLEAN_VALUE.test(reason)) && lines.every((line) => CLEAN_VALUE.test(line));
        assert.deepEqual(outcome.validated, [clean], JSON.stringify(input));
      }),
      { numRuns: 500 },
    );
  });
});

describe('split reads (fast-check)', () => {
  const TOKEN_CHARS = [..."!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"];
  const VALUE_CHARS = [...'abcXYZ019 !"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~\t', '\xe9', '\xff'];
  const EXTENSIONS = ['', ';a', ';a=b', ' ; q="x y"', '\t;n=1'];

  const ows = fc.string({ unit: fc.constantFrom(' ', '\t'), maxLength: 3 });
  /** [raw line, name, value as reported]: names are `X-` tokens, so never a framing field. */
  const field = fc
    .record({
      name: fc.string({ unit: fc.constantFrom(...TOKEN_CHARS), minLength: 1, maxLength: 12 }),
      value: fc.string({ unit: fc.constantFrom(...VALUE_CHARS), maxLength: 20 }).map((value) => value.replace(/^[ \t]+|[ \t]+$/g, '')),
      before: ows,
      after: ows,
    })
    .map(({ name, value, before, after }) => ({ line: `X-${name}:${before}${value}${after}`, name: `X-${name}`, value }));

  const response = fc
    .record({
      version: fc.constantFrom('1.0', '1.1'),
      status: fc.integer({ min: 200, max: 599 }).filter((status) => status !== 204 && status !== 304),
      reason: fc.option(fc.string({ unit: fc.constantFrom(...VALUE_CHARS), maxLength: 12 }).map((reason) => reason.replace(/\t/g, ' '))),
      earlyHints: fc.boolean(),
      fields: fc.array(field, { maxLength: 6 }),
      connection: fc.constantFrom(null, 'close', 'keep-alive', 'Keep-Alive, close'),
      framing: fc.constantFrom('length', 'chunked', 'close'),
      framingName: fc.constantFrom(0, 1, 2),
      framingAt: fc.nat(),
      body: fc.uint8Array({ maxLength: 300 }),
      chunkCuts: fc.array(fc.nat({ max: 300 }), { maxLength: 8 }),
      extensions: fc.array(fc.constantFrom(...EXTENSIONS), { minLength: 1, maxLength: 4 }),
      upperHex: fc.boolean(),
      trailers: fc.option(fc.array(field, { minLength: 1, maxLength: 3 })),
    })
    .map(build);

  type Generated = { bytes: Buffer; expected: Event[]; keepAlive: boolean; closeDelimited: boolean };

  /** The bytes of a response and what the parser must report for it. */
  function build(r: {
    version: string; status: number; reason: string | null; earlyHints: boolean; fields: { line: string; name: string; value: string }[];
    connection: string | null; framing: string; framingName: number; framingAt: number; body: Uint8Array; chunkCuts: number[];
    extensions: string[]; upperHex: boolean; trailers: { line: string; name: string; value: string }[] | null;
  }): Generated {
    const version = r.version;
    const body = Buffer.from(r.body);
    const fields = [...r.fields];
    if (r.connection !== null) fields.push({ line: `Connection: ${r.connection}`, name: 'Connection', value: r.connection });
    if (r.framing !== 'close') {
      const names = r.framing === 'length' ? ['Content-Length', 'content-length', 'CONTENT-LENGTH'] : ['Transfer-Encoding', 'transfer-encoding', 'TRANSFER-ENCODING'];
      const name = names[r.framingName]!;
      const value = r.framing === 'length' ? String(body.length) : 'chunked';
      fields.splice(r.framingAt % (fields.length + 1), 0, { line: `${name}: ${value}`, name, value });
    }
    const statusLine = `HTTP/${version} ${r.status}${r.reason === null ? '' : ` ${r.reason}`}`;
    const head = `${r.earlyHints ? 'HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n' : ''}${statusLine}\r\n${fields.map((f) => `${f.line}\r\n`).join('')}\r\n`;

    let bodyBytes: Buffer = body;
    if (r.framing === 'chunked') {
      const cuts = [...new Set(r.chunkCuts.map((cut) => cut % (body.length + 1)))].filter((cut) => cut > 0 && cut < body.length).sort((a, b) => a - b);
      const bounds = body.length === 0 ? [] : [0, ...cuts, body.length];
      const parts: Buffer[] = [];
      for (let i = 0; i + 1 < bounds.length; i++) {
        const size = (bounds[i + 1]! - bounds[i]!).toString(16);
        parts.push(latin1(`${r.upperHex ? size.toUpperCase() : size}${r.extensions[i % r.extensions.length]}\r\n`), body.subarray(bounds[i], bounds[i + 1]), latin1('\r\n'));
      }
      const trailerLines = (r.trailers ?? []).map((f) => `${f.line}\r\n`).join('');
      parts.push(latin1(`0${r.extensions[0]}\r\n${trailerLines}\r\n`));
      bodyBytes = Buffer.concat(parts);
    }

    const expected = [{ type: 'head', status: r.status, headers: fields.flatMap((f) => [f.name, f.value]), statusText: r.reason ?? '' } as Event];
    if (body.length > 0) expected.push(data(body));
    expected.push(end(r.framing === 'chunked' && r.trailers !== null ? r.trailers.flatMap((f) => [f.name, f.value]) : null));
    const tokens = (r.connection ?? '').toLowerCase().split(',').map((token) => token.trim());
    // HTTP/1.0 persists only with keep-alive, and never after Transfer-Encoding (RFC 9112 §6.1).
    const keepAlive = r.framing !== 'close' && !tokens.includes('close') && (version === '1.1' || (tokens.includes('keep-alive') && r.framing !== 'chunked'));
    return { bytes: Buffer.concat([latin1(head), bodyBytes]), expected, keepAlive, closeDelimited: r.framing === 'close' };
  }

  /** `bytes` cut at `positions` (any numbers; taken modulo the length), or one byte per piece. */
  function split(bytes: Buffer, positions: number[] | 'bytes'): Buffer[] {
    if (positions === 'bytes') return bytewise(bytes);
    const cuts = [...new Set(positions.map((p) => p % (bytes.length + 1)))].sort((a, b) => a - b);
    return [0, ...cuts].map((from, i) => bytes.subarray(from, [...cuts, bytes.length][i]));
  }

  const positions = fc.oneof(fc.constant('bytes' as const), fc.array(fc.nat(), { maxLength: 20 }));

  it('report the same events (and consume the same bytes) as one read', () => {
    fc.assert(
      fc.property(response, positions, ({ bytes, expected, keepAlive, closeDelimited }, cuts) => {
        // After a response with a length, the start of another one must be left unconsumed.
        const extra = closeDelimited ? Buffer.alloc(0) : latin1('HTTP/1.1 200 OK\r\n');
        const whole = run([Buffer.concat([bytes, extra])], { finish: true });
        assert.deepEqual(whole.events, expected);
        assert.equal(whole.consumed, bytes.length);
        assert.equal(whole.parser.keepAlive, keepAlive);

        const pieces = run(split(Buffer.concat([bytes, extra]), cuts), { finish: true });
        assert.deepEqual(pieces.events, whole.events);
        assert.equal(pieces.consumed, bytes.length);
        assert.equal(pieces.parser.keepAlive, keepAlive);
      }),
      { numRuns: 200 },
    );
  });
});
