/**
 * Gatehouse's HTTP/1.1 client for upstreams: a keep-alive connection pool per upstream origin that
 * writes one request at a time per connection (no pipelining, RFC 9112 §9.3.2) and reads the
 * answer with `upstream/response-parser.ts`.
 *
 * Why not undici's `Pool`, which Gatehouse used before: the proxy needs only this one exchange
 * shape (a request head from already validated fields, a streamed body, the answer streamed back
 * with backpressure), and undici's general client costs ~9 µs per request on this machine (its
 * `Request` object, header re-validation, queue and llhttp in WebAssembly, which copies every
 * received byte into its memory), more than a third of a small proxied request. undici still serves
 * every other client in Gatehouse (ACME, health checks, the on-demand `ask`).
 *
 * The handler interface keeps the shape of undici's dispatch handler (onConnect, onHeaders, onData,
 * onComplete, onError, onBodySent), with one change: `onConnect` gets the {@link UpstreamCall}, whose
 * `abort()` and `resume()` act on that request only (never on a later one that reuses the connection).
 *
 * Timeouts: the connect, response-header and body-idle bounds and the keep-alive idle bound are
 * checked by one shared timer every {@link TICK_MS} while any upstream connection exists (no timer
 * is set or cleared per request): a bound fires up to one tick late, never early.
 *
 * Errors given to `onError` carry a `code`: `GH_UPSTREAM_CONNECT_TIMEOUT`,
 * `GH_UPSTREAM_HEADERS_TIMEOUT`, `GH_UPSTREAM_BODY_TIMEOUT`, `GH_UPSTREAM_RESET` (the connection
 * ended before the response was complete), `GH_UPSTREAM_BAD_RESPONSE` (see the parser),
 * `GH_UPSTREAM_CLOSED` (the pool was closed), `GH_UPSTREAM_BAD_REQUEST` (an invalid request
 * target), or the `net`/`tls` error's own (`ECONNREFUSED`, `ECONNRESET`, certificate errors, ...).
 */
import net, { type Socket } from 'node:net';
import type { Readable } from 'node:stream';
import tls, { type ConnectionOptions } from 'node:tls';
import { READ_BLOCK_SIZE, takeReadBlock, trimReadBlocks, type ReadBlock } from './read-blocks.js';
import { ResponseParser, type ResponseSink } from './response-parser.js';
import { busyPollKick } from '../busy-poll.js';

/** One request for {@link UpstreamPool.dispatch}. */
export interface UpstreamRequestOptions {
  /** Request target in origin-form (`/path?query`); not empty, bytes 0x21–0x7E and 0x80–0xFF only. */
  readonly path: string;
  /** Request method (a token, as the client's parser accepted it). */
  readonly method: string;
  /**
   * Header fields `[name, value, ...]`, already valid (as `proxy/headers.ts` builds them): they are
   * written as given. `host` is added when absent, then `connection: keep-alive`, and
   * `transfer-encoding: chunked` for a body without `content-length`; hop-by-hop fields must not be
   * in the list.
   */
  readonly headers: readonly string[];
  /** The request body, streamed with backpressure; null for none. */
  readonly body: Readable | null;
  /** Bound on the wait for the response head once the request (body included) is sent (ms); default: the pool's. */
  readonly headersTimeout?: number;
  /** Bound on the silence between response body chunks (ms); default: the pool's. */
  readonly bodyTimeout?: number;
}

/** What the pool calls back, in order: onConnect, onBodySent*, onHeaders, onData*, then onComplete or onError. */
export interface UpstreamHandler {
  /** The request is about to be written on a connection; `call` can abort it or resume its body. */
  onConnect(call: UpstreamCall): void;
  /** A chunk of the request body was written. Throwing aborts the request with the error thrown. */
  onBodySent(chunk: Buffer): void;
  /**
   * The final response head (1xx are not reported). `rawHeaders` is `[name, value, ...]` as received.
   * `validated` is true when every name is a token and no value holds a control character other
   * than HTAB (see `ResponseSink.onResponseHead`): the fields need no second check.
   * @returns false to stop reading from the upstream until `call.resume()` (as `onData`).
   */
  onHeaders(status: number, rawHeaders: string[], statusText: string, validated: boolean): boolean;
  /**
   * A body chunk: a view, valid during the call only, unless the handler calls `call.hold()` in
   * it (then until the function that returns is called; a large read's block is reused after).
   * @returns false to stop reading from the upstream until `call.resume()`; what the read in hand
   *   still holds (at most one socket read: 32 KiB) is delivered, and the response may complete.
   */
  onData(chunk: Buffer): boolean;
  /** The response ended; `trailers` `[name, value, ...]` or null. */
  onComplete(trailers: string[] | null): void;
  /** The request failed; nothing more is called. */
  onError(error: Error): void;
}

