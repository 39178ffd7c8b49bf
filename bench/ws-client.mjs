// WebSocket echo load: CONNECTIONS sockets, each keeping IN_FLIGHT messages of SIZE bytes
// outstanding; every echo received sends the next message. Counts echoes per second over the
// measured window, after a warm-up. Prints one JSON line: { value, unit, error? }.
// Usage: node bench/ws-client.mjs URL SECONDS WARMUP_SECONDS [CONNECTIONS=16] [IN_FLIGHT=4] [SIZE=128]
import WebSocket from 'ws';

const [url, seconds, warmup, connections = '16', inFlight = '4', size = '128'] = process.argv.slice(2);
const payload = Buffer.alloc(Number(size), 0x61);
let received = 0;
let measuring = false;
let failure;
const sockets = [];

for (let i = 0; i < Number(connections); i++) {
  const socket = new WebSocket(url, { perMessageDeflate: false });
  sockets.push(socket);
  socket.on('open', () => {
    for (let k = 0; k < Number(inFlight); k++) socket.send(payload);
  });
  socket.on('message', () => {
    if (measuring) received++;
    socket.send(payload);
  });
  socket.on('error', (error) => { failure ??= error.message; });
  socket.on('unexpected-response', (_request, response) => { failure ??= `upgrade answered ${response.statusCode}`; });
}

setTimeout(() => {
  measuring = true;
  const started = performance.now();
  setTimeout(() => {
    const elapsed = (performance.now() - started) / 1000;
    measuring = false;
    const result = received > 0
      ? { value: received / elapsed, unit: 'msg/s' }
      : { value: null, unit: 'msg/s', error: failure ?? 'no echo received' };
    process.stdout.write(`${JSON.stringify(result)}\n`);
    for (const socket of sockets) socket.terminate();
    process.exit(0);
  }, Number(seconds) * 1000);
}, Number(warmup) * 1000);
