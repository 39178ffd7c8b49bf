/**
 * Gatehouse: wires a config to certificates, listeners and the router, and runs the
 * start → reload → stop lifecycle. A reload builds the new runtime completely before it replaces
 * the old one, so a config that fails to build leaves the old one serving.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import type { GatehouseConfig } from './config/schema.js';
import { ACME_CHALLENGE_PREFIX, HttpListener, redirectToHttps } from './listeners/http.js';
import { HttpsListener } from './listeners/https.js';
import type { Logger } from './observability/log.js';
import { dispatchRequest, dispatchUpgrade, requestHost, type AccessRecord, type DispatchContext } from './routing/dispatch.js';
import { buildRuntime, type Runtime } from './routing/runtime.js';
import { CertificateStore, covers, loadStaticCertificates, type ObtainDecision } from './tls/certificates.js';
import { LocalCA } from './tls/local-ca.js';
import type { Certificate } from './tls/source.js';
import { AcmeIssuer } from './acme/manager.js';
import { FileStorage } from './tls/storage.js';

/** The certificate issuers of a running server. */
export interface CertificateIssuers {
  /** The local CA (`tls: internal`, temporary certificates, the default certificate). */
  readonly internal: LocalCA;
  /** The ACME issuer; present when a site uses `tls: acme` or `tls.on_demand` is set. */
  readonly acme: AcmeIssuer | undefined;
}

/** A running edge server. */
export class Gatehouse {
  /** Addresses actually bound (real ports when 0 was configured). */
  readonly addresses: { http?: AddressInfo; https?: AddressInfo; } = {};
  #config: GatehouseConfig;
  #runtime: Runtime;
  readonly #logger: Logger;
  readonly #accessLogger: Logger;
  readonly #store: CertificateStore;
  readonly #issuers: CertificateIssuers;
  #staticCertificates: Certificate[];
  #http: HttpListener | undefined;
  #https: HttpsListener | undefined;
  readonly #httpsContext: DispatchContext;
  readonly #httpContext: DispatchContext;
  #stopping: Promise<void> | undefined;

  private constructor(config: GatehouseConfig, logger: Logger, store: CertificateStore, issuers: CertificateIssuers, staticCertificates: Certificate[], runtime: Runtime) {
    this.#config = config;
    this.#logger = logger;
    this.#accessLogger = logger.child({ logger: 'http.log.access' });
    this.#store = store;
    this.#issuers = issuers;
    this.#staticCertificates = staticCertificates;
    this.#runtime = runtime;
    const self = this;
    const onComplete = (record: AccessRecord) => this.#logAccess(record);
    this.#httpsContext = {
      get runtime() { return self.#runtime; },
      protocol: 'https',
      certificateCovers: (serverName, host) => {
        const certificate = store.forServerName(serverName);
        return certificate !== undefined && covers(certificate, host);
      },
      onComplete,
      draining: () => this.#https?.draining ?? false,
    };
    this.#httpContext = {
      get runtime() { return self.#runtime; },
      protocol: 'http',
      onComplete,
      draining: () => this.#http?.draining ?? false,
    };
  }

