/**
 * Gatehouse: wires a config to certificates, listeners, the router and the operations side
 * (metrics, admin API, access log), and runs the start → reload → stop lifecycle.
 *
 * A reload is provision → validate → swap → cleanup, as Caddy does it: the new config is parsed,
 * validated and fully built (routes, upstream pools, certificates, listeners on new addresses)
 * before it replaces the old one, so a config that fails at any step leaves the old one serving.
 * After the swap, listeners whose address did not change keep running (no connection is refused),
 * requests in flight finish on the old upstream pools, and upgrade tunnels stay open unless the
 * new config no longer has their route.
 */
import cluster from 'node:cluster';
import { watch, type FSWatcher } from 'node:fs';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { basename, dirname } from 'node:path';
import type { Duplex } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { ConfigError, loadConfigFileOffThread } from './config/load.js';
import type { GatehouseConfig, ListenAddress } from './config/schema.js';
import { ACME_CHALLENGE_PREFIX, HttpListener, redirectToHttps } from './listeners/http.js';
import { HttpsListener } from './listeners/https.js';
import { captureOf, finishCapture, startCapture } from './middleware/capture.js';
import { ClientAddress } from './middleware/client-ip.js';
import { RateLimiter } from './middleware/rate-limit.js';
import { AccessLog } from './observability/access-log.js';
import { AdminListener, type ReloadResult } from './observability/admin.js';
import { ClusterMetricsError, clusterMetricsText, shareWorkerMetrics } from './observability/cluster-metrics.js';
import { reloadOtherWorkers } from './workers.js';
import type { Logger } from './observability/log.js';
import { Metrics } from './observability/metrics.js';
import type { ClientRequest, ClientResponse } from './proxy/forward.js';
import type { ProxyFailure } from './proxy/errors.js';
import { dispatchRequest, dispatchUpgrade, requestHost, type AccessRecord, type DispatchContext } from './routing/dispatch.js';
import { buildRuntime, buildRuntimeInTurns, type RouteRuntime, type Runtime, type SiteRuntime } from './routing/runtime.js';
import { CertificateStore, covers, loadStaticCertificates, type ObtainDecision } from './tls/certificates.js';
import { LocalCA } from './tls/local-ca.js';
import type { Certificate } from './tls/source.js';
import { AcmeIssuer } from './acme/manager.js';
import { FileStorage } from './tls/storage.js';
import { setBusyPolling } from './busy-poll.js';

export type { ReloadResult } from './observability/admin.js';

/** The certificate issuers of a running server. */
export interface CertificateIssuers {
  /** The local CA (`tls: internal`, temporary certificates, the default certificate). */
  readonly internal: LocalCA;
  /** The ACME issuer; present when a site uses `tls: acme` or `tls.on_demand` is set. */
  readonly acme: AcmeIssuer | undefined;
}

/** The middleware of one route (only routes that have some get an entry). */
interface RouteMiddleware {
  readonly limiter: RateLimiter | undefined;
  readonly capture: { readonly max_body: number } | undefined;
}

/** An open upgrade tunnel: what routed it, so a reload can tell whether its route still exists. */
interface Tunnel {
  readonly host: string;
  readonly url: string;
  readonly path: string;
}

/** The listeners of a running server. */
interface Listeners {
  https: HttpsListener | undefined;
  http: HttpListener | undefined;
  admin: AdminListener | undefined;
}

