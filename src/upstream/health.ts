/**
 * Active health checks (route `health_check`; Caddy `health_uri`/`health_interval`/
 * `health_timeout`/`health_status`/`health_passes`/`health_fails`, nginx `health_check`).
 *
 * Every `interval` (±10% jitter, so checks of many upstreams and many Gatehouse instances do not
 * beat in step) each upstream gets `GET <origin><path>` on a dispatcher of its own — never the
 * traffic pool, so a check neither waits behind traffic nor hides a broken connect path behind a
 * reused socket (every check opens a fresh connection). A check passes when the status matches
 * `status` within `timeout`; anything else (another status, a connect error, a timeout) fails.
 *
 * Upstreams start healthy (as in Caddy and nginx) and flip only after `fails` consecutive failing
 * checks, or back after `passes` consecutive passing ones. Each flip is reported to `onChange` and
 * written to availability: through the upstream's circuit breaker when it has one
 * (`CircuitBreaker.setActiveHealthy`, so the breaker stays the single writer of `available`), else
 * directly to `upstream.available`.
 *
 * Checks of one upstream never overlap: the next one is scheduled when the previous one ends.
 * `stop()` clears every timer and aborts checks in flight; nothing is left to keep the process up.
 */
import { Agent, request, type Dispatcher } from 'undici';
import type { HealthCheckConfig } from '../config/schema.js';
import type { BreakerState, CircuitBreaker } from './breaker.js';
import { errorCode } from './retry.js';

/** What the checker needs of an upstream; `upstream/pool.ts`'s `Upstream` satisfies it. */
export interface HealthTarget {
  /** Origin, e.g. `http://127.0.0.1:8080`. The check URL is `origin + path`. */
  readonly origin: string;
  /** Written when no breaker is given for the upstream. */
  available: boolean;
  /** Reported in snapshots. */
  readonly inFlight: number;
}

/** One upstream's active-health bookkeeping. */
export interface HealthState {
  /** The active verdict (after thresholds). Starts true. */
  healthy: boolean;
  /** Consecutive passing checks (0 after a failure). */
  passes: number;
  /** Consecutive failing checks (0 after a pass). */
  fails: number;
  /** Wall-clock time (ms since the epoch) the last check finished; undefined before the first. */
  lastCheck: number | undefined;
  /** Why the last failing check failed (`status 500`, `timeout after 2000ms`, `ECONNREFUSED`); undefined if none failed yet. */
  lastError: string | undefined;
}

/** A point-in-time view of one upstream, for `/status` and metrics. */
export interface HealthSnapshot {
  readonly origin: string;
  /** Active health verdict. */
  readonly healthy: boolean;
  /** What the selector sees: active health AND circuit breaker. */
  readonly available: boolean;
  readonly inFlight: number;
  /** Consecutive failing active checks. */
  readonly failures: number;
  readonly lastCheck: number | undefined;
  readonly lastError: string | undefined;
  /** Circuit-breaker state, when the upstream has a breaker. */
  readonly breaker?: BreakerState;
  /** Passive failures in the breaker's window, when the upstream has a breaker. */
  readonly passiveFailures?: number;
}

/** The route's `health_check` (durations in ms). */
export type HealthCheckSettings = Pick<HealthCheckConfig, 'path' | 'interval' | 'timeout' | 'status' | 'passes' | 'fails'>;

/** Options of `new HealthChecker()`. */
export interface HealthCheckerOptions<U extends HealthTarget> {
  /** Called on every flip of `healthy`, with the reason of the check that caused it. */
  readonly onChange?: (upstream: U, state: Readonly<HealthState>, reason: string) => void;
  /** The upstream's circuit breaker, if any (e.g. `group.breakerOf.bind(group)`). */
  readonly breakerOf?: (upstream: U) => CircuitBreaker | undefined;
  /** Dispatcher for the checks. Default: a private undici `Agent`, destroyed by `stop()`. */
  readonly dispatcher?: Dispatcher;
  /** TLS options for `https://` upstreams when the default dispatcher is used. */
  readonly tls?: { readonly ca?: string | Buffer; readonly rejectUnauthorized?: boolean; readonly servername?: string };
  /** Random source in [0, 1) for jitter. Default `Math.random`. */
  readonly random?: () => number;
  /** Wall clock for `lastCheck` (ms since the epoch). Default `Date.now`. */
  readonly wallClock?: () => number;
}

interface Entry<U> {
  readonly upstream: U;
  readonly url: string;
  readonly state: HealthState;
  timer: NodeJS.Timeout | undefined;
  controller: AbortController | undefined;
  running: Promise<void> | undefined;
}

/** Active health checks of one route's upstreams. */
export class HealthChecker<U extends HealthTarget> {
  private readonly entries: Entry<U>[];
  private readonly statusMin: number;
  private readonly statusMax: number;
  private readonly dispatcher: Dispatcher;
  private readonly ownDispatcher: Agent | undefined;
  private readonly random: () => number;
  private readonly wallClock: () => number;
  private started = false;