/** Options of {@link UpstreamPool}. Times in milliseconds. */
export interface UpstreamPoolOptions {
  /** Most connections open at once; null = no limit (requests never wait for a connection). */
  readonly connections: number | null;
  /** Bound on opening a connection (TCP and TLS handshake), ms. */
  readonly connectTimeout: number;
  /** Default bound on the wait for a response head once the request (body included) was sent, ms. */
  readonly headersTimeout: number;
  /** Default bound on the silence between response body chunks, ms (not counted while paused). */
  readonly bodyTimeout: number;
  /** An idle connection is closed after this long, ms. */
  readonly keepAliveTimeout: number;
  /** For `https:` origins: TLS options (`ca`, `rejectUnauthorized`, `servername`); null for `http:`. */
  readonly tls: Pick<ConnectionOptions, 'ca' | 'rejectUnauthorized' | 'servername'> | null;
}

/** Resolution of every upstream timeout (ms): they fire at most this late. */
export const TICK_MS = 50;

/** An error of the upstream client, with a stable `code`. */
export class UpstreamError extends Error {
  constructor(readonly code: string, message: string) {
    super(message);
    this.name = 'UpstreamError';
  }
}

/** Bytes a request target may not hold: controls, space and DEL (RFC 9112 §3.2; undici's rule too). */
const INVALID_PATH = /[^\x21-\x7e\x80-\xff]/;

/**
 * One request's handle: made by {@link UpstreamPool.dispatch}, given to `onConnect`.
 */
export class UpstreamCall {
  /** The connection serving it; null while it waits for one. */
  connection: UpstreamConnection | null = null;
  /** onComplete or onError was called (or is about to be). */
  done = false;
  constructor(
    readonly pool: UpstreamPool,
    readonly options: UpstreamRequestOptions,
    readonly handler: UpstreamHandler,
  ) {}

  /** Aborts the request (its connection is closed): `onError(error)`, unless it already ended. */
  abort(error?: Error): void {
    if (this.done) return;
    const reason = error ?? new UpstreamError('GH_UPSTREAM_ABORTED', 'the request was aborted');
    if (this.connection !== null) this.connection.fail(this, reason);
    else this.pool.dequeue(this, reason);
  }

  /**
   * Keeps the body chunk being delivered valid after `onData` returns; call it inside `onData`.
   * A large read lands in a block that is reused once every chunk viewing it was released (see
   * `read-blocks.ts`): pass the function returned as the client write's callback (called with an
   * error, it keeps the hold). Never calling it is safe (the block is then left to the garbage
   * collector); calling it twice without an error is not.
   * @returns the release function, or null when the chunk is a copy the handler may keep as is.
   */
  hold(): ((error?: Error | null) => void) | null {
    const block = this.connection?.delivering ?? null;
    return block === null ? null : block.retain();
  }

  /**
   * Inside `onData`: true when the chunk being delivered is the body's last (the last bytes of a
   * `Content-Length` body): `onComplete`, without trailers, follows as soon as `onData` returns,
   * unless `onData` throws. False for chunked and close-delimited bodies, whose end is only
   * known after their last data.
   */
  get lastChunk(): boolean {
    const connection = this.connection;
    return connection !== null && connection.deliveringLast;
  }

  /** Reading the response goes on after a handler returned false. */
  resume(): void {
    if (!this.done) this.connection?.resumeReading(this);
  }
}

/**
 * A keep-alive pool of HTTP/1.1 connections to one origin.
 */
export class UpstreamPool {
  /** Idle connections, the most recently used last (it is taken first). */
  private readonly idle: UpstreamConnection[] = [];
  /** Requests waiting for a connection (only with a `connections` limit); `queueHead` is the first. */
  private readonly queue: (UpstreamCall | null)[] = [];
  private queueHead = 0;
  /** Requests in `queue` still waiting (aborted ones leave a null slot). */
  private pending = 0;
  /** Every open (or opening) connection. */
  private size = 0;
  private running = 0;
  private closing = false;
  private closed: Promise<void> | null = null;
  private resolveClosed: (() => void) | null = null;
  /** `host` field value for requests without one: the origin's host and port. */
  readonly hostField: string;
  /** The last TLS session of this origin, offered again for a quicker handshake. */
  tlsSession: Buffer | undefined = undefined;

  /**
   * @param hostname host name or IP (no brackets).
   * @param port TCP port.
   * @param options limits and timeouts.
   * @param hostField the `Host` value for requests that carry none (e.g. `127.0.0.1:8080`).
   */
  constructor(readonly hostname: string, readonly port: number, readonly options: UpstreamPoolOptions, hostField: string) {
    this.hostField = hostField;
  }

