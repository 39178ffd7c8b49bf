/**
 * The TLS-ALPN-01 responder without a CA: ClientHello parsing (SNI, ALPN, records split in
 * pieces), validation connections answered with the challenge certificate, every other connection
 * handed to the real TLS server intact, even when its ClientHello arrives a few bytes at a time.
 */
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { once } from 'node:events';
import { connect as netConnect, createServer as createNetServer, type Socket } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { Duplex } from 'node:stream';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import acme from 'acme-client';
import { TlsAlpnResponder, Http01Responder } from '../src/acme/challenges.js';
import { parseClientHello } from '../src/acme/client-hello.js';
import { startChallengeListeners, type ChallengeListeners } from './helpers/acme.js';

/** The raw ClientHello Node sends for these options (captured by a TCP server that never answers). */
async function captureClientHello(options: ConnectionOptions): Promise<Buffer> {
  const chunks: Buffer[] = [];
  const server = createNetServer((socket) => {
    socket.on('data', (chunk: Buffer) => {
      chunks.push(chunk);
      if (parseClientHello(Buffer.concat(chunks)).status !== 'incomplete') socket.destroy();
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const client = tlsConnect({ host: '127.0.0.1', port: (server.address() as { port: number }).port, ...options });
  client.on('error', () => {}); // the server hangs up after the hello
  await new Promise((resolve) => client.once('close', resolve));
  server.close();
  return Buffer.concat(chunks);
}

/** Re-split a handshake message into TLS records of at most `size` bytes (RFC 8446 §5.1 allows it). */
function refragment(hello: Buffer, size: number): Buffer {
  const message = hello.subarray(5, 5 + hello.readUInt16BE(3));
  const records: Buffer[] = [];
  for (let offset = 0; offset < message.length; offset += size) {
    const piece = message.subarray(offset, offset + size);
    const header = Buffer.from([22, 3, 1, 0, 0]);
    header.writeUInt16BE(piece.length, 3);
    records.push(header, piece);
  }
  return Buffer.concat(records);
}

describe('ClientHello parser', () => {
  it('reads SNI and ALPN, from one record or from many small ones fed byte by byte', async () => {
    const hello = await captureClientHello({ servername: 'Alpn.Example.com', ALPNProtocols: ['acme-tls/1', 'h2'] });
    const expected = { status: 'complete', serverName: 'alpn.example.com', alpnProtocols: ['acme-tls/1', 'h2'] };
    assert.deepEqual(parseClientHello(hello), expected);
    assert.deepEqual(parseClientHello(hello.subarray(0, hello.length - 1)), { status: 'incomplete' });
    const fragmented = refragment(hello, 37);
    for (let end = 1; end < fragmented.length; end++) {
      assert.equal(parseClientHello(fragmented.subarray(0, end)).status, 'incomplete', `at ${end} bytes`);
    }
    assert.deepEqual(parseClientHello(fragmented), expected);
  });

  it('reports no SNI and no ALPN when absent, and refuses what is not a ClientHello', async () => {
    const bare = await captureClientHello({});
    assert.deepEqual(parseClientHello(bare), { status: 'complete', serverName: undefined, alpnProtocols: [] });
    assert.equal(parseClientHello(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')).status, 'invalid');
    assert.equal(parseClientHello(Buffer.from([22, 3, 1, 0, 4, 2, 0, 0, 0])).status, 'invalid'); // ServerHello
    assert.equal(parseClientHello(Buffer.from([0x80, 0x2e, 1, 3, 1])).status, 'invalid'); // SSLv2
  });
});

describe('TLS-ALPN-01 responder', () => {
  const tlsAlpn = new TlsAlpnResponder({ helloTimeoutMs: 2000 });
  let listeners: ChallengeListeners;
  let port: number;
  const keyAuthorization = 'token-abc.thumbprint-xyz';

  before(async () => {
    listeners = await startChallengeListeners(0, 0, new Http01Responder(), tlsAlpn);
    port = listeners.tlsPort;
  });
  after(async () => {
    await listeners?.close();
  });

  const handshake = (options: ConnectionOptions): Promise<{ alpn: string | false; cert: X509Certificate; greeting: string }> =>
    new Promise((resolve, reject) => {
      const socket = tlsConnect({ host: '127.0.0.1', port, rejectUnauthorized: false, ...options }, () => {
        const result = { alpn: socket.alpnProtocol ?? false, cert: socket.getPeerX509Certificate()!, greeting: '' };
        socket.setEncoding('utf8');
        socket.on('data', (data: string) => { result.greeting += data; });
        socket.once('end', () => resolve(result));
        socket.once('close', () => resolve(result));
      });
      socket.once('error', reject);
    });

  it('passes every connection straight through while nothing is pending', async () => {
    assert.equal(tlsAlpn.hasPending(), false);
    const result = await handshake({ servername: 'site.example.com', ALPNProtocols: ['h2'] });
    assert.equal(result.alpn, 'h2');
    assert.match(result.greeting, /real server/);
  });

  it('answers acme-tls/1 for a pending name with the challenge certificate, passes other clients through', async () => {
    const authz = { identifier: { type: 'dns', value: 'pending.example.com' } } as acme.Authorization;
    await tlsAlpn.present(authz, keyAuthorization);
    assert.equal(tlsAlpn.hasPending(), true);

    const validation = await handshake({ servername: 'pending.example.com', ALPNProtocols: ['acme-tls/1'] });
    assert.equal(validation.alpn, 'acme-tls/1');
    assert.ok(validation.cert.checkHost('pending.example.com'));
    assert.ok(acme.crypto.isAlpnCertificateAuthorizationValid(validation.cert.toString(), keyAuthorization));

    const browser = await handshake({ servername: 'pending.example.com', ALPNProtocols: ['h2', 'http/1.1'] });
    assert.equal(browser.alpn, 'h2');
    assert.match(browser.greeting, /real server/);
    assert.ok(browser.cert.checkHost('fallback.test'));

    const otherName = await handshake({ servername: 'other.example.com', ALPNProtocols: ['http/1.1'] });
    assert.match(otherName.greeting, /real server/);

    tlsAlpn.cleanUp('pending.example.com');
    assert.equal(tlsAlpn.hasPending(), false);
  });

  it('reassembles a ClientHello that arrives a few bytes at a time', async () => {
    await tlsAlpn.present({ identifier: { type: 'dns', value: 'slow.example.com' } } as acme.Authorization, keyAuthorization);
    try {
      // A stream that writes the client's bytes to TCP in 7-byte pieces, one per event loop turn.
      const tcp: Socket = netConnect(port, '127.0.0.1');
      await once(tcp, 'connect');
      tcp.setNoDelay(true);
      const trickle = new Duplex({
        read() {},
        write(chunk: Buffer, _encoding, callback) {
          const pieces: Buffer[] = [];
          for (let i = 0; i < chunk.length; i += 7) pieces.push(chunk.subarray(i, i + 7));
          const next = (): void => {
            const piece = pieces.shift();
            if (!piece) return callback();
            tcp.write(piece, () => setTimeout(next, 1));
          };
          next();
        },
        final(callback) {
          tcp.end(callback);
        },
      });
      tcp.on('data', (data) => trickle.push(data));
      tcp.on('end', () => trickle.push(null));
      const result = await handshake({ socket: trickle, servername: 'slow.example.com', ALPNProtocols: ['acme-tls/1'] } as ConnectionOptions);
      assert.equal(result.alpn, 'acme-tls/1');
      assert.ok(acme.crypto.isAlpnCertificateAuthorizationValid(result.cert.toString(), keyAuthorization));
      tcp.destroy();
    } finally {
      tlsAlpn.cleanUp('slow.example.com');
    }
  });
});
