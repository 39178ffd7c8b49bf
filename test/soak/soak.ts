/**
 * Soak test (not part of `npm test`): a spawned Gatehouse (the built CLI) under mixed good and bad
 * traffic for SOAK_SECONDS (default 600), reporting the server process's RSS and open descriptors
 * at the start and the end, and what every kind of traffic got.
 *
 *   npm run soak                      # 10 minutes
 *   SOAK_SECONDS=60 npm run soak      # a short run
 *   SOAK_WORKERS=12 npm run soak      # more concurrent clients (default 8)
 *   SOAK_ONLY="upstream short body" npm run soak   # only these scenarios (comma list), to chase one
 *
 * Exits 1 when the server died, a good request failed, or a bad one was answered as if it were
 * good; descriptor and memory figures are reported, not judged (compare start and end).
 */
import { spawn } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import { connect as http2Connect, type ClientHttp2Session } from 'node:http2';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Agent, request } from 'undici';
import { collectFrames, getFields, h2Connect, headersFrame, rstStreamFrame } from '../helpers/h2frames.ts';
import { rawExchange } from '../helpers/raw-http.ts';

const SECONDS = Number(process.env.SOAK_SECONDS ?? 600);
const WORKERS = Number(process.env.SOAK_WORKERS ?? 8);
const ONLY = process.env.SOAK_ONLY?.split(',').map((name) => name.trim()).filter(Boolean);
const CLI = fileURLToPath(new URL('../../dist/cli.js', import.meta.url));

interface Sample { readonly at: number; readonly rssKiB: number; readonly fds: number }

async function sample(pid: number, startedAt: number): Promise<Sample> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const rss = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
  const fds = (await readdir(`/proc/${pid}/fd`)).length;
  return { at: Math.round((Date.now() - startedAt) / 1000), rssKiB: rss, fds };
}

/** The upstream: a Node server for good traffic, and raw misbehaviour on some paths. */
async function startUpstream(): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = http.createServer((req, res) => {
    const url = req.url ?? '/';
    req.resume();
    req.on('end', () => {
      if (url.startsWith('/short-body')) {
        res.writeHead(200, { 'content-length': '100000' });
        res.write(Buffer.alloc(40_010, 0x61));
        setTimeout(() => res.destroy(), 5);
      } else if (url.startsWith('/never')) {
        // never answers; Gatehouse gives 504 after response_header
      } else if (url.startsWith('/bad-headers')) {
        res.socket?.end('HTTP/1.1 200 OK\r\nX Bad\x01: a\r\nContent-Length: 2\r\n\r\nok');
      } else if (url.startsWith('/big')) {
        res.writeHead(200, { 'content-length': String(256 * 1024) });
        res.end(Buffer.alloc(256 * 1024, 0x62));
      } else {
        res.writeHead(200, { 'content-type': 'text/plain', 'set-cookie': ['a=1', 'b=2'] });
        res.end(`ok ${url}\n`);
      }
    });
  });
  server.on('connection', (s: net.Socket) => { sockets.add(s); s.on('close', () => sockets.delete(s)); });
  server.on('upgrade', (_req, socket: net.Socket) => socket.end('HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n'));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

