// Gatehouse at scale: many sites and certificates, many idle TLS connections. See bench/README.md.
//
//   node bench/scale.mjs            (after npm run build; needs nginx, wrk, h2load, taskset)
//
// Environment: SCALE_SITES (default 10000), SCALE_CERTS (default = SCALE_SITES, one static
// certificate per site), SCALE_CONNECTIONS (idle TLS connections, default 10000), SCALE_DURATION
// (seconds per throughput measurement, default 5).
//
// 1. Generates SCALE_CERTS certificates (a CA, then one P-256 leaf and key per site) and writes
//    two configs: one site, and SCALE_SITES sites each with its own static certificate.
// 2. Start-up: spawn → first 200 answered for the last site, for each config: a first start
//    without the caches (verified certificates, parsed config), then a restart on the same
//    storage folder.
// 3. Routing: wrk (plain h1) and h2load (HTTPS h1, SNI = the site) on a site in the middle, with
//    one site and with SCALE_SITES sites: req/s of each.
// 4. Idle connections: with SCALE_SITES sites, a separate node process opens SCALE_CONNECTIONS
//    TLS connections (each a full handshake and one keep-alive request), leaves them idle; the
//    cost is (RSS after − RSS before) / connections. Once with ALPN http/1.1, once with h2; and
//    (SCALE_IDLE_NAMES) with SNI and Host spread over every site (one certificate per name: each
//    connection also holds its name's SecureContext), with one name for every connection (one
//    certificate, the cost of a connection alone), or both (default). SCALE_ONLY_IDLE=1 measures
//    only this (no start-up or routing runs).
// Gatehouse runs on CPU 1, the load and the backend (nginx, one worker) on CPU 0. Everything
// listens on 127.0.0.1; every process is stopped by pid and the temp dir removed at exit.
import { spawn, execFileSync } from 'node:child_process';
import { generateKeyPairSync, X509Certificate } from 'node:crypto';
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync, chmodSync } from 'node:fs';
import { createServer, connect as netConnect } from 'node:net';
import { tmpdir, cpus } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import tls from 'node:tls';

const BENCH_DIR = dirname(fileURLToPath(import.meta.url));
const ROOT = dirname(BENCH_DIR);
/** How long the idle client pauses at half its connections (the parent waits 3 s of it, then reads RSS). */
const HALF_PAUSE_MS = 6000;

if (process.argv[2] === '--idle-client') await idleClient(process.argv.slice(3));
else await main();