  /**
   * Start serving `config`: load or create the local CA, load static certificates, build the
   * routes, bind the listeners.
   * @throws when storage is unusable, a certificate file is invalid (`GH_TLS_*` codes), or a
   *   listener cannot bind (EADDRINUSE, EACCES); nothing is left running then.
   */
  static async start(config: GatehouseConfig, logger: Logger): Promise<Gatehouse> {
    const storage = new FileStorage(config.tls.storage);
    const internal = await LocalCA.load(storage);
    const tlsLogger = logger.child({ logger: 'tls' });
    const store = new CertificateStore({ logger: tlsLogger, renewWindow: config.tls.acme.renew_window });
    const staticCertificates = await loadStaticCertificates(config.tls.certificates);
    for (const certificate of staticCertificates) store.put(certificate);
    if (staticCertificates.length === 0) {
      store.setDefault(() => internal.issue(['localhost', '127.0.0.1', '::1']));
      await store.refreshDefault();
    }
    const acme = needsAcme(config)
      ? await AcmeIssuer.fromConfig(config.tls, { storage, logger: logger.child({ logger: 'tls' }), onCertificate: (c) => store.put(c) })
      : undefined;
    const runtime = buildRuntime(config.sites, logger.child({ logger: 'upstream' }));
    const gatehouse = new Gatehouse(config, logger, store, { internal, acme }, staticCertificates, runtime);
    store.setPolicy((name) => gatehouse.#obtainPolicy(name));
    try {
      await gatehouse.#listen();
      // After the listeners: the HTTP-01 and TLS-ALPN-01 answers must be reachable before ordering.
      if (acme) {
        await acme.manage(acmeNames(config));
        acme.start();
      }
    } catch (error) {
      await gatehouse.#closeListeners(0);
      await runtime.close();
      await acme?.close();
      throw error;
    }
    runtime.start();
    logger.info({
      config: config.source,
      http: gatehouse.addresses.http?.port,
      https: gatehouse.addresses.https?.port,
      sites: config.sites.length,
      local_ca_root: storage.pathOf('ca/root.crt'),
    }, 'serving');
    return gatehouse;
  }

  /** The config being served. */
  get config(): GatehouseConfig {
    return this.#config;
  }

  /** The certificate store (SNI lookup), e.g. for /status. */
  get certificates(): CertificateStore {
    return this.#store;
  }

  /** The runtime being served (routes, upstreams). */
  get runtime(): Runtime {
    return this.#runtime;
  }

  /**
   * Serve a new config. The new routes are built before they replace the old ones; requests in
   * flight finish on the old upstream pools, which close afterwards. Listener addresses are kept
   * (a changed `listen` section needs a restart, and is logged).
   * @throws when the new config cannot be built (a certificate file is invalid); the old one keeps serving.
   */
  async reload(config: GatehouseConfig): Promise<void> {
    const staticCertificates = await loadStaticCertificates(config.tls.certificates);
    const runtime = buildRuntime(config.sites, this.#logger.child({ logger: 'upstream' }));
    if (JSON.stringify(config.listen) !== JSON.stringify(this.#config.listen)) {
      this.#logger.warn({ old: this.#config.listen, new: config.listen }, 'listen addresses changed: restart to apply them');
    }
    for (const certificate of this.#staticCertificates) {
      if (!staticCertificates.some((c) => c.cert === certificate.cert)) this.#store.remove(certificate);
    }
    for (const certificate of staticCertificates) this.#store.put(certificate);
    this.#staticCertificates = staticCertificates;
    if (this.#issuers.acme) await this.#issuers.acme.manage(acmeNames(config));
    else if (needsAcme(config)) this.#logger.warn('the new config uses ACME but the old one did not: restart to start the ACME issuer');
    const old = this.#runtime;
    this.#runtime = runtime;
    this.#config = config;
    runtime.start();
    this.#logger.info({ config: config.source, sites: config.sites.length }, 'config reloaded');
    old.close().catch((error: unknown) => this.#logger.warn({ err: error }, 'closing the old upstream pools failed'));
  }

  /**
   * Stop: listeners stop accepting, in-flight requests get `grace_period` to finish, then every
   * connection and upstream pool is closed. Idempotent.
   */
  stop(): Promise<void> {
    this.#stopping ??= (async () => {
      this.#issuers.acme?.stop();
      await this.#closeListeners(this.#config.grace_period);
      await this.#runtime.close();
      await this.#issuers.acme?.close();
    })();
    return this.#stopping;
  }

  async #listen(): Promise<void> {
    const { listen } = this.#config;
    const onClientError = (error: Error) => this.#logger.debug({ err: { message: error.message, code: (error as { code?: string }).code } }, 'client connection error');
    if (listen.https) {
      this.#https = new HttpsListener({
        address: listen.https,
        store: this.#store,
        onRequest: (req, res) => dispatchRequest(req, res, this.#httpsContext),
        onUpgrade: (req, socket, head) => dispatchUpgrade(req, socket, head, this.#httpsContext),
        onClientError,
        ...(this.#issuers.acme && this.#config.tls.acme.challenges.includes('tls-alpn-01')
          ? { acceptConnection: this.#issuers.acme.tlsAlpn.handleConnection.bind(this.#issuers.acme.tlsAlpn) }
          : {}),
      });
      this.addresses.https = await this.#https.listen();
    }
    if (listen.http) {
      this.#http = new HttpListener({
        address: listen.http,
        onRequest: (req, res) => this.#onPlainRequest(req, res),
        onUpgrade: (req, socket, head) => this.#onPlainUpgrade(req, socket, head),
        onClientError,
      });
      this.addresses.http = await this.#http.listen();
    }
  }

  async #closeListeners(graceMs: number): Promise<void> {
    await Promise.all([this.#https?.close(graceMs), this.#http?.close(graceMs)]);
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
    const host = requestHost(req);
    const routed = host === undefined ? undefined : this.#runtime.router.siteFor(host);
    if (host === undefined || routed === undefined) {
      dispatchRequest(req, res, this.#httpContext);
      return;
    }
    const site = routed.site.config;
    if (site.tls !== 'off' && site.redirect && this.addresses.https) {
      redirectToHttps(req, res, host, this.addresses.https.port);
      this.#logAccess({
        req, startedAt: performance.now(), protocol: 'http', host, site: routed.site, route: undefined,
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
    dispatchUpgrade(req, socket, head, this.#httpContext);
  }

  /** Which source may obtain a certificate for a name the store does not have. */
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

  #logAccess(record: AccessRecord): void {
    if (!this.#config.log.access) return;
    const req = record.req;
    const url = req.url ?? '';
    const query = url.indexOf('?');
    const socket = req.socket as { servername?: string | false; remoteAddress?: string } | null;
    this.#accessLogger.info({
      request_id: record.requestId,
      client_ip: socket?.remoteAddress,
      protocol: req.httpVersionMajor === 2 ? 'h2' : 'h1',
      tls: record.protocol === 'https',
      method: req.method,
      host: record.host,
      path: query < 0 ? url : url.slice(0, query),
      status: record.status,
      bytes_in: record.bytesIn,
      bytes_out: record.bytesOut,
      duration_ms: Math.round((performance.now() - record.startedAt) * 1000) / 1000,
      upstream: record.upstream,
      sni: typeof socket?.servername === 'string' ? socket.servername : undefined,
      error: record.error,
    }, 'request');
  }
}

/** ACME is needed when a site uses it or on-demand TLS is configured. */
function needsAcme(config: GatehouseConfig): boolean {
  return config.tls.on_demand !== undefined || config.sites.some((site) => site.tls === 'acme');
}

/** Exact names of `tls: acme` sites (wildcards and `*` are on-demand only). */
function acmeNames(config: GatehouseConfig): string[] {
  return config.sites.filter((site) => site.tls === 'acme').flatMap((site) => site.hosts.filter((host) => !host.includes('*')));
}