/** A running edge server. */
export class Gatehouse {
  /** Addresses actually bound (real ports when 0 was configured). */
  readonly addresses: { http?: AddressInfo; https?: AddressInfo; admin?: AddressInfo } = {};
  #config: GatehouseConfig;
  #runtime: Runtime;
  /** 1 at start, +1 per successful reload. */
  #version = 1;
  #loadedAt = new Date();
  readonly #logger: Logger;
  #accessLog: AccessLog;
  readonly #store: CertificateStore;
  readonly #issuers: CertificateIssuers;
  readonly #metrics: Metrics;
  #clients: ClientAddress;
  #middleware = new WeakMap<RouteRuntime, RouteMiddleware>();
  /** Rate limiters by route and settings, so that a reload keeps the buckets of unchanged routes. */
  #limiters = new Map<string, RateLimiter>();
  #anyCapture = false;
  readonly #tunnels = new Map<Duplex, Tunnel>();
  #staticCertificates: Certificate[];
  readonly #listeners: Listeners = { https: undefined, http: undefined, admin: undefined };
  readonly #httpsContext: DispatchContext;
  readonly #httpContext: DispatchContext;
  /** Reloads run one at a time, in order. */
  #reloading: Promise<unknown> = Promise.resolve();
  #watcher: FSWatcher | undefined;
  #watchTimer: NodeJS.Timeout | undefined;
  #stopping: Promise<void> | undefined;

