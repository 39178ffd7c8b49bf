/**
 * `workers: auto | N`: one Gatehouse process per core behind the same listeners (node:cluster).
 *
 * The primary process binds nothing and serves nothing. It forks the workers (each runs the same
 * command line and serves the whole config), and:
 * - forwards SIGTERM/SIGINT to every worker (each drains for `grace_period`) and exits 0 once all
 *   have exited; SIGHUP (reload the config file) and SIGUSR1 (reopen the access log) to every worker;
 * - restarts a worker that died on its own, after a backoff that doubles from 250 ms to 30 s and
 *   starts again from 250 ms once a worker has lived 30 s;
 * - relays ACME challenges between workers (see below), and turns a worker's `POST /reload` into
 *   a SIGHUP to every other worker.
 *
 * Listeners: the workers' `listen()` calls share one socket per address. Linux and macOS use
 * `SCHED_NONE` here: every worker accepts on the shared socket itself, so a connection costs no
 * round trip through the primary (the default round-robin policy passes each accepted handle to a
 * worker over IPC, which halves the rate of new TLS connections). Windows keeps Node's default.
 *
 * Certificates and ACME: the storage folder (`tls.storage`) is shared. Every worker loads what is
 * stored and runs the ACME loop; that is safe and not redundant work: an order takes a lock file in
 * storage (`locks/...`), so one process orders a name while the others wait, read the new
 * certificate from storage and serve it (the loop re-reads storage before ordering). Each worker
 * renews at its own jittered time and finds, by then, the certificate another worker already
 * renewed: one order per name and renewal. The CA's validation request may reach any worker, so
 * a worker presenting an HTTP-01 or TLS-ALPN-01 challenge sends it through the primary to every
 * other worker, which answers it too, and the clean-up after validation goes the same way.
 */
import cluster, { type Worker } from 'node:cluster';
import { availableParallelism } from 'node:os';
import type { AcmeIssuer } from './acme/manager.js';
import { mallocTunables } from './malloc.js';
import { serveClusterMetrics } from './observability/cluster-metrics.js';

/** Environment variable carrying a worker's index (0 .. N-1) to the worker process. */
export const WORKER_INDEX_ENV = 'GATEHOUSE_WORKER_INDEX';

/** Shortest and longest wait before a dead worker is started again (ms). */
const RESTART_MIN_MS = 250;
const RESTART_MAX_MS = 30_000;
/** A worker that lived this long resets the backoff (ms). */
const STABLE_AFTER_MS = 30_000;

/** The number of processes `workers` asks for: `auto` = one per core. */
export function workerCount(setting: 'auto' | number): number {
  return setting === 'auto' ? Math.max(1, availableParallelism()) : setting;
}

/** True in a process forked by {@link runPrimary}. */
export function isWorker(): boolean {
  return cluster.isWorker;
}

/** What the primary reports (a pino logger fits). */
export interface PrimaryLogger {
  info(fields: object, message: string): void;
  warn(fields: object, message: string): void;
  error(fields: object, message: string): void;
}

/**
 * Run as the primary: fork `count` workers that run `process.argv` again, supervise them until
 * SIGTERM/SIGINT, then wait for every worker to drain and exit.
 * @param graceMs the config's `grace_period`: a worker still alive this long (+5 s) after SIGTERM is killed.
 * @returns the exit code (0 after a requested stop, 1 when no worker could start).
 */
