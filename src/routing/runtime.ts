/**
 * The runtime form of a config's sites: routes with their upstream pools, balancers and health
 * checkers, behind the {@link Router}. Built whole before it serves (so a reload that fails to
 * build leaves the old one serving) and closed when replaced.
 */
import type { RouteConfig, SiteConfig } from '../config/schema.js';
import { createSelector, type Selector } from '../upstream/balancer.js';
import { HealthChecker } from '../upstream/health.js';
import { Upstream } from '../upstream/pool.js';
import { Router } from './router.js';

/** A route ready to serve. */
export interface RouteRuntime {
  readonly config: RouteConfig;
  /** The prefix removed by `strip_prefix` (without trailing `/`), or `''`. */
  readonly strip: string;
  readonly upstreams: readonly Upstream[];
  readonly selector: Selector;
}

/** A site ready to serve. */
export interface SiteRuntime {
  readonly config: SiteConfig;
  readonly hosts: readonly string[];
  readonly routes: readonly { readonly path: string; readonly route: RouteRuntime }[];
  /** `Strict-Transport-Security` value for HTTPS answers, when the site sets `hsts`. */
  readonly hsts: string | undefined;
}

/** What the listeners route with. */
export interface Runtime {
  readonly router: Router<SiteRuntime, RouteRuntime>;
  readonly sites: readonly SiteRuntime[];
  /** Every upstream of every route (for /status, metrics and shutdown). */
  readonly upstreams: readonly Upstream[];
  /** Start background work (health checks). */
  start(): void;
  /** Stop background work and close the upstream pools once their requests finished. */
  close(): Promise<void>;
}

/** Logger calls the runtime makes (a pino child logger `upstream` fits). */
export interface RuntimeLogger {
  info(fields: object, message: string): void;
  warn(fields: object, message: string): void;
}

/**
 * Build the runtime of `sites`.
 * @throws {Error} when an upstream URL or balancing policy cannot be built (validated configs do not).
 */
export function buildRuntime(sites: readonly SiteConfig[], logger: RuntimeLogger): Runtime {
  const upstreams: Upstream[] = [];
  const checkers: HealthChecker<Upstream>[] = [];
  const siteRuntimes: SiteRuntime[] = sites.map((site) => ({
    config: site,
    hosts: site.hosts,
    hsts: site.hsts ? hstsValue(site.hsts) : undefined,
    routes: site.routes.map((config) => {
      const routeUpstreams = config.upstreams.map((u) => new Upstream(u.url, { weight: u.weight, timeouts: config.timeouts }));
      upstreams.push(...routeUpstreams);
      if (config.health_check) {
        checkers.push(new HealthChecker(routeUpstreams, config.health_check, {
          onChange: (upstream, state, reason) => {
            logger[state.healthy ? 'info' : 'warn']({ upstream: upstream.origin, healthy: state.healthy, reason }, state.healthy ? 'upstream healthy' : 'upstream unhealthy');
          },
        }));
      }
      const route: RouteRuntime = {
        config,
        strip: config.strip_prefix ? config.path.replace(/\/$/, '') : '',
        upstreams: routeUpstreams,
        selector: createSelector(config.load_balancing, { cookieName: config.cookie_name }),
      };
      return { path: config.path, route };
    }),
  }));
  return {
    router: new Router<SiteRuntime, RouteRuntime>(siteRuntimes),
    sites: siteRuntimes,
    upstreams,
    start() {
      for (const checker of checkers) checker.start();
    },
    async close() {
      await Promise.allSettled(checkers.map((checker) => checker.stop()));
      await Promise.allSettled(upstreams.map((u) => u.close()));
    },
  };
}

function hstsValue(hsts: { max_age: number; include_subdomains: boolean; preload: boolean }): string {
  let value = `max-age=${Math.floor(hsts.max_age / 1000)}`;
  if (hsts.include_subdomains) value += '; includeSubDomains';
  if (hsts.preload) value += '; preload';
  return value;
}
