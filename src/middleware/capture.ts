/**
 * Debug capture (`capture` on a route): the request and response of each exchange — headers,
 * bodies up to `max_body` bytes each, timings — written as one log line (`http.log.capture`) when
 * the exchange ends. For troubleshooting an API, not for production traffic: it copies bodies.
 *
 * Bodies are observed, never buffered on the proxy path: the request's chunks are seen as the
 * server pushes them into the request stream, the response's as the proxy writes them, so flow
 * control and backpressure are untouched. Credentials (`log.redact`: Authorization, Cookie,
 * Set-Cookie by default) are redacted by the capture logger (pino `redact`).
 */
import { isUtf8 } from 'node:buffer';
import type { CaptureConfig } from '../config/schema.js';
import type { ClientRequest, ClientResponse } from '../proxy/forward.js';

const kCapture = Symbol('gatehouse.capture');

interface Carrier {
  [kCapture]?: ExchangeCapture;
}

type Push = (chunk: unknown, encoding?: BufferEncoding) => boolean;
type AnyFunction = (...args: unknown[]) => unknown;

/** One body, kept up to a cap. */
class BodyCopy {
  readonly chunks: Buffer[] = [];
  kept = 0;
  total = 0;
  constructor(private readonly max: number) {}

  add(chunk: unknown): void {
    if (chunk === null || chunk === undefined) return;
    const buffer = typeof chunk === 'string' ? Buffer.from(chunk) : Buffer.isBuffer(chunk) ? chunk : chunk instanceof Uint8Array ? Buffer.from(chunk) : undefined;
    if (buffer === undefined) return;
    this.total += buffer.length;
    const room = this.max - this.kept;
    if (room <= 0) return;
    const part = buffer.length <= room ? buffer : buffer.subarray(0, room);
    this.chunks.push(Buffer.from(part)); // a copy: the caller may reuse its buffer
    this.kept += part.length;
  }

  toJSON(): { bytes: number; truncated: boolean; encoding: 'utf8' | 'base64'; body: string } {
    const data = Buffer.concat(this.chunks, this.kept);
    // A cut in the middle of a UTF-8 sequence would make text look binary: allow up to 3 bytes off.
    let text = isUtf8(data);
    if (!text && this.total > this.kept) {
      for (let cut = 1; cut <= 3 && !text; cut++) text = isUtf8(data.subarray(0, data.length - cut));
    }
    return {
      bytes: this.total,
      truncated: this.total > this.kept,
      encoding: text ? 'utf8' : 'base64',
      body: text ? data.toString('utf8') : data.toString('base64'),
    };
  }
}

/** The capture of one exchange; start it with {@link startCapture}, end it with {@link finishCapture}. */
export class ExchangeCapture {
  readonly request: BodyCopy;
  readonly response: BodyCopy;
  readonly startedAt: number;
  status = 0;
  responseHeaders: Record<string, string | string[]> = {};
  /** ms from the start to the response head. */
  headersAt: number | undefined;
  readonly origPush: Push;
  readonly origWriteHead: AnyFunction;
  readonly origWrite: AnyFunction;
  readonly origEnd: AnyFunction;

  constructor(readonly req: ClientRequest, readonly res: ClientResponse, config: CaptureConfig) {
    this.startedAt = performance.now();
    this.request = new BodyCopy(config.max_body);
    this.response = new BodyCopy(config.max_body);
    // A StreamRequest has no body and no push: nothing to wrap.
    this.origPush = (req as { push?: Push }).push as Push;
    this.origWriteHead = res.writeHead as unknown as AnyFunction;
    this.origWrite = res.write as unknown as AnyFunction;
    this.origEnd = res.end as unknown as AnyFunction;
  }
}

/**
 * Start capturing `req`/`res` (call before anything reads the body or writes the response). The
 * instance methods `push` (request) and `writeHead`/`write`/`end` (response) are wrapped with
 * module-level functions; nothing else changes.
 */
