/**
 * V8 heap growth tuning (src/heap.ts): the flag chosen, the operator's own kept, and this Node's
 * V8 knowing and accepting the flag (a renamed flag would only print an error and change nothing).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { describe, it } from 'node:test';
import { HEAP_GROWING_PERCENT, heapGrowingFlag } from '../src/heap.ts';

describe('V8 heap growth', () => {
  it('sets --heap-growing-percent=100 unless Node was started with the flag', () => {
    assert.equal(HEAP_GROWING_PERCENT, 100);
    assert.equal(heapGrowingFlag([]), '--heap-growing-percent=100');
    assert.equal(heapGrowingFlag(['--max-old-space-size=512', '--enable-source-maps']), '--heap-growing-percent=100');
    assert.equal(heapGrowingFlag(['--heap-growing-percent=50']), undefined);
    assert.equal(heapGrowingFlag(['--heap_growing_percent=50']), undefined);
  });

  it("this Node's V8 lists the flag and accepts it at run time", () => {
    const options = spawnSync(process.execPath, ['--v8-options'], { encoding: 'utf8' });
    assert.match(options.stdout, /^\s*--heap-growing-percent \(/m, 'V8 no longer has --heap-growing-percent');
    const run = spawnSync(process.execPath, [
      '--import', 'tsx', '--input-type=module', '-e',
      "const { tuneHeapGrowth } = await import('./src/heap.ts'); console.log(tuneHeapGrowth([]));",
    ], { encoding: 'utf8', cwd: new URL('..', import.meta.url).pathname });
    assert.equal(run.status, 0, run.stderr);
    assert.equal(run.stdout.trim(), 'true');
    assert.doesNotMatch(run.stderr, /unrecognized flag|unknown flag/i);
  });
});