  /** Counters, for tests and status pages. */
  get stats(): { readonly connected: number; readonly free: number; readonly pending: number; readonly running: number } {
    return { connected: this.size, free: this.idle.length, pending: this.pending, running: this.running };
  }

  /**
   * Sends one request. Never throws: failures reach `handler.onError` (synchronously when the pool
   * is closed or the path is invalid).
   * @returns the request's handle (the same object `onConnect` gets).
   */
  dispatch(options: UpstreamRequestOptions, handler: UpstreamHandler): UpstreamCall {
    const call = new UpstreamCall(this, options, handler);
    if (this.closing) {
      call.done = true;
      handler.onError(new UpstreamError('GH_UPSTREAM_CLOSED', 'the upstream pool is closed'));
      return call;
    }
    if (options.path.length === 0 || INVALID_PATH.test(options.path)) {
      call.done = true;
      handler.onError(new UpstreamError('GH_UPSTREAM_BAD_REQUEST', 'invalid request target'));
      return call;
    }
    let connection = this.idle.pop();
    // One closed since it went idle (its 'close' event is still to come) is skipped.
    while (connection !== undefined && !connection.reusable) connection = this.idle.pop();
    if (connection !== undefined) {
      connection.assign(call);
    } else if (this.options.connections === null || this.size < this.options.connections) {
      this.open().assign(call);
    } else {
      this.queue.push(call);
      this.pending++;
    }
    return call;
  }

  /** Finishes queued and running requests, then closes every connection. */
  close(): Promise<void> {
    this.closing = true;
    this.closed ??= new Promise<void>((resolve) => { this.resolveClosed = resolve; });
    for (const connection of this.idle.splice(0)) connection.destroy();
    this.settleClose();
    return this.closed;
  }

  /** Aborts running and queued requests and closes every connection now. */
  destroy(): Promise<void> {
    const error = new UpstreamError('GH_UPSTREAM_CLOSED', 'the upstream pool was destroyed');
    this.closing = true;
    for (let i = this.queueHead; i < this.queue.length; i++) {
      const call = this.queue[i];
      if (call == null) continue;
      call.done = true;
      call.handler.onError(error);
    }
    this.queue.length = 0;
    this.queueHead = 0;
    this.pending = 0;
    for (const connection of [...liveConnections]) if (connection.pool === this) connection.destroy(error);
    return this.close();
  }

  // ---- used by UpstreamConnection and UpstreamCall ----

  /** A connection took a request (from `assign`). */
  started(): void {
    this.running++;
  }

  /**
   * A connection's request ended. A reusable connection takes the next waiting request or goes
   * idle; one that is not is closing, and `removed` follows.
   */
  finished(connection: UpstreamConnection, reusable: boolean): void {
    this.running--;
    if (!reusable) return;
    const next = this.nextQueued();
    if (next !== undefined) {
      connection.assign(next);
    } else if (this.closing) {
      connection.destroy();
    } else {
      connection.idleSince = performance.now();
      this.idle.push(connection);
    }
  }

  /** A connection closed: forget it, and open another for a waiting request. */
  removed(connection: UpstreamConnection): void {
    this.size--;
    const at = this.idle.lastIndexOf(connection);
    if (at >= 0) this.idle.splice(at, 1);
    if (this.pending > 0) {
      const next = this.nextQueued();
      if (next !== undefined) this.open().assign(next);
    }
    this.settleClose();
  }

  /** A queued request was aborted before it got a connection. */
  dequeue(call: UpstreamCall, error: Error): void {
    const at = this.queue.indexOf(call, this.queueHead);
    if (at >= 0) {
      this.queue[at] = null;
      this.pending--;
    }
    call.done = true;
    call.handler.onError(error);
  }

  private nextQueued(): UpstreamCall | undefined {
    while (this.queueHead < this.queue.length) {
      const call = this.queue[this.queueHead];
      this.queue[this.queueHead++] = null;
      if (this.queueHead === this.queue.length) {
        this.queue.length = 0;
        this.queueHead = 0;
      }
      if (call != null && !call.done) {
        this.pending--;
        return call;
      }
    }
    return undefined;
  }

  private open(): UpstreamConnection {
    this.size++;
    return new UpstreamConnection(this);
  }

  private settleClose(): void {
    if (this.closing && this.size === 0 && this.resolveClosed !== null) {
      this.resolveClosed();
      this.resolveClosed = null;
    }
  }
}

