/**
 * An incremental, strict parser of HTTP/1.1 responses (RFC 9112), for the upstream side of the
 * proxy: it reads what an upstream connection receives and reports each response's head, body
 * chunks and end to a {@link ResponseSink}.
 *
 * Strict where leniency lets one response be read as another (response splitting, RFC 9112 §11.1):
 * - lines end with CRLF; a bare CR or LF, or a NUL, anywhere in the head is an error;
 * - field names are tokens with the colon right after them (whitespace before it: §5.1), and a
 *   line folded into the previous one (obs-fold, §5.2) is an error;
 * - `Content-Length` is digits only, and repeated values must all be the same (RFC 9110 §8.6);
 *   `Transfer-Encoding` together with `Content-Length` is an error (§6.3: "ought to be handled as
 *   an error"), as is a chunk size that is not hex digits or a chunk not followed by CRLF;
 * - an unsolicited `100 Continue` (Gatehouse never sends `Expect` upstream) is an error; other
 *   1xx responses (103 Early Hints, ...) are read and skipped.
 * Body length (§6.3): none for HEAD, 1xx, 204 and 304; chunked when `chunked` is the last
 * transfer coding; `Content-Length` bytes; else up to the end of the connection.
 *
 * The head is parsed from one latin1 string (one slice per field), and body chunks are views of
 * the received buffers: nothing is copied except a head or a chunk-size line split across reads.
 */
import { FIELD_CHAR, TCHAR, TOKEN } from './field-syntax.js';

/** What the parser reports, in order: a head, body chunks, the end (or an error). */
export interface ResponseSink {
  /**
   * A final response head (status 101–599 except 1xx informational ones, which are skipped).
   * @param rawHeaders `[name, value, ...]` as received (name case kept, value without surrounding whitespace).
   * @param validated true when every name is a token and every value (and the reason phrase) holds
   *   only HTAB, SP, VCHAR and obs-text (RFC 9110 §5.5), so a consumer need not check the fields
   *   again; false when one of them holds another control character (the parser passes those on:
   *   what to do with them is the consumer's call).
   */
  onResponseHead(status: number, rawHeaders: string[], statusText: string, validated: boolean): void;
  /** A piece of the body: a view of the received buffer, valid only during the call. */
  onResponseData(chunk: Buffer): void;
  /** The response is complete. `trailers` as `[name, value, ...]`, or null when there were none. */
  onResponseEnd(trailers: string[] | null): void;
}

/** A response the parser refuses; `code` is `GH_UPSTREAM_BAD_RESPONSE`. */
export class ResponseParseError extends Error {
  readonly code = 'GH_UPSTREAM_BAD_RESPONSE';
  constructor(message: string) {
    super(`invalid upstream response: ${message}`);
    this.name = 'ResponseParseError';
  }
}

/** Largest response head (status line and fields) or trailer section accepted: 16 KiB, as Node's and undici's default. */
export const MAX_HEAD_BYTES = 16 * 1024;

const enum State {
  /** Waiting for (the rest of) a head. */
  Head,
  /** `remaining` body bytes to go (Content-Length). */
  Length,
  /** Until the connection ends. */
  UntilClose,
  /** Reading a chunk-size line (hex digits, then extensions, then CRLF). */
  ChunkSize,
  /** `remaining` bytes of chunk data to go. */
  ChunkData,
  /** The CRLF after a chunk's data. */
  ChunkDataEnd,
  /** The trailer section after the last chunk, up to the empty line. */
  Trailers,
  /** The response is complete; `execute` consumes nothing more until `expect()` is called again. */
  Done,
}

const CR = 0x0d;
const LF = 0x0a;
/** A NUL, a CR not followed by LF, or an LF not preceded by CR: never valid in a head. */
const BAD_LINE_BYTES = /\0|\r(?!\n)|(?<!\r)\n/;
/** An LF not preceded by CR (checked early, on a head still incomplete). */
const BARE_LF = /(?<!\r)\n/;
/** `HTTP/1.x NNN` followed by the end or a space and the reason phrase. */
const STATUS_LINE = /^HTTP\/1\.[01] [1-5]\d\d(?: |$)/;
/**
 * A whole head (status line and field lines, without the CRLFCRLF) in which every byte is one that
 * RFC 9110/9112 allow where it stands: the status line, then `token ":" value` lines with values of
 * HTAB, SP, VCHAR and obs-text. One test of it stands for the per-line checks below, which run only
 * when it fails (to find what is wrong, or to pass on a value with a control character).
 */
const CLEAN_HEAD = new RegExp(`^HTTP/1\\.[01] [1-5]\\d\\d(?: ${FIELD_CHAR}*)?(?:\\r\\n${TCHAR}+:${FIELD_CHAR}*)*$`);
const DIGITS = /^\d{1,15}$/;
const EMPTY: readonly string[] = Object.freeze([]);

