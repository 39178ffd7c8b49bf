// New TLS connection per request: CONCURRENCY loops, each opening a TLS connection (SNI
// bench.localhost, ALPN http/1.1, no session resumption: no session is ever offered), sending one
// `GET PATH` with `Connection: close`, reading the response to its end, and starting over.
// wrk and h2load both resume TLS sessions on reconnect, so they would measure abbreviated
// handshakes; this client measures full ones. Prints one JSON line: { value, unit, error? }.
// Usage: node bench/tls-handshakes.mjs HOST PORT PATH SECONDS WARMUP_SECONDS [CONCURRENCY=32]
import tls from 'node:tls';

const [host, port, path, seconds, warmup, concurrency = '32'] = process.argv.slice(2);
const request = Buffer.from(`GET ${path} HTTP/1.1\r\nHost: bench.localhost\r\nConnection: close\r\n\r\n`);
let completed = 0;
let failed = 0;
let lastError;
let measuring = false;
let running = true;
// One context for every connection: tls.connect would otherwise build a new one (with the root
// store) per call, and that client-side cost would cap the figure.
const secureContext = tls.createSecureContext();

function once() {
  if (!running) return;
  let head = '';
  const socket = tls.connect({
    host, port: Number(port), servername: 'bench.localhost', ALPNProtocols: ['http/1.1'], rejectUnauthorized: false, secureContext, noDelay: true,
  }, () => socket.write(request));
  socket.setEncoding('latin1');
  socket.on('data', (chunk) => { if (head.length < 16) head += chunk; });
  socket.on('error', (error) => { lastError = error.message; });
  socket.on('close', () => {
    if (measuring) {
      if (head.startsWith('HTTP/1.1 200')) completed++;
      else { failed++; lastError ??= `answer: ${JSON.stringify(head.slice(0, 12))}`; }
    }
    once();
  });
}

for (let i = 0; i < Number(concurrency); i++) once();

setTimeout(() => {
  measuring = true;
  const started = performance.now();
  setTimeout(() => {
    const elapsed = (performance.now() - started) / 1000;
    running = false;
    measuring = false;
    const total = completed + failed;
    const result = completed > 0 && failed <= total * 0.01
      ? { value: completed / elapsed, unit: 'conn/s' }
      : { value: null, unit: 'conn/s', error: `${failed} of ${total} failed${lastError ? `: ${lastError}` : ''}` };
    process.stdout.write(`${JSON.stringify(result)}\n`);
    process.exit(0);
  }, Number(seconds) * 1000);
}, Number(warmup) * 1000);
