/**
 * A clock for time-driven state machines (circuit breakers, health-check bookkeeping).
 *
 * Production code uses {@link monotonicClock}; tests pass a {@link ManualClock} and move time by
 * hand, so a breaker's timeline is exact and a test never sleeps.
 */

/** A source of time in milliseconds. Only differences between two readings are meaningful. */
export interface Clock {
  /** Current time in milliseconds (fractional allowed). */
  now(): number;
}

/**
 * The process's monotonic clock (`performance.now()`): unaffected by wall-clock jumps (NTP, DST),
 * which matters for cooldowns and sliding windows.
 */
export const monotonicClock: Clock = { now: () => performance.now() };

/** A clock that only moves when told to. For tests. */
export class ManualClock implements Clock {
  /** @param time starting time in ms. Default 0. */
  constructor(private time = 0) {}

  now(): number {
    return this.time;
  }

  /** Move time forward by `ms` milliseconds (must be >= 0). */
  advance(ms: number): void {
    if (ms < 0) throw new RangeError(`a clock cannot go backwards (advance(${ms}))`);
    this.time += ms;
  }

  /** Set the time to `ms`; must not be earlier than the current time. */
  set(ms: number): void {
    if (ms < this.time) throw new RangeError(`a clock cannot go backwards (set(${ms}) < ${this.time})`);
    this.time = ms;
  }
}