/**
 * Parses the responses of one connection, one at a time: call {@link expect} before each
 * request, then {@link execute} with every buffer the connection reads and {@link finish} when it
 * ends. Errors are thrown as {@link ResponseParseError}; after one, the connection must be closed.
 */
export class ResponseParser {
  private state = State.Done;
  private remaining = 0;
  /** Bytes of a head, chunk-size line or trailer section that did not end in the last read. */
  private pending: Buffer | null = null;
  private noBody = false;
  /** Chunk size being read (hex digits so far), and whether an extension started. */
  private chunkSize = 0;
  private chunkDigits = 0;
  private inExtension = false;
  /** Whitespace followed the chunk size: only more of it, `;` or CR may come (BWS, RFC 9112 §7.1.1). */
  private afterSize = false;
  private sawCR = false;
  /** The connection may carry another request after the current response (set with its head). */
  keepAlive = false;

  constructor(private readonly sink: ResponseSink) {}

  /**
   * Get ready for the response to a new request.
   * @param head the request is a HEAD: the response has no body whatever its fields say.
   */
  expect(head: boolean): void {
    this.state = State.Head;
    this.noBody = head;
    this.pending = null;
    this.keepAlive = false;
  }

  /** True while a response is expected or being read. */
  get busy(): boolean {
    return this.state !== State.Done;
  }

  /**
   * Body bytes known to follow: the rest of a Content-Length body or of the current chunk;
   * `Infinity` for a body that runs to the end of the connection; 0 otherwise (head, sizes, done).
   */
  get bodyLeft(): number {
    switch (this.state) {
      case State.Length:
      case State.ChunkData:
        return this.remaining;
      case State.UntilClose:
        return Infinity;
      default:
        return 0;
    }
  }

  /** True once the head of the current response was reported. */
  get headDone(): boolean {
    return this.state !== State.Head && this.state !== State.Done;
  }

  /**
   * Parses `data`. Stops after the end of the current response: bytes past it return
   * as the count not consumed, so the caller can tell an upstream that sent more than asked.
   * @returns the number of bytes of `data` consumed.
   * @throws ResponseParseError on anything RFC 9112 does not allow (see the file comment).
   */
  execute(data: Buffer): number {
    let pos = 0;
    const end = data.length;
    while (pos < end) {
      switch (this.state) {
        case State.Head:
        case State.Trailers: {
          const used = this.readSection(data, pos);
          if (used < 0) return end; // incomplete: kept in `pending`
          pos = used;
          break;
        }
        case State.Length: {
          const take = Math.min(this.remaining, end - pos);
          this.remaining -= take;
          if (this.remaining === 0) this.state = State.Done;
          this.sink.onResponseData(pos === 0 && take === end ? data : data.subarray(pos, pos + take));
          pos += take;
          if (this.state === State.Done) this.sink.onResponseEnd(null);
          break;
        }
        case State.UntilClose:
          this.sink.onResponseData(pos === 0 ? data : data.subarray(pos));
          return end;
        case State.ChunkSize:
          pos = this.readChunkSize(data, pos);
          break;
        case State.ChunkData: {
          const take = Math.min(this.remaining, end - pos);
          this.remaining -= take;
          if (this.remaining === 0) this.state = State.ChunkDataEnd;
          this.sink.onResponseData(data.subarray(pos, pos + take));
          pos += take;
          break;
        }
        case State.ChunkDataEnd: {
          const byte = data[pos++]!;
          if (!this.sawCR) {
            if (byte !== CR) throw new ResponseParseError('chunk data not followed by CRLF');
            this.sawCR = true;
          } else {
            if (byte !== LF) throw new ResponseParseError('chunk data not followed by CRLF');
            this.sawCR = false;
            this.startChunkSize();
          }
          break;
        }
        case State.Done:
          return pos;
      }
      if (this.state === State.Done) return pos;
    }
    return pos;
  }

  /**
   * The connection ended (the upstream's FIN). Completes a close-delimited body.
   * @throws ResponseParseError when a response was in progress and needed more bytes.
   */
  finish(): void {
    if (this.state === State.UntilClose) {
      this.state = State.Done;
      this.sink.onResponseEnd(null);
      return;
    }
    if (this.state !== State.Done) throw new ResponseParseError('the connection closed before the response was complete');
  }

