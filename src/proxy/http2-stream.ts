/**
 * An HTTP/2 request served straight from its `ServerHttp2Stream`, without Node's compat objects.
 *
 * Node's compat API (`Http2ServerRequest`/`Http2ServerResponse`, the server's `'request'` event)
 * builds a `Readable` and a `Stream` per request and puts about a dozen listeners on the stream
 * (several of them closures). Measured on this machine with the benchmark's HTTP/2 scenario (16
 * connections × 16 streams, 1 KiB answers), a proxy built from Node's servers and undici alone
 * serves 12.6–13.5k req/s through the compat objects and 15.6–15.8k req/s from the `'stream'`
 * event: the compat layer is ~14 µs of ~75 µs per proxied request.
 *
 * {@link StreamRequest} and {@link StreamResponse} are the part of that API Gatehouse uses (the
 * router, the middleware, the proxy, the access log), for requests **without a body** (the
 * HEADERS frame ended the stream: GET, HEAD, DELETE, ... as browsers send them). Requests with a
 * body, `Expect` or CONNECT still get Node's compat objects (`listeners/https.ts` decides), so
 * body streaming, `100-continue` and flow control stay Node's.
 *
 * The response writes to the stream with `respond`/`write`/`end`; every response is started with
 * `waitForTrailers` (trailers given with {@link StreamResponse.addTrailers} are sent once the body
 * is queued, else Node sends an empty trailing HEADERS frame that ends the stream), as the compat
 * layer does, so a response aborted mid-body never looks complete (see `proxy/forward.ts`).
 * 'close' and 'drain' are the stream's own events: listen on {@link StreamResponse.stream}.
 */
import type { IncomingHttpHeaders, OutgoingHttpHeaders, ServerHttp2Stream } from 'node:http2';
import type { TLSSocket } from 'node:tls';

/** The request half: the fields of `Http2ServerRequest` Gatehouse reads. Its body is empty. */
export class StreamRequest {
  /** Always `'2.0'`, as `Http2ServerRequest.httpVersion`. */
  readonly httpVersion = '2.0';
  readonly httpVersionMajor = 2;
  readonly httpVersionMinor = 0;
  /** The request has no body: always true (see the file comment). */
  readonly readableEnded = true;
  /** `:method`. */
  readonly method: string;
  /** `:path` (RFC 9113 §8.3.1): path and query. */
  url: string;

  /**
   * @param stream the request's stream (its HEADERS frame carried END_STREAM).
   * @param headers the header object of the `'stream'` event (pseudo-headers included).
   * @param rawHeaders the flat `[name, value, ...]` list of the `'stream'` event.
   */
  constructor(readonly stream: ServerHttp2Stream, readonly headers: IncomingHttpHeaders, readonly rawHeaders: string[]) {
    this.method = headers[':method'] as string;
    this.url = headers[':path'] ?? '';
  }

  /**
   * The connection's TLS socket (through Node's HTTP/2 socket proxy, as `Http2ServerRequest.socket`),
   * or undefined once the session is gone.
   */
  get socket(): TLSSocket | undefined {
    return this.stream.session?.socket as TLSSocket | undefined;
  }
}

/** No field set with `setHeader` (shared, never written). */
const NO_HEADERS: OutgoingHttpHeaders = Object.freeze(Object.create(null) as OutgoingHttpHeaders);

/** Options of every `respond`: see the file comment. */
const RESPOND_OPTIONS = Object.freeze({ waitForTrailers: true });

/** The response half: the methods of `Http2ServerResponse` Gatehouse calls. */
export class StreamResponse {
  /** The status `writeHead` or `end` sends when none is given. Default 200. */
  statusCode = 200;
  #headers: OutgoingHttpHeaders = NO_HEADERS;
  #trailers: OutgoingHttpHeaders | undefined = undefined;
  #ended = false;

  constructor(readonly stream: ServerHttp2Stream) {}

  /** True once the response HEADERS were sent. */
  get headersSent(): boolean {
    return this.stream.headersSent;
  }

  /** True once `end()` was called (or the stream's writable side ended). */
  get writableEnded(): boolean {
    return this.#ended || this.stream.writableEnded;
  }

  /** Bytes queued on the stream and not yet sent. */
  get writableLength(): number {
    return this.stream.writableLength;
  }

  get destroyed(): boolean {
    return this.stream.destroyed;
  }