type Outcome = 'expected' | 'unexpected';
const tally = new Map<string, { expected: number; unexpected: number; examples: string[] }>();
function record(kind: string, outcome: Outcome, detail = ''): void {
  let entry = tally.get(kind);
  if (!entry) tally.set(kind, entry = { expected: 0, unexpected: 0, examples: [] });
  entry[outcome]++;
  if (outcome === 'unexpected' && entry.examples.length < 3) entry.examples.push(detail.slice(0, 160));
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'gh-soak-'));
  const upstream = await startUpstream();
  const config = join(dir, 'gatehouse.yaml');
  await writeFile(config, `
listen: { http: "127.0.0.1:0", https: "127.0.0.1:0" }
log: { level: info, access: false }
clients:
  timeouts: { headers: 2s, body_idle: 2s, keepalive: 2s, idle: 5s, handshake: 2s }
  limits: { header_size: 16KiB, header_count: 50, target_length: 4KiB }
sites:
  - hosts: [localhost]
    tls: internal
    hsts: 1y
    routes:
      - upstreams: ["http://127.0.0.1:${upstream.port}"]
        retries: { count: 0 }
        timeouts: { response_header: 1s }
        passive_health: { max_fails: 1000000 }
  - hosts: [plain.localhost]
    tls: off
    routes:
      - upstreams: ["http://127.0.0.1:${upstream.port}"]
        retries: { count: 0 }
        timeouts: { response_header: 1s }
        passive_health: { max_fails: 1000000 }
`);
  const child = spawn(process.execPath, [CLI, 'run', '--config', config], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (c: Buffer) => { stderr += c.toString(); });
  let exited = false;
  child.once('exit', () => { exited = true; });
  const ports = await new Promise<{ http: number; https: number }>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (c: Buffer) => {
      out += c.toString();
      for (const line of out.split('\n')) {
        try {
          const parsed = JSON.parse(line) as { msg?: string; http?: number; https?: number };
          if (parsed.msg === 'serving') resolve({ http: parsed.http!, https: parsed.https! });
        } catch { /* partial line */ }
      }
    });
    child.once('exit', (code) => reject(new Error(`gatehouse exited with ${code}: ${stderr}`)));
    setTimeout(() => reject(new Error('gatehouse did not start')), 20_000).unref();
  });
  const pid = child.pid!;
  const startedAt = Date.now();
  const agent = new Agent({ connect: { rejectUnauthorized: false, servername: 'localhost' }, connections: 4 });
  const base = `https://127.0.0.1:${ports.https}`;

  let h2: ClientHttp2Session | undefined;
  const h2Session = (): ClientHttp2Session => {
    if (h2 === undefined || h2.destroyed || h2.closed) {
      h2 = http2Connect(base, { servername: 'localhost', rejectUnauthorized: false });
      h2.on('error', () => {});
    }
    return h2;
  };
  const h2Get = (path: string) => new Promise<number>((resolve) => {
    const stream = h2Session().request({ ':path': path, ':authority': 'localhost' });
    let status = 0;
    stream.on('response', (h) => { status = Number(h[':status']); });
    stream.on('error', () => {});
    stream.resume();
    stream.on('close', () => resolve(stream.rstCode === 0 ? status : -stream.rstCode));
    stream.end();
  });

  const scenarios: [string, () => Promise<void>][] = [
    ['h1 GET', async () => {
      const res = await request(`${base}/good`, { dispatcher: agent, headers: { host: 'localhost' } });
      await res.body.text();
      record('h1 GET', res.statusCode === 200 ? 'expected' : 'unexpected', String(res.statusCode));
    }],
    ['h1 POST 64 KiB', async () => {
      const res = await request(`${base}/upload`, { dispatcher: agent, method: 'POST', body: Buffer.alloc(65_536, 1), headers: { host: 'localhost' } });
      await res.body.text();
      record('h1 POST 64 KiB', res.statusCode === 200 ? 'expected' : 'unexpected', String(res.statusCode));
    }],
    ['h1 GET 256 KiB', async () => {
      const res = await request(`${base}/big`, { dispatcher: agent, headers: { host: 'localhost' } });
      const body = await res.body.arrayBuffer();
      record('h1 GET 256 KiB', res.statusCode === 200 && body.byteLength === 262_144 ? 'expected' : 'unexpected', String(res.statusCode));
    }],
    ['h2 GET', async () => {
      const status = await h2Get('/good-h2');
      record('h2 GET', status === 200 ? 'expected' : 'unexpected', String(status));
    }],
    ['plain GET', async () => {
      const answer = await rawExchange(ports.http, 'GET /plain HTTP/1.1\r\nHost: plain.localhost\r\nConnection: close\r\n\r\n');
      record('plain GET', answer.status === 200 ? 'expected' : 'unexpected', answer.text);
    }],
    ['bad framing', async () => {
      const attacks = [
        'POST / HTTP/1.1\r\nHost: plain.localhost\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n',
        'GET / HTTP/1.1\r\nHost: plain.localhost\r\nHost: evil\r\n\r\n',
        'GET / HTTP/1.2\r\nHost: plain.localhost\r\n\r\n',
        `GET / HTTP/1.1\r\nHost: plain.localhost\r\nX: ${'a'.repeat(20_000)}\r\n\r\n`,
        'POST / HTTP/1.0\r\nHost: plain.localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n',
      ];
      const bytes = attacks[Math.floor(Math.random() * attacks.length)]!;
      const answer = await rawExchange(ports.http, bytes);
      record('bad framing', answer.status >= 400 && answer.status < 600 && answer.closed ? 'expected' : 'unexpected', answer.text);
    }],
    ['slow header (abandoned)', async () => {
      const answer = await rawExchange(ports.https, 'GET /slow HTTP/1.1\r\nHost: localhost\r\nX-Slow: ', { tls: true, waitMs: 4_000 });
      record('slow header (abandoned)', answer.closed ? 'expected' : 'unexpected', answer.text);
    }],
    ['h2 rapid reset burst', async () => {
      const socket = await h2Connect(ports.https);
      collectFrames(socket);
      const frames: Buffer[] = [];
      for (let id = 1; id < 400; id += 2) frames.push(headersFrame(id, getFields('localhost', '/reset'), { endStream: true }), rstStreamFrame(id));
      socket.write(Buffer.concat(frames));
      await new Promise((r) => setTimeout(r, 100));
      socket.destroy();
      record('h2 rapid reset burst', 'expected');
    }],
    ['upstream short body', async () => {
      const status = await h2Get('/short-body');
      record('upstream short body', status < 0 ? 'expected' : 'unexpected', String(status));
    }],
    ['upstream never answers', async () => {
      const res = await request(`${base}/never`, { dispatcher: agent, headers: { host: 'localhost' } });
      await res.body.text();
      record('upstream never answers', res.statusCode === 504 ? 'expected' : 'unexpected', String(res.statusCode));
    }],
    ['upstream bad headers', async () => {
      const status = await h2Get('/bad-headers');
      record('upstream bad headers', status === 502 ? 'expected' : 'unexpected', String(status));
    }],
    ['upgrade refused', async () => {
      const answer = await rawExchange(ports.https, 'GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n', { tls: true });
      record('upgrade refused', answer.status === 426 && answer.statuses.length === 1 ? 'expected' : 'unexpected', answer.text);
    }],
    ['client aborts mid-response', async () => {
      const controller = new AbortController();
      const res = await request(`${base}/big`, { dispatcher: agent, headers: { host: 'localhost' }, signal: controller.signal });
      controller.abort();
      await res.body.text().catch(() => {});
      record('client aborts mid-response', 'expected');
    }],
  ];

  if (ONLY !== undefined && ONLY.length > 0) {
    const unknown = ONLY.filter((name) => !scenarios.some(([n]) => n === name));
    if (unknown.length > 0) throw new Error(`SOAK_ONLY: no scenario named ${unknown.join(', ')}`);
    scenarios.splice(0, scenarios.length, ...scenarios.filter(([name]) => ONLY.includes(name)));
  }
  const samples: Sample[] = [];
  // Warm up (first certificates, JIT, pools), then take the start figures.
  for (const [, run] of scenarios) await run().catch(() => {});
  tally.clear();
  await new Promise((r) => setTimeout(r, 1_000));
  samples.push(await sample(pid, startedAt));
  console.log(`soak: ${SECONDS} s, ${WORKERS} workers, gatehouse pid ${pid}; start RSS ${samples[0]!.rssKiB} KiB, ${samples[0]!.fds} FDs`);

  const deadline = Date.now() + SECONDS * 1000;
  const sampler = setInterval(() => {
    if (exited) return;
    sample(pid, startedAt).then((s) => { samples.push(s); console.log(`  t=${s.at}s RSS ${s.rssKiB} KiB, ${s.fds} FDs`); }).catch(() => {});
  }, Math.max(5_000, SECONDS * 100));
  await Promise.all(Array.from({ length: WORKERS }, async () => {
    while (Date.now() < deadline && !exited) {
      const [name, run] = scenarios[Math.floor(Math.random() * scenarios.length)]!;
      try {
        await run();
      } catch (error) {
        record(name, 'unexpected', (error as Error).message);
      }
    }
  }));
  clearInterval(sampler);
  h2?.destroy();
  await agent.close();
  // Let deadlines and keep-alive timeouts close what the traffic left, then take the end figures.
  await new Promise((r) => setTimeout(r, 8_000));
  const crashed = exited;
  const end = crashed ? undefined : await sample(pid, startedAt);

  console.log('\nscenario                      expected  unexpected');
  let unexpected = 0;
  for (const [kind, entry] of tally) {
    unexpected += entry.unexpected;
    console.log(`${kind.padEnd(30)}${String(entry.expected).padStart(8)}  ${String(entry.unexpected).padStart(10)}${entry.examples.length ? `  e.g. ${JSON.stringify(entry.examples[0])}` : ''}`);
  }
  const start = samples[0]!;
  const peak = samples.reduce((m, s) => Math.max(m, s.rssKiB), 0);
  console.log(`\nserver RSS: start ${start.rssKiB} KiB → end ${end?.rssKiB ?? 'n/a'} KiB (peak ${Math.max(peak, end?.rssKiB ?? 0)} KiB)`);
  console.log(`server FDs: start ${start.fds} → end ${end?.fds ?? 'n/a'}`);
  console.log(crashed ? `server DIED: ${stderr}` : 'server alive');

  child.kill('SIGTERM');
  await new Promise((r) => (exited ? r(undefined) : child.once('exit', r)));
  await upstream.close();
  await rm(dir, { recursive: true, force: true });
  process.exitCode = crashed || unexpected > 0 ? 1 : 0;
}

main().catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