  /** Head or trailer section: complete it from `pending` and `data`; -1 when it needs more bytes. */
  private readSection(data: Buffer, pos: number): number {
    let buffer = data;
    let start = pos;
    let carried = 0;
    if (this.pending !== null) {
      carried = this.pending.length;
      buffer = Buffer.concat([this.pending, data.subarray(pos)]);
      start = 0;
      this.pending = null;
    }
    // A trailer section may be empty: the CRLF right after the last chunk's size line.
    if (this.state === State.Trailers && buffer.length - start >= 2 && buffer[start] === CR && buffer[start + 1] === LF) {
      this.state = State.Done;
      this.sink.onResponseEnd(null);
      return pos + 2 - carried;
    }
    const endOfSection = buffer.indexOf('\r\n\r\n', start, 'latin1');
    if (endOfSection < 0) {
      // Up to MAX_HEAD_BYTES and three bytes of the CRLFCRLF that ends it may wait for the rest.
      if (buffer.length - start > MAX_HEAD_BYTES + 3) throw new ResponseParseError('head larger than 16 KiB');
      if (BARE_LF.test(buffer.toString('latin1', start))) throw new ResponseParseError('bare LF in the head');
      this.pending = Buffer.from(buffer.subarray(start)); // a copy: `data` is reused by the caller
      return -1;
    }
    if (endOfSection - start > MAX_HEAD_BYTES) throw new ResponseParseError('head larger than 16 KiB');
    const text = buffer.toString('latin1', start, endOfSection);
    const consumed = endOfSection + 4 - start; // bytes of `buffer` from `start`
    const next = pos + consumed - carried;
    if (this.state === State.Trailers) this.parseTrailers(text);
    else this.parseHead(text);
    return next;
  }

  private parseHead(text: string): void {
    const clean = CLEAN_HEAD.test(text);
    if (!clean && BAD_LINE_BYTES.test(text)) throw new ResponseParseError('bare CR, LF or NUL in the head');
    let lineEnd = text.indexOf('\r\n');
    const statusLine = lineEnd < 0 ? text : text.slice(0, lineEnd);
    if (!clean && !STATUS_LINE.test(statusLine)) throw new ResponseParseError('malformed status line');
    const status = (statusLine.charCodeAt(9) - 48) * 100 + (statusLine.charCodeAt(10) - 48) * 10 + (statusLine.charCodeAt(11) - 48);
    const http10 = statusLine.charCodeAt(7) === 48;
    const statusText = statusLine.length > 13 ? statusLine.slice(13) : '';
    const headers: string[] = [];
    let length = -1;
    let chunked = false;
    let transferEncoding = false;
    let closeToken = false;
    let keepAliveToken = false;
    while (lineEnd >= 0) {
      const lineStart = lineEnd + 2;
      lineEnd = text.indexOf('\r\n', lineStart);
      const stop = lineEnd < 0 ? text.length : lineEnd;
      const colon = text.indexOf(':', lineStart);
      if (colon <= lineStart || colon >= stop) throw new ResponseParseError('malformed field line');
      const name = text.slice(lineStart, colon);
      if (!clean && !TOKEN.test(name)) throw new ResponseParseError('invalid field name');
      const value = trimOws(text, colon + 1, stop);
      headers.push(name, value);
      switch (name.length) {
        case 10:
          if (name.toLowerCase() === 'connection') {
            const tokens = value.toLowerCase();
            if (hasToken(tokens, 'close')) closeToken = true;
            if (hasToken(tokens, 'keep-alive')) keepAliveToken = true;
          }
          break;
        case 14:
          if (name.toLowerCase() === 'content-length') length = contentLength(value, length);
          break;
        case 17:
          if (name.toLowerCase() === 'transfer-encoding') {
            transferEncoding = true;
            chunked = lastCoding(value) === 'chunked';
          }
          break;
      }
    }
    if (transferEncoding && length >= 0) throw new ResponseParseError('both Transfer-Encoding and Content-Length');
    if (status < 200) {
      // Gatehouse never sends Expect, so a 100 is unsolicited; other 1xx are informational (skipped).
      if (status === 100 || status === 101) throw new ResponseParseError(`unexpected ${status} response`);
      return;
    }
    // HTTP/1.1 persists unless `close`; HTTP/1.0 only with `keep-alive` (RFC 9112 §9.3), and never
    // after an HTTP/1.0 message with Transfer-Encoding (§6.1: its framing is to be treated as faulty).
    this.keepAlive = !closeToken && (!http10 || (keepAliveToken && !transferEncoding));
    this.sink.onResponseHead(status, headers, statusText, clean);

    if (this.noBody || status === 204 || status === 304) {
      this.finishResponse();
    } else if (transferEncoding) {
      if (chunked) {
        this.startChunkSize();
      } else {
        this.state = State.UntilClose;
        this.keepAlive = false;
      }
    } else if (length >= 0) {
      if (length === 0) this.finishResponse();
      else {
        this.state = State.Length;
        this.remaining = length;
      }
    } else {
      this.state = State.UntilClose;
      this.keepAlive = false;
    }
  }

  private finishResponse(): void {
    this.state = State.Done;
    this.sink.onResponseEnd(null);
  }

