/**
 * Start Gatehouse for a test: in this process (`startGatehouse`, fast, returns the object) or as the
 * real CLI in a child process (`spawnGatehouse`, for signals, exit codes and FD counts). Both write
 * the config to a fresh temp dir (its `certs/` is the storage) and listen on port 0.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import pino from 'pino';
import { loadConfigFile } from '../../src/config/load.ts';
import { Gatehouse } from '../../src/gatehouse.ts';

export const CLI = fileURLToPath(new URL('../../dist/cli.js', import.meta.url));

/** A Gatehouse in this process; `logs` collects its JSON log lines. */
export interface TestGatehouse {
  readonly gatehouse: Gatehouse;
  readonly dir: string;
  readonly httpPort: number;
  readonly httpsPort: number;
  readonly logs: Record<string, unknown>[];
  stop(): Promise<void>;
}

/**
 * Start Gatehouse in-process. `config` is YAML; it may use `{{dir}}` for the temp dir. Listen
 * addresses default to 127.0.0.1:0 for both listeners when the YAML has no `listen` section.
 */
export async function startGatehouse(config: string, files: Record<string, string> = {}): Promise<TestGatehouse> {
  const dir = await mkdtemp(join(tmpdir(), 'gh-test-'));
  for (const [name, content] of Object.entries(files)) await writeFile(join(dir, name), content);
  const text = (/^listen:/m.test(config) ? config : `listen: { http: "127.0.0.1:0", https: "127.0.0.1:0" }\n${config}`).replaceAll('{{dir}}', dir);
  const file = join(dir, 'gatehouse.yaml');
  await writeFile(file, text);
  const logs: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      for (const line of chunk.toString('utf8').split('\n')) if (line) logs.push(JSON.parse(line) as Record<string, unknown>);
      callback();
    },
  });
  const logger = pino({ level: 'debug' }, sink);
  let gatehouse: Gatehouse;
  try {
    gatehouse = await Gatehouse.start(await loadConfigFile(file), logger);
  } catch (error) {
    await rm(dir, { recursive: true, force: true });
    throw error;
  }
  return {
    gatehouse, dir, logs,
    httpPort: gatehouse.addresses.http?.port ?? 0,
    httpsPort: gatehouse.addresses.https?.port ?? 0,
    async stop() {
      await gatehouse.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** The CLI in a child process. */
export interface SpawnedGatehouse {
  readonly child: ChildProcess;
  readonly dir: string;
  readonly httpPort: number;
  readonly httpsPort: number;
  /** stdout lines parsed as JSON so far (non-JSON lines are kept as `{ text }`). */
  readonly logs: Record<string, unknown>[];
  readonly stderr: () => string;
  /** Resolves with the exit code. */
  readonly exited: Promise<number | null>;
  /** SIGKILL if still running, remove the temp dir. */
  kill(): Promise<void>;
}

/**
 * Run `node dist/cli.js ...args` (built by `npm test` before the tests) and wait for its "serving"
 * line. `{{config}}` in args is replaced by the path of `config` written to the temp dir.
 */
export async function spawnGatehouse(args: string[], config?: string, options: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<SpawnedGatehouse> {
  const dir = await mkdtemp(join(tmpdir(), 'gh-cli-'));
  const file = join(dir, 'gatehouse.yaml');
  if (config !== undefined) await writeFile(file, config.replaceAll('{{dir}}', dir));
  const child = spawn(process.execPath, [CLI, ...args.map((a) => a.replaceAll('{{config}}', file))], {
    cwd: dir, stdio: ['ignore', 'pipe', 'pipe'], env: options.env ?? process.env,
  });
  const logs: Record<string, unknown>[] = [];
  let stderr = '';
  let buffered = '';
  let serving: (line: Record<string, unknown>) => void = () => {};
  const servingLine = new Promise<Record<string, unknown>>((resolve) => { serving = resolve; });
  child.stdout!.on('data', (chunk: Buffer) => {
    buffered += chunk.toString('utf8');
    let newline;
    while ((newline = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      let parsed: Record<string, unknown>;
      try { parsed = JSON.parse(line) as Record<string, unknown>; } catch { parsed = { text: line }; }
      logs.push(parsed);
      if (parsed.msg === 'serving') serving(parsed);
    }
  });
  child.stderr!.on('data', (chunk: Buffer) => { stderr += chunk.toString('utf8'); });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const kill = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await exited;
    }
    await rm(dir, { recursive: true, force: true });
  };
  const timeout = options.timeoutMs ?? 20_000;
  const line = await Promise.race([
    servingLine,
    exited.then((code) => { throw new Error(`gatehouse exited with ${code} before serving: ${stderr}`); }),
    new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`gatehouse did not serve within ${timeout} ms: ${stderr}`)), timeout).unref()),
  ]).catch(async (error: unknown) => { await kill(); throw error; });
  return {
    child, dir, logs, exited, kill,
    stderr: () => stderr,
    httpPort: Number(line.http ?? 0),
    httpsPort: Number(line.https ?? 0),
  };
}