const enum Phase {
  Connecting,
  /** Connected, no request. */
  Idle,
  /** The request is written (or being written); no response head yet. */
  AwaitingHead,
  /** Reading the response body. */
  Body,
  /** Reading paused by the handler (no body timeout). */
  Paused,
  Closed,
}

const kConnection = Symbol('gatehouse.upstreamConnection');

interface ConnectionCarrier {
  [kConnection]?: UpstreamConnection;
}

/** One HTTP/1.1 connection of a pool; the parser's sink. Internal to this module. */
export class UpstreamConnection implements ResponseSink {
  readonly socket: Socket;
  private readonly parser: ResponseParser;
  private call: UpstreamCall | null = null;
  private phase = Phase.Connecting;
  /** `performance.now()` when the current phase started (or the last body byte came). */
  private since = performance.now();
  /** `performance.now()` when the connection became idle. */
  idleSince = 0;
  private headersTimeout = 0;
  private bodyTimeout = 0;
  /** The request body is still being written. */
  private sendingBody: Readable | null = null;
  private bodyChunked = false;
  private bodyExpected = -1;
  private bodySent = 0;
  private keepAlive = true;
  /** The current response ended inside `onData` processing; finished after the parser returns. */
  private completed = false;
  private trailers: string[] | null = null;
  /** The pool was told the connection closed. */
  private forgotten = false;
  /**
   * Size of the next read block this connection takes (bytes), from its last read: READ_BLOCK_SIZE
   * after a read that filled its buffer, else twice the last read, at least LARGE_READ.
   */
  private blockSize = READ_BLOCK_SIZE;
  /** Reads in a row that brought under SMALL_READ: from TRICKLE on, the body is read into the shared buffer. */
  private smallReads = 0;
  /**
   * The read block this connection reads a large body into, from `readOffset` on (the bytes
   * before it were handed on as chunks that view the block); the connection holds it until too
   * little is left in it or the body ends. Null when it has none.
   */
  private readBlock: ReadBlock | null = null;
  /** Bytes of `readBlock` handed on so far. */
  private readOffset = 0;
  /** The body being read went (in part) into a read block. */
  private bodyLarge = false;
  /** The last response's body went into a read block: the next head is read into one too. */
  private lastLarge = false;
  /** The block the body chunk being delivered views (see {@link UpstreamCall.hold}); else null. */
  delivering: ReadBlock | null = null;

  constructor(readonly pool: UpstreamPool) {
    this.parser = new ResponseParser(this);
    const tlsOptions = pool.options.tls;
    let socket: Socket;
    if (tlsOptions === null) {
      socket = net.connect({
        host: pool.hostname, port: pool.port, noDelay: true, keepAlive: true, keepAliveInitialDelay: 60_000,
        // Node calls `buffer` without a receiver: one closure per connection (not per request).
        onread: { buffer: () => this.readBuffer(), callback: onSocketRead },
      });
      socket.once('connect', onSocketConnect);
    } else {
      socket = tls.connect({
        host: pool.hostname,
        port: pool.port,
        servername: tlsOptions.servername ?? (net.isIP(pool.hostname) === 0 ? pool.hostname : undefined),
        ca: tlsOptions.ca,
        rejectUnauthorized: tlsOptions.rejectUnauthorized,
        ALPNProtocols: ['http/1.1'],
        session: pool.tlsSession,
      });
      socket.setNoDelay(true);
      socket.setKeepAlive(true, 60_000);
      socket.once('secureConnect', onSocketConnect);
      socket.on('session', onTlsSession);
    }
    this.socket = socket;
    (socket as ConnectionCarrier)[kConnection] = this;
    if (tlsOptions !== null) socket.on('data', onSocketData); // plain sockets read through `onread`
    socket.on('end', onSocketEnd);
    socket.on('error', onSocketError);
    socket.on('close', onSocketClose);
    socket.on('drain', onSocketDrain);
    watch(this);
  }

  /**
   * While a body chunk is delivered: it ends the body (the parser already finished the response,
   * which completes once the chunk's `onData` returns).
   */
  get deliveringLast(): boolean {
    return !this.parser.busy;
  }

  /** The connection may carry another request after the current one (or now, when idle). */
  get reusable(): boolean {
    return this.keepAlive && this.phase !== Phase.Closed && !this.socket.destroyed;
  }

  /** Takes a request: writes it now if connected, else once connected. */
  assign(call: UpstreamCall): void {
    this.call = call;
    call.connection = this;
    this.pool.started();
    if (this.phase === Phase.Idle) this.start(call);
  }

  /** The socket connected. */
  connected(): void {
    if (this.phase !== Phase.Connecting) return;
    this.phase = Phase.Idle;
    this.since = performance.now();
    const call = this.call;
    if (call !== null) this.start(call);
  }