  private startChunkSize(): void {
    this.state = State.ChunkSize;
    this.chunkSize = 0;
    this.chunkDigits = 0;
    this.inExtension = false;
    this.afterSize = false;
    this.sawCR = false;
  }

  /** Reads the chunk-size line byte by byte (it is short); returns the position after what it used. */
  private readChunkSize(data: Buffer, pos: number): number {
    const end = data.length;
    while (pos < end) {
      const byte = data[pos++]!;
      if (this.sawCR) {
        if (byte !== LF) throw new ResponseParseError('chunk-size line not ended by CRLF');
        if (this.chunkDigits === 0) throw new ResponseParseError('missing chunk size');
        this.sawCR = false;
        if (this.chunkSize === 0) {
          this.state = State.Trailers;
        } else {
          this.state = State.ChunkData;
          this.remaining = this.chunkSize;
        }
        return pos;
      }
      if (byte === CR) {
        this.sawCR = true;
      } else if (this.inExtension) {
        // chunk-ext (RFC 9112 §7.1.1): ignored, but no control bytes.
        if ((byte < 0x20 && byte !== 0x09) || byte === 0x7f) throw new ResponseParseError('invalid chunk extension');
      } else if (byte === 0x3b /* ; */) {
        if (this.chunkDigits === 0) throw new ResponseParseError('missing chunk size');
        this.inExtension = true;
      } else if (byte === 0x20 || byte === 0x09) {
        if (this.chunkDigits === 0) throw new ResponseParseError('missing chunk size');
        this.afterSize = true;
      } else if (this.afterSize) {
        throw new ResponseParseError('invalid chunk-size line');
      } else {
        const digit = hexValue(byte);
        if (digit < 0) throw new ResponseParseError('invalid chunk size');
        if (++this.chunkDigits > 13) throw new ResponseParseError('chunk size too large');
        this.chunkSize = this.chunkSize * 16 + digit;
      }
    }
    return pos;
  }

  private parseTrailers(text: string): void {
    if (BAD_LINE_BYTES.test(text)) throw new ResponseParseError('bare CR, LF or NUL in the trailers');
    const trailers: string[] = [];
    let lineStart = 0;
    while (lineStart <= text.length) {
      let lineEnd = text.indexOf('\r\n', lineStart);
      if (lineEnd < 0) lineEnd = text.length;
      const line = text.slice(lineStart, lineEnd);
      const colon = line.indexOf(':');
      if (colon <= 0 || !TOKEN.test(line.slice(0, colon))) throw new ResponseParseError('malformed trailer field');
      trailers.push(line.slice(0, colon), trimOws(line, colon + 1));
      lineStart = lineEnd + 2;
    }
    this.state = State.Done;
    this.sink.onResponseEnd(trailers.length === 0 ? (EMPTY as string[]) : trailers);
  }
}

function hexValue(byte: number): number {
  if (byte >= 0x30 && byte <= 0x39) return byte - 0x30;
  const lower = byte | 0x20;
  if (lower >= 0x61 && lower <= 0x66) return lower - 0x61 + 10;
  return -1;
}

/** `line` from `from` to `to`, without leading and trailing spaces and tabs (OWS, RFC 9110 §5.6.3). */
function trimOws(line: string, from: number, to = line.length): string {
  let start = from;
  let end = to;
  while (start < end && (line.charCodeAt(start) === 0x20 || line.charCodeAt(start) === 0x09)) start++;
  while (end > start && (line.charCodeAt(end - 1) === 0x20 || line.charCodeAt(end - 1) === 0x09)) end--;
  return start === 0 && end === line.length ? line : line.slice(start, end);
}

/** A Content-Length value (possibly a list of one repeated value) checked against an earlier one (-1: none). */
function contentLength(value: string, previous: number): number {
  let result = previous;
  for (const part of value.includes(',') ? value.split(',') : [value]) {
    const digits = trimOws(part, 0);
    if (!DIGITS.test(digits)) throw new ResponseParseError('invalid Content-Length');
    const n = Number(digits);
    if (result >= 0 && result !== n) throw new ResponseParseError('conflicting Content-Length values');
    result = n;
  }
  return result;
}

/** The last transfer coding of a Transfer-Encoding value, lower-cased (`gzip, chunked` → `chunked`). */
function lastCoding(value: string): string {
  const comma = value.lastIndexOf(',');
  return trimOws(comma < 0 ? value : value.slice(comma + 1), 0).toLowerCase();
}

/** Does a lower-cased comma list contain `token`? */
function hasToken(list: string, token: string): boolean {
  if (list === token) return true;
  if (!list.includes(token)) return false;
  for (const part of list.split(',')) if (trimOws(part, 0) === token) return true;
  return false;
}