export function startCapture(req: ClientRequest, res: ClientResponse, config: CaptureConfig): ExchangeCapture {
  const capture = new ExchangeCapture(req, res, config);
  (req as unknown as Carrier)[kCapture] = capture;
  (res as unknown as Carrier)[kCapture] = capture;
  (req as { push: Push }).push = capturePush;
  (res as unknown as { writeHead: AnyFunction }).writeHead = captureWriteHead;
  (res as unknown as { write: AnyFunction }).write = captureWrite;
  (res as unknown as { end: AnyFunction }).end = captureEnd;
  return capture;
}

/** The capture started on `req`, if any. */
export function captureOf(req: ClientRequest): ExchangeCapture | undefined {
  return (req as unknown as Carrier)[kCapture];
}

/** What the capture log line holds (before redaction). */
export interface CaptureRecord {
  readonly request: { method: string | undefined; url: string | undefined; http_version: string; headers: Record<string, unknown> } & ReturnType<BodyCopy['toJSON']>;
  readonly response: { status: number; headers: Record<string, string | string[]> } & ReturnType<BodyCopy['toJSON']>;
  readonly timings: { headers_ms: number | undefined; total_ms: number };
}

/** The exchange is over: the log record of the capture. */
export function finishCapture(capture: ExchangeCapture, status: number): CaptureRecord {
  const { req } = capture;
  const total = performance.now() - capture.startedAt;
  return {
    request: {
      method: req.method,
      url: req.url,
      http_version: req.httpVersion,
      headers: { ...req.headers },
      ...capture.request.toJSON(),
    },
    response: {
      status: capture.status || status,
      headers: capture.responseHeaders,
      ...capture.response.toJSON(),
    },
    timings: {
      headers_ms: capture.headersAt === undefined ? undefined : round(capture.headersAt),
      total_ms: round(total),
    },
  };
}

function round(ms: number): number {
  return Math.round(ms * 1000) / 1000;
}

function capturePush(this: Carrier, chunk: unknown, encoding?: BufferEncoding): boolean {
  const capture = this[kCapture]!;
  capture.request.add(chunk);
  return capture.origPush.call(this, chunk, encoding);
}

function captureWriteHead(this: Carrier, ...args: unknown[]): unknown {
  const capture = this[kCapture]!;
  if (capture.headersAt === undefined) {
    capture.headersAt = performance.now() - capture.startedAt;
    capture.status = Number(args[0]);
    const headers = args.length > 1 ? args[args.length - 1] : undefined;
    capture.responseHeaders = headersOf(capture.res, headers);
  }
  return capture.origWriteHead.apply(this, args);
}

function captureWrite(this: Carrier, ...args: unknown[]): unknown {
  const capture = this[kCapture]!;
  if (typeof args[0] !== 'function') capture.response.add(args[0]);
  return capture.origWrite.apply(this, args);
}

function captureEnd(this: Carrier, ...args: unknown[]): unknown {
  const capture = this[kCapture]!;
  if (typeof args[0] !== 'function') capture.response.add(args[0]);
  if (capture.headersAt === undefined) {
    capture.headersAt = performance.now() - capture.startedAt;
    capture.status = capture.res.statusCode;
    capture.responseHeaders = headersOf(capture.res, undefined);
  }
  return capture.origEnd.apply(this, args);
}

/** Response headers as one object: those set with `setHeader` plus those given to `writeHead`
 * (a flat `[name, value, ...]` array or an object). */
function headersOf(res: ClientResponse, given: unknown): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  const add = (name: string, value: unknown) => {
    const key = name.toLowerCase();
    const values = Array.isArray(value) ? value.map(String) : [String(value)];
    const previous = out[key];
    if (previous === undefined) out[key] = values.length === 1 ? values[0]! : values;
    else out[key] = [...(Array.isArray(previous) ? previous : [previous]), ...values];
  };
  for (const [name, value] of Object.entries(res.getHeaders())) if (value !== undefined) add(name, value);
  if (Array.isArray(given)) {
    if (given.length > 0 && Array.isArray(given[0])) for (const [name, value] of given as [string, unknown][]) add(name, value);
    else for (let i = 0; i + 1 < given.length; i += 2) add(String(given[i]), given[i + 1]);
  } else if (given !== null && typeof given === 'object') {
    for (const [name, value] of Object.entries(given)) if (value !== undefined) add(name, value);
  }
  return out;
}