  /**
   * A field for the response HEADERS (lower-cased name); replaces one of the same name.
   * @throws Error (ERR_HTTP2_HEADERS_SENT) after the HEADERS were sent.
   */
  setHeader(name: string, value: string | number | string[]): this {
    if (this.stream.headersSent) throw Object.assign(new Error('the response HEADERS were already sent'), { code: 'ERR_HTTP2_HEADERS_SENT' });
    if (this.#headers === NO_HEADERS) this.#headers = Object.create(null) as OutgoingHttpHeaders;
    this.#headers[name.toLowerCase()] = value;
    return this;
  }

  /** The fields set with {@link setHeader} (lower-case names); do not modify. */
  getHeaders(): OutgoingHttpHeaders {
    return this.#headers;
  }

  /**
   * Sends the response HEADERS: the fields set with {@link setHeader}, then `headers` (names
   * lower-cased; they win on a name both have). Node adds `date`, and ends the stream at once for
   * HEAD, 204 and 304.
   * @param headers an object, or a flat `[name, value, ...]` list.
   * @throws what `ServerHttp2Stream.respond` throws: an invalid field, a closed stream, HEADERS
   *   already sent.
   */
  writeHead(status: number, headers?: OutgoingHttpHeaders | readonly (string | number)[]): this {
    this.statusCode = status;
    const fields: OutgoingHttpHeaders = Object.create(null) as OutgoingHttpHeaders;
    const set = this.#headers;
    for (const name in set) fields[name] = set[name];
    if (Array.isArray(headers)) {
      for (let i = 0; i + 1 < headers.length; i += 2) fields[String(headers[i]).toLowerCase()] = headers[i + 1] as string | number;
    } else if (headers !== undefined) {
      const object = headers as OutgoingHttpHeaders;
      for (const name in object) if (object[name] !== undefined) fields[name.toLowerCase()] = object[name];
    }
    fields[':status'] = status;
    this.stream.respond(fields, RESPOND_OPTIONS);
    return this;
  }

  /**
   * Queues body bytes (sends the HEADERS first when not sent yet).
   * @returns false when the stream's buffer is full: wait for the stream's 'drain'.
   */
  write(chunk: Buffer | string): boolean {
    if (!this.stream.headersSent) this.writeHead(this.statusCode);
    return this.stream.write(chunk);
  }

  /**
   * Sends `100 Continue` (RFC 9110 §15.2.1) as an informational HEADERS frame. Unused while only
   * requests without a body are served this way; there for the `Http2ServerResponse` API's sake.
   */
  writeContinue(): void {
    if (!this.stream.headersSent && !this.stream.destroyed) this.stream.additionalHeaders({ ':status': 100 });
  }

  /** Trailer fields, sent after the body (RFC 9113 §8.1). Call before `end()`. */
  addTrailers(trailers: OutgoingHttpHeaders): void {
    if (this.#trailers === undefined) {
      this.#trailers = Object.create(null) as OutgoingHttpHeaders;
      this.stream.once('wantTrailers', sendTrailers);
      (this.stream as TrailerCarrier)[kTrailers] = this.#trailers;
    }
    for (const name in trailers) this.#trailers[name.toLowerCase()] = trailers[name];
  }

  /** Ends the response (sending the HEADERS first when not sent yet); a no-op once ended or closed. */
  end(chunk?: Buffer | string): this {
    if (this.#ended) return this;
    this.#ended = true;
    const stream = this.stream;
    if (stream.destroyed || stream.closed) return this;
    if (!stream.headersSent) this.writeHead(this.statusCode);
    // HEAD, 204 and 304 ended the stream with their HEADERS.
    if (stream.writableEnded) return this;
    if (chunk === undefined) stream.end();
    else stream.end(chunk);
    return this;
  }

  /** Closes the stream (RST_STREAM); the client sees the response as failed. */
  destroy(error?: Error): void {
    if (!this.stream.destroyed) this.stream.destroy(error);
  }
}

const kTrailers = Symbol('gatehouse.trailers');

interface TrailerCarrier {
  [kTrailers]?: OutgoingHttpHeaders;
}

/** The stream's 'wantTrailers': the body is queued, send the trailers. */
function sendTrailers(this: ServerHttp2Stream & TrailerCarrier): void {
  const trailers = this[kTrailers] ?? NO_HEADERS;
  if (!this.destroyed && !this.closed) this.sendTrailers(trailers);
}