export function runPrimary(count: number, graceMs: number, logger: PrimaryLogger): Promise<number> {
  if (process.platform !== 'win32') cluster.schedulingPolicy = cluster.SCHED_NONE;
  return new Promise<number>((resolveExit) => {
    const slots: (Worker | undefined)[] = new Array<Worker | undefined>(count).fill(undefined);
    const startedAt: number[] = new Array<number>(count).fill(0);
    const delay: number[] = new Array<number>(count).fill(RESTART_MIN_MS);
    const timers = new Set<NodeJS.Timeout>();
    let stopping = false;
    let everServed = false;

    const fork = (index: number): void => {
      // The heap tuning of src/malloc.ts: on Node 20, which cannot re-exec the primary in place,
      // this is how it reaches the processes that serve.
      const tunables = mallocTunables(process.env);
      const worker = cluster.fork(tunables === undefined
        ? { [WORKER_INDEX_ENV]: String(index) }
        : { GLIBC_TUNABLES: tunables, [WORKER_INDEX_ENV]: String(index) });
      slots[index] = worker;
      startedAt[index] = Date.now();
      worker.on('listening', () => {
        everServed = true;
      });
      worker.on('message', (message: unknown) => relay(worker, message));
      worker.on('exit', (code, signal) => {
        if (slots[index] === worker) slots[index] = undefined;
        if (stopping) {
          if (slots.every((w) => w === undefined)) finish(0);
          return;
        }
        const lived = Date.now() - startedAt[index]!;
        if (lived >= STABLE_AFTER_MS) delay[index] = RESTART_MIN_MS;
        const wait = delay[index]!;
        delay[index] = Math.min(RESTART_MAX_MS, wait * 2);
        logger.error({ worker: index, worker_pid: worker.process.pid, code, signal, restart_in_ms: wait }, 'worker exited; restarting it');
        const timer = setTimeout(() => {
          timers.delete(timer);
          if (!stopping) fork(index);
        }, wait);
        timers.add(timer);
        if (!everServed && slots.every((w) => w === undefined) && wait >= 4 * RESTART_MIN_MS) {
          // Not one worker ever listened and they keep dying: the config cannot start. Give up.
          stopping = true;
          logger.error({}, 'no worker could start; stopping');
          finish(1);
        }
      });
    };

    /**
     * A worker's message for the others: an ACME challenge goes to every other live worker; a
     * reload done through the admin API (`POST /reload`) becomes a SIGHUP to every other worker.
     */
    const relay = (from: Worker, message: unknown): void => {
      if (isReloadMessage(message)) {
        if (!stopping) for (const worker of slots) if (worker !== undefined && worker !== from) worker.process.kill('SIGHUP');
        return;
      }
      if (!isChallengeMessage(message)) return;
      for (const worker of slots) if (worker !== undefined && worker !== from && worker.isConnected()) worker.send(message);
    };

    const finish = (code: number): void => {
      for (const timer of timers) clearTimeout(timer);
      timers.clear();
      process.off('SIGTERM', onStop);
      process.off('SIGINT', onStop);
      process.off('SIGHUP', onHup);
      process.off('SIGUSR1', onUsr1);
      for (const worker of slots) if (worker !== undefined) worker.process.kill('SIGKILL');
      resolveExit(code);
    };

    const signalAll = (signal: NodeJS.Signals): void => {
      for (const worker of slots) if (worker !== undefined) worker.process.kill(signal);
    };
    const onStop = (signal: NodeJS.Signals): void => {
      if (stopping) return;
      stopping = true;
      for (const timer of timers) clearTimeout(timer);
      timers.clear();
      logger.info({ signal, workers: slots.filter((w) => w !== undefined).length }, 'stopping: every worker finishes its in-flight requests');
      if (slots.every((w) => w === undefined)) {
        finish(0);
        return;
      }
      signalAll('SIGTERM');
      // A worker stuck past its grace period is killed; the primary exits 0 anyway (a stop was asked).
      setTimeout(() => finish(0), graceMs + 5_000).unref();
    };
    const onHup = (): void => {
      if (!stopping) signalAll('SIGHUP');
    };
    const onUsr1 = (): void => signalAll('SIGUSR1');
    process.on('SIGTERM', onStop);
    process.on('SIGINT', onStop);
    process.on('SIGHUP', onHup);
    process.on('SIGUSR1', onUsr1);

    serveClusterMetrics();
    logger.info({ workers: count }, 'starting workers');
    for (let i = 0; i < count; i++) fork(i);
  });
}

