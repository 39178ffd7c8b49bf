/**
 * Raw HTTP/2 frames for tests that must send what a well-behaved client library never would:
 * HEADERS without END_HEADERS, a HEADERS + RST_STREAM flood, a silent session. HPACK is encoded as
 * literal fields without indexing (RFC 7541 §6.2.2), which every decoder must accept.
 *
 *   const socket = await h2Connect(port);              // TLS with ALPN h2, preface and SETTINGS sent
 *   socket.write(headersFrame(1, [[':method', 'GET'], ...], { endStream: true }));
 *   const frames = collectFrames(socket);              // frames the server sends, parsed
 */
import { connect as tlsConnect, type TLSSocket } from 'node:tls';

export const FRAME = Object.freeze({ DATA: 0, HEADERS: 1, RST_STREAM: 3, SETTINGS: 4, PING: 6, GOAWAY: 7, WINDOW_UPDATE: 8, CONTINUATION: 9 });
const END_STREAM = 0x1;
const END_HEADERS = 0x4;
const ACK = 0x1;

/** The client connection preface (RFC 9113 §3.4). */
export const PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');

/** One frame: 9-byte header and payload (RFC 9113 §4.1). */
export function frame(type: number, flags: number, streamId: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const head = Buffer.alloc(9);
  head.writeUIntBE(payload.length, 0, 3);
  head[3] = type;
  head[4] = flags;
  head.writeUInt32BE(streamId & 0x7fffffff, 5);
  return Buffer.concat([head, payload]);
}

/** HPACK integer with an N-bit prefix (RFC 7541 §5.1). */
function hpackInteger(value: number, prefixBits: number, firstByte: number): Buffer {
  const max = (1 << prefixBits) - 1;
  if (value < max) return Buffer.from([firstByte | value]);
  const bytes = [firstByte | max];
  let rest = value - max;
  while (rest >= 128) {
    bytes.push((rest & 0x7f) | 0x80);
    rest >>= 7;
  }
  bytes.push(rest);
  return Buffer.from(bytes);
}

/** HPACK block of literal fields without indexing, new names (RFC 7541 §6.2.2). */
export function hpack(fields: readonly (readonly [string, string])[]): Buffer {
  const parts: Buffer[] = [];
  for (const [name, value] of fields) {
    const n = Buffer.from(name, 'latin1');
    const v = Buffer.from(value, 'latin1');
    parts.push(Buffer.from([0x00]), hpackInteger(n.length, 7, 0), n, hpackInteger(v.length, 7, 0), v);
  }
  return Buffer.concat(parts);
}

/** A HEADERS frame; `endHeaders` defaults to true. */
export function headersFrame(streamId: number, fields: readonly (readonly [string, string])[], options: { endStream?: boolean; endHeaders?: boolean } = {}): Buffer {
  const flags = (options.endStream ? END_STREAM : 0) | (options.endHeaders === false ? 0 : END_HEADERS);
  return frame(FRAME.HEADERS, flags, streamId, hpack(fields));
}

/** RST_STREAM with an error code (8 = CANCEL). */
export function rstStreamFrame(streamId: number, code = 8): Buffer {
  const payload = Buffer.alloc(4);
  payload.writeUInt32BE(code, 0);
  return frame(FRAME.RST_STREAM, 0, streamId, payload);
}

export function settingsFrame(ack = false): Buffer {
  return frame(FRAME.SETTINGS, ack ? ACK : 0, 0);
}

/** A parsed frame the server sent. */
export interface ReceivedFrame {
  readonly type: number;
  readonly flags: number;
  readonly streamId: number;
  readonly payload: Buffer;
}

/** GOAWAY payload: last stream id and error code. */
export function goawayOf(f: ReceivedFrame): { lastStreamId: number; code: number } {
  return { lastStreamId: f.payload.readUInt32BE(0) & 0x7fffffff, code: f.payload.readUInt32BE(4) };
}

/**
 * Parses every frame the server sends on `socket` into `frames`; answers SETTINGS (ACK) and, unless
 * `answerPings` is false, PINGs, as a client library would.
 */
export function collectFrames(socket: TLSSocket, options: { answerPings?: boolean } = {}): ReceivedFrame[] {
  const frames: ReceivedFrame[] = [];
  let buffered = Buffer.alloc(0);
  socket.on('data', (chunk: Buffer) => {
    buffered = Buffer.concat([buffered, chunk]);
    while (buffered.length >= 9) {
      const length = buffered.readUIntBE(0, 3);
      if (buffered.length < 9 + length) break;
      const f: ReceivedFrame = { type: buffered[3]!, flags: buffered[4]!, streamId: buffered.readUInt32BE(5) & 0x7fffffff, payload: buffered.subarray(9, 9 + length) };
      buffered = buffered.subarray(9 + length);
      frames.push(f);
      if (socket.writable && f.type === FRAME.SETTINGS && (f.flags & ACK) === 0) socket.write(settingsFrame(true));
      if (socket.writable && f.type === FRAME.PING && (f.flags & ACK) === 0 && options.answerPings !== false) socket.write(frame(FRAME.PING, ACK, 0, f.payload));
    }
  });
  return frames;
}

/** TLS connection with ALPN h2 (certificate not checked); with `preface` (default) the preface and SETTINGS are sent. */
export function h2Connect(port: number, options: { servername?: string; preface?: boolean } = {}): Promise<TLSSocket> {
  return new Promise((resolve, reject) => {
    const socket = tlsConnect({ host: '127.0.0.1', port, servername: options.servername ?? 'localhost', ALPNProtocols: ['h2'], rejectUnauthorized: false }, () => {
      if (socket.alpnProtocol !== 'h2') {
        socket.destroy();
        reject(new Error(`ALPN picked ${String(socket.alpnProtocol)}`));
        return;
      }
      if (options.preface !== false) socket.write(Buffer.concat([PREFACE, settingsFrame()]));
      resolve(socket);
    });
    socket.on('error', reject);
  });
}

/** Request fields for a GET. */
export function getFields(authority: string, path = '/', extra: readonly (readonly [string, string])[] = []): (readonly [string, string])[] {
  return [[':method', 'GET'], [':scheme', 'https'], [':authority', authority], [':path', path], ...extra];
}

/**
 * True when this Node's HTTP/2 stack refuses a request whose `:authority` or `host` carries userinfo
 * (`user@host`) before the server's code sees it: from nghttp2 1.64.0 (nghttp2/nghttp2#2262), `@` in
 * those values makes the request malformed and the stream is reset with PROTOCOL_ERROR (RFC 9113
 * §8.3.1, §8.1.1). Node 22.23 (nghttp2 1.69) and 24.21 (1.70) do; Node 20.20 (1.61) passes the
 * request on, and Gatehouse answers 400. Tests branch on the library's version, not on Node's major.
 */
export const NGHTTP2_REFUSES_USERINFO = (() => {
  const [major = 0, minor = 0] = (process.versions.nghttp2 ?? '0.0').split('.').map(Number);
  return major > 1 || (major === 1 && minor >= 64);
})();
