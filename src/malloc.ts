/**
 * glibc's heap trimming, tuned for a proxy's buffer churn.
 *
 * Every socket read Node makes allocates its buffer with `malloc` (64 KiB), and the garbage
 * collector frees those buffers in bulk. With glibc's default `M_TRIM_THRESHOLD` (128 KiB, raised
 * at most to 32 MiB by its dynamic mmap threshold), each bulk free hands the top of the heap back
 * to the kernel, and the next reads fault the same pages in again. Proxying 256 KiB bodies, one
 * core, 50 connections: 25 000–55 000 page faults a second and 2.5–3.1k req/s with the default;
 * with a 64 MiB threshold, ~800 a second and 3.2–4.1k req/s (see bench/README.md). Small answers
 * are not affected. The cost: up to that much freed heap stays mapped and is reused rather than
 * returned.
 *
 * glibc reads its tunables (`GLIBC_TUNABLES`, glibc ≥ 2.26) once, when the process starts, so
 * Gatehouse starts itself again with the setting: in place with `process.execve` (same pid, Node
 * ≥ 22.15 / 23.11), before any module beyond Node's own is loaded. Node 20 has no `execve`: there
 * the setting reaches only the workers (`workers` > 1, which the primary forks with it), and a
 * single process gets it from its environment (the Docker image and the systemd unit in the
 * README set it). A `glibc.malloc.trim_threshold` already present in `GLIBC_TUNABLES` is the
 * operator's choice and is kept; musl and other platforms ignore all of this.
 */

/** The heap trim threshold Gatehouse asks glibc for (bytes): 64 MiB. */
export const MALLOC_TRIM_THRESHOLD = 64 * 1024 * 1024;

const TUNABLE = 'glibc.malloc.trim_threshold';
/** Set in the environment of the process started again; removed by it at once. */
const REEXEC_MARK = 'GATEHOUSE_MALLOC_REEXEC';

/**
 * The `GLIBC_TUNABLES` value to serve with: `env`'s, with `glibc.malloc.trim_threshold` added
 * (other tunables kept); or undefined when nothing needs to change: not Linux with glibc, or the
 * operator already set a trim threshold.
 * @param env the environment to look at, e.g. `process.env`.
 */
export function mallocTunables(env: NodeJS.ProcessEnv): string | undefined {
  if (!runsOnGlibc()) return undefined;
  const current = env.GLIBC_TUNABLES ?? '';
  if (current.split(':').some((entry) => entry.startsWith(`${TUNABLE}=`))) return undefined;
  const entry = `${TUNABLE}=${MALLOC_TRIM_THRESHOLD}`;
  return current === '' ? entry : `${current}:${entry}`;
}

/**
 * Starts this process again, in place, with {@link mallocTunables} in its environment when that
 * changes it and Node has `process.execve`. Does not return then; returns when nothing is to be
 * done (or it cannot be done: Node 20, not glibc, already set). Call before anything opens a file,
 * a socket or a thread that must survive: `execve` replaces the process image.
 * @throws what `process.execve` throws (e.g. the Node binary is gone): the caller goes on untuned.
 */
export function reexecWithMallocTuning(): void {
  // Started again already: never twice, even if a glibc rewrote the variable (it may drop entries).
  if (process.env[REEXEC_MARK] !== undefined) {
    delete process.env[REEXEC_MARK];
    return;
  }
  const execve = (process as { execve?: (file: string, args: string[], env: NodeJS.ProcessEnv) => never }).execve;
  if (typeof execve !== 'function') return;
  const tunables = mallocTunables(process.env);
  if (tunables === undefined) return;
  const env = { ...process.env, GLIBC_TUNABLES: tunables, [REEXEC_MARK]: '1' };
  execve.call(process, process.execPath, [process.execPath, ...process.execArgv, ...process.argv.slice(1)], env);
}

let glibc: boolean | undefined;

/** True on Linux with glibc (the runtime `process.report` names), where the tunable applies. */
function runsOnGlibc(): boolean {
  if (glibc !== undefined) return glibc;
  if (process.platform !== 'linux') return (glibc = false);
  // `excludeNetwork` is Node ≥ 20.13's; older type definitions do not name it.
  const report = process.report as NodeJS.ProcessReport & { excludeNetwork: boolean };
  const excludeNetwork = report.excludeNetwork;
  try {
    report.excludeNetwork = true; // the header is all this needs: skip the socket listing
    const header = (report.getReport() as { header?: { glibcVersionRuntime?: string } }).header;
    glibc = typeof header?.glibcVersionRuntime === 'string';
  } catch {
    glibc = false;
  } finally {
    report.excludeNetwork = excludeNetwork;
  }
  return glibc;
}
