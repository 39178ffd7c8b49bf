/**
 * Passive health checks and circuit breaking, per upstream (route `passive_health`; Caddy
 * `passive_health_checks` + `fail_duration`/`max_fails`, nginx `max_fails`/`fail_timeout`).
 *
 * States:
 * - `closed`: traffic flows. Each failure is timestamped; `max_fails` failures within the sliding
 *   `window` open the breaker. Successes do not erase failures: they age out of the window.
 * - `open`: the upstream is out of rotation for `cooldown`.
 * - `half-open`: after the cooldown, exactly one trial request is let through
 *   ({@link CircuitBreaker.tryAcquire} returns true once). Its success closes the breaker, its
 *   failure re-opens it for another cooldown.
 *
 * No timers: the state is computed lazily from an injectable {@link Clock} whenever it is read.
 *
 * Availability. The selector reads the plain boolean `upstream.available`, which must be
 * "active health check healthy AND breaker not blocking". When an upstream has a breaker, the
 * breaker is the only writer of `available`: the health checker reports its verdict with
 * {@link CircuitBreaker.setActiveHealthy} and the breaker writes
 * `available = activeHealthy && (closed || (half-open && no trial in flight))` on every change.
 * The one change no call announces — a cooldown running out — is picked up by
 * {@link BreakerGroup.refresh}, which the proxy calls before each `select` (O(n) comparisons of
 * numbers, no allocation).
 */
import type { PassiveHealthConfig } from '../config/schema.js';
import { monotonicClock, type Clock } from './clock.js';
import { errorCode, isConnectFailure, isConnectionReset } from './retry.js';

/** Breaker states, as in the circuit-breaker pattern (Nygard, "Release It!"). */
export type BreakerState = 'closed' | 'open' | 'half-open';

/**
 * Why an attempt failed: `connect` (refused, unreachable, connect timeout), `reset` (connection
 * died), `timeout` (no response head in time), `status` (5xx with `fail_on_5xx`), `latency`
 * (slower than `max_latency`), `other` (any other upstream-side error).
 */
export type FailureKind = 'connect' | 'reset' | 'timeout' | 'status' | 'latency' | 'other';

/** What the breaker writes: `upstream/pool.ts`'s `Upstream` satisfies it. */
export interface BreakerTarget {
  available: boolean;
}

/** The route's `passive_health` (all durations in ms). */
export type BreakerConfig = Pick<PassiveHealthConfig, 'max_fails' | 'window' | 'cooldown' | 'fail_on_5xx' | 'max_latency'>;

/** Options of `new CircuitBreaker()`. */
export interface BreakerOptions {
  /** Time source. Default {@link monotonicClock}. */
  readonly clock?: Clock;
  /** Upstream whose `available` flag the breaker keeps in sync; none when absent. */
  readonly target?: BreakerTarget;
  /** Called on every state change with the new state and a human-readable reason (for logs). */
  readonly onChange?: (state: BreakerState, reason: string) => void;
}

/** One upstream's circuit breaker. See the file comment for the state machine. */
export class CircuitBreaker {
  private current: BreakerState = 'closed';
  /** Ring buffer of the last `max_fails` failure times (ms). */
  private readonly failureTimes: Float64Array;
  private failureCount = 0;
  private failureNext = 0;
  /** While open: when the cooldown ends (ms). */
  private openUntil = 0;
  /** While half-open: when the trial request was let through (ms), or -1 when none is in flight. */
  private trialSince = -1;
  private activeHealthy = true;
  private readonly clock: Clock;
  private readonly target: BreakerTarget | undefined;
  private readonly onChange: ((state: BreakerState, reason: string) => void) | undefined;

  /**
   * @param config `max_fails` (>= 1), `window` ms, `cooldown` ms, `fail_on_5xx`, `max_latency` ms.
   * @param options clock, target, onChange.
   */
  constructor(readonly config: BreakerConfig, options: BreakerOptions = {}) {
    this.failureTimes = new Float64Array(Math.max(1, config.max_fails));
    this.clock = options.clock ?? monotonicClock;
    this.target = options.target;
    this.onChange = options.onChange;
    this.sync();
  }

  /** The state now (an open breaker whose cooldown has passed reads as `half-open`). */
  state(): BreakerState {
    this.refresh(this.clock.now());
    return this.current;
  }