  private start(call: UpstreamCall): void {
    const options = call.options;
    this.phase = Phase.AwaitingHead;
    this.since = performance.now();
    this.headersTimeout = options.headersTimeout ?? this.pool.options.headersTimeout;
    this.bodyTimeout = options.bodyTimeout ?? this.pool.options.bodyTimeout;
    this.completed = false;
    this.trailers = null;
    this.parser.expect(options.method === 'HEAD');
    call.handler.onConnect(call);
    if (this.call !== call) return; // aborted in onConnect

    const headers = options.headers;
    let head = `${options.method} ${options.path} HTTP/1.1\r\n`;
    let hasHost = false;
    let length = -1;
    for (let i = 0; i < headers.length; i += 2) {
      const name = headers[i]!;
      const value = headers[i + 1]!;
      if (name.length === 4 && name.toLowerCase() === 'host') hasHost = true;
      else if (name.length === 14 && name.toLowerCase() === 'content-length') length = Number(value);
      head += `${name}: ${value}\r\n`;
    }
    if (!hasHost) head += `host: ${this.pool.hostField}\r\n`;
    head += 'connection: keep-alive\r\n'; // the default in HTTP/1.1; said for HTTP/1.0 servers
    const body = options.body;
    if (body === null) {
      this.socket.write(`${head}\r\n`, 'latin1');
      return;
    }
    this.bodyChunked = length < 0;
    if (this.bodyChunked) head += 'transfer-encoding: chunked\r\n';
    this.bodyExpected = length;
    this.bodySent = 0;
    this.socket.write(`${head}\r\n`, 'latin1');
    this.sendingBody = body;
    (body as ConnectionCarrier)[kConnection] = this;
    body.on('data', onBodyData);
    body.on('end', onBodyEnd);
    body.on('error', onBodyError);
    body.on('close', onBodyClose);
    if (body.isPaused()) body.resume();
  }

  // ---- request body ----

  bodyData(chunk: Buffer | string): void {
    const call = this.call;
    if (call === null || this.sendingBody === null) return;
    const buffer = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
    if (buffer.length === 0) return;
    this.bodySent += buffer.length;
    if (this.bodyExpected >= 0 && this.bodySent > this.bodyExpected) {
      this.fail(call, new UpstreamError('GH_REQUEST_BODY_LENGTH', 'the request body is longer than its Content-Length'));
      return;
    }
    let flushed: boolean;
    if (this.bodyChunked) {
      this.socket.cork();
      this.socket.write(`${buffer.length.toString(16)}\r\n`, 'latin1');
      this.socket.write(buffer);
      flushed = this.socket.write('\r\n', 'latin1');
      this.socket.uncork();
    } else {
      flushed = this.socket.write(buffer);
    }
    try {
      call.handler.onBodySent(buffer);
    } catch (error) {
      this.fail(call, error as Error);
      return;
    }
    if (!flushed && this.call === call) this.sendingBody.pause();
  }

  bodyEnd(): void {
    const call = this.call;
    const body = this.sendingBody;
    if (call === null || body === null) return;
    this.stopBody();
    if (this.bodyExpected >= 0 && this.bodySent !== this.bodyExpected) {
      this.fail(call, new UpstreamError('GH_REQUEST_BODY_LENGTH', 'the request body is shorter than its Content-Length'));
      return;
    }
    if (this.bodyChunked) this.socket.write('0\r\n\r\n', 'latin1');
    if (this.phase === Phase.AwaitingHead) this.since = performance.now(); // the request is sent
  }

  bodyFailed(error: Error | undefined): void {
    const call = this.call;
    if (call === null || this.sendingBody === null) return;
    this.fail(call, error ?? new UpstreamError('GH_REQUEST_BODY_ABORTED', 'the request body ended early'));
  }

  drained(): void {
    const body = this.sendingBody;
    if (body !== null && body.isPaused()) body.resume();
  }

  private stopBody(): void {
    const body = this.sendingBody;
    if (body === null) return;
    this.sendingBody = null;
    body.removeListener('data', onBodyData);
    body.removeListener('end', onBodyEnd);
    body.removeListener('error', onBodyError);
    body.removeListener('close', onBodyClose);
    (body as ConnectionCarrier)[kConnection] = undefined;
    if (body.isPaused()) body.resume(); // undo this pool's backpressure: the owner drains or drops the rest
  }

  // ---- response ----

