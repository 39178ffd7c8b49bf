/**
 * Answering ACME challenges (RFC 8555 §8): the pending HTTP-01 tokens (§8.3) and the TLS-ALPN-01
 * responder (RFC 8737). The issuer presents a challenge here before telling the CA to validate and
 * cleans it up afterwards; the listeners consult these objects:
 *
 * - plain HTTP listener, before any redirect:
 *   `const answer = http01.handle(req.url); if (answer !== undefined) { 200, text/plain, answer }`
 * - HTTPS listener: accept raw TCP connections with a `net.Server` and hand each one to
 *   `tlsAlpn.handleConnection(socket, (s) => secureServer.emit('connection', s))`.
 *
 * Challenges live in this process's memory: with several Gatehouse processes behind one address,
 * the CA's validation request must reach the process that placed the order.
 */
import { createSecureContext, createServer as createTlsServer, type SecureContext, type Server as TlsServer } from 'node:tls';
import type { Socket } from 'node:net';
import acme from 'acme-client';
import { parseClientHello, MAX_CLIENT_HELLO_BYTES } from './client-hello.js';

/** Challenge types Gatehouse can answer, as RFC 8555/8737 name them. */
export type ChallengeType = 'http-01' | 'tls-alpn-01';

/** The path prefix of HTTP-01 requests (RFC 8555 §8.3). */
export const HTTP01_PREFIX = '/.well-known/acme-challenge/';

/** The ALPN protocol of TLS-ALPN-01 validation connections (RFC 8737 §6.2). */
export const ACME_TLS_ALPN_PROTOCOL = 'acme-tls/1';

/** Pending HTTP-01 challenges: token → key authorization. */
export class Http01Responder {
  readonly #tokens = new Map<string, string>();

  /**
   * The body to answer for a request path, or undefined when the path is not a pending HTTP-01
   * challenge (then the listener carries on: redirect, routing). O(1), no allocation for other paths.
   * @param path the request target (`req.url`), e.g. `/.well-known/acme-challenge/<token>`; a query is ignored.
   * @returns the key authorization (RFC 8555 §8.1), to send as `200`, `Content-Type: text/plain`.
   */
  handle(path: string | undefined): string | undefined {
    if (this.#tokens.size === 0 || !path || !path.startsWith(HTTP01_PREFIX)) return undefined;
    const query = path.indexOf('?');
    const token = path.slice(HTTP01_PREFIX.length, query < 0 ? undefined : query);
    return this.#tokens.get(token);
  }

  /** Serve `keyAuthorization` for `token` until {@link cleanUp}. */
  present(token: string, keyAuthorization: string): void {
    this.#tokens.set(token, keyAuthorization);
  }

  cleanUp(token: string): void {
    this.#tokens.delete(token);
  }

  /** Number of pending tokens. */
  get size(): number {
    return this.#tokens.size;
  }
}

/** Options of {@link TlsAlpnResponder}. */
export interface TlsAlpnResponderOptions {
  /** How long to wait for a complete ClientHello while challenges are pending, ms. Default 10 000. */
  readonly helloTimeoutMs?: number;
}

/**
 * TLS-ALPN-01 (RFC 8737): while a challenge is pending, looks at the ClientHello of each new
 * connection; a hello that offers ALPN `acme-tls/1` for a pending name gets a handshake with the
 * challenge certificate (§3) on a dedicated TLS server, anything else is handed on untouched.
 * With nothing pending, {@link handleConnection} hands every socket on at once.
 */
export class TlsAlpnResponder {
  readonly #contexts = new Map<string, SecureContext>();
  readonly #server: TlsServer;
  readonly #helloTimeoutMs: number;

  constructor(options: TlsAlpnResponderOptions = {}) {
    this.#helloTimeoutMs = options.helloTimeoutMs ?? 10_000;
    this.#server = createTlsServer({
      ALPNProtocols: [ACME_TLS_ALPN_PROTOCOL],
      SNICallback: (name, callback) => callback(null, this.#contexts.get(name.toLowerCase())),
    });
    // The handshake is the whole answer (RFC 8737 §3): the CA has the certificate once it is done.
    this.#server.on('secureConnection', (socket) => {
      socket.on('error', () => {});
      socket.setTimeout(10_000, () => socket.destroy());
      socket.end();
    });
    this.#server.on('tlsClientError', () => {});
  }

  /** True while at least one TLS-ALPN-01 challenge is pending. */
  hasPending(): boolean {
    return this.#contexts.size > 0;
  }

  /**
   * Take a new raw TCP connection of the HTTPS listener. With no challenge pending, calls
   * `next(socket)` synchronously. Otherwise reads the ClientHello (up to {@link MAX_CLIENT_HELLO_BYTES},
   * at most `helloTimeoutMs`); a validation connection is answered here, any other is given to
   * `next` with the bytes read pushed back (`socket.unshift`), so the real TLS server sees the
   * connection from its first byte. A socket that closes before its ClientHello is destroyed.
   * @param next hands the socket to the real server, e.g. `(s) => http2Server.emit('connection', s)`.
   */
  handleConnection(socket: Socket, next: (socket: Socket) => void): void {
    if (this.#contexts.size === 0) {
      next(socket);
      return;
    }
    const chunks: Buffer[] = [];
    let total = 0;
    let done = false;
    const finish = (validation: boolean): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.removeListener('data', onData);
      socket.removeListener('error', onClose);
      socket.removeListener('end', onClose);
      socket.pause();
      if (total > 0) socket.unshift(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, total));
      if (validation) this.#server.emit('connection', socket);
      else next(socket);
    };
    const onData = (chunk: Buffer): void => {
      chunks.push(chunk);
      total += chunk.length;
      const hello = parseClientHello(chunks.length === 1 ? chunk : Buffer.concat(chunks, total));
      if (hello.status === 'incomplete' && total <= MAX_CLIENT_HELLO_BYTES + 1024) return;
      finish(hello.status === 'complete'
        && hello.serverName !== undefined
        && hello.alpnProtocols.includes(ACME_TLS_ALPN_PROTOCOL)
        && this.#contexts.has(hello.serverName));
    };
    const onClose = (): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.removeListener('data', onData);
      socket.destroy();
    };
    const timer = setTimeout(() => finish(false), this.#helloTimeoutMs);
    timer.unref();
    socket.on('data', onData);
    socket.once('error', onClose);
    socket.once('end', onClose);
  }

  /**
   * Serve the challenge certificate for `authz.identifier.value` (RFC 8737 §3: self-signed, the
   * name as its only SAN, the critical acmeIdentifier extension holding SHA-256 of the key
   * authorization) until {@link cleanUp}.
   */
  async present(authz: acme.Authorization, keyAuthorization: string): Promise<void> {
    const key = await acme.crypto.createPrivateEcdsaKey('P-256');
    const [, cert] = await acme.crypto.createAlpnCertificate(authz, keyAuthorization, key);
    this.#contexts.set(authz.identifier.value.toLowerCase(), createSecureContext({ key, cert }));
  }

  cleanUp(name: string): void {
    this.#contexts.delete(name.toLowerCase());
  }
}
