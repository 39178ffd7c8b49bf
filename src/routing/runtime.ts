/**
 * The runtime form of a config's sites: routes with their upstream pools, balancers, circuit
 * breakers and health checkers (one `UpstreamGroup` per route), behind the {@link Router}. Built
 * whole before it serves (so a reload that fails to build leaves the old one serving) and closed
 * when replaced.
 */
import { setImmediate as nextTurn } from 'node:timers/promises';
import type { RouteConfig, SiteConfig } from '../config/schema.js';
import type { Selector } from '../upstream/balancer.js';
import type { Clock } from '../upstream/clock.js';
import { UpstreamGroup, type UpstreamSnapshot } from '../upstream/group.js';
import { Upstream } from '../upstream/pool.js';
import { Router } from './router.js';

/** A route ready to serve. */
export interface RouteRuntime {
  readonly config: RouteConfig;
  /** The prefix removed by `strip_prefix` (without trailing `/`), or `''`. */
  readonly strip: string;
  readonly upstreams: readonly Upstream[];
  readonly selector: Selector;
  /** Policy, breakers, health checks and retry budget of the route's upstreams. */
  readonly group: UpstreamGroup;
}

/** The upstreams of one route, as {@link Runtime.upstreamStates} reports them. */
export interface RouteUpstreamStates {
  /** The site's hosts. */
  readonly hosts: readonly string[];
  /** The route's path prefix. */
  readonly path: string;
  /** The route's balancing policy. */
  readonly policy: string;
  /** One snapshot per upstream, in config order. */
  readonly upstreams: UpstreamSnapshot[];
}

/** A site ready to serve. */
export interface SiteRuntime {
  readonly config: SiteConfig;
  readonly hosts: readonly string[];
  readonly routes: readonly { readonly path: string; readonly route: RouteRuntime }[];
  /** `Strict-Transport-Security` value for HTTPS answers, when the site sets `hsts`. */
  readonly hsts: string | undefined;
  /**
   * Fields added to every proxied HTTPS answer (`ForwardTarget.responseHeaders`): the site's
   * `strict-transport-security`; undefined when there are none.
   */
  readonly httpsResponseHeaders: readonly string[] | undefined;
}

/** What the listeners route with. */
export interface Runtime {
  readonly router: Router<SiteRuntime, RouteRuntime>;
  readonly sites: readonly SiteRuntime[];
  /** Every upstream of every route (for /status, metrics and shutdown). */
  readonly upstreams: readonly Upstream[];
  /**
   * The state of every route's upstreams now (health, availability, in-flight requests, passive
   * failures, breaker state, last check and last error), for the admin API and metrics.
   */
  upstreamStates(): RouteUpstreamStates[];
  /** Start background work (health checks). */
  start(): void;
  /** Stop background work and close the upstream pools once their requests finished. */
  close(): Promise<void>;
}

/**
 * Logger calls the runtime makes (a pino logger fits). State changes go to the sub-loggers
 * `upstream.health` and `upstream.breaker` when the logger can make children.
 */
export interface RuntimeLogger {
  info(fields: object, message: string): void;
  warn(fields: object, message: string): void;
  child?(bindings: { logger: string }): RuntimeLogger;
}

/** Options of {@link buildRuntime}. */
export interface RuntimeOptions {
  /** Clock of every circuit breaker. Default: monotonic. Tests pass a `ManualClock`. */
  readonly clock?: Clock;
}

/**
 * Build the runtime of `sites`.
 * @throws {Error} when an upstream URL or balancing policy cannot be built (validated configs do not).
 */
export function buildRuntime(sites: readonly SiteConfig[], logger: RuntimeLogger, options: RuntimeOptions = {}): Runtime {
  const builder = new RuntimeBuilder(logger, options);
  for (const site of sites) builder.add(site);
  return builder.finish();
}

/**
 * {@link buildRuntime} for a server that is serving (reloads): `slice` sites per turn of the event
 * loop, so requests on the same thread are answered between slices (10 000 sites take ~70–100 ms
 * to build). Same result, same errors.
 * @param slice sites built per turn. Default 1 000.
 */
export async function buildRuntimeInTurns(
  sites: readonly SiteConfig[], logger: RuntimeLogger, options: RuntimeOptions = {}, slice = 1_000,
): Promise<Runtime> {
  const builder = new RuntimeBuilder(logger, options);
  for (let i = 0; i < sites.length; i++) {
    if (i > 0 && i % slice === 0) await nextTurn();
    builder.add(sites[i]!);
  }
  return builder.finish();
}

/** Builds a {@link Runtime} one site at a time. */
class RuntimeBuilder {
  readonly #healthLogger: RuntimeLogger;
  readonly #breakerLogger: RuntimeLogger;
  readonly #clock: Clock | undefined;
  readonly #upstreams: Upstream[] = [];
  readonly #groups: UpstreamGroup[] = [];
  readonly #sites: SiteRuntime[] = [];

  constructor(logger: RuntimeLogger, options: RuntimeOptions) {
    this.#healthLogger = logger.child?.({ logger: 'upstream.health' }) ?? logger;
    this.#breakerLogger = logger.child?.({ logger: 'upstream.breaker' }) ?? logger;
    this.#clock = options.clock;
  }

  add(site: SiteConfig): void {
    this.#sites.push({
      config: site,
      hosts: site.hosts,
      hsts: site.hsts ? hstsValue(site.hsts) : undefined,
      httpsResponseHeaders: site.hsts ? Object.freeze(['strict-transport-security', hstsValue(site.hsts)]) : undefined,
      routes: site.routes.map((config) => {
        const routeUpstreams = config.upstreams.map((u) => new Upstream(u.url, { weight: u.weight, timeouts: config.timeouts }));
        this.#upstreams.push(...routeUpstreams);
        const group = new UpstreamGroup(routeUpstreams, config, {
          clock: this.#clock,
          healthLogger: this.#healthLogger,
          breakerLogger: this.#breakerLogger,
        });
        this.#groups.push(group);
        const route: RouteRuntime = {
          config,
          strip: config.strip_prefix ? config.path.replace(/\/$/, '') : '',
          upstreams: routeUpstreams,
          selector: group.selector,
          group,
        };
        return { path: config.path, route };
      }),
    });
  }

  finish(): Runtime {
    const siteRuntimes = this.#sites;
    const upstreams = this.#upstreams;
    const groups = this.#groups;
    return {
      router: new Router<SiteRuntime, RouteRuntime>(siteRuntimes),
      sites: siteRuntimes,
      upstreams,
      upstreamStates() {
        const states: RouteUpstreamStates[] = [];
        for (const site of siteRuntimes) {
          for (const { path, route } of site.routes) {
            states.push({ hosts: site.hosts, path, policy: route.config.load_balancing, upstreams: route.group.snapshot() });
          }
        }
        return states;
      },
      start() {
        for (const group of groups) group.start();
      },
      async close() {
        await Promise.allSettled(groups.map((group) => group.stop()));
        await Promise.allSettled(upstreams.map((u) => u.close()));
      },
    };
  }
}

function hstsValue(hsts: { max_age: number; include_subdomains: boolean; preload: boolean }): string {
  let value = `max-age=${Math.floor(hsts.max_age / 1000)}`;
  if (hsts.include_subdomains) value += '; includeSubDomains';
  if (hsts.preload) value += '; preload';
  return value;
}
