/**
 * V8's old-generation growth, fixed for a long-running proxy.
 *
 * After each full (mark-compact) collection V8 sets the old generation's next limit from its live
 * size and a growing factor it derives from its own speed measurements. After the memory reducer
 * has run (it collects when the process looks idle: about 8 s of low allocation), V8 grows the heap
 * slowly until a mark-compact finds 10 MB (or 10%) more committed memory than at the reducer's last
 * run. A proxy keeps little alive (~22 MB here) but allocates fast under load, with its young
 * generation at its full size; measured on Node 20 and 22, every mark-compact then started the next
 * marking at once, and one did not end that mode: a mark-compact every ~50 ms, and half the
 * throughput, for as long as the load lasted (bench/README.md, 2026-12-03, "the slowed process was
 * the garbage collector"). A fixed factor (`--heap-growing-percent`, read by V8 at every
 * mark-compact, in every growing mode) keeps the limit at twice the live size: 0–1 mark-compacts
 * in 5 s of 256 KiB bodies instead of 7–33, and none of those runs slid into that mode.
 *
 * The cost: up to twice the live old generation before a mark-compact (V8's own factor lets it
 * grow up to four times on a large machine). An operator who starts Node with their own
 * `--heap-growing-percent` keeps it.
 */
import v8 from 'node:v8';

/** How far the old generation grows over its live size before the next mark-compact (%): 100, twice. */
export const HEAP_GROWING_PERCENT = 100;

/**
 * The V8 flag to set, or undefined when the operator gave one to Node (`node
 * --heap-growing-percent=N`; V8 flags are not allowed in `NODE_OPTIONS`).
 * @param execArgv Node's own arguments, e.g. `process.execArgv`.
 */
export function heapGrowingFlag(execArgv: readonly string[]): string | undefined {
  if (execArgv.some((arg) => /^--heap[-_]growing[-_]percent(=|$)/.test(arg))) return undefined;
  return `--heap-growing-percent=${HEAP_GROWING_PERCENT}`;
}

/**
 * Sets {@link HEAP_GROWING_PERCENT} with `v8.setFlagsFromString`, unless the operator set it.
 * Called once by `gatehouse run` (and by each worker), before serving. Throws nothing: V8 prints
 * an error and changes nothing for a flag it does not know (`test/heap.test.ts` checks it knows it).
 * @param execArgv Node's own arguments; default `process.execArgv`.
 * @returns true when the flag was set here.
 */
export function tuneHeapGrowth(execArgv: readonly string[] = process.execArgv): boolean {
  const flag = heapGrowingFlag(execArgv);
  if (flag === undefined) return false;
  v8.setFlagsFromString(flag);
  return true;
}