// ---- reloads across workers ----

interface ReloadMessage {
  readonly gatehouse: 'reload-others';
}

function isReloadMessage(message: unknown): message is ReloadMessage {
  return typeof message === 'object' && message !== null && (message as ReloadMessage).gatehouse === 'reload-others';
}

/**
 * In a worker that reloaded its config through the admin API: has the primary send SIGHUP to every
 * other worker, so that all of them serve the new config (a signal to the primary, or the file
 * watch, already reaches every worker). No-op outside a worker.
 */
export function reloadOtherWorkers(): void {
  if (cluster.isWorker && process.send !== undefined && process.connected) process.send({ gatehouse: 'reload-others' } satisfies ReloadMessage);
}

// ---- ACME challenges across workers ----

interface ChallengeMessage {
  readonly gatehouse: 'acme-challenge';
  readonly type: 'http-01' | 'tls-alpn-01';
  readonly op: 'present' | 'cleanUp';
  /** http-01: the token; tls-alpn-01: the name. */
  readonly key: string;
  /** http-01 present: the key authorization. */
  readonly keyAuthorization?: string;
  /** tls-alpn-01 present: the authorization object (plain JSON from the CA) and key authorization. */
  readonly authz?: unknown;
}

function isChallengeMessage(message: unknown): message is ChallengeMessage {
  return typeof message === 'object' && message !== null && (message as ChallengeMessage).gatehouse === 'acme-challenge';
}

/**
 * In a worker: share this issuer's challenges with the other workers, and answer theirs. The
 * responders' `present`/`cleanUp` are wrapped so that a challenge presented here is also sent to
 * the primary, which hands it to every other worker. No-op outside a worker.
 */
export function shareAcmeChallenges(issuer: AcmeIssuer): void {
  if (!cluster.isWorker || process.send === undefined) return;
  const send = (message: ChallengeMessage): void => {
    if (process.connected) process.send!(message);
  };
  const http01 = issuer.http01;
  const tlsAlpn = issuer.tlsAlpn;
  const http01Present = http01.present.bind(http01);
  const http01CleanUp = http01.cleanUp.bind(http01);
  const tlsAlpnPresent = tlsAlpn.present.bind(tlsAlpn);
  const tlsAlpnCleanUp = tlsAlpn.cleanUp.bind(tlsAlpn);
  http01.present = (token, keyAuthorization) => {
    http01Present(token, keyAuthorization);
    send({ gatehouse: 'acme-challenge', type: 'http-01', op: 'present', key: token, keyAuthorization });
  };
  http01.cleanUp = (token) => {
    http01CleanUp(token);
    send({ gatehouse: 'acme-challenge', type: 'http-01', op: 'cleanUp', key: token });
  };
  tlsAlpn.present = async (authz, keyAuthorization) => {
    await tlsAlpnPresent(authz, keyAuthorization);
    send({ gatehouse: 'acme-challenge', type: 'tls-alpn-01', op: 'present', key: authz.identifier.value, keyAuthorization, authz });
  };
  tlsAlpn.cleanUp = (name) => {
    tlsAlpnCleanUp(name);
    send({ gatehouse: 'acme-challenge', type: 'tls-alpn-01', op: 'cleanUp', key: name });
  };
  process.on('message', (message: unknown) => {
    if (!isChallengeMessage(message)) return;
    if (message.type === 'http-01') {
      if (message.op === 'present') http01Present(message.key, message.keyAuthorization ?? '');
      else http01CleanUp(message.key);
    } else if (message.op === 'present') {
      tlsAlpnPresent(message.authz as Parameters<typeof tlsAlpnPresent>[0], message.keyAuthorization ?? '').catch(() => undefined);
    } else {
      tlsAlpnCleanUp(message.key);
    }
  });
}
