// WebSocket echo backend for the benchmark: every message goes back as it came (text or binary).
// Usage: node bench/ws-echo.mjs PORT
import { WebSocketServer } from 'ws';

const port = Number(process.argv[2]);
const server = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });
server.on('connection', (socket) => {
  socket.on('message', (data, isBinary) => socket.send(data, { binary: isBinary }));
  socket.on('error', () => socket.terminate());
});
server.on('listening', () => process.stdout.write(`ws echo listening on 127.0.0.1:${port}\n`));
process.on('SIGTERM', () => process.exit(0));
