/**
 * A second (third, ...) Gatehouse-like process for the multi-process ACME test:
 * `node --import tsx test/helpers/acme-worker.ts '<json>'` with
 * `{ directory, caFile, storage, name }`.
 *
 * It answers HTTP-01 on an HTTP server of its own (port 0; the test forwards Pebble's requests to
 * it), prints `{"ready":true,"port":N}`, waits for a line on stdin, obtains the certificate for
 * `name` with an `AcmeIssuer` on the shared storage folder, prints
 * `{"orders":N,"fingerprint":"..","waited":bool}` and exits.
 */
import { X509Certificate } from 'node:crypto';
import { once } from 'node:events';
import { readFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { createInterface } from 'node:readline';
import { AcmeIssuer } from '../../src/acme/manager.js';
import { FileStorage } from '../../src/tls/storage.js';

const settings = JSON.parse(process.argv[2] ?? '{}') as { directory: string; caFile: string; storage: string; name: string };
let waited = false;
const issuer = new AcmeIssuer({
  directory: settings.directory,
  caBundle: await readFile(settings.caFile, 'utf8'),
  agreeTos: true,
  storage: new FileStorage(settings.storage),
  challenges: ['http-01'],
  pollIntervalMs: 50,
  lock: { pollIntervalMs: 50 },
  logger: {
    debug() {}, warn() {}, error() {},
    info(object, message) {
      if (message === 'waiting for another process to finish obtaining the certificate') waited = true;
      void object;
    },
  },
});
const server = createServer((req, res) => {
  const answer = issuer.http01.handle(req.url);
  if (answer === undefined) res.writeHead(404).end();
  else res.writeHead(200, { 'content-type': 'text/plain' }).end(answer);
});
server.listen(0, '127.0.0.1');
await once(server, 'listening');
process.stdout.write(`${JSON.stringify({ ready: true, port: (server.address() as { port: number }).port })}\n`);

const lines = createInterface({ input: process.stdin });
await once(lines, 'line');
await issuer.manage([settings.name]);
const cert = await issuer.obtain(settings.name);
process.stdout.write(`${JSON.stringify({ orders: issuer.orderCount, fingerprint: cert ? new X509Certificate(cert.cert).fingerprint256 : null, waited })}\n`);
lines.close();
server.closeAllConnections();
server.close();
await issuer.close();
