import assert from 'node:assert/strict';
import http2 from 'node:http2';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { setImmediate as nextTurn } from 'node:timers/promises';
import tls from 'node:tls';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { CertificateStore } from '../src/tls/certificates.js';
import { makeCertificate } from './helpers/certs.js';

// The test needs to see what the garbage collector keeps.
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

async function collectGarbage(): Promise<void> {
  for (let i = 0; i < 4; i++) {
    gc();
    await nextTurn(); // WeakRefs are cleared between turns, not within one.
  }
}

/** A real TLS client connection to `servername`, open once the handshake is done. */
function connectTo(port: number, servername: string): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, servername, rejectUnauthorized: false, ALPNProtocols: ['http/1.1'] }, () => resolve(socket));
    socket.once('error', reject);
  });
}

describe('CertificateStore: SecureContexts evicted from the LRU while connections use them', () => {
  let server: http2.Http2SecureServer;
  let port = 0;
  let store: CertificateStore;
  /** Every context the SNI callback served, by name, held weakly (as a connection holds it, no more). */
  const served: { name: string; context: WeakRef<tls.SecureContext> }[] = [];
  const serverSockets = new Set<tls.TLSSocket>();

  before(async () => {
    store = new CertificateStore({ contextCacheSize: 1 });
    store.put(makeCertificate({ names: ['alpha.test'] }).certificate);
    store.put(makeCertificate({ names: ['beta.test'] }).certificate);
    server = http2.createSecureServer({
      ...store.serverOptions(),
      allowHTTP1: true,
      SNICallback: (name, done) => store.sniCallback(name, (error, context) => {
        if (context !== undefined) served.push({ name, context: new WeakRef(context) });
        done(error, context);
      }),
    });
    server.on('secureConnection', (socket: tls.TLSSocket) => {
      serverSockets.add(socket);
      socket.once('close', () => serverSockets.delete(socket));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.address() as AddressInfo).port;
  });
  after(async () => {
    for (const socket of serverSockets) socket.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  const servedFor = (name: string) => served.filter((s) => s.name === name).map((s) => s.context);

  test('a name whose context is still held by a connection gets that context again, not a second copy', async () => {
    const first = await connectTo(port, 'alpha.test');
    const other = await connectTo(port, 'beta.test'); // evicts alpha's context (the LRU keeps one)
    await collectGarbage();
    const [alpha] = servedFor('alpha.test');
    assert.notEqual(alpha!.deref(), undefined, 'the open connection keeps its context alive');
    const second = await connectTo(port, 'alpha.test');
    const [, alphaAgain] = servedFor('alpha.test');
    assert.equal(alphaAgain!.deref(), alpha!.deref(), 'the same context serves the new connection');
    for (const socket of [first, other, second]) socket.destroy();
  });

  test('once no connection holds an evicted context, nothing keeps it', async () => {
    const open = await connectTo(port, 'alpha.test');
    const other = await connectTo(port, 'beta.test'); // evicts alpha's context again
    open.destroy();
    other.destroy();
    const deadline = Date.now() + 5_000;
    while (serverSockets.size > 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
    assert.equal(serverSockets.size, 0);
    await collectGarbage();
    for (const context of servedFor('alpha.test')) assert.equal(context.deref(), undefined);
    // The name still works: a new context is built for it.
    const again = await connectTo(port, 'alpha.test');
    assert.equal(again.getPeerCertificate().subjectaltname, 'DNS:alpha.test');
    again.destroy();
  });
});
