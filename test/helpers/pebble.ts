/**
 * A real ACME server for tests: Let's Encrypt's Pebble (Debian package `pebble`) with
 * `pebble-challtestsrv` as its DNS resolver (every A query answers 127.0.0.1, no AAAA), both on
 * free ports, with a TLS certificate for Pebble generated here by `openssl`.
 *
 * Pebble validates HTTP-01 by connecting to `127.0.0.1:<httpPort>` and TLS-ALPN-01 to
 * `127.0.0.1:<tlsPort>`: the test starts its own listeners on those ports (see
 * {@link freePort}) and passes them in.
 *
 * ```ts
 * const httpPort = await freePort(), tlsPort = await freePort();
 * const pebble = await startPebble({ httpPort, tlsPort });
 * after(() => pebble.close());
 * // directory: pebble.directoryUrl, trust: pebble.caPem (tls.acme.ca_bundle)
 * const root = await pebble.issuingRoot(); // verifies issued chains
 * ```
 *
 * Every process is killed by pid in {@link Pebble.close} (also on SIGKILL-able hangs), and the
 * temp folder is removed.
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile, readFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Agent, request } from 'undici';

const run = promisify(execFile);

/** Options of {@link startPebble}. */
export interface PebbleOptions {
  /** Port Pebble connects to for HTTP-01 validation (the test's plain HTTP listener). */
  readonly httpPort: number;
  /** Port Pebble connects to for TLS-ALPN-01 validation (the test's TLS listener). */
  readonly tlsPort: number;
  /** Extra `PEBBLE_*` environment, e.g. `{ PEBBLE_WFE_NONCEREJECT: '50' }`. */
  readonly env?: Readonly<Record<string, string>>;
  /** Validity of issued certificates, seconds. Default 90 days (Let's Encrypt's). */
  readonly certificateValidityPeriod?: number;
  /** EAB keys (kid → base64url HMAC key); when given, EAB is required. */
  readonly externalAccountMACKeys?: Readonly<Record<string, string>>;
}

/** A running (or stopped, restartable) Pebble + challtestsrv pair. */
export interface Pebble {
  /** `https://127.0.0.1:<port>/dir` */
  readonly directoryUrl: string;
  /** PEM of the certificate Pebble serves its API with (trust it as `ca_bundle`). */
  readonly caPem: string;
  /** Path of {@link caPem} on disk. */
  readonly caFile: string;
  /** Pebble's stdout + stderr so far (it logs one line per request). */
  logs(): string;
  /** Count of new orders Pebble accepted (`POST /order-plz` lines in its log). */
  orderCount(): number;
  /** PEM of the root that signs issued chains (`GET /roots/0` on the management port). Changes on restart. */
  issuingRoot(): Promise<string>;
  /** Stop Pebble only (challtestsrv keeps running); the ACME API becomes unreachable. */
  stop(): Promise<void>;
  /** Start Pebble again on the same ports (fresh state: new accounts, new root). */
  start(): Promise<void>;
  /** Kill every process by pid and remove the temp folder. Safe to call twice. */
  close(): Promise<void>;
}