  /**
   * A read of a plain socket (its `onread` callback), into `buffer`: the shared buffer is read into
   * again by the next read of any connection, so what it holds is copied out. A read into the rest
   * of the connection's read block is handed on as a view of the block, and the next read goes on
   * after it (the handler may hold the view, see {@link UpstreamCall.hold}); a read under 16 KiB
   * there is copied out instead, so a small chunk waiting in a slow client's queue does not keep a
   * block of up to 256 KiB, and its bytes are read into again. Sets the size of the next block
   * (`blockSize`) and counts small reads (`smallReads`).
   * @returns false to stop reading (the handler paused the response).
   */
  readInto(nread: number, buffer: Buffer): boolean {
    let block = this.readBlock;
    let data: Buffer;
    if (block !== null && buffer.buffer === block.buffer.buffer && nread >= SMALL_READ) {
      data = nread === buffer.length ? buffer : buffer.subarray(0, nread);
      this.readOffset = buffer.byteOffset - block.buffer.byteOffset + nread;
      this.delivering = block;
    } else if (nread >= SMALL_READ && this.lastLarge && this.phase === Phase.AwaitingHead) {
      // The head of a response, read into the shared buffer (Node asks for the next read's buffer
      // right after a read: the connection was idle then, and held no block), on a connection
      // whose last body was read into a block: likely a large body again, whose first bytes go
      // into a new block rather than into a new buffer of their own.
      block = this.newReadBlock(READ_BLOCK_SIZE);
      buffer.copy(block.buffer, 0, 0, nread);
      data = block.buffer.subarray(0, nread);
      this.readOffset = nread;
      this.delivering = block;
    } else {
      data = Buffer.allocUnsafe(nread);
      buffer.copy(data, 0, 0, nread);
    }
    this.blockSize = nread === buffer.length ? READ_BLOCK_SIZE // more is likely waiting
      : Math.min(READ_BLOCK_SIZE, Math.max(LARGE_READ, nread * 2));
    this.smallReads = nread < SMALL_READ ? this.smallReads + 1 : 0;
    this.received(data);
    this.delivering = null;
    return this.phase !== Phase.Paused;
  }

  /**
   * The buffer for this connection's next read (see {@link onSocketRead}): while a body is read,
   * BODY_READ bytes of the connection's read block, while it has at least BLOCK_REST left; else
   * of a new block (sized from `blockSize` and the body left) when at least LARGE_READ of the body
   * is to come, or SMALL_READ once the body went into a block (its tail is handed on as views
   * too). Node asks for this buffer right after each read, so the head of the next response is
   * always read into the shared buffer (an idle connection holds no block); {@link readInto} says
   * where its bytes go.
   *
   * Else the shared buffer, and the block, if any, is given back; so too once TRICKLE reads in a
   * row brought under SMALL_READ each (an upstream that trickles keeps no block).
   */
  readBuffer(): Buffer {
    if (this.phase === Phase.Body && this.smallReads < TRICKLE) {
      let block = this.readBlock;
      if (block === null || block.buffer.length - this.readOffset < BLOCK_REST) {
        const left = this.parser.bodyLeft;
        block = left >= LARGE_READ || (this.bodyLarge && left >= SMALL_READ) ? this.newReadBlock(Math.min(left, this.blockSize)) : null;
      }
      if (block !== null) {
        this.bodyLarge = true;
        return block.buffer.subarray(this.readOffset, this.readOffset + BODY_READ);
      }
    }
    this.releaseReadBlock();
    return sharedReadBuffer;
  }

  /** A new read block of at least `size` bytes for this connection; its hold on the old one is given back. */
  private newReadBlock(size: number): ReadBlock {
    this.readBlock?.release(); // the chunks that view the old block keep their holds
    const block = takeReadBlock(size);
    this.readBlock = block;
    this.readOffset = 0;
    return block;
  }

  /** Gives back this connection's hold on its read block, if any (the body ended or the socket closed). */
  private releaseReadBlock(): void {
    const block = this.readBlock;
    if (block === null) return;
    this.readBlock = null;
    block.release();
  }

  /** Bytes from the upstream. */
  received(data: Buffer): void {
    const call = this.call;
    if (call === null || !this.parser.busy) {
      // Bytes nobody asked for: the connection is out of step; close it.
      this.destroy();
      return;
    }
    let used: number;
    try {
      used = this.parser.execute(data);
    } catch (error) {
      if (this.call !== null) this.fail(this.call, error as Error);
      else this.destroy();
      return;
    }
    if (this.completed) {
      if (used < data.length) this.keepAlive = false; // more than the response: out of step
      this.complete();
    }
  }

  onResponseHead(status: number, rawHeaders: string[], statusText: string, validated: boolean): void {
    const call = this.call;
    if (call === null) return;
    this.phase = Phase.Body;
    this.since = performance.now();
    if (!this.parser.keepAlive) this.keepAlive = false;
    if (!call.handler.onHeaders(status, rawHeaders, statusText, validated) && this.call === call) this.pause();
  }

