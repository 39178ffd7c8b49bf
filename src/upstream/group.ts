/**
 * One route's upstreams as the proxy uses them: the balancing policy, a circuit breaker per
 * upstream, the active health checker, the retry budget, and the per-upstream state the admin API
 * and metrics read (Caddy's `hosts.go` plays this part).
 *
 * Per request the proxy calls:
 * 1. {@link UpstreamGroup.choose} — applies elapsed breaker cooldowns, asks the policy, and takes
 *    the breaker's permission (`tryAcquire`, which lets exactly one half-open trial through).
 *    Undefined means "no upstream": answer 503 with `Retry-After` from {@link UpstreamGroup.retryAfterMs}.
 * 2. After the attempt, exactly one of {@link UpstreamGroup.reportResponse} (a response head
 *    arrived), {@link UpstreamGroup.reportFailure} (the upstream failed) or
 *    {@link UpstreamGroup.release} (the attempt ended for reasons not the upstream's: the client
 *    left, the body was too large).
 *
 * All three are O(number of upstreams) or better and allocate nothing in the common case.
 */
import type { HealthCheckConfig, PassiveHealthConfig, RetriesConfig } from '../config/schema.js';
import { createSelector, type SelectionContext, type Selector } from './balancer.js';
import { BreakerGroup, failureKind, type BreakerState, type CircuitBreaker } from './breaker.js';
import type { Clock } from './clock.js';
import { HealthChecker, type HealthCheckerOptions } from './health.js';
import type { Upstream } from './pool.js';
import { errorCode, type RetryBudget } from './retry.js';

/** The route settings a group is built from (a `RouteConfig` satisfies it). */
export interface UpstreamGroupConfig {
  /** Policy name (`round_robin`, `least_conn`, …). */
  readonly load_balancing: string;
  /** Sticky cookie name for `cookie`. */
  readonly cookie_name?: string;
  /** Active health checks; none when absent. */
  readonly health_check?: HealthCheckConfig | undefined;
  /** Circuit breaker settings (ms). */
  readonly passive_health: PassiveHealthConfig;
  /** `count` extra attempts and `try_duration` ms. */
  readonly retries: RetriesConfig;
}

/** Where state changes are logged; a pino logger fits. */
export interface UpstreamLogger {
  info(fields: object, message: string): void;
  warn(fields: object, message: string): void;
}

/** Options of `new UpstreamGroup()`. */
export interface UpstreamGroupOptions {
  /** Clock of the circuit breakers. Default: monotonic. Tests pass a `ManualClock`. */
  readonly clock?: Clock;
  /** Logger `upstream.health`: one line per active-health flip. */
  readonly healthLogger?: UpstreamLogger;
  /** Logger `upstream.breaker`: one line per breaker state change. */
  readonly breakerLogger?: UpstreamLogger;
  /** Extra options of the health checker (dispatcher, TLS, random source). */
  readonly health?: Omit<HealthCheckerOptions<Upstream>, 'onChange' | 'breakerOf'>;
  /** `cookie` policy: sign with this secret, add `Secure`. */
  readonly cookieSecret?: string | Uint8Array;
  readonly cookieSecure?: boolean;
}

/**
 * A point-in-time view of one upstream, for the admin API and metrics.
 * Plain data: safe to serialise as JSON.
 */
export interface UpstreamSnapshot {
  /** e.g. `http://127.0.0.1:8080`. */
  readonly origin: string;
  /** Active health verdict; true when the route has no `health_check`. */
  readonly healthy: boolean;
  /** What the balancer sees: healthy AND the breaker lets traffic through. */
  readonly available: boolean;
  /** Requests being proxied to it now. */
  readonly inFlight: number;
  /** Passive failures (failed attempts) within the breaker's `window`. */
  readonly failures: number;
  /** Circuit breaker state. */
  readonly breaker: BreakerState;
  /** When the last active check finished (ms since the epoch); undefined without checks or before the first. */
  readonly lastCheck: number | undefined;
  /**
   * Why it is or was failing: the last failing check (`status 500`, `timeout after 2000ms`) while
   * actively unhealthy, else the code of the last failed attempt (`ECONNREFUSED`), else the last
   * failing check; undefined when nothing ever failed.
   */
  readonly lastError: string | undefined;
}

interface UpstreamEntry {
  readonly breaker: CircuitBreaker;
  /** Code of the last failed attempt. */
  lastFailure: string | undefined;
}

/** One route's upstreams, policy, breakers, health checker and retry budget. */
export class UpstreamGroup {
  /** The route's upstreams, in config order (the array the policy is always given). */
  readonly upstreams: readonly Upstream[];
  /** The balancing policy instance of this route. */
  readonly selector: Selector;
  /** One circuit breaker per upstream. */
  readonly breakers: BreakerGroup<Upstream>;
  /** The route's `retries`: extra attempts and total time budget (ms). */
  readonly retries: RetryBudget;
  /** Active health checks, when the route configures them. */
  readonly health: HealthChecker<Upstream> | undefined;
  private readonly entries = new Map<Upstream, UpstreamEntry>();
  /** Scratch `exclude` list for {@link choose} when a breaker refuses the policy's choice. */
  private readonly refused: Upstream[] = [];