async function main() {
  const SITES = Number(process.env.SCALE_SITES ?? 10_000);
  const CERTS = Math.min(SITES, Number(process.env.SCALE_CERTS ?? SITES));
  const CONNECTIONS = Number(process.env.SCALE_CONNECTIONS ?? 10_000);
  const DURATION = Number(process.env.SCALE_DURATION ?? 5);
  const cpuLoad = '0';
  const cpuProxy = cpus().length > 1 ? '1' : '0';
  const tmp = mkdtempSync(join(tmpdir(), 'gatehouse-scale-'));
  chmodSync(tmp, 0o755);
  const children = new Set();
  const cleanup = () => {
    for (const child of children) try { process.kill(child.pid, 'SIGKILL'); } catch { /* gone */ }
    if (process.env.SCALE_KEEP) process.stderr.write(`kept ${tmp}\n`);
    else rmSync(tmp, { recursive: true, force: true });
  };
  process.on('exit', cleanup);
  process.on('SIGINT', () => process.exit(130));
  process.on('SIGTERM', () => process.exit(143));
  const log = (message) => process.stderr.write(`[scale ${new Date().toISOString().slice(11, 19)}] ${message}\n`);
  const start = (name, command, args) => {
    const child = spawn('bash', ['-c', 'ulimit -n "$(ulimit -Hn)"; exec "$@"', 'bash', command, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(child);
    child.output = '';
    child.stdout.on('data', (d) => { child.output = (child.output + d).slice(-4000); });
    child.stderr.on('data', (d) => { child.output = (child.output + d).slice(-4000); });
    child.on('exit', () => children.delete(child));
    child.label = name;
    return child;
  };
  const stop = async (child) => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  };

  // --- certificates ---
  const { signCertificate } = await import(join(ROOT, 'dist/tls/local-ca.js'));
  let t0 = performance.now();
  const caKeys = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const now = Date.now();
  const caPem = signCertificate({ subject: { commonName: 'Scale Bench CA' }, publicKey: caKeys.publicKey, notBefore: new Date(now - 60_000), notAfter: new Date(now + 7 * 86_400_000), ca: { pathLength: 0 } }, { privateKey: caKeys.privateKey });
  const ca = { privateKey: caKeys.privateKey, certificate: new X509Certificate(caPem) };
  mkdirSync(join(tmp, 'certs'));
  const siteName = (i) => `site${i}.scale.test`;
  const certFiles = [];
  for (let i = 0; i < CERTS; i++) {
    const keys = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const pem = signCertificate({ subject: {}, names: [siteName(i)], publicKey: keys.publicKey, notBefore: new Date(now - 60_000), notAfter: new Date(now + 7 * 86_400_000) }, ca);
    const cert = join(tmp, 'certs', `${i}.crt`);
    const key = join(tmp, 'certs', `${i}.key`);
    writeFileSync(cert, pem + caPem);
    writeFileSync(key, keys.privateKey.export({ type: 'pkcs8', format: 'pem' }));
    certFiles.push({ cert, key });
  }
  log(`${CERTS} certificates generated in ${((performance.now() - t0) / 1000).toFixed(1)} s`);

  // --- backend ---
  const [backendPort, backendTlsPort, plainPort, tlsPort] = await freePorts(4);
  mkdirSync(join(tmp, 'www'));
  writeFileSync(join(tmp, 'www', '1k'), Buffer.alloc(1024, 'x'));
  const render = (template, values) => {
    let text = readFileSync(join(BENCH_DIR, 'templates', template), 'utf8');
    for (const [k, v] of Object.entries(values)) text = text.replaceAll(`@${k}@`, String(v));
    return text;
  };
  writeFileSync(join(tmp, 'backend.conf'), render('backend-nginx.conf', { TMP: tmp, BACKEND_PORT: backendPort, BACKEND_TLS_PORT: backendTlsPort, CERT: certFiles[0].cert, KEY: certFiles[0].key }));
  const backend = start('backend', 'taskset', ['-c', cpuLoad, 'nginx', '-p', tmp, '-c', join(tmp, 'backend.conf'), '-e', join(tmp, 'backend-error.log')]);
  await waitFor(async () => (await httpStatus(backendPort, 'x', '/1k')) === 200, 10_000, () => backend.output);

  // --- configs ---
  const middle = Math.floor(SITES / 2);
  const config = (siteIndexes, certIndexes) => [
    'listen:', `  http: "127.0.0.1:${plainPort}"`, `  https: "127.0.0.1:${tlsPort}"`,
    'grace_period: 1s',
    'clients:', '  timeouts: { keepalive: 10m, idle: 10m }',
    'tls:', `  storage: ${join(tmp, 'storage')}`, '  certificates:',
    ...certIndexes.map((i) => `    - { cert: ${certFiles[i].cert}, key: ${certFiles[i].key} }`),
    'log: { level: info, access: false }',
    'sites:',
    ...siteIndexes.map((i) => `  - { hosts: [${siteName(i)}], tls: ${i < CERTS ? 'static' : 'internal'}, redirect: false, routes: [{ path: /, upstreams: ["http://127.0.0.1:${backendPort}"] }] }`),
  ].join('\n') + '\n';
  const all = Array.from({ length: SITES }, (_, i) => i);
  const oneCert = middle < CERTS ? [middle] : [0];
  writeFileSync(join(tmp, 'one.yaml'), config([middle], oneCert));
  writeFileSync(join(tmp, 'many.yaml'), config(all, all.slice(0, CERTS)));

  const startGatehouse = async (file, probeHost) => {
    const began = performance.now();
    const child = start('gatehouse', 'taskset', ['-c', cpuProxy, process.execPath, 'dist/cli.js', 'run', '--config', file]);
    await waitFor(async () => (await httpStatus(plainPort, probeHost, '/1k')) === 200, 60_000, () => child.output);
    const ms = performance.now() - began;
    const serving = /"msg":"serving"/.test(child.output);
    return { child, ms, serving };
  };

  const results = { sites: SITES, certs: CERTS };
  if (process.env.SCALE_ONLY_CONFIG) { await stop(backend); return; }
  // Idle TLS keep-alive connections: HTTP/1.1, then HTTP/2 (one session and one finished stream
  // each); SNI and Host spread over every site ('each': one certificate per name, so every
  // connection also holds its name's SecureContext) and/or all on the middle site ('one': one
  // name, one certificate: what a connection costs by itself). Keys: idle_{h1,h2}[_one_name]_*.
  const idleNames = process.env.SCALE_IDLE_NAMES ?? 'both';
  const measureIdle = async () => {
    for (const names of idleNames === 'both' ? ['each', 'one'] : [idleNames]) {
      for (const protocol of ['http/1.1', 'h2']) {
        const key = `${protocol === 'h2' ? 'h2' : 'h1'}${names === 'one' ? '_one_name' : ''}`;
        const { child } = await startGatehouse(join(tmp, 'many.yaml'), siteName(middle));
        await sleep(2000);
        const before = rssKiB(child.pid);
        const [sites, base] = names === 'one' ? [1, middle] : [SITES, 0];
        const client = start('idle-client', 'taskset', ['-c', cpuLoad, process.execPath, join(BENCH_DIR, 'scale.mjs'), '--idle-client', String(tlsPort), String(CONNECTIONS), String(sites), protocol, String(base)]);
        const began = performance.now();
        await waitFor(async () => /half|ready/.test(client.output), 600_000, () => client.output, 500);
        await sleep(3000);
        const middleRss = rssKiB(child.pid);
        const half = Number(/half (\d+)/.exec(client.output)?.[1] ?? 0);
        await waitFor(async () => /ready/.test(client.output), 600_000, () => client.output, 500);
        const openSeconds = (performance.now() - began) / 1000 - HALF_PAUSE_MS / 1000;
        await sleep(3000);
        const after = rssKiB(child.pid);
        const opened = Number(/ready (\d+)/.exec(client.output)?.[1] ?? 0);
        const perConnection = (after - before) / opened;
        // The second half alone: both readings follow a burst of handshakes, and neither holds
        // the start-up's leftovers, so this is the steadier figure of the two.
        const perConnectionSecondHalf = (after - middleRss) / (opened - half);
        results[`idle_${key}_connections`] = opened;
        results[`idle_${key}_rss_before_kib`] = before;
        results[`idle_${key}_rss_half_kib`] = middleRss;
        results[`idle_${key}_rss_after_kib`] = after;
        results[`kib_per_idle_${key}_tls_connection`] = Number(perConnection.toFixed(1));
        results[`kib_per_idle_${key}_tls_connection_second_half`] = Number(perConnectionSecondHalf.toFixed(1));
        log(`${opened} idle TLS ${protocol} connections, ${names === 'one' ? 'one name' : `SNI over ${SITES} names`} (opened in ${openSeconds.toFixed(1)} s): RSS ${before} → ${middleRss} (${half}) → ${after} KiB, ${perConnection.toFixed(1)} KiB per connection, ${perConnectionSecondHalf.toFixed(1)} for the second half`);
        await stop(client);
        await stop(child);
      }
    }
  };
  const idleRows = () => ['h1', 'h2', 'h1_one_name', 'h2_one_name'].filter((key) => results[`idle_${key}_connections`] !== undefined).map((key) => {
    const what = `${key.startsWith('h1') ? 'HTTP/1.1' : 'HTTP/2'}, ${key.endsWith('_one_name') ? 'one name' : 'one certificate per name'}`;
    return `| Idle TLS keep-alive connections, ${what}: RSS per connection (KiB), all / second half | | ${results[`kib_per_idle_${key}_tls_connection`]} / ${results[`kib_per_idle_${key}_tls_connection_second_half`]} (${results[`idle_${key}_connections`]} connections, ${Math.round(results[`idle_${key}_rss_before_kib`] / 1024)} → ${Math.round(results[`idle_${key}_rss_half_kib`] / 1024)} → ${Math.round(results[`idle_${key}_rss_after_kib`] / 1024)} MiB) |`;
  });
  if (process.env.SCALE_ONLY_IDLE) {
    // A first start in a new storage folder builds the caches and leaves a larger heap behind
    // (the start-up runs do this otherwise): start and stop once so every "before" is a restart.
    await stop((await startGatehouse(join(tmp, 'many.yaml'), siteName(middle))).child);
    await measureIdle();
    await stop(backend);
    process.stdout.write(`${JSON.stringify(results)}\n`);
    process.stdout.write(['', `| Measure | | ${SITES} sites, ${CERTS} certificates |`, '|---|---:|---:|', ...idleRows(), ''].join('\n'));
    return;
  }
  // Start-up, twice on the same storage folder: the first start with no cache of verified
  // certificates and no parsed-config cache (removed before it), then a restart that finds it (startup_*_first_ms and
  // startup_*_restart_ms); startup_*_ms is the better of the two.
  for (const [label, file, host] of [['one', 'one.yaml', siteName(middle)], ['many', 'many.yaml', siteName(SITES - 1)]]) {
    rmSync(join(tmp, 'storage', 'static', 'verified.json'), { force: true });
    rmSync(join(tmp, 'storage', 'config-cache'), { recursive: true, force: true }); // the parsed-config cache too
    const rounds = [];
    for (let round = 0; round < 2; round++) {
      const { child, ms } = await startGatehouse(join(tmp, file), host);
      rounds.push(Math.round(ms));
      await stop(child);
    }
    results[`startup_${label}_ms`] = Math.min(...rounds);
    results[`startup_${label}_first_ms`] = rounds[0];
    results[`startup_${label}_restart_ms`] = rounds[1];
    log(`start-up with ${label === 'one' ? '1 site' : `${SITES} sites, ${CERTS} certificates`}: first ${rounds[0]} ms, restart ${rounds[1]} ms (spawn → first 200)`);
  }

  if (process.env.SCALE_ONLY_STARTUP) { await stop(backend); process.stdout.write(`${JSON.stringify(results)}\n`); return; }

  // Routing throughput: 1 site vs SITES sites, same site name, same certificate.
  for (const [label, file] of [['one', 'one.yaml'], ['many', 'many.yaml'], ['one', 'one.yaml'], ['many', 'many.yaml']]) {
    const { child } = await startGatehouse(join(tmp, file), siteName(middle));
    const wrk = run('taskset', ['-c', cpuLoad, 'wrk', '-t1', '-c50', `-d${DURATION}`, '-H', `Host: ${siteName(middle)}`, `http://127.0.0.1:${plainPort}/1k`]);
    const h1 = Number(/Requests\/sec:\s+([\d.]+)/.exec(wrk)?.[1] ?? NaN);
    const h2load = run('taskset', ['-c', cpuLoad, 'h2load', '--h1', '-c50', '-m1', '-D', String(DURATION), `--connect-to=127.0.0.1:${tlsPort}`, `https://${siteName(middle)}:${tlsPort}/1k`]);
    const tlsRate = Number(/finished in [\d.]+s, ([\d.]+) req\/s/.exec(h2load)?.[1] ?? NaN);
    const ok = /(\d+) succeeded/.exec(h2load)?.[1];
    for (const [key, value] of [[`h1_${label}`, h1], [`h1_tls_${label}`, tlsRate]]) {
      results[key] = Math.max(results[key] ?? 0, Math.round(value));
    }
    log(`${label === 'one' ? '1 site' : `${SITES} sites`}: plain h1 ${Math.round(h1)} req/s, HTTPS h1 ${Math.round(tlsRate)} req/s (${ok ?? '?'} succeeded)`);
    await stop(child);
  }

  await measureIdle();
  await stop(backend);
  process.stdout.write(`${JSON.stringify(results)}\n`);
  process.stdout.write([
    '', `| Measure | 1 site | ${SITES} sites, ${CERTS} certificates |`, '|---|---:|---:|',
    `| Start-up, spawn → first 200 (ms) | ${results.startup_one_ms} | ${results.startup_many_ms} |`,
    `| Plain HTTP/1.1 keep-alive 1 KiB (req/s) | ${results.h1_one} | ${results.h1_many} |`,
    `| HTTPS HTTP/1.1 keep-alive 1 KiB, SNI (req/s) | ${results.h1_tls_one} | ${results.h1_tls_many} |`,
    ...idleRows(),
    '',
  ].join('\n'));
}

/**
 * The separate client process: open N TLS connections (SNI spread over `sites` sites from site
 * number `base`: 1 and base = one name for all), one request each, keep them open.
 */
async function idleClient([port, count, sites, protocol = 'http/1.1', base = '0']) {
  const n = Number(count);
  const siteHost = (i) => `site${Number(base) + (i % Number(sites))}.scale.test`;
  if (protocol === 'h2') return idleClientH2(Number(port), n, siteHost);
  const secureContext = tls.createSecureContext();
  const request = (host) => Buffer.from(`GET /1k HTTP/1.1\r\nHost: ${host}\r\n\r\n`);
  const sockets = [];
  let next = 0;
  let opened = 0;
  let failed = 0;
  const openOne = () => new Promise((resolve) => {
    const i = next++;
    const host = siteHost(i);
    const socket = tls.connect({ host: '127.0.0.1', port: Number(port), servername: host, ALPNProtocols: ['http/1.1'], rejectUnauthorized: false, secureContext }, () => socket.write(request(host)));
    let got = 0;
    const done = (ok) => { if (ok) opened++; else failed++; resolve(); };
    socket.on('data', (chunk) => { got += chunk.length; if (got >= 1024 && got - chunk.length < 1024) done(true); });
    socket.on('error', () => { if (got < 1024) done(false); });
    sockets.push(socket);
  });
  await openInTwoHalves(n, () => next, openOne, () => opened);
  process.stdout.write(`ready ${opened} failed ${failed}\n`);
  setInterval(() => {}, 1 << 30);
}

/** The same over HTTP/2: N sessions, one request each, left open. */
async function idleClientH2(port, n, siteHost) {
  const { connect } = await import('node:http2');
  const sessions = [];
  let next = 0;
  let opened = 0;
  let failed = 0;
  const openOne = () => new Promise((resolve) => {
    const i = next++;
    const host = siteHost(i);
    const session = connect(`https://${host}:${port}`, { host: '127.0.0.1', servername: host, rejectUnauthorized: false, createConnection: () => tls.connect({ host: '127.0.0.1', port, servername: host, ALPNProtocols: ['h2'], rejectUnauthorized: false }) });
    sessions.push(session);
    session.on('error', () => {});
    const request = session.request({ ':path': '/1k', ':authority': host });
    request.on('response', () => {});
    request.on('data', () => {});
    request.on('end', () => { opened++; resolve(); });
    request.on('error', () => { failed++; resolve(); });
  });
  await openInTwoHalves(n, () => next, openOne, () => opened);
  process.stdout.write(`ready ${opened} failed ${failed}\n`);
  setInterval(() => {}, 1 << 30);
}

/**
 * Opens `n` connections 64 at a time in two halves: after the first, prints `half <opened>` and
 * pauses HALF_PAUSE_MS, so that the parent can read the server's RSS with n/2 connections open
 * (the second half's RSS growth is the cost of a connection without the start-up's leftovers).
 */
async function openInTwoHalves(n, next, openOne, opened) {
  for (const limit of [Math.floor(n / 2), n]) {
    const worker = async () => { while (next() < limit) await openOne(); };
    await Promise.all(Array.from({ length: 64 }, worker));
    if (limit < n) {
      process.stdout.write(`half ${opened()}\n`);
      await sleep(HALF_PAUSE_MS);
    }
  }
}

function rssKiB(pid) {
  return Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? NaN);
}