  onResponseData(chunk: Buffer): void {
    const call = this.call;
    if (call === null) return;
    if (this.phase === Phase.Body) this.since = performance.now();
    if (!call.handler.onData(chunk) && this.call === call) this.pause();
  }

  onResponseEnd(trailers: string[] | null): void {
    this.completed = true;
    this.trailers = trailers;
  }

  private complete(): void {
    const call = this.call;
    if (call === null) return;
    this.completed = false;
    // An idle connection holds no block (the chunks handed on keep theirs).
    this.lastLarge = this.bodyLarge;
    this.bodyLarge = false;
    this.releaseReadBlock();
    this.call = null;
    call.done = true;
    call.connection = null;
    if (this.sendingBody !== null) {
      // Answered before the whole body was sent (e.g. 413): the rest is not sent, so the
      // connection is out of step.
      this.stopBody();
      this.keepAlive = false;
    }
    if (this.phase === Phase.Paused) this.socket.resume();
    const trailers = this.trailers;
    this.trailers = null;
    if (this.reusable) {
      this.phase = Phase.Idle;
      this.pool.finished(this, true);
    } else {
      this.phase = Phase.Closed;
      this.socket.destroy();
      this.pool.finished(this, false);
    }
    call.handler.onComplete(trailers);
  }

  private pause(): void {
    this.phase = Phase.Paused;
    this.socket.pause();
  }

  resumeReading(call: UpstreamCall): void {
    if (this.call !== call || this.phase !== Phase.Paused) return;
    this.phase = Phase.Body;
    this.since = performance.now();
    this.socket.resume();
  }

  /** The upstream ended its side. */
  ended(): void {
    const call = this.call;
    if (call === null) {
      this.destroy();
      return;
    }
    try {
      this.parser.finish();
    } catch {
      this.fail(call, new UpstreamError('GH_UPSTREAM_RESET', this.parser.headDone
        ? 'the upstream closed the connection before the response was complete'
        : 'the upstream closed the connection before answering'));
      return;
    }
    if (this.completed) this.complete();
  }

  errored(error: Error): void {
    const call = this.call;
    if (call !== null) this.fail(call, error);
    else this.destroy();
  }

  closedSocket(): void {
    const call = this.call;
    if (call !== null) this.fail(call, new UpstreamError('GH_UPSTREAM_RESET', 'the upstream connection closed'));
    this.phase = Phase.Closed;
    this.releaseReadBlock(); // the handle is closed: nothing reads into it any more
    if (this.forgotten) return;
    this.forgotten = true;
    unwatch(this);
    this.pool.removed(this);
  }

  /** Fails `call` (if it is this connection's) with `error` and closes the connection. */
  fail(call: UpstreamCall, error: Error): void {
    if (this.call !== call || call.done) return;
    this.call = null;
    call.done = true;
    call.connection = null;
    this.stopBody();
    this.phase = Phase.Closed;
    this.socket.destroy();
    this.pool.finished(this, false);
    call.handler.onError(error);
  }

  /** Closes the connection; a request on it fails with `error` (default: reset). */
  destroy(error?: Error): void {
    const call = this.call;
    if (call !== null) {
      this.fail(call, error ?? new UpstreamError('GH_UPSTREAM_RESET', 'the upstream connection closed'));
      return;
    }
    this.phase = Phase.Closed;
    this.socket.destroy();
  }

  /** Timeouts, from the shared timer. */
  check(now: number): void {
    const call = this.call;
    switch (this.phase) {
      case Phase.Connecting:
        if (now - this.since >= this.pool.options.connectTimeout) {
          this.destroy(new UpstreamError('GH_UPSTREAM_CONNECT_TIMEOUT', 'connecting to the upstream timed out'));
        }
        break;
      case Phase.Idle:
        if (call === null && now - this.idleSince >= this.pool.options.keepAliveTimeout) this.destroy();
        break;
      case Phase.AwaitingHead:
        // Counted once the request is sent, body included (as Go's ResponseHeaderTimeout).
        if (call !== null && this.sendingBody === null && now - this.since >= this.headersTimeout) {
          this.fail(call, new UpstreamError('GH_UPSTREAM_HEADERS_TIMEOUT', 'the upstream did not answer in time'));
        }
        break;
      case Phase.Body:
        if (call !== null && now - this.since >= this.bodyTimeout) {
          this.fail(call, new UpstreamError('GH_UPSTREAM_BODY_TIMEOUT', 'the upstream stopped sending the response body'));
        }
        break;
    }
  }
}