/** A TCP port free on 127.0.0.1 right now (listen on 0, read it, close). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

/** Start challtestsrv and Pebble; resolves when Pebble's directory answers. */
export async function startPebble(options: PebbleOptions): Promise<Pebble> {
  const folder = await mkdtemp(join(tmpdir(), 'gatehouse-pebble-'));
  const children = new Set<ChildProcess>();
  let pebbleChild: ChildProcess | undefined;
  let output = '';
  let closed = false;

  const kill = async (child: ChildProcess): Promise<void> => {
    if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    try {
      process.kill(child.pid, 'SIGTERM');
    } catch {
      return;
    }
    const timer = setTimeout(() => {
      try {
        if (child.pid !== undefined) process.kill(child.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }, 2000);
    await exited;
    clearTimeout(timer);
  };

  try {
    const certFile = join(folder, 'cert.pem');
    const keyFile = join(folder, 'key.pem');
    await run('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
      '-keyout', keyFile, '-out', certFile, '-days', '2', '-subj', '/CN=Pebble API test certificate',
      '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    ]);
    const caPem = await readFile(certFile, 'utf8');

    const [apiPort, managementPort, dnsPort, challtestManagementPort] = await Promise.all([freePort(), freePort(), freePort(), freePort()]);
    const configFile = join(folder, 'pebble-config.json');
    await writeFile(configFile, JSON.stringify({
      pebble: {
        listenAddress: `127.0.0.1:${apiPort}`,
        managementListenAddress: `127.0.0.1:${managementPort}`,
        certificate: certFile,
        privateKey: keyFile,
        httpPort: options.httpPort,
        tlsPort: options.tlsPort,
        ocspResponderURL: '',
        externalAccountBindingRequired: options.externalAccountMACKeys !== undefined,
        externalAccountMACKeys: options.externalAccountMACKeys ?? {},
        certificateValidityPeriod: options.certificateValidityPeriod ?? 90 * 24 * 3600,
      },
    }));

    const spawnLogged = (command: string, args: string[], env: NodeJS.ProcessEnv): ChildProcess => {
      const child = spawn(command, args, { cwd: folder, env, stdio: ['ignore', 'pipe', 'pipe'] });
      children.add(child);
      child.stdout?.on('data', (chunk: Buffer) => { output += chunk.toString(); });
      child.stderr?.on('data', (chunk: Buffer) => { output += chunk.toString(); });
      child.once('exit', () => children.delete(child));
      return child;
    };

    // challtestsrv: DNS only. Its own challenge listeners are turned off so they cannot clash
    // with the ports the test listens on.
    spawnLogged('pebble-challtestsrv', [
      '-dns01', `127.0.0.1:${dnsPort}`, '-http01', '', '-https01', '', '-tlsalpn01', '',
      '-management', `127.0.0.1:${challtestManagementPort}`, '-defaultIPv4', '127.0.0.1', '-defaultIPv6', '',
    ], process.env);

    const directoryUrl = `https://127.0.0.1:${apiPort}/dir`;
    const dispatcher = new Agent({ connect: { ca: caPem } });

    const waitForDirectory = async (child: ChildProcess): Promise<void> => {
      const deadline = Date.now() + 15_000;
      for (;;) {
        if (child.exitCode !== null) throw new Error(`pebble exited with ${child.exitCode}:\n${output}`);
        try {
          const response = await request(directoryUrl, { dispatcher });
          await response.body.text();
          if (response.statusCode === 200) return;
        } catch {
          // not listening yet
        }
        if (Date.now() > deadline) throw new Error(`pebble did not start within 15 s:\n${output}`);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    };

    const start = async (): Promise<void> => {
      if (pebbleChild && pebbleChild.exitCode === null && pebbleChild.signalCode === null) return;
      pebbleChild = spawnLogged('pebble', ['-config', configFile, '-dnsserver', `127.0.0.1:${dnsPort}`], {
        ...process.env,
        PEBBLE_VA_NOSLEEP: '1',
        PEBBLE_WFE_NONCEREJECT: '0',
        PEBBLE_AUTHZREUSE: '0',
        PEBBLE_VA_ALWAYS_VALID: '0',
        ...options.env,
      });
      await waitForDirectory(pebbleChild);
    };

    await start();

    const pebble: Pebble = {
      directoryUrl,
      caPem,
      caFile: certFile,
      logs: () => output,
      orderCount: () => output.split('\n').filter((line) => /POST \/order-plz/.test(line)).length,
      async issuingRoot() {
        const response = await request(`https://127.0.0.1:${managementPort}/roots/0`, { dispatcher });
        const text = await response.body.text();
        if (response.statusCode !== 200) throw new Error(`GET /roots/0 answered ${response.statusCode}: ${text}`);
        return text;
      },
      async stop() {
        if (pebbleChild) await kill(pebbleChild);
      },
      start,
      async close() {
        if (closed) return;
        closed = true;
        await Promise.all([...children].map(kill));
        await dispatcher.close().catch(() => {});
        await rm(folder, { recursive: true, force: true });
      },
    };
    return pebble;
  } catch (error) {
    await Promise.all([...children].map(kill));
    await rm(folder, { recursive: true, force: true });
    throw error;
  }
}