function run(command, args) {
  try {
    return execFileSync(command, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 1 << 24 });
  } catch (error) {
    return `${error.stdout ?? ''}${error.stderr ?? ''}`;
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function waitFor(check, timeoutMs, describe, interval = 25) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check().catch(() => false)) return;
    await sleep(interval);
  }
  throw new Error(`timed out: ${describe()}`);
}

function httpStatus(port, host, path) {
  return new Promise((resolve) => {
    // write, not end: a client that half-closes after its request has gone away as far as
    // Gatehouse (like nginx and Go servers) is concerned, and gets no answer (logged as 499).
    const socket = netConnect(port, '127.0.0.1', () => socket.write(`GET ${path} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`));
    let head = '';
    socket.setEncoding('latin1');
    socket.on('data', (d) => { head += d; });
    socket.on('close', () => resolve(Number(/^HTTP\/1\.1 (\d{3})/.exec(head)?.[1] ?? 0)));
    socket.on('error', () => resolve(0));
  });
}

function freePorts(n) {
  return new Promise((resolve) => {
    const servers = [];
    const ports = [];
    const next = () => {
      if (ports.length === n) { for (const s of servers) s.close(); resolve(ports); return; }
      const s = createServer();
      servers.push(s);
      s.listen(0, '127.0.0.1', () => { ports.push(s.address().port); next(); });
    };
    next();
  });
}
