#!/usr/bin/env node
/**
 * The `gatehouse` command.
 *
 * ```
 * gatehouse [run] [--config FILE]            default FILE: config/gatehouse.yaml, else the embedded default
 * gatehouse validate --config FILE           exit 0, or print file:line errors and exit 1
 * gatehouse --from HOST[:PORT] --to URL [--to URL ...] [--internal-certs]
 * gatehouse --version | --help
 * ```
 * Signals: SIGTERM/SIGINT drain and exit 0; SIGHUP reloads the config file; SIGUSR1 reopens the
 * access log file (logrotate).
 */
import { existsSync, readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import type { GatehouseConfig } from './config/schema.js';
import type { Gatehouse } from './gatehouse.js';
import { tuneHeapGrowth } from './heap.js';
import { reexecWithMallocTuning } from './malloc.js';

const USAGE = `Usage:
  gatehouse [run] [--config FILE]      run the edge server (default FILE: config/gatehouse.yaml,
                                       else the embedded default: https://localhost:8443 → 127.0.0.1:3000)
  gatehouse validate --config FILE     check a config file; print file:line errors
  gatehouse --from HOST[:PORT] --to URL [--to URL ...] [--internal-certs]
                                       quick mode: one site, no config file (like caddy reverse-proxy)
  gatehouse --version | --help

Signals: SIGTERM/SIGINT finish in-flight requests and exit 0; SIGHUP reloads the config file;
SIGUSR1 reopens the access log file (log.access_file) after logrotate moved it.`;

/** Default config file, relative to the working directory (as DESIGN.md gives it). */
const DEFAULT_CONFIG_FILE = 'config/gatehouse.yaml';

async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        config: { type: 'string', short: 'c' },
        from: { type: 'string' },
        to: { type: 'string', multiple: true },
        'internal-certs': { type: 'boolean' },
        version: { type: 'boolean', short: 'v' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (error) {
    process.stderr.write(`gatehouse: ${(error as Error).message}\n\n${USAGE}\n`);
    return 2;
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  if (values.version) {
    process.stdout.write(`gatehouse ${packageVersion()}\n`);
    return 0;
  }
  const command = positionals[0] ?? 'run';
  if (positionals.length > 1 || (command !== 'run' && command !== 'validate')) {
    process.stderr.write(`gatehouse: unknown command "${positionals.join(' ')}"\n\n${USAGE}\n`);
    return 2;
  }

  if (command === 'validate') {
    const { loadConfigFile } = await import('./config/load.js');
    const file = values.config ?? DEFAULT_CONFIG_FILE;
    try {
      const config = await loadConfigFile(file);
      process.stdout.write(`${file}: valid (${config.sites.length} site${config.sites.length === 1 ? '' : 's'})\n`);
      return 0;
    } catch (error) {
      process.stderr.write(`${(error as Error).message}\n`);
      return 1;
    }
  }

  // Serving: start again in place with glibc's heap trimming tuned (src/malloc.ts), before the
  // modules below load (a third of a second that would otherwise be paid twice).
  try {
    reexecWithMallocTuning();
  } catch (error) {
    process.stderr.write(`gatehouse: could not restart with GLIBC_TUNABLES, going on without: ${(error as Error).message}\n`);
  }
  // A fixed old-generation growing factor: V8's slow growth after its memory reducer ran can keep
  // a busy proxy in back-to-back mark-compacts (src/heap.ts).
  tuneHeapGrowth();
  const { ConfigError, EMBEDDED_DEFAULT_PATH, loadConfigFile } = await import('./config/load.js');
  const { quickConfig } = await import('./config/quick.js');
  const { Gatehouse } = await import('./gatehouse.js');
  const { createLogger, flushLogger } = await import('./observability/log.js');
  const { isWorker, runPrimary, shareAcmeChallenges, workerCount } = await import('./workers.js');
  // A worker answers the primary's metrics requests from its first moment (empty until it serves).
  if (isWorker()) (await import('./observability/cluster-metrics.js')).shareWorkerMetrics();

  let config: GatehouseConfig;
  let configFile: string | undefined;
  try {
    if (values.from !== undefined || values.to !== undefined) {
      if (values.config) throw new Error('--from/--to and --config cannot be combined');
      config = quickConfig({ from: values.from, to: values.to ?? [], internalCerts: values['internal-certs'] ?? false });
    } else {
      configFile = values.config ?? (existsSync(DEFAULT_CONFIG_FILE) ? DEFAULT_CONFIG_FILE : EMBEDDED_DEFAULT_PATH);
      // The parsed-config cache in tls.storage: a restart with an unchanged file skips the YAML parse.
      config = await loadConfigFile(configFile, { cache: true });
    }
  } catch (error) {
    process.stderr.write(`${error instanceof ConfigError ? error.message : `gatehouse: ${(error as Error).message}`}\n`);
    return 1;
  }

  const logger = createLogger({ level: config.log.level, format: config.log.format });
  const workers = workerCount(config.workers);
  if (workers > 1 && !isWorker()) return await runPrimary(workers, config.grace_period, logger);
  let gatehouse: Gatehouse;
  try {
    gatehouse = await Gatehouse.start(config, logger);
  } catch (error) {
    logger.fatal({ err: error }, 'cannot start');
    flushLogger(logger);
    process.stderr.write(`gatehouse: cannot start: ${(error as Error).message}\n`);
    return 1;
  }
  if (isWorker() && gatehouse.acme !== undefined) shareAcmeChallenges(gatehouse.acme);

  return await new Promise<number>((resolveExit) => {
    let stopping = false;
    const stop = (signal: string) => {
      if (stopping) return;
      stopping = true;
      logger.info({ signal }, 'stopping: finishing in-flight requests');
      gatehouse.stop().then(
        () => { logger.info('stopped'); flushLogger(logger); resolveExit(0); },
        (error: unknown) => { logger.error({ err: error }, 'stop failed'); flushLogger(logger); resolveExit(1); },
      );
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));
    process.on('SIGHUP', () => {
      if (stopping) return;
      void gatehouse.reloadFromFile('SIGHUP');
    });
    // Node starts its inspector on SIGUSR1 unless a listener is installed: here it reopens the access log.
    process.on('SIGUSR1', () => gatehouse.reopenLogs());
  });
}

function packageVersion(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

main(process.argv.slice(2)).then(
  // Exit explicitly: idle keep-alive sockets and timers must not keep a stopped server alive.
  (code) => process.exit(code),
  (error: unknown) => { process.stderr.write(`gatehouse: ${(error as Error).stack ?? String(error)}\n`); process.exit(1); },
);
