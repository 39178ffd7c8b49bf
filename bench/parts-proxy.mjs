// The "parts" target of the benchmark: a reverse proxy built from Node's servers and undici's Pool
// (the parts Gatehouse was built from until it got an upstream pool of its own) and nothing else.
// Plain HTTP/1.1 on node:http, TLS on node:http2's createSecureServer (ALPN h2 and
// http/1.1; as Gatehouse, HTTP/2 requests without a body are served from the 'stream' event and the
// others through the compat 'request' API), upstream requests through an undici Pool's
// dispatch() with a handler that writes straight to the client response, WebSocket upgrades piped
// as raw sockets. No routing table, no X-Forwarded-*/Via/X-Request-Id, no access log, metrics,
// deadlines, retries, health checks or limits. Its figures are what Node's servers plus undici
// reach on this machine: what a Node proxy gets without Gatehouse's code (bench/README.md).
// Not a product: it drops hop-by-hop fields and little else.
// Usage: node bench/parts-proxy.mjs PLAIN_PORT TLS_PORT BACKEND_PORT WS_PORT CERT_FILE KEY_FILE
import { readFileSync } from 'node:fs';
import http from 'node:http';
import http2 from 'node:http2';
import net from 'node:net';
import { Pool } from 'undici';

const [plainPort, tlsPort, backendPort, wsPort, certFile, keyFile] = process.argv.slice(2);
const backend = new Pool(`http://127.0.0.1:${backendPort}`, { connections: 1024 });
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade']);

/** undici dispatch handler (legacy interface, as Gatehouse's) relaying one response. */
class Relay {
  /** @param out the client response (or, in StreamRelay, the HTTP/2 stream): body bytes go to it. */
  constructor(out, http2Client) {
    this.out = out;
    this.http2 = http2Client;
    this.resume = null;
  }

  onConnect() {}

  onHeaders(status, raw, resume) {
    if (status < 200) return true;
    this.resume = resume;
    const res = this.out;
    if (this.http2) {
      const headers = {};
      for (let i = 0; i < raw.length; i += 2) {
        const name = raw[i].toString('latin1').toLowerCase();
        if (!HOP_BY_HOP.has(name)) headers[name] = raw[i + 1].toString('latin1');
      }
      res.writeHead(status, headers);
    } else {
      const headers = [];
      for (let i = 0; i < raw.length; i += 2) {
        const name = raw[i].toString('latin1');
        if (!HOP_BY_HOP.has(name.toLowerCase())) headers.push(name, raw[i + 1].toString('latin1'));
      }
      res.writeHead(status, headers);
    }
    return true;
  }

  onData(chunk) {
    if (this.out.write(chunk)) return true;
    this.out.once('drain', () => this.resume?.());
    return false;
  }

  onComplete() {
    this.out.end();
  }

  onError() {
    if (this.out.headersSent) this.out.destroy();
    else {
      this.out.statusCode = 502;
      this.out.end();
    }
  }
}

function forward(req, res) {
  const http2Client = req.httpVersionMajor === 2;
  const headers = [];
  const raw = req.rawHeaders;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i];
    if (name.charCodeAt(0) === 58 /* ':' */ || HOP_BY_HOP.has(name.toLowerCase())) continue;
    headers.push(name, raw[i + 1]);
  }
  if (http2Client) headers.push('host', req.headers[':authority']);
  const hasBody = req.headers['content-length'] !== undefined || req.headers['transfer-encoding'] !== undefined;
  backend.dispatch({ path: req.url, method: req.method, headers, body: hasBody && !http2Client ? req : null }, new Relay(res, http2Client));
}

/** WebSocket and other HTTP/1.1 upgrades: the request head goes to the WebSocket backend, then raw bytes both ways. */
function upgrade(req, socket, head) {
  const upstream = net.connect(Number(wsPort), '127.0.0.1');
  let text = `${req.method} ${req.url} HTTP/1.1\r\n`;
  for (let i = 0; i < req.rawHeaders.length; i += 2) text += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
  upstream.write(`${text}\r\n`);
  if (head.length > 0) upstream.write(head);
  upstream.pipe(socket).pipe(upstream);
  upstream.on('error', () => socket.destroy());
  socket.on('error', () => upstream.destroy());
}

const plain = http.createServer({ keepAliveTimeout: 75_000 }, forward);
plain.on('upgrade', upgrade);
plain.listen(Number(plainPort), '127.0.0.1');

/** The same relay for an HTTP/2 request served from its stream (no compat objects). */
class StreamRelay extends Relay {
  constructor(stream) {
    super(stream, true);
  }

  onHeaders(status, raw, resume) {
    if (status < 200) return true;
    this.resume = resume;
    const headers = { ':status': status };
    for (let i = 0; i < raw.length; i += 2) {
      const name = raw[i].toString('latin1').toLowerCase();
      if (!HOP_BY_HOP.has(name)) headers[name] = raw[i + 1].toString('latin1');
    }
    this.out.respond(headers, { waitForTrailers: true });
    return true;
  }

  onComplete() {
    if (!this.out.writableEnded) this.out.end();
  }

  onError() {
    if (this.out.headersSent) this.out.close(http2.constants.NGHTTP2_INTERNAL_ERROR);
    else if (!this.out.destroyed) this.out.respond({ ':status': 502 }, { endStream: true });
  }
}

function ignore() {}

const secure = http2.createSecureServer({ cert: readFileSync(certFile), key: readFileSync(keyFile), allowHTTP1: true });
secure.on('request', forward);
// As Gatehouse (src/listeners/https.ts): Node's compat listener on 'stream' serves only requests with a body.
const [compat] = secure.listeners('stream');
secure.removeListener('stream', compat);
secure.on('stream', (stream, hdrs, flags, raw) => {
  if (!stream.endAfterHeaders || hdrs.expect !== undefined || hdrs[':method'] === 'CONNECT') {
    compat.call(secure, stream, hdrs, flags, raw);
    return;
  }
  stream.on('error', ignore);
  const headers = [];
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i];
    if (name.charCodeAt(0) === 58 /* ':' */ || HOP_BY_HOP.has(name)) continue;
    headers.push(name, raw[i + 1]);
  }
  headers.push('host', hdrs[':authority']);
  backend.dispatch({ path: hdrs[':path'], method: hdrs[':method'], headers, body: null }, new StreamRelay(stream));
});
secure.on('upgrade', upgrade);
secure.listen(Number(tlsPort), '127.0.0.1');

process.on('SIGTERM', () => process.exit(0));