  /**
   * Ask to send a request through. Call once per attempt, after the selector chose this upstream.
   * @returns true when closed; true exactly once when half-open (the trial request); false when
   *   open or while the trial is in flight — select another upstream (add this one to `exclude`).
   */
  tryAcquire(): boolean {
    const now = this.clock.now();
    this.refresh(now);
    if (this.current === 'closed') return true;
    if (this.current === 'open' || this.trialSince >= 0) return false;
    this.trialSince = now;
    this.sync();
    return true;
  }

  /**
   * Give back an acquired trial whose request was never sent or never finished for reasons not
   * the upstream's (the client went away). No-op unless a trial is in flight.
   */
  release(): void {
    if (this.current === 'half-open' && this.trialSince >= 0) {
      this.trialSince = -1;
      this.sync();
    }
  }

  /**
   * Report a successful attempt. A response slower than `max_latency` counts as a failure.
   * Half-open: closes the breaker. Open: ignored (a late answer to a request sent before opening).
   * @param latencyMs time from sending the request to the response head (ms).
   */
  recordSuccess(latencyMs: number): void {
    const maxLatency = this.config.max_latency;
    if (maxLatency !== undefined && latencyMs > maxLatency) {
      this.recordFailure('latency');
      return;
    }
    this.refresh(this.clock.now());
    if (this.current === 'half-open') {
      this.failureCount = 0;
      this.failureNext = 0;
      this.transition('closed', 'trial request succeeded');
    }
  }

  /**
   * Report a failed attempt. Closed: counts it, opening the breaker at `max_fails` within
   * `window`. Half-open: re-opens for another cooldown. Open: ignored.
   */
  recordFailure(kind: FailureKind): void {
    const now = this.clock.now();
    this.refresh(now);
    if (this.current === 'open') return;
    if (this.current === 'half-open') {
      this.open(now, `trial request failed (${kind})`);
      return;
    }
    const ring = this.failureTimes;
    ring[this.failureNext] = now;
    this.failureNext = (this.failureNext + 1) % ring.length;
    if (this.failureCount < ring.length) this.failureCount++;
    // Ring full: failureNext now points at the oldest of the last max_fails failures.
    if (this.failureCount === ring.length && now - ring[this.failureNext]! <= this.config.window) {
      this.open(now, `${ring.length} failures within ${this.config.window}ms (last: ${kind})`);
    }
  }

  /**
   * Report a response: a failure when `fail_on_5xx` and the status is 5xx, else a success
   * (subject to `max_latency`).
   * @param status the upstream's response status.
   * @param latencyMs time to the response head (ms).
   */
  recordResponse(status: number, latencyMs: number): void {
    if (this.config.fail_on_5xx && status >= 500) this.recordFailure('status');
    else this.recordSuccess(latencyMs);
  }

  /**
   * How long until this upstream may be tried again (ms), for a 503's `Retry-After` (round up to
   * seconds). 0 when closed or half-open without a trial; the rest of the cooldown when open; the
   * time the in-flight trial may still take (bounded by `cooldown`) otherwise.
   */
  retryAfterMs(): number {
    const now = this.clock.now();
    this.refresh(now);
    if (this.current === 'open') return Math.max(0, this.openUntil - now);
    if (this.current === 'half-open' && this.trialSince >= 0) return Math.max(0, this.trialSince + this.config.cooldown - now);
    return 0;
  }

  /** Failures counted in the current window (for status pages and metrics). */
  failures(): number {
    const now = this.clock.now();
    let count = 0;
    for (let i = 0; i < this.failureCount; i++) {
      if (now - this.failureTimes[i]! <= this.config.window) count++;
    }
    return count;
  }

  /** True when the breaker lets the selector choose this upstream (ignores active health). */
  allowsTraffic(): boolean {
    this.refresh(this.clock.now());
    return this.current === 'closed' || (this.current === 'half-open' && this.trialSince < 0);
  }

  /**
   * The active health checker's verdict; `target.available` follows `healthy && allowsTraffic()`.
   * Called by `HealthChecker` when it is given this breaker.
   */
  setActiveHealthy(healthy: boolean): void {
    if (this.activeHealthy === healthy) return;
    this.activeHealthy = healthy;
    this.sync();
  }

