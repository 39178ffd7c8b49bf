/**
 * HTTP/1 over raw sockets, for tests that send the exact bytes a client library would never send.
 *
 *   const answer = await rawExchange(port, 'GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n');
 *   answer.status   // 400
 *   answer.closed   // true: the server closed the connection
 */
import net from 'node:net';
import tls from 'node:tls';

/** What came back on one connection. */
export interface RawAnswer {
  /** Every byte the server sent, latin1. */
  readonly text: string;
  /** Status of the first response, 0 when none. */
  readonly status: number;
  /**
   * Status of every response on the connection, in order: every status line (`HTTP/1.x NNN
   * reason` and CRLF), wherever it starts, since a response may follow a body without a CRLF.
   */
  readonly statuses: number[];
  /** The server closed the connection (false: the wait ran out with the connection open). */
  readonly closed: boolean;
  /** Milliseconds until close (or until the wait ran out). */
  readonly elapsedMs: number;
}

/** Options of {@link rawExchange}. */
export interface RawOptions {
  /** Connect with TLS (ALPN http/1.1, certificate not checked). */
  readonly tls?: boolean;
  readonly servername?: string;
  /** Give up waiting for the close after this (ms). Default 3000. */
  readonly waitMs?: number;
  /** Stop waiting as soon as this many bytes arrived... or this predicate holds on the text so far. */
  readonly until?: (text: string) => boolean;
}

/** Opens a plain or TLS connection to 127.0.0.1:port. */
export function rawConnect(port: number, options: { tls?: boolean; servername?: string } = {}): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket: net.Socket = options.tls
      ? tls.connect({ host: '127.0.0.1', port, servername: options.servername ?? 'localhost', ALPNProtocols: ['http/1.1'], rejectUnauthorized: false }, () => resolve(socket))
      : net.connect({ host: '127.0.0.1', port }, () => resolve(socket));
    socket.once('error', reject);
  });
}

/** Writes `bytes` (one write, or several with pauses when an array) and collects the answer until the server closes. */
export async function rawExchange(port: number, bytes: string | Buffer | readonly (string | Buffer)[], options: RawOptions = {}): Promise<RawAnswer> {
  const socket = await rawConnect(port, options);
  return exchangeOn(socket, bytes, options);
}

/** {@link rawExchange} on an open socket. */
export async function exchangeOn(socket: net.Socket, bytes: string | Buffer | readonly (string | Buffer)[], options: RawOptions = {}): Promise<RawAnswer> {
  const started = performance.now();
  let text = '';
  const done = new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), options.waitMs ?? 3_000);
    socket.on('data', (chunk: Buffer) => {
      text += chunk.toString('latin1');
      if (options.until?.(text)) {
        clearTimeout(timer);
        resolve(false);
      }
    });
    socket.on('error', () => {});
    socket.once('close', () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
  const parts = typeof bytes === 'string' || Buffer.isBuffer(bytes) ? [bytes] : bytes;
  for (let i = 0; i < parts.length; i++) {
    if (i > 0) await new Promise((r) => setTimeout(r, 50));
    if (!socket.destroyed) socket.write(parts[i]!);
  }
  const closed = await done;
  const elapsedMs = performance.now() - started;
  socket.destroy();
  const statuses = [...text.matchAll(/HTTP\/1\.[01] (\d{3}) [^\r\n]*\r\n/g)].map((m) => Number(m[1]));
  return { text, status: statuses[0] ?? 0, statuses, closed, elapsedMs };
}
