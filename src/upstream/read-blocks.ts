/**
 * Reusable read buffers for large upstream bodies, shared by every upstream connection of the
 * process.
 *
 * Why: a plain upstream socket reads a large body into memory that is handed on to the client
 * without a copy (`http1-pool.ts`, `readInto`). Allocating a buffer for every read (up to 256 KiB,
 * over a gigabyte a second at 5 000 responses of 256 KiB) makes V8 collect for the external memory
 * alone: a scavenge every ~30 MB of new `ArrayBuffer`s, and on Node 24 a full mark-compact instead.
 * A connection takes a block from here and reads into it read after read, each read handed on as
 * a chunk that views its part; the block comes back once the connection and every chunk have
 * released it (a chunk written to a client: from the write's callback, when the bytes are with the
 * kernel, and only when the write did not fail), so under a steady load the same few blocks go
 * round.
 *
 * Memory: a slow client's queue (at most `RESPONSE_BUFFER`, 256 KiB, before the upstream is
 * paused, `proxy/forward.ts`) holds chunks of consecutive reads, so it keeps its bytes plus the
 * unread rest of at most two blocks: under 768 KiB per slow connection.
 *
 * Safety rule: a block is reused only after its count of holders fell to zero; a holder that never
 * releases (a chunk kept by a stream whose write callback is not relied on, a write that never
 * completes) only keeps the block out of the free list, and the garbage collector frees it as it
 * freed every read buffer before. Releasing twice is the one misuse that would let a block be
 * overwritten while in use; each release function is called once by construction (a write
 * callback).
 */

/** Bytes of the largest block (a connection reads into it 32 KiB at a time, `http1-pool.ts`). */
export const READ_BLOCK_SIZE = 256 * 1024;

/** Bytes of the smallest block. */
export const MIN_READ_BLOCK_SIZE = 64 * 1024;

/**
 * Most free blocks kept per size (64, 128 and 256 KiB: 7 MiB in all); a block released when its
 * list is full is left to the GC.
 */
export const MAX_FREE_BLOCKS = 16;

/** One block and its count of holders. */
export class ReadBlock {
  readonly buffer: Buffer;
  /** Holders: the connection that reads into it, and each chunk handed on that views it. */
  private holders = 0;

  constructor(private readonly freeList: ReadBlock[], size: number) {
    this.buffer = Buffer.allocUnsafeSlow(size);
  }

  /**
   * Releases one hold; at zero the block returns to its free list. Bound once per block, so it is
   * passed as a write's callback as is: a write that failed (`error` given: the stream was
   * destroyed, and a native write may still read the chunk's memory) keeps its hold, and the block
   * is then left to the garbage collector.
   */
  readonly release = (error?: Error | null): void => {
    if (error != null) return;
    if (--this.holders !== 0) return;
    if (this.freeList.length < MAX_FREE_BLOCKS) this.freeList.push(this);
  };

  /** Adds a hold. @returns the function that releases it (call it once). */
  retain(): (error?: Error | null) => void {
    this.holders++;
    return this.release;
  }
}

/** Free blocks of 64, 128 and 256 KiB. */
const freeLists: ReadBlock[][] = [[], [], []];
/** A block was taken since the last {@link trimReadBlocks}. */
let takenSinceTrim = false;
/** Blocks allocated since the process started. */
let made = 0;

/**
 * A block for reads of up to `size` bytes, with one hold (the caller's, its connection): of the
 * smallest size of 64, 128 and 256 KiB that holds `size` (256 KiB for more), a free one when there
 * is, else new. Sizes keep a body shorter than 256 KiB from holding a block several times its size.
 */
export function takeReadBlock(size: number): ReadBlock {
  takenSinceTrim = true;
  const index = size <= MIN_READ_BLOCK_SIZE ? 0 : size <= 2 * MIN_READ_BLOCK_SIZE ? 1 : 2;
  const list = freeLists[index]!;
  let block = list.pop();
  if (block === undefined) {
    block = new ReadBlock(list, MIN_READ_BLOCK_SIZE << index);
    made++;
  }
  block.retain();
  return block;
}

/**
 * Drops the free blocks when none was taken since the last call, so a burst of large bodies does
 * not hold them for the life of the process. Called every 10 s by the upstream pool's timer, and
 * when the last upstream connection closes (`all` true).
 */
export function trimReadBlocks(all = false): void {
  if (all || !takenSinceTrim) for (const list of freeLists) list.length = 0;
  takenSinceTrim = false;
}

/** Blocks allocated since the process started, and free now (every size; for tests). */
export function readBlockStats(): { made: number; free: number } {
  return { made, free: freeLists[0]!.length + freeLists[1]!.length + freeLists[2]!.length };
}