  /**
   * @param upstreams the route's upstreams (built by the caller, closed by the caller).
   * @param config the route's `load_balancing`, `cookie_name`, `health_check`, `passive_health`, `retries`.
   * @param options clock, loggers, health-checker and cookie options.
   * @throws BalancerError when the policy name is unknown.
   */
  constructor(upstreams: readonly Upstream[], config: UpstreamGroupConfig, options: UpstreamGroupOptions = {}) {
    this.upstreams = upstreams;
    this.retries = config.retries;
    this.selector = createSelector(config.load_balancing, {
      cookieName: config.cookie_name,
      cookieSecret: options.cookieSecret,
      cookieSecure: options.cookieSecure,
    });
    const breakerLogger = options.breakerLogger;
    this.breakers = new BreakerGroup(upstreams, config.passive_health, {
      clock: options.clock,
      onChange: breakerLogger && ((upstream, state, reason) => {
        breakerLogger[state === 'open' ? 'warn' : 'info']({ upstream: upstream.origin, breaker: state, reason }, `circuit breaker ${state}`);
      }),
    });
    for (const upstream of upstreams) {
      this.entries.set(upstream, { breaker: this.breakers.breakerOf(upstream)!, lastFailure: undefined });
    }
    const healthLogger = options.healthLogger;
    this.health = config.health_check === undefined ? undefined : new HealthChecker(upstreams, config.health_check, {
      ...options.health,
      breakerOf: (upstream) => this.breakers.breakerOf(upstream),
      onChange: healthLogger && ((upstream, state, reason) => {
        healthLogger[state.healthy ? 'info' : 'warn'](
          { upstream: upstream.origin, healthy: state.healthy, reason },
          state.healthy ? 'upstream healthy' : 'upstream unhealthy',
        );
      }),
    });
  }

  /**
   * Choose the upstream for one attempt and take its breaker's permission.
   *
   * `ctx.exclude` lists upstreams this request already tried; when every available upstream is
   * excluded, one of them is chosen again (a single-upstream route retries on its only upstream,
   * which is what the keep-alive race needs). The `cookie` policy may set `ctx.setCookie`.
   * @returns the upstream, already counted by its breaker (report the outcome), or undefined when
   *   none is available.
   */
  choose(ctx: SelectionContext): Upstream | undefined {
    this.breakers.refresh();
    let upstream = this.selector.select(this.upstreams, ctx) as Upstream | undefined;
    if (upstream === undefined && ctx.exclude !== undefined) {
      const exclude = ctx.exclude;
      ctx.exclude = undefined;
      upstream = this.selector.select(this.upstreams, ctx) as Upstream | undefined;
      ctx.exclude = exclude;
    }
    if (upstream === undefined || this.entries.get(upstream)!.breaker.tryAcquire()) return upstream;
    // Rare: the breaker refused after the policy chose (it changed state in between). Exclude the
    // refusers and ask again; this path may allocate.
    const refused = this.refused;
    refused.length = 0;
    if (ctx.exclude !== undefined) refused.push(...(ctx.exclude as Upstream[]));
    const saved = ctx.exclude;
    for (;;) {
      refused.push(upstream);
      ctx.exclude = refused;
      upstream = this.selector.select(this.upstreams, ctx) as Upstream | undefined;
      if (upstream === undefined || this.entries.get(upstream)!.breaker.tryAcquire()) break;
    }
    ctx.exclude = saved;
    refused.length = 0;
    return upstream;
  }

  /**
   * A response head arrived from `upstream`: a success for its breaker, unless it is a 5xx and
   * `fail_on_5xx` is set, or slower than `max_latency`.
   * @param latencyMs from sending the attempt to the response head.
   */
  reportResponse(upstream: Upstream, status: number, latencyMs: number): void {
    this.entries.get(upstream)?.breaker.recordResponse(status, latencyMs);
  }

  /**
   * The attempt on `upstream` failed with `error`. Counts against its breaker unless the error
   * is not the upstream's fault (the client aborted), in which case the breaker's permission is
   * given back.
   */
  reportFailure(upstream: Upstream, error: unknown): void {
    const entry = this.entries.get(upstream);
    if (entry === undefined) return;
    const kind = failureKind(error);
    if (kind === undefined) {
      entry.breaker.release();
      return;
    }
    entry.lastFailure = errorCode(error) ?? kind;
    entry.breaker.recordFailure(kind);
  }

  /** The attempt on `upstream` ended for reasons not the upstream's: give back a half-open trial. */
  release(upstream: Upstream): void {
    this.entries.get(upstream)?.breaker.release();
  }

  /** The breaker of `upstream`, or undefined when it is not one of this group's. */
  breakerOf(upstream: Upstream): CircuitBreaker | undefined {
    return this.entries.get(upstream)?.breaker;
  }

  /**
   * For the `Retry-After` of a 503 when {@link choose} found nothing: the shortest wait (ms) until
   * an open breaker lets a trial through; undefined when no breaker is open (active health keeps
   * the upstreams out, and nobody knows when they come back).
   */
  retryAfterMs(): number | undefined {
    return this.breakers.retryAfterMs();
  }

  /** A snapshot of every upstream, in config order. */
  snapshot(): UpstreamSnapshot[] {
    return this.upstreams.map((upstream) => {
      const entry = this.entries.get(upstream)!;
      const health = this.health?.stateOf(upstream);
      // An active verdict of "unhealthy" explains the state best; else the latest failed attempt.
      const lastError = health !== undefined && !health.healthy ? health.lastError : (entry.lastFailure ?? health?.lastError);
      return {
        origin: upstream.origin,
        healthy: health?.healthy ?? true,
        available: upstream.available,
        inFlight: upstream.inFlight,
        failures: entry.breaker.failures(),
        breaker: entry.breaker.state(),
        lastCheck: health?.lastCheck,
        lastError,
      };
    });
  }

  /** Start the active health checks (no-op without `health_check`). */
  start(): void {
    this.health?.start();
  }

  /** Stop the health checks. The upstream pools are the caller's to close. */
  async stop(): Promise<void> {
    await this.health?.stop();
  }
}
