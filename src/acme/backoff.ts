/**
 * Per-name retry delays after failed orders, so a broken name (DNS not pointing here, CA down)
 * does not hammer the CA into rate-limiting every other name. Delays double from `baseMs` up to
 * `maxMs`, then stay at `maxMs`; a Retry-After from the CA (RFC 8555 §6.6) is a floor.
 */

/** Options of {@link Backoff}. */
export interface BackoffOptions {
  /** Delay after the first failure, ms. Default 60 000 (1 minute). */
  readonly baseMs?: number;
  /** Largest delay, ms. Default 21 600 000 (6 hours). */
  readonly maxMs?: number;
}

/** Failure state of one name. */
export interface BackoffState {
  /** Consecutive failures. */
  readonly failures: number;
  /** Earliest next attempt, ms since epoch. */
  readonly retryAt: number;
}

/** Failure states by name: exponential delay from `baseMs` to `maxMs`, Retry-After as a floor. */
export class Backoff {
  readonly baseMs: number;
  readonly maxMs: number;
  readonly #states = new Map<string, BackoffState>();

  constructor(options: BackoffOptions = {}) {
    this.baseMs = options.baseMs ?? 60_000;
    this.maxMs = options.maxMs ?? 6 * 3_600_000;
  }

  /**
   * Record a failure of `name`.
   * @param retryAfterMs the CA's Retry-After, when it sent one.
   * @returns the new state (delay = `retryAt - now`).
   */
  fail(name: string, retryAfterMs?: number, now = Date.now()): BackoffState {
    const failures = (this.#states.get(name)?.failures ?? 0) + 1;
    const exponential = Math.min(this.baseMs * 2 ** Math.min(failures - 1, 40), this.maxMs);
    const delay = Math.max(exponential, retryAfterMs ?? 0);
    const state = { failures, retryAt: now + delay };
    this.#states.set(name, state);
    return state;
  }

  /** Forget the failures of `name` (it succeeded). */
  succeed(name: string): void {
    this.#states.delete(name);
  }

  /** The failure state of `name`, undefined when it has not failed since its last success. */
  get(name: string): BackoffState | undefined {
    return this.#states.get(name);
  }
}