  /**
   * @param upstreams the route's upstreams.
   * @param config `path`, `interval` ms, `timeout` ms, `status` (`"2xx"`, `"200"`, `"200-399"`),
   *   `passes`, `fails` — the schema's defaults are `/health`, 10 s, 2 s, `2xx`, 1, 1.
   * @param options onChange, breakerOf, dispatcher, tls, random, wallClock.
   * @throws RangeError when `status` is not a valid status range.
   */
  constructor(upstreams: readonly U[], readonly config: HealthCheckSettings, private readonly options: HealthCheckerOptions<U> = {}) {
    [this.statusMin, this.statusMax] = parseStatusRange(config.status);
    this.entries = upstreams.map((upstream) => ({
      upstream,
      url: new URL(config.path, upstream.origin).href,
      state: { healthy: true, passes: 0, fails: 0, lastCheck: undefined, lastError: undefined },
      timer: undefined,
      controller: undefined,
      running: undefined,
    }));
    this.ownDispatcher = options.dispatcher ? undefined : new Agent({ connect: { timeout: config.timeout, ...(options.tls ?? {}) } });
    this.dispatcher = options.dispatcher ?? this.ownDispatcher!;
    this.random = options.random ?? Math.random;
    this.wallClock = options.wallClock ?? Date.now;
  }

  /** Start checking: a first check of every upstream now, then one every `interval` ±10%. Idempotent. */
  start(): void {
    if (this.started) return;
    this.started = true;
    for (const entry of this.entries) this.run(entry);
  }

  /**
   * Stop: clear every timer, abort checks in flight, close the private dispatcher. Resolves once
   * the aborted checks have settled. The checker cannot be started again.
   */
  async stop(): Promise<void> {
    this.started = false;
    const pending: Promise<void>[] = [];
    for (const entry of this.entries) {
      if (entry.timer !== undefined) clearTimeout(entry.timer);
      entry.timer = undefined;
      entry.controller?.abort();
      if (entry.running) pending.push(entry.running);
    }
    await Promise.all(pending);
    await this.ownDispatcher?.destroy();
  }

  /** The bookkeeping of `upstream`, or undefined when it is not one of this checker's. */
  stateOf(upstream: U): Readonly<HealthState> | undefined {
    return this.entries.find((entry) => entry.upstream === upstream)?.state;
  }

  /** A copy of every upstream's state, in config order. */
  snapshot(): HealthSnapshot[] {
    return this.entries.map(({ upstream, state }) => {
      const breaker = this.options.breakerOf?.(upstream);
      return {
        origin: upstream.origin,
        healthy: state.healthy,
        available: upstream.available,
        inFlight: upstream.inFlight,
        failures: state.fails,
        lastCheck: state.lastCheck,
        lastError: state.lastError,
        ...(breaker ? { breaker: breaker.state(), passiveFailures: breaker.failures() } : {}),
      };
    });
  }

  private run(entry: Entry<U>): void {
    entry.timer = undefined;
    entry.running = this.check(entry).finally(() => {
      entry.running = undefined;
      if (!this.started) return;
      const jitter = 0.9 + 0.2 * this.random();
      entry.timer = setTimeout(() => this.run(entry), Math.max(1, Math.round(this.config.interval * jitter)));
    });
  }

  private async check(entry: Entry<U>): Promise<void> {
    const controller = new AbortController();
    entry.controller = controller;
    let timedOut = false;
    const timeout = this.config.timeout;
    const timer = setTimeout(() => {
      timedOut = true;
      controller.abort();
    }, timeout);
    let passed = false;
    let reason: string;
    try {
      const response = await request(entry.url, {
        method: 'GET',
        dispatcher: this.dispatcher,
        signal: controller.signal,
        headersTimeout: timeout,
        bodyTimeout: timeout,
        reset: true,
        headers: { 'user-agent': 'gatehouse-health-check' },
      });
      await response.body.dump();
      passed = response.statusCode >= this.statusMin && response.statusCode <= this.statusMax;
      reason = `status ${response.statusCode}`;
    } catch (error) {
      reason = timedOut ? `timeout after ${timeout}ms` : (errorCode(error) ?? (error as Error)?.name ?? 'error');
    } finally {
      clearTimeout(timer);
      entry.controller = undefined;
    }
    if (!this.started) return; // stopped while the check ran: its outcome means nothing
    this.record(entry, passed, reason);
  }

  private record(entry: Entry<U>, passed: boolean, reason: string): void {
    const state = entry.state;
    state.lastCheck = this.wallClock();
    if (passed) {
      state.passes++;
      state.fails = 0;
      if (!state.healthy && state.passes >= this.config.passes) this.flip(entry, true, reason);
    } else {
      state.fails++;
      state.passes = 0;
      state.lastError = reason;
      if (state.healthy && state.fails >= this.config.fails) this.flip(entry, false, reason);
    }
  }

  private flip(entry: Entry<U>, healthy: boolean, reason: string): void {
    entry.state.healthy = healthy;
    const breaker = this.options.breakerOf?.(entry.upstream);
    if (breaker) breaker.setActiveHealthy(healthy);
    else entry.upstream.available = healthy;
    this.options.onChange?.(entry.upstream, entry.state, reason);
  }
}

/**
 * Parse a `status` setting into an inclusive range.
 * @param text `"2xx"` (200–299), `"200"` (exactly), or `"200-399"`.
 * @returns `[min, max]`.
 * @throws RangeError for anything else, or a range whose end is below its start.
 */
export function parseStatusRange(text: string): [number, number] {
  const match = /^(?:([1-5])xx|([1-5]\d\d)(?:-([1-5]\d\d))?)$/.exec(text);
  if (!match) throw new RangeError(`expected a status such as "2xx", "200" or "200-399", got ${JSON.stringify(text)}`);
  if (match[1] !== undefined) {
    const hundreds = Number(match[1]) * 100;
    return [hundreds, hundreds + 99];
  }
  const min = Number(match[2]);
  const max = match[3] !== undefined ? Number(match[3]) : min;
  if (max < min) throw new RangeError(`status range ${JSON.stringify(text)} ends before it starts`);
  return [min, max];
}