  private constructor(config: GatehouseConfig, logger: Logger, store: CertificateStore, issuers: CertificateIssuers, staticCertificates: Certificate[], runtime: Runtime) {
    this.#config = config;
    this.#logger = logger;
    this.#accessLog = AccessLog.create(config.log, logger);
    this.#store = store;
    this.#issuers = issuers;
    this.#staticCertificates = staticCertificates;
    this.#runtime = runtime;
    this.#clients = new ClientAddress(config.trusted_proxies);
    this.#metrics = new Metrics({
      runtime: () => this.#runtime,
      certificates: () => store.list(),
      acme: () => (issuers.acme ? { orders: issuers.acme.orderCount, failures: issuers.acme.failureCount } : undefined),
      tunnels: () => this.#tunnels.size,
    });
    this.#buildMiddleware(config, runtime);
    shareWorkerMetrics(this.#metrics.registry);
    const self = this;
    const onComplete = (record: AccessRecord) => this.#onExchange(record);
    const beforeForward = (req: ClientRequest, res: ClientResponse, site: SiteRuntime, route: RouteRuntime) => this.#beforeForward(req, res, site, route);
    const onTunnel = (req: IncomingMessage, socket: Duplex, route: RouteRuntime) => this.#onTunnel(req, socket, route);
    this.#httpsContext = {
      get runtime() { return self.#runtime; },
      protocol: 'https',
      certificateCovers: (serverName, host) => {
        const certificate = store.forServerName(serverName);
        return certificate !== undefined && covers(certificate, host);
      },
      onComplete,
      beforeForward,
      onTunnel,
      draining: () => this.#listeners.https?.draining ?? false,
    };
    this.#httpContext = {
      get runtime() { return self.#runtime; },
      protocol: 'http',
      onComplete,
      beforeForward,
      onTunnel,
      draining: () => this.#listeners.http?.draining ?? false,
    };
  }

  /**
   * Start serving `config`: load or create the local CA, load static certificates, build the
   * routes, bind the listeners (HTTPS, HTTP, admin).
   * @throws when storage is unusable, a certificate file is invalid (`GH_TLS_*` codes), or a
   *   listener cannot bind (EADDRINUSE, EACCES); nothing is left running then.
   */
  static async start(config: GatehouseConfig, logger: Logger): Promise<Gatehouse> {
    const storage = new FileStorage(config.tls.storage);
    const internal = await LocalCA.load(storage);
    const tlsLogger = logger.child({ logger: 'tls' });
    const store = new CertificateStore({ logger: tlsLogger, renewWindow: config.tls.acme.renew_window });
    const staticCertificates = await loadStaticCertificates(config.tls.certificates, { storage, logger: tlsLogger });
    for (const certificate of staticCertificates) store.put(certificate);
    if (staticCertificates.length === 0) {
      store.setDefault(() => internal.issue(['localhost', '127.0.0.1', '::1']));
      await store.refreshDefault();
    }
    const acme = needsAcme(config)
      ? await AcmeIssuer.fromConfig(config.tls, { storage, logger: logger.child({ logger: 'tls' }), onCertificate: (c) => store.put(c) })
      : undefined;
    const runtime = buildRuntime(config.sites, logger);
    const gatehouse = new Gatehouse(config, logger, store, { internal, acme }, staticCertificates, runtime);
    store.setPolicy((name) => gatehouse.#obtainPolicy(name));
    try {
      await gatehouse.#openListeners(config, gatehouse.#listeners, gatehouse.addresses);
      // After the listeners: the HTTP-01 and TLS-ALPN-01 answers must be reachable before ordering.
      if (acme) {
        await acme.manage(acmeNames(config));
        acme.start();
      }
    } catch (error) {
      await gatehouse.#closeListeners(gatehouse.#listeners, 0);
      await runtime.close();
      await acme?.close();
      gatehouse.#accessLog.close();
      throw error;
    }
    runtime.start();
    setBusyPolling(config.busy_polling);
    gatehouse.#watchConfig();
    logger.info({
      config: config.source,
      http: gatehouse.addresses.http?.port,
      https: gatehouse.addresses.https?.port,
      admin: gatehouse.addresses.admin?.port,
      sites: config.sites.length,
      local_ca_root: storage.pathOf('ca/root.crt'),
    }, 'serving');
    return gatehouse;
  }

  /** The config being served. */
  get config(): GatehouseConfig {
    return this.#config;
  }

  /** The version of the config being served: 1 at start, +1 per successful reload. */
  get configVersion(): number {
    return this.#version;
  }

  /** The certificate store (SNI lookup), e.g. for /status. */
  get certificates(): CertificateStore {
    return this.#store;
  }

  /** The ACME issuer, when a site uses `tls: acme` or `tls.on_demand` is set (workers share its challenges). */
  get acme(): AcmeIssuer | undefined {
    return this.#issuers.acme;
  }

  /** The runtime being served (routes, upstreams). */
  get runtime(): Runtime {
    return this.#runtime;
  }

  /** The metrics registry (served at `GET /metrics` on the admin listener). */
  get metrics(): Metrics {
    return this.#metrics;
  }

  /** Open upgrade tunnels (WebSocket). */
  get tunnelCount(): number {
    return this.#tunnels.size;
  }

  /**
   * Serve a new, already validated config: build it whole, then swap (see the file comment).
   * Reloads run one at a time.
   * @throws when the new config cannot be built (a certificate file is invalid, a new listen
   *   address cannot be bound); the old one keeps serving.
   */
  reload(config: GatehouseConfig): Promise<void> {
    const run = this.#reloading.then(() => this.#apply(config));
    this.#reloading = run.catch(() => undefined);
    return run.then(
      () => this.#metrics.reloaded(true, this.#version),
      (error: unknown) => {
        this.#metrics.reloaded(false, this.#version);
        throw error;
      },
    );
  }

  /**
   * Read the config file again and serve it (SIGHUP, `POST /reload`, the file watch). An invalid
   * file is refused, with its file:line errors in the log, and the old config keeps serving.
   * Never throws.
   */
  reloadFromFile(trigger = 'api'): Promise<ReloadResult> {
    const run = this.#reloading.then(() => this.#reloadFile(trigger));
    this.#reloading = run;
    return run;
  }

  /** Reopen the access log file (SIGUSR1, after logrotate moved it). */
  reopenLogs(): void {
    this.#accessLog.reopen();
    this.#logger.info({ file: this.#accessLog.file }, 'access log reopened');
  }

  /**
   * Stop: listeners stop accepting, in-flight requests get `grace_period` to finish, then every
   * connection and upstream pool is closed. Idempotent.
   */
  stop(): Promise<void> {
    this.#stopping ??= (async () => {
      setBusyPolling(0); // a spinning loop would keep the process alive
      this.#unwatchConfig();
      this.#issuers.acme?.stop();
      await this.#reloading;
      await this.#closeListeners(this.#listeners, this.#config.grace_period);
      for (const socket of this.#tunnels.keys()) socket.destroy();
      await this.#runtime.close();
      await this.#issuers.acme?.close();
      this.#accessLog.close();
    })();
    return this.#stopping;
  }

  // ---- reload ----

  async #reloadFile(trigger: string): Promise<ReloadResult> {
    if (this.#stopping) return { result: 'failed', version: this.#version, errors: ['the server is stopping'] };
    const file = this.#configFile();
    if (file === undefined) {
      this.#logger.warn({ trigger }, 'reload ignored: no config file to reload');
      return { result: 'failed', version: this.#version, errors: ['no config file to reload (quick mode)'] };
    }
    let next: GatehouseConfig;
    try {
      next = await loadConfigFileOffThread(file, {
        onParsed: (where) => { if (where === 'here') this.#logger.warn({ trigger }, 'reload: no worker thread could parse the config; it was parsed on the serving thread'); },
      });
    } catch (error) {
      const errors = (error as Error).message.split('\n');
      this.#logger.error({ trigger, err: { code: (error as ConfigError).code, message: (error as Error).message }, errors }, 'reload refused: the old config keeps serving');
      this.#metrics.reloaded(false, this.#version);
      return { result: 'refused', version: this.#version, errors };
    }
    try {
      await this.#apply(next);
    } catch (error) {
      this.#logger.error({ trigger, err: error }, 'reload failed: the old config keeps serving');
      this.#metrics.reloaded(false, this.#version);
      return { result: 'failed', version: this.#version, errors: [(error as Error).message] };
    }
    this.#metrics.reloaded(true, this.#version);
    return { result: 'reloaded', version: this.#version };
  }

  /** provision → validate → swap → cleanup. Throws before the swap, never after it. */
  async #apply(config: GatehouseConfig): Promise<void> {
    if (this.#stopping) throw new Error('the server is stopping');
    const old = { config: this.#config, runtime: this.#runtime };
    // Provision: everything that can fail.
    const staticCertificates = await loadStaticCertificates(config.tls.certificates, { storage: new FileStorage(config.tls.storage), logger: this.#logger.child({ logger: 'tls' }) });
    // Building the routes of 10 000 sites takes ~70-100 ms: in slices, each in a turn of its own,
    // so requests waiting on this thread are answered in between.
    await nextTurn();
    const runtime = await buildRuntimeInTurns(config.sites, this.#logger);
    await nextTurn();
    const opened: Listeners = { https: undefined, http: undefined, admin: undefined };
    const openedAddresses: Gatehouse['addresses'] = {};
    const closing: Listeners = { https: undefined, http: undefined, admin: undefined };
    try {
      await this.#openListeners(config, opened, openedAddresses, old.config);
    } catch (error) {
      await this.#closeListeners(opened, 0);
      await runtime.close();
      throw error;
    }
    if (needsAcme(config) && !this.#issuers.acme) this.#logger.warn('the new config uses ACME but the old one did not: restart to start the ACME issuer');

    // Swap.
    const kept = new Set(staticCertificates.map((c) => c.cert)); // a Set: 10 000 certificates, not 10^8 comparisons
    for (const certificate of this.#staticCertificates) {
      if (!kept.has(certificate.cert)) this.#store.remove(certificate);
    }
    for (const certificate of staticCertificates) this.#store.put(certificate);
    this.#staticCertificates = staticCertificates;
    for (const name of ['https', 'http', 'admin'] as const) {
      if (!sameAddress(old.config.listen[name], config.listen[name])) {
        closing[name] = this.#listeners[name] as never;
        this.#listeners[name] = opened[name] as never;
        if (opened[name] === undefined) delete this.addresses[name];
        else this.addresses[name] = openedAddresses[name];
      }
    }
    this.#clients = new ClientAddress(config.trusted_proxies);
    this.#buildMiddleware(config, runtime);
    if (!this.#accessLog.sameAs(config.log)) {
      const previous = this.#accessLog;
      this.#accessLog = AccessLog.create(config.log, this.#logger);
      previous.close();
    }
    this.#runtime = runtime;
    this.#config = config;
    this.#version++;
    this.#loadedAt = new Date();
    runtime.start();
    setBusyPolling(config.busy_polling);

    // Cleanup.
    const closedTunnels = this.#closeOrphanTunnels(runtime);
    this.#unwatchConfig();
    this.#watchConfig();
    this.#logger.info({
      config: config.source, version: this.#version, sites: config.sites.length, tunnels_closed: closedTunnels,
      http: this.addresses.http?.port, https: this.addresses.https?.port, admin: this.addresses.admin?.port,
    }, 'config reloaded');
    if (closing.https || closing.http || closing.admin) {
      this.#logger.info({ listeners: Object.keys(closing).filter((k) => closing[k as keyof Listeners]) }, 'closing listeners whose address changed');
      this.#closeListeners(closing, config.grace_period).catch((error: unknown) => this.#logger.warn({ err: error }, 'closing old listeners failed'));
    }
    if (this.#issuers.acme) {
      this.#issuers.acme.manage(acmeNames(config)).catch((error: unknown) => this.#logger.warn({ err: error }, 'ACME: managing the new names failed'));
    }
    old.runtime.close().catch((error: unknown) => this.#logger.warn({ err: error }, 'closing the old upstream pools failed'));
  }

  /** The file the config came from; undefined in quick mode. */
  #configFile(): string | undefined {
    const source = this.#config.source;
    return source.startsWith('<') ? undefined : source;
  }

  /** `reload.watch`: reload when the config file changes (its folder is watched, so editors that
   * replace the file by renaming are seen too). */
  #watchConfig(): void {
    const file = this.#configFile();
    if (!this.#config.reload.watch || file === undefined) return;
    const name = basename(file);
    try {
      this.#watcher = watch(dirname(file), { persistent: false }, (_event, changed) => {
        if (changed !== null && changed.toString() !== name) return;
        clearTimeout(this.#watchTimer);
        this.#watchTimer = setTimeout(() => {
          this.#watchTimer = undefined;
          void this.reloadFromFile('watch');
        }, this.#config.reload.debounce);
        this.#watchTimer.unref();
      });
      this.#watcher.on('error', (error) => this.#logger.warn({ err: error, file }, 'config file watch failed'));
    } catch (error) {
      this.#logger.warn({ err: error, file }, 'cannot watch the config file');
    }
  }

  #unwatchConfig(): void {
    clearTimeout(this.#watchTimer);
    this.#watchTimer = undefined;
    this.#watcher?.close();
    this.#watcher = undefined;
  }

  // ---- listeners ----

  /**
   * Open the listeners of `config` into `into` (their bound addresses into `addresses`); with
   * `previous`, only those whose address changed (the others keep running).
   */
  async #openListeners(config: GatehouseConfig, into: Listeners, addresses: Gatehouse['addresses'], previous?: GatehouseConfig): Promise<void> {
    const { listen } = config;
    const changed = (name: 'http' | 'https' | 'admin') => previous === undefined || !sameAddress(previous.listen[name], listen[name]);
    const onClientError = (error: Error) => this.#logger.debug({ err: { message: error.message, code: (error as { code?: string }).code } }, 'client connection error');
    const refused = (protocol: 'http' | 'https') => (req: ClientRequest, failed: ProxyFailure) => {
      // Refused before routing: in the access log and the metrics like every other answer.
      this.#metrics.inFlight++;
      this.#onExchange({
        req, startedAt: performance.now(), protocol, host: requestHost(req) ?? '', site: undefined, route: undefined,
        status: failed.status, bytesIn: 0, bytesOut: 0, upstream: undefined, error: failed.code, requestId: undefined,
      });
    };
    if (listen.https && changed('https')) {
      const acme = this.#issuers.acme;
      const https = new HttpsListener({
        address: listen.https,
        store: this.#store,
        onRequest: (req, res) => {
          this.#metrics.inFlight++;
          dispatchRequest(req, res, this.#httpsContext);
        },
        onUpgrade: (req, socket, head) => {
          this.#metrics.inFlight++;
          dispatchUpgrade(req, socket, head, this.#httpsContext);
        },
        onClientError,
        onRefused: refused('https'),
        clients: config.clients,
        ...(acme && config.tls.acme.challenges.includes('tls-alpn-01')
          ? { acceptConnection: acme.tlsAlpn.handleConnection.bind(acme.tlsAlpn) }
          : {}),
      });
      https.server.on('secureConnection', (socket: TLSSocket) => this.#metrics.handshake(socket));
      into.https = https;
      addresses.https = await https.listen();
    }
    if (listen.http && changed('http')) {
      const http = new HttpListener({
        address: listen.http,
        onRequest: (req, res) => this.#onPlainRequest(req, res),
        onUpgrade: (req, socket, head) => this.#onPlainUpgrade(req, socket, head),
        onClientError,
        onRefused: refused('http'),
        clients: config.clients,
      });
      into.http = http;
      addresses.http = await http.listen();
    }
    if (listen.admin && changed('admin')) {
      const admin = new AdminListener(listen.admin, {
        token: () => this.#config.admin.token,
        metrics: () => this.#metricsText(),
        status: () => this.#status(),
        reload: async () => {
          const result = await this.reloadFromFile('api');
          // workers > 1: the others load the same file (the primary signals them).
          if (result.result === 'reloaded') reloadOtherWorkers();
          return result;
        },
      }, this.#logger.child({ logger: 'admin' }));
      into.admin = admin;
      addresses.admin = await admin.listen();
    }
  }

  /** `GET /metrics`: this process's metrics, or with `workers` > 1 every worker's, aggregated. */
  async #metricsText(): Promise<{ contentType: string; body: string; status?: number }> {
    const contentType = this.#metrics.contentType;
    if (!cluster.isWorker) return { contentType, body: await this.#metrics.text() };
    try {
      return { contentType, body: await clusterMetricsText() };
    } catch (error) {
      if (!(error instanceof ClusterMetricsError)) throw error;
      this.#logger.warn({ err: { message: error.message } }, 'metrics: the workers\' metrics could not be collected');
      return { status: 503, contentType: 'text/plain; charset=utf-8', body: `${error.message}\n` };
    }
  }

  async #closeListeners(listeners: Listeners, graceMs: number): Promise<void> {
    await Promise.all([listeners.https?.close(graceMs), listeners.http?.close(graceMs), listeners.admin?.close()]);
  }

  /** Plain HTTP: ACME challenge, else redirect to HTTPS, else serve the plain site. */
  #onPlainRequest(req: IncomingMessage, res: ServerResponse): void {
    const url = req.url ?? '/';
    if (url.startsWith(ACME_CHALLENGE_PREFIX) && this.#issuers.acme) {
      const answer = this.#issuers.acme.handleHttp01(url);
      if (answer !== undefined) {
        res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(answer) });
        res.end(answer);
        return;
      }
    }
    this.#metrics.inFlight++;
    const host = requestHost(req);
    const routed = host === undefined ? undefined : this.#runtime.router.siteFor(host);
    if (host === undefined || routed === undefined) {
      dispatchRequest(req, res, this.#httpContext);
      return;
    }
    const site = routed.site.config;
    if (site.tls !== 'off' && site.redirect && this.addresses.https) {
      const startedAt = performance.now();
      redirectToHttps(req, res, host, this.addresses.https.port);
      this.#onExchange({
        req, startedAt, protocol: 'http', host, site: routed.site, route: undefined,
        status: 308, bytesIn: 0, bytesOut: 0, upstream: undefined, error: undefined, requestId: undefined,
      });
      return;
    }
    dispatchRequest(req, res, this.#httpContext, host, routed);
  }

  #onPlainUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    const host = requestHost(req);
    const routed = host === undefined ? undefined : this.#runtime.router.siteFor(host);
    if (routed !== undefined && routed.site.config.tls !== 'off' && routed.site.config.redirect && this.addresses.https) {
      const authority = host!.includes(':') ? `[${host}]` : host;
      const port = this.addresses.https.port;
      socket.end(`HTTP/1.1 308 Permanent Redirect\r\nLocation: https://${authority}${port === 443 ? '' : `:${port}`}${req.url ?? '/'}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
      return;
    }
    this.#metrics.inFlight++;
    dispatchUpgrade(req, socket, head, this.#httpContext);
  }

  // ---- route middleware and tunnels ----

  /** Rate limiters (kept across reloads when the route and its settings did not change) and capture settings. */
  #buildMiddleware(config: GatehouseConfig, runtime: Runtime): void {
    const middleware = new WeakMap<RouteRuntime, RouteMiddleware>();
    const limiters = new Map<string, RateLimiter>();
    let anyCapture = false;
    const clients = this.#clients;
    for (const site of runtime.sites) {
      for (const { route } of site.routes) {
        const { rate_limit: rateLimit, capture } = route.config;
        if (rateLimit === undefined && capture === undefined) continue;
        let limiter: RateLimiter | undefined;
        if (rateLimit !== undefined) {
          const key = JSON.stringify([site.hosts, route.config.path, rateLimit, config.trusted_proxies]);
          limiter = this.#limiters.get(key);
          if (limiter === undefined) limiter = new RateLimiter(rateLimit, clients);
          limiters.set(key, limiter);
        }
        if (capture !== undefined) anyCapture = true;
        middleware.set(route, { limiter, capture });
      }
    }
    this.#middleware = middleware;
    this.#limiters = limiters;
    this.#anyCapture = anyCapture;
  }

  /** Capture, then rate limit: 0 to go on, else the status already answered. */
  #beforeForward(req: ClientRequest, res: ClientResponse, site: SiteRuntime, route: RouteRuntime): number {
    const middleware = this.#middleware.get(route);
    if (middleware === undefined) return 0;
    if (middleware.capture !== undefined) startCapture(req, res, middleware.capture);
    if (middleware.limiter !== undefined && middleware.limiter.admit(req, res) !== 0) {
      this.#metrics.rateLimited(site, route);
      return 429;
    }
    return 0;
  }

  #onTunnel(req: IncomingMessage, socket: Duplex, route: RouteRuntime): void {
    const tunnels = this.#tunnels;
    tunnels.set(socket, { host: requestHost(req) ?? '', url: req.url ?? '/', path: route.config.path });
    socket.once('close', () => tunnels.delete(socket));
  }

  /** Close the tunnels whose route the new runtime no longer has (same host and path, same route prefix). */
  #closeOrphanTunnels(runtime: Runtime): number {
    let closed = 0;
    for (const [socket, tunnel] of this.#tunnels) {
      const routed = runtime.router.siteFor(tunnel.host);
      const matched = routed === undefined ? undefined : runtime.router.routeFor(routed, tunnel.url);
      if (matched === undefined || matched.route.config.path !== tunnel.path) {
        socket.destroy();
        this.#tunnels.delete(socket);
        closed++;
      }
    }
    return closed;
  }

  // ---- observability ----

  /** One exchange is over: metrics, debug capture, access log. */
  #onExchange(record: AccessRecord): void {
    this.#metrics.observe(record);
    if (this.#anyCapture) {
      const capture = captureOf(record.req);
      if (capture !== undefined) {
        this.#accessLog.capture.info({
          request_id: record.requestId,
          site: record.site?.hosts[0],
          route: record.route?.config.path,
          upstream: record.upstream,
          error: record.error,
          ...finishCapture(capture, record.status),
        }, 'capture');
      }
    }
    if (this.#config.log.access) this.#logAccess(record);
  }

  #logAccess(record: AccessRecord): void {
    const req = record.req;
    const url = req.url ?? '';
    const query = url.indexOf('?');
    const socket = req.socket as { servername?: string | false; remoteAddress?: string } | null;
    this.#accessLog.access.info({
      request_id: record.requestId,
      client_ip: this.#clients.of(req),
      protocol: req.httpVersionMajor === 2 ? 'h2' : 'h1',
      tls: record.protocol === 'https',
      method: req.method,
      host: record.host,
      path: query < 0 ? url : url.slice(0, query),
      route: record.route?.config.path,
      status: record.status,
      bytes_in: record.bytesIn,
      bytes_out: record.bytesOut,
      duration_ms: Math.round((performance.now() - record.startedAt) * 1000) / 1000,
      upstream: record.upstream,
      sni: typeof socket?.servername === 'string' ? socket.servername : undefined,
      error: record.error,
      headers: this.#config.log.access_headers ? req.headers : undefined,
    }, 'request');
  }

  /** `GET /status`. */
  #status(): unknown {
    const config = this.#config;
    const address = (a: AddressInfo | undefined) => (a === undefined ? undefined : `${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`);
    const acme = this.#issuers.acme;
    return {
      config: { version: this.#version, source: config.source, loaded_at: this.#loadedAt.toISOString() },
      listeners: { https: address(this.addresses.https), http: address(this.addresses.http), admin: address(this.addresses.admin) },
      in_flight: this.#metrics.inFlight,
      tunnels: this.#tunnels.size,
      sites: this.#runtime.sites.map((site) => ({
        hosts: site.hosts,
        tls: site.config.tls,
        redirect: site.config.redirect,
        routes: site.routes.map(({ path, route }) => ({
          path,
          strip_prefix: route.config.strip_prefix,
          load_balancing: route.config.load_balancing,
          rate_limit: route.config.rate_limit,
          capture: route.config.capture !== undefined,
          upstreams: route.group.snapshot(),
        })),
      })),
      certificates: this.#store.list().map((c) => ({
        names: c.names,
        source: c.source,
        issuer: c.issuer,
        not_before: c.notBefore.toISOString(),
        not_after: c.notAfter.toISOString(),
        temporary: c.temporary,
      })),
      acme: acme ? { directory: acme.directoryUrl, orders: acme.orderCount, failures: acme.failureCount } : undefined,
    };
  }

  // ---- certificates ----

  /**
   * Which source may obtain a certificate for a name the store does not have:
   * - an internal site's name: the local CA, during the handshake;
   * - a name an ACME site lists exactly: ACME in the background, the local CA meanwhile (the
   *   handshake is never stalled by an order);
   * - any other name (an ACME site's wildcard or `*`, or no site) with `tls.on_demand`: ACME during
   *   the handshake, after the on-demand gate (ask URL or allow list) approved the name.
   */
  #obtainPolicy(name: string): ObtainDecision | undefined {
    const routed = this.#runtime.router.siteFor(name);
    const { internal, acme } = this.#issuers;
    const mode = routed?.site.config.tls;
    if (mode === 'internal') return { source: internal, waitInHandshake: true };
    if (mode === 'static' || mode === 'off' || acme === undefined) return undefined;
    if (mode === 'acme' && routed!.site.hosts.includes(name)) return { source: acme, waitInHandshake: false, temporary: internal };
    if (this.#config.tls.on_demand) return { source: acme, waitInHandshake: true };
    return undefined;
  }
}

/** Same listen address (both off counts as the same). */
function sameAddress(a: ListenAddress | null | undefined, b: ListenAddress | null | undefined): boolean {
  if (!a || !b) return !a && !b;
  return a.host === b.host && a.port === b.port;
}

/** ACME is needed when a site uses it or on-demand TLS is configured. */
function needsAcme(config: GatehouseConfig): boolean {
  return config.tls.on_demand !== undefined || config.sites.some((site) => site.tls === 'acme');
}

/** Exact names of `tls: acme` sites (wildcards and `*` are on-demand only). */
function acmeNames(config: GatehouseConfig): string[] {
  return config.sites.filter((site) => site.tls === 'acme').flatMap((site) => site.hosts.filter((host) => !host.includes('*')));
}
