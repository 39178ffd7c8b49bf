/** What tests need to know of other processes: their environment, read from /proc (Linux). */
import { readFileSync } from 'node:fs';

/** The environment process `pid` started with (its /proc/PID/environ). @throws when it cannot be read. */
export function environOf(pid: number): Record<string, string> {
  const env: Record<string, string> = {};
  for (const entry of readFileSync(`/proc/${pid}/environ`, 'latin1').split('\0')) {
    const equals = entry.indexOf('=');
    if (equals > 0) env[entry.slice(0, equals)] = entry.slice(equals + 1);
  }
  return env;
}

/**
 * True where Gatehouse tunes glibc's heap (src/malloc.ts) and a test can see it: Linux with glibc,
 * and this test process not started with a `GLIBC_TUNABLES` of its own (which would change what
 * the children get).
 */
export const TUNABLES_APPLY = process.platform === 'linux'
  && typeof (process.report.getReport() as { header?: { glibcVersionRuntime?: string } }).header?.glibcVersionRuntime === 'string'
  && process.env.GLIBC_TUNABLES === undefined;