function carried(target: unknown): UpstreamConnection | undefined {
  return (target as ConnectionCarrier)[kConnection];
}

function onSocketConnect(this: Socket): void {
  carried(this)?.connected();
}

function onSocketData(this: Socket, data: Buffer): void {
  busyPollKick();
  carried(this)?.received(data);
}

/**
 * Plain upstream sockets read through `onread` (no `Readable` buffering, no 'data' event), into
 * the buffer `UpstreamConnection.readBuffer` gives after each read: while a large body is read,
 * the rest of the connection's read block (`read-blocks.ts`; each read of 16 KiB or more handed on
 * as a view without a copy, the block reused once every client write that carried a part of it is
 * done); otherwise one buffer shared by every connection, whose bytes are copied out at once (into
 * a read block for the head of a likely large response, see `readInto`). Reads are
 * synchronous with their callback on the one event-loop thread, so no two connections ever fill
 * the shared buffer at the same time, and an idle connection holds no buffer of its own (Node's
 * own read path allocates 64 KiB per read and shrinks it with a copy).
 */
function onSocketRead(this: Socket, nread: number, buffer: Buffer): boolean {
  busyPollKick();
  const connection = carried(this);
  return connection === undefined ? false : connection.readInto(nread, buffer);
}

/** The shared read buffer: headers and small bodies (bytes). */
const sharedReadBuffer = Buffer.allocUnsafeSlow(16 * 1024);
/** A body with at least this much to come is read into a read block (bytes). */
const LARGE_READ = 64 * 1024;
/** A read under this size is copied out of a read block, not handed on as a view (bytes). */
const SMALL_READ = 16 * 1024;
/** Reads under SMALL_READ in a row after which a body is read into the shared buffer. */
const TRICKLE = 2;
/** A read block with less than this left after the chunks handed on is replaced (bytes). */
const BLOCK_REST = 32 * 1024;
/**
 * Most bytes one read of a large body takes (Caddy's copy buffer is as large). Measured with
 * 256 KiB bodies (bench/README.md, 2026-12-03, "read blocks"): reads of up to 256 KiB drained the
 * socket at once and left the proxy waiting for the next segment, and the backend on the other
 * core then spent 100–110 µs per response against 45–70 µs with 32 KiB reads (64 KiB did not
 * help); the proxy spends ~15 µs more for the extra reads. Later rounds found the backend's cost
 * bimodal with either size (bench/README.md, 2026-12-03 15:08): it is the backend's BBR pacing on
 * loopback, which reacts to when the proxy reads and acknowledges; with cubic it costs 39–46 µs
 * behind any proxy (bench/README.md, 2026-12-03 17:03).
 */
const BODY_READ = 32 * 1024;

function onSocketEnd(this: Socket): void {
  carried(this)?.ended();
}

function onSocketError(this: Socket, error: Error): void {
  carried(this)?.errored(error);
}

function onSocketClose(this: Socket): void {
  carried(this)?.closedSocket();
}

function onSocketDrain(this: Socket): void {
  carried(this)?.drained();
}

function onTlsSession(this: Socket, session: Buffer): void {
  const connection = carried(this);
  if (connection !== undefined) connection.pool.tlsSession = session;
}

function onBodyData(this: Readable, chunk: Buffer | string): void {
  carried(this)?.bodyData(chunk);
}

function onBodyEnd(this: Readable): void {
  carried(this)?.bodyEnd();
}

function onBodyError(this: Readable, error: Error): void {
  carried(this)?.bodyFailed(error);
}

function onBodyClose(this: Readable): void {
  if (!this.readableEnded) carried(this)?.bodyFailed(undefined);
}

// ---- the shared timer ----

const liveConnections = new Set<UpstreamConnection>();
let ticker: NodeJS.Timeout | undefined;

function watch(connection: UpstreamConnection): void {
  liveConnections.add(connection);
  if (ticker === undefined) {
    ticker = setInterval(tick, TICK_MS);
    ticker.unref();
  }
}

function unwatch(connection: UpstreamConnection): void {
  liveConnections.delete(connection);
  if (liveConnections.size === 0 && ticker !== undefined) {
    clearInterval(ticker);
    ticker = undefined;
    trimReadBlocks(true);
  }
}

/** Ticks between two trims of the free read blocks (10 s). */
const TRIM_TICKS = 10_000 / TICK_MS;
let ticksToTrim = TRIM_TICKS;

function tick(): void {
  const now = performance.now();
  for (const connection of liveConnections) connection.check(now);
  if (--ticksToTrim === 0) {
    ticksToTrim = TRIM_TICKS;
    trimReadBlocks();
  }
}
