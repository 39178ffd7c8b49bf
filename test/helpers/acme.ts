/**
 * Pieces shared by the ACME tests: the challenge listeners Pebble validates against (a plain HTTP
 * server answering HTTP-01 tokens, a TCP server passing connections through the TLS-ALPN-01
 * responder to a "real" TLS server), a capturing logger, and a check that a chain validates against
 * Pebble's root alone and covers a name.
 */
import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer as createHttpServer, type Server as HttpServer } from 'node:http';
import { createServer as createNetServer, type AddressInfo, type Server as NetServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect, createServer as createTlsServer, type Server as TlsServer } from 'node:tls';
import { promisify } from 'node:util';
import type { Http01Responder, TlsAlpnResponder } from '../../src/acme/challenges.js';
import type { AcmeLogger } from '../../src/acme/manager.js';
import type { Certificate } from '../../src/tls/source.js';

/** A self-signed certificate for `name` (openssl, ECDSA P-256), for the pass-through TLS server. */
export async function selfSigned(name: string): Promise<{ cert: string; key: string }> {
  const folder = await mkdtemp(join(tmpdir(), 'gatehouse-selfsigned-'));
  try {
    await promisify(execFile)('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
      '-keyout', join(folder, 'key.pem'), '-out', join(folder, 'cert.pem'), '-days', '1',
      '-subj', `/CN=${name}`, '-addext', `subjectAltName=DNS:${name}`,
    ]);
    return { cert: await readFile(join(folder, 'cert.pem'), 'utf8'), key: await readFile(join(folder, 'key.pem'), 'utf8') };
  } finally {
    await rm(folder, { recursive: true, force: true });
  }
}

/** The listeners Pebble validates against. */
export interface ChallengeListeners {
  /** HTTP-01 requests answered (token found). */
  http01Answers: number;
  /** Connections the TLS pass-through server (not the ALPN responder) completed a handshake on. */
  passedThrough: number;
  /** The ports listened on (the ones asked for, or the kernel's choice for 0). */
  readonly httpPort: number;
  readonly tlsPort: number;
  close(): Promise<void>;
}

/**
 * Plain HTTP on `httpPort` answering from `http01` (404 otherwise), and on `tlsPort` a TCP server
 * that gives each connection to `tlsAlpn.handleConnection`, passing the others to a TLS server
 * with a self-signed certificate (like the HTTPS listener would). Both on 127.0.0.1. Pass 0 for
 * either port and start Pebble with the ports the listeners got: a port picked free earlier may be
 * taken by any outgoing connection before it is listened on.
 */
export async function startChallengeListeners(httpPort: number, tlsPort: number, http01: Http01Responder, tlsAlpn: TlsAlpnResponder): Promise<ChallengeListeners> {
  const state = { http01Answers: 0, passedThrough: 0 };
  const http: HttpServer = createHttpServer((req, res) => {
    const answer = http01.handle(req.url);
    if (answer === undefined) {
      res.writeHead(404).end('not a pending challenge');
      return;
    }
    state.http01Answers++;
    res.writeHead(200, { 'content-type': 'text/plain' }).end(answer);
  });
  const fallback = await selfSigned('fallback.test');
  const secure: TlsServer = createTlsServer({ ...fallback, ALPNProtocols: ['h2', 'http/1.1'] }, (socket) => {
    state.passedThrough++;
    socket.end('hello from the real server\n');
  });
  secure.on('tlsClientError', () => {});
  const sockets = new Set<Socket>();
  const raw: NetServer = createNetServer((socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
    tlsAlpn.handleConnection(socket, (s) => secure.emit('connection', s));
  });
  http.listen(httpPort, '127.0.0.1');
  raw.listen(tlsPort, '127.0.0.1');
  await Promise.all([once(http, 'listening'), once(raw, 'listening')]);
  return {
    httpPort: (http.address() as AddressInfo).port,
    tlsPort: (raw.address() as AddressInfo).port,
    get http01Answers() { return state.http01Answers; },
    get passedThrough() { return state.passedThrough; },
    async close() {
      http.closeAllConnections();
      for (const socket of sockets) socket.destroy();
      await Promise.all([
        new Promise<void>((resolve) => http.close(() => resolve())),
        new Promise<void>((resolve) => raw.close(() => resolve())),
      ]);
    },
  } as ChallengeListeners;
}

/** A logger that keeps every line: `{ level, name, msg, ...fields }`. */
export interface CapturedLogger extends AcmeLogger {
  readonly lines: Array<Record<string, unknown> & { level: string; msg: string | undefined; name: string | undefined }>;
}

export function captureLogger(): CapturedLogger {
  const lines: CapturedLogger['lines'] = [];
  const make = (bindings: Record<string, unknown>): AcmeLogger => {
    const at = (level: string) => (object: object, msg?: string) => {
      lines.push({ ...bindings, ...object, level, msg, name: bindings.name as string | undefined });
    };
    return {
      debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error'),
      child: (more) => make({ ...bindings, ...more }),
    };
  };
  return Object.assign(make({}), { lines }) as CapturedLogger;
}

/**
 * Serve `certificate` on a TLS server and connect to it trusting only `root`, with SNI `name`:
 * resolves when the chain validates and the leaf covers the name (Node's checkServerIdentity),
 * rejects otherwise.
 */
export async function verifyServes(certificate: Certificate, root: string, name: string): Promise<void> {
  const server = createTlsServer({ cert: certificate.cert, key: certificate.key }, (socket) => socket.end());
  server.on('tlsClientError', () => {});
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as { port: number };
  try {
    await new Promise<void>((resolve, reject) => {
      const socket = connect({ host: '127.0.0.1', port, servername: name, ca: [root] }, () => {
        socket.destroy();
        resolve();
      });
      socket.once('error', reject);
    });
  } finally {
    server.close();
  }
}