  /**
   * Apply the changes time alone causes: an open breaker whose cooldown ended turns half-open; a
   * trial that took longer than `cooldown` is considered lost and another one is allowed.
   * @param now current time (ms) from the breaker's clock.
   */
  refresh(now: number): void {
    if (this.current === 'open') {
      if (now >= this.openUntil) this.transition('half-open', 'cooldown elapsed');
    } else if (this.current === 'half-open' && this.trialSince >= 0 && now - this.trialSince >= this.config.cooldown) {
      this.trialSince = -1;
      this.sync();
    }
  }

  private open(now: number, reason: string): void {
    this.openUntil = now + this.config.cooldown;
    this.transition('open', reason);
  }

  private transition(state: BreakerState, reason: string): void {
    this.current = state;
    this.trialSince = -1;
    this.sync();
    this.onChange?.(state, reason);
  }

  private sync(): void {
    const target = this.target;
    if (target === undefined) return;
    target.available = this.activeHealthy
      && (this.current === 'closed' || (this.current === 'half-open' && this.trialSince < 0));
  }
}

/**
 * The breakers of one route's upstreams, sharing one clock and config.
 * @typeParam U the upstream type (`Upstream` from `upstream/pool.ts`).
 */
export class BreakerGroup<U extends BreakerTarget & { readonly origin: string }> {
  private readonly byUpstream = new Map<U, CircuitBreaker>();
  private readonly list: CircuitBreaker[] = [];
  private readonly clock: Clock;

  /**
   * @param upstreams the route's upstreams; each gets a breaker that writes its `available`.
   * @param config the route's `passive_health`.
   * @param options clock (default monotonic); onChange(upstream, state, reason) for logs.
   */
  constructor(
    upstreams: readonly U[],
    config: BreakerConfig,
    options: { readonly clock?: Clock; readonly onChange?: (upstream: U, state: BreakerState, reason: string) => void } = {},
  ) {
    this.clock = options.clock ?? monotonicClock;
    const onChange = options.onChange;
    for (const upstream of upstreams) {
      const breaker = new CircuitBreaker(config, {
        clock: this.clock,
        target: upstream,
        onChange: onChange && ((state, reason) => onChange(upstream, state, reason)),
      });
      this.byUpstream.set(upstream, breaker);
      this.list.push(breaker);
    }
  }

  /** The breaker of `upstream`, or undefined when it is not one of this group's. */
  breakerOf(upstream: U): CircuitBreaker | undefined {
    return this.byUpstream.get(upstream);
  }

  /** Apply elapsed cooldowns to every breaker (see {@link CircuitBreaker.refresh}). Call before each `select`. */
  refresh(): void {
    const now = this.clock.now();
    const list = this.list;
    for (let i = 0; i < list.length; i++) list[i]!.refresh(now);
  }

  /**
   * When all upstreams are out, the shortest wait (ms) until an open breaker allows a trial, for
   * `Retry-After`; undefined when no breaker is open (the upstreams are out for active health).
   */
  retryAfterMs(): number | undefined {
    let shortest: number | undefined;
    for (const breaker of this.list) {
      if (breaker.allowsTraffic()) continue;
      const wait = breaker.retryAfterMs();
      if (shortest === undefined || wait < shortest) shortest = wait;
    }
    return shortest;
  }
}

/**
 * Classify an upstream error for {@link CircuitBreaker.recordFailure} by its code.
 * @returns the failure kind, or undefined when the error is not the upstream's fault (an aborted
 *   request: `GH_UPSTREAM_ABORTED`, `ABORT_ERR`; a request body that broke its framing or ended
 *   early; an invalid request target) and must not count against it.
 */
export function failureKind(error: unknown): FailureKind | undefined {
  const code = errorCode(error);
  if (code === undefined) return 'other';
  switch (code) {
    case 'GH_UPSTREAM_ABORTED': case 'ABORT_ERR': case 'GH_REQUEST_BODY_LENGTH': case 'GH_REQUEST_BODY_ABORTED':
    case 'GH_UPSTREAM_BAD_REQUEST':
      return undefined;
  }
  if (isConnectFailure(code)) return 'connect';
  if (isConnectionReset(code)) return 'reset';
  if (code === 'GH_UPSTREAM_HEADERS_TIMEOUT' || code === 'GH_UPSTREAM_BODY_TIMEOUT') return 'timeout';
  return 'other';
}
