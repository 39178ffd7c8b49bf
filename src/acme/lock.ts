/**
 * A lock in storage, so that processes sharing a storage folder never order a certificate for the
 * same name at the same time (CertMagic's storage lock). The holder creates the lock key
 * exclusively ({@link Storage.storeExclusive}) with `{ pid, hostname, token, created, updated }`
 * and rewrites `updated` every `staleAfterMs / 4` while it works. A waiter polls; it breaks a
 * lock that is stale (`updated` older than `staleAfterMs`) or whose pid is dead on this host.
 *
 * Within one process, holders of the same key on the same storage also queue in memory, so a
 * storage without `storeExclusive` still serialises work inside the process.
 *
 * Known limit (as in CertMagic): two waiters that judge the same lock stale at the same instant
 * may both break it; the window is the time between two reads of a small file.
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import type { Storage } from '../tls/storage.js';
import { AcmeError } from './errors.js';

/** Options of {@link acquireLock}. */
export interface LockOptions {
  /** A lock not refreshed for this long is broken, ms. Default 120 000 (2 minutes). */
  readonly staleAfterMs?: number;
  /** Delay between two attempts while waiting, ms. Default 1000. */
  readonly pollIntervalMs?: number;
  /** Give up waiting after this long, ms. Default 600 000 (10 minutes). */
  readonly timeoutMs?: number;
  /** Called once when the lock is found taken (for a log line). */
  readonly onWait?: (holder: LockHolder | undefined) => void;
}

/** What a lock file says about its holder. */
export interface LockHolder {
  readonly pid: number;
  readonly hostname: string;
  readonly token: string;
  /** ms since epoch */
  readonly created: number;
  /** ms since epoch of the last refresh */
  readonly updated: number;
}

/** A held lock. */
export interface Lock {
  /** Stop refreshing and remove the lock file if it is still ours. Never throws. */
  release(): Promise<void>;
}

const inProcess = new WeakMap<Storage, Map<string, Promise<void>>>();

/**
 * Take the lock `key` in `storage`, waiting while another holder has it.
 * @throws {AcmeError} `GH_ACME_LOCK_TIMEOUT` after `timeoutMs` of waiting; storage errors as thrown.
 */
export async function acquireLock(storage: Storage, key: string, options: LockOptions = {}): Promise<Lock> {
  const timeoutMs = options.timeoutMs ?? 600_000;
  const deadline = Date.now() + timeoutMs;

  // In-process queue first: at most one holder per (storage, key) in this process.
  let queue = inProcess.get(storage);
  if (!queue) inProcess.set(storage, (queue = new Map()));
  let releaseLocal!: () => void;
  const mine = new Promise<void>((resolve) => { releaseLocal = resolve; });
  const previous = queue.get(key);
  const chained = (previous ?? Promise.resolve()).then(() => mine);
  queue.set(key, chained);
  const dropLocal = (): void => {
    releaseLocal();
    if (queue.get(key) === chained) queue.delete(key);
  };
  if (previous) {
    options.onWait?.(undefined);
    const timedOut = await Promise.race([
      previous.then(() => false),
      new Promise<boolean>((resolve) => setTimeout(() => resolve(true), timeoutMs).unref()),
    ]);
    if (timedOut) {
      dropLocal();
      throw new AcmeError('GH_ACME_LOCK_TIMEOUT', `waited ${timeoutMs} ms for the lock ${key} held in this process`);
    }
  }

  if (!storage.storeExclusive) {
    return { release: async () => dropLocal() };
  }
  try {
    const fileLock = await acquireFileLock(storage, key, deadline, options);
    return {
      release: async () => {
        await fileLock.release();
        dropLocal();
      },
    };
  } catch (error) {
    dropLocal();
    throw error;
  }
}

async function acquireFileLock(storage: Storage, key: string, deadline: number, options: LockOptions): Promise<Lock> {
  const staleAfterMs = options.staleAfterMs ?? 120_000;
  const pollIntervalMs = options.pollIntervalMs ?? 1000;
  const token = randomBytes(8).toString('hex');
  const host = hostname();
  const created = Date.now();
  const content = (updated: number): string => JSON.stringify({ pid: process.pid, hostname: host, token, created, updated } satisfies LockHolder);
  let waited = false;

  for (;;) {
    if (await storage.storeExclusive!(key, content(Date.now()))) break;
    const raw = await storage.load(key);
    const holder = parseHolder(raw);
    if (raw !== undefined && isStale(holder, staleAfterMs)) {
      // Re-read just before deleting: break only the lock judged stale, not a fresh one.
      const again = await storage.load(key);
      if (again !== undefined && again.equals(raw)) await storage.delete(key);
      continue;
    }
    if (!waited) {
      waited = true;
      options.onWait?.(holder);
    }
    if (Date.now() >= deadline) {
      throw new AcmeError('GH_ACME_LOCK_TIMEOUT', `the lock ${key} is held by pid ${holder?.pid ?? '?'} on ${holder?.hostname ?? '?'}; gave up waiting`);
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(pollIntervalMs, Math.max(0, deadline - Date.now()))));
  }

  let released = false;
  const refresh = setInterval(() => {
    void (async () => {
      const current = parseHolder(await storage.load(key).catch(() => undefined));
      if (released || current?.token !== token) return;
      await storage.store(key, content(Date.now())).catch(() => {});
    })();
  }, Math.max(10, Math.floor(staleAfterMs / 4)));
  refresh.unref();

  return {
    async release() {
      if (released) return;
      released = true;
      clearInterval(refresh);
      try {
        const current = parseHolder(await storage.load(key));
        if (current?.token === token) await storage.delete(key);
      } catch {
        // a lock left behind goes stale and is broken by the next waiter
      }
    },
  };
}

function parseHolder(raw: Buffer | undefined): LockHolder | undefined {
  if (!raw) return undefined;
  try {
    const value = JSON.parse(raw.toString('utf8')) as Partial<LockHolder>;
    if (typeof value.pid === 'number' && typeof value.updated === 'number' && typeof value.token === 'string') return value as LockHolder;
  } catch {
    // a torn or foreign file: treated as stale below when old enough
  }
  return undefined;
}

/** Stale: unreadable, not refreshed within `staleAfterMs`, or held by a dead pid on this host. */
function isStale(holder: LockHolder | undefined, staleAfterMs: number): boolean {
  if (!holder) return true;
  if (Date.now() - holder.updated > staleAfterMs) return true;
  if (holder.hostname === hostname() && holder.pid !== process.pid) {
    try {
      process.kill(holder.pid, 0);
    } catch (error) {
      return (error as NodeJS.ErrnoException).code === 'ESRCH';
    }
  }
  return false;
}
