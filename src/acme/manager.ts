/**
 * The ACME issuer (RFC 8555): obtains certificates for names, keeps them in storage, renews them
 * in the background, and answers `CertificateSource.obtain` for the SNI store (CertMagic's
 * acmeissuer.go + maintain.go).
 *
 * Storage layout, under `tls.storage` (`<directory-host>` is the ACME directory's host, plus
 * `-<port>` when its URL names one, e.g. `acme-v02.api.letsencrypt.org`, `127.0.0.1-14000`):
 *
 * ```
 * acme/<directory-host>/account.key                   account key, PEM ECDSA P-256, mode 0600
 * acme/<directory-host>/account.json                  account URL and contact (informational)
 * certificates/<directory-host>/<name>/<name>.crt     certificate chain, PEM, leaf first
 * certificates/<directory-host>/<name>/<name>.key     its private key, PEM ECDSA P-256, mode 0600
 * certificates/<directory-host>/<name>/<name>.json    { names, issuer, not_before, not_after, directory, obtained_at }
 * locks/<directory-host>/<name>.lock                  present only while a process orders <name>
 * ```
 *
 * Every file is written atomically. A certificate found in storage that is valid and not due for
 * renewal is used as is, across restarts and across processes sharing the folder: no new order
 * (CAs rate-limit orders, e.g. Let's Encrypt's 5 duplicate certificates per week).
 *
 * Lifecycle of a name:
 * - `manage(names)` (names of sites with `tls: acme`) loads stored certificates; the background
 *   loop (`start()`) obtains the missing ones and renews each when `renew_window` of its lifetime
 *   is left (minus a random jitter of up to 10% of the window, at most 6 h, so certificates issued
 *   together do not renew together). Every certificate obtained, renewed or loaded is handed to
 *   `onCertificate` so the store swaps it in without a restart.
 * - `obtain(name)` (from the store, at handshake time) returns the current certificate, loads it,
 *   or orders it; names not managed must pass the on-demand gate (`tls.on_demand`).
 * - One order per name at a time: concurrent calls share one promise, and a lock in storage
 *   (`locks/...`) keeps other processes from ordering the same name; they wait, then use the
 *   winner's certificate from storage.
 * - Failures back off per name: 1 minute doubling to 6 hours, then every 6 hours, never sooner than
 *   the CA's Retry-After (RFC 8555 §6.6).
 * - Challenges are tried in the order of `tls.acme.challenges`; a failed validation moves on to the
 *   next type with a new order.
 *
 * Log lines come from the child loggers `tls.obtain`, `tls.renew` and `tls.on_demand`.
 */
import { readFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import acme from 'acme-client';
import type { GatehouseConfig } from '../config/schema.js';
import { certificateFromPem, normalizeHostName } from '../tls/pem.js';
import type { Certificate, CertificateSource } from '../tls/source.js';
import type { Storage } from '../tls/storage.js';
import { AcmeAccount, directoryFolder, resolveDirectoryUrl } from './account.js';
import { Backoff, type BackoffOptions } from './backoff.js';
import { Http01Responder, TlsAlpnResponder, type ChallengeType } from './challenges.js';
import { AcmeError, errorFields, type AcmeProblem } from './errors.js';
import { acquireLock, type Lock, type LockOptions } from './lock.js';
import { OnDemandPolicy } from './on-demand.js';
import { AcmeTransport } from './transport.js';

/** The logger the issuer writes to: pino's `Logger` fits; `child` names sub-loggers (`tls.obtain`). */
export interface AcmeLogger {
  debug(object: object, message?: string): void;
  info(object: object, message?: string): void;
  warn(object: object, message?: string): void;
  error(object: object, message?: string): void;
  child?(bindings: Record<string, unknown>): AcmeLogger;
}

/** Options of {@link AcmeIssuer}. The first group mirrors `tls.acme`. */
export interface AcmeIssuerOptions {
  /** `letsencrypt` (default), `letsencrypt-staging`, or the https URL of an ACME directory. */
  readonly directory?: string;
  /** Account contact (RFC 8555 §7.3); the CA sends expiry warnings there. */
  readonly email?: string;
  /** The operator accepted the CA's terms (`tls.acme.agree_tos`). Must be true. */
  readonly agreeTos: boolean;
  /** PEM of extra CA certificates trusted for the ACME server's own TLS (e.g. Pebble's). */
  readonly caBundle?: string;
  /** Challenge types in order of preference. Default `['http-01', 'tls-alpn-01']`. */
  readonly challenges?: readonly ChallengeType[];
  /** External account binding (RFC 8555 §7.3.4). */
  readonly eab?: { readonly kid: string; readonly hmacKey: string };
  /** Renew when this fraction of the lifetime is left, in (0, 1). Default 1/3. */
  readonly renewWindow?: number;

  /** Where keys and certificates live (see the layout at the top of this file). */
  readonly storage: Storage;
  /** Log destination; named child loggers are derived from it. Default: silent. */
  readonly logger?: AcmeLogger;
  /**
   * Receives every certificate this issuer obtains, renews or loads from storage, once each, so the
   * store can `put` it. Exceptions it throws are logged and ignored.
   */
  readonly onCertificate?: (certificate: Certificate) => void;
  /** The on-demand gate for names not passed to {@link AcmeIssuer.manage}; without it such names are refused. */
  readonly onDemand?: OnDemandPolicy;
  /** HTTP-01 tokens, shared with the plain HTTP listener. Default: a new one ({@link AcmeIssuer.http01}). */
  readonly http01?: Http01Responder;
  /** TLS-ALPN-01 responder, shared with the HTTPS listener. Default: a new one ({@link AcmeIssuer.tlsAlpn}). */
  readonly tlsAlpn?: TlsAlpnResponder;
  /** Retry delays after failures. Default 1 minute doubling to 6 hours. */
  readonly backoff?: BackoffOptions;
  /** Longest sleep of the renewal loop, ms (it also wakes for each due renewal or retry). Default 600 000. */
  readonly checkIntervalMs?: number;
  /** First delay between status polls of a challenge or order, ms; doubles up to 10 s. Default 1000. */
  readonly pollIntervalMs?: number;
  /** Storage lock settings (stale after 2 minutes, wait at most 10 minutes). */
  readonly lock?: LockOptions;
  /** Timeout of each HTTP request to the ACME server, ms. Default 30 000. */
  readonly requestTimeoutMs?: number;
}

interface Held {
  readonly cert: Certificate;
  /** When the loop renews it (jittered), ms since epoch. */
  readonly renewAt: number;
}

const silent: AcmeLogger = { debug() {}, info() {}, warn() {}, error() {} };

/**
 * Certificates from an ACME CA; registry name `acme`. See the file comment for the lifecycle.
 *
 * Wiring:
 * ```ts
 * const issuer = await AcmeIssuer.fromConfig(config.tls, { storage, logger, onCertificate: (c) => store.put(c) });
 * // plain HTTP listener:  issuer.http01.handle(req.url)        (before redirects)
 * // HTTPS listener:       issuer.tlsAlpn.handleConnection(socket, (s) => h2.emit('connection', s))
 * await issuer.manage(namesOfAcmeSites);
 * issuer.start();
 * // shutdown: await issuer.close();
 * ```
 */
export class AcmeIssuer implements CertificateSource {
  readonly name = 'acme';
  /** The ACME directory URL in use. */
  readonly directoryUrl: string;
  /** Pending HTTP-01 challenges; the plain HTTP listener calls {@link Http01Responder.handle}. */
  readonly http01: Http01Responder;
  /** TLS-ALPN-01 responder; the HTTPS listener passes raw connections through {@link TlsAlpnResponder.handleConnection}. */
  readonly tlsAlpn: TlsAlpnResponder;

  readonly #options: AcmeIssuerOptions;
  readonly #storage: Storage;
  readonly #folder: string;
  readonly #challenges: readonly ChallengeType[];
  readonly #renewWindow: number;
  readonly #checkIntervalMs: number;
  readonly #transport: AcmeTransport;
  readonly #backoff: Backoff;
  readonly #log: { obtain: AcmeLogger; renew: AcmeLogger; onDemand: AcmeLogger };
  readonly #managed = new Set<string>();
  readonly #held = new Map<string, Held>();
  readonly #inflight = new Map<string, Promise<Certificate>>();
  #account: Promise<AcmeAccount> | undefined;
  #timer: NodeJS.Timeout | undefined;
  #running = false;
  #orders = 0;
  #failures = 0;
  #warnedNoOnDemand = false;

  /**
   * @throws {AcmeError} `GH_ACME_TOS_NOT_AGREED` unless `agreeTos`; `GH_ACME_CONFIG` for a bad
   *   directory or renew window.
   */
  constructor(options: AcmeIssuerOptions) {
    this.directoryUrl = resolveDirectoryUrl(options.directory ?? 'letsencrypt');
    if (!options.agreeTos) {
      throw new AcmeError('GH_ACME_TOS_NOT_AGREED', `set tls.acme.agree_tos: true once you have read and accepted the terms of service of ${this.directoryUrl}`);
    }
    const renewWindow = options.renewWindow ?? 1 / 3;
    if (!(renewWindow > 0 && renewWindow < 1)) throw new AcmeError('GH_ACME_CONFIG', `tls.acme.renew_window must be between 0 and 1, got ${renewWindow}`);
    this.#options = options;
    this.#storage = options.storage;
    this.#folder = directoryFolder(this.directoryUrl);
    this.#challenges = options.challenges?.length ? [...new Set(options.challenges)] : ['http-01', 'tls-alpn-01'];
    this.#renewWindow = renewWindow;
    this.#checkIntervalMs = options.checkIntervalMs ?? 600_000;
    this.#transport = new AcmeTransport({
      ...(options.caBundle !== undefined ? { ca: options.caBundle } : {}),
      ...(options.requestTimeoutMs !== undefined ? { timeoutMs: options.requestTimeoutMs } : {}),
    });
    this.#backoff = new Backoff(options.backoff);
    this.http01 = options.http01 ?? new Http01Responder();
    this.tlsAlpn = options.tlsAlpn ?? new TlsAlpnResponder();
    const root = options.logger ?? silent;
    const child = (name: string): AcmeLogger => root.child?.({ name }) ?? root;
    this.#log = { obtain: child('tls.obtain'), renew: child('tls.renew'), onDemand: child('tls.on_demand') };
  }

  /**
   * Build the issuer from the `tls` config section: `tls.acme` options, `ca_bundle` read from its
   * (absolute) path, `tls.on_demand` as the on-demand gate.
   * @throws {AcmeError} `GH_ACME_CONFIG` when `ca_bundle` cannot be read; see the constructor.
   */
  static async fromConfig(
    tls: GatehouseConfig['tls'],
    deps: Pick<AcmeIssuerOptions, 'storage' | 'logger' | 'onCertificate' | 'http01' | 'tlsAlpn'>,
  ): Promise<AcmeIssuer> {
    const config = tls.acme;
    let caBundle: string | undefined;
    if (config.ca_bundle !== undefined) {
      try {
        caBundle = await readFile(config.ca_bundle, 'utf8');
      } catch (error) {
        throw new AcmeError('GH_ACME_CONFIG', `tls.acme.ca_bundle: cannot read ${config.ca_bundle} (${(error as NodeJS.ErrnoException).code ?? (error as Error).message})`, { cause: error });
      }
    }
    const onDemand = tls.on_demand && (tls.on_demand.ask !== undefined || tls.on_demand.allow !== undefined)
      ? new OnDemandPolicy({
        ...(tls.on_demand.ask !== undefined ? { ask: tls.on_demand.ask } : {}),
        ...(tls.on_demand.allow !== undefined ? { allow: tls.on_demand.allow } : {}),
        ...(deps.logger ? { logger: deps.logger.child?.({ name: 'tls.on_demand' }) ?? deps.logger } : {}),
      })
      : undefined;
    return new AcmeIssuer({
      directory: config.directory,
      agreeTos: config.agree_tos,
      challenges: config.challenges,
      renewWindow: config.renew_window,
      ...(config.email !== undefined ? { email: config.email } : {}),
      ...(caBundle !== undefined ? { caBundle } : {}),
      ...(config.eab ? { eab: { kid: config.eab.kid, hmacKey: config.eab.hmac_key } } : {}),
      ...(onDemand ? { onDemand } : {}),
      ...deps,
    });
  }

  /**
   * The plain HTTP listener's hook, before any redirect: the key authorization to answer (200,
   * `text/plain`) for a pending HTTP-01 challenge path (RFC 8555 §8.3), else undefined.
   * Same as `http01.handle(path)`.
   * @param path the request target, e.g. `/.well-known/acme-challenge/<token>`.
   */
  handleHttp01(path: string | undefined): string | undefined {
    return this.http01.handle(path);
  }

  /** Orders this instance has created (RFC 8555 §7.4 `newOrder`), for /status and tests. */
  get orderCount(): number {
    return this.#orders;
  }

  /** Failed attempts to obtain or renew a certificate (each logged as "could not get certificate"), for metrics. */
  get failureCount(): number {
    return this.#failures;
  }

  /**
   * Take charge of `names` (the hosts of sites with `tls: acme`): load their certificates from
   * storage now (each delivered to `onCertificate`), and let the loop obtain the missing and renew
   * the due ones. Wildcards and IP literals are skipped with a warning (they need DNS-01, or no
   * public CA issues them).
   */
  async manage(names: Iterable<string>): Promise<void> {
    const added: string[] = [];
    for (const raw of names) {
      const name = normalizeHostName(raw);
      if (!isIssuableName(name)) {
        this.#log.obtain.warn({ names: [name] }, 'cannot obtain a certificate for this name over HTTP-01 or TLS-ALPN-01 (wildcard, IP address or invalid name); skipped');
        continue;
      }
      if (this.#managed.has(name)) continue;
      this.#managed.add(name);
      added.push(name);
    }
    await Promise.all(added.map(async (name) => {
      const stored = await this.#load(name);
      if (stored) this.#adopt(name, stored, 'storage');
    }));
    this.#schedule(0);
  }

  /**
   * `CertificateSource.obtain`: a certificate covering `serverName`, from memory, storage or a new
   * order. Names not given to {@link manage} must pass the on-demand gate; refused names (and all
   * of them when there is no gate) resolve undefined. Concurrent calls for a name share one order.
   * A held certificate that is due but not expired is returned at once (the loop renews it).
   * @throws {AcmeError} `GH_ACME_BACKOFF` while the name waits after a failure; the errors of the
   *   order (`GH_ACME_PROBLEM`, `GH_ACME_UNREACHABLE`, `GH_ACME_VALIDATION_FAILED`, ...).
   */
  async obtain(serverName: string): Promise<Certificate | undefined> {
    const name = normalizeHostName(serverName);
    if (!isIssuableName(name)) return undefined;
    const held = this.#held.get(name);
    if (held && held.cert.notAfter.getTime() > Date.now()) return held.cert;
    if (!this.#managed.has(name) && !held) {
      const gate = this.#options.onDemand;
      if (!gate) {
        if (!this.#warnedNoOnDemand) {
          this.#warnedNoOnDemand = true;
          this.#log.onDemand.warn({ names: [name] }, 'a certificate was requested for a name no site lists and tls.on_demand is not configured; refusing such names');
        }
        return undefined;
      }
      if (!(await gate.allows(name))) {
        this.#log.onDemand.info({ names: [name] }, 'on-demand certificate refused');
        return undefined;
      }
    }
    return this.#get(name, false);
  }

  /** Start the background loop (obtain missing, renew due, retry after backoff). Timers are unref'd. */
  start(): void {
    if (this.#running) return;
    this.#running = true;
    this.#schedule(0);
  }

  /** Stop the loop. Orders in flight finish; nothing new is started by the loop. */
  stop(): void {
    this.#running = false;
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  /** Stop, wait for orders in flight to settle, close connections to the ACME server. */
  async close(): Promise<void> {
    this.stop();
    await Promise.allSettled([...this.#inflight.values()]);
    await this.#transport.close();
  }

  /** One piece of work per name: callers share the promise until it settles. */
  #get(name: string, renew: boolean): Promise<Certificate> {
    let pending = this.#inflight.get(name);
    if (!pending) {
      pending = this.#acquire(name, renew).finally(() => {
        this.#inflight.delete(name);
        this.#schedule();
      });
      this.#inflight.set(name, pending);
    }
    return pending;
  }

  async #acquire(name: string, renew: boolean): Promise<Certificate> {
    const current = this.#held.get(name)?.cert;
    const stored = await this.#load(name);
    let best = current;
    if (stored && (!current || stored.notBefore.getTime() > current.notBefore.getTime())) {
      this.#adopt(name, stored, 'storage');
      best = stored;
    }
    if (best && !this.#isDue(best) && (!renew || best !== current)) return best;
    if (best && !renew && best.notAfter.getTime() > Date.now()) return best;

    const state = this.#backoff.get(name);
    if (state && state.retryAt > Date.now()) {
      throw new AcmeError('GH_ACME_BACKOFF', `obtaining a certificate for ${name} failed ${state.failures} time(s); next attempt at ${new Date(state.retryAt).toISOString()}`, { retryAt: state.retryAt });
    }

    let lock: Lock | undefined;
    try {
      lock = await acquireLock(this.#storage, `locks/${this.#folder}/${name}.lock`, {
        ...this.#options.lock,
        onWait: (holder) => this.#log.obtain.info({ names: [name], holder_pid: holder?.pid, holder_host: holder?.hostname }, 'waiting for another process to finish obtaining the certificate'),
      });
      // The previous holder may have just stored what we need.
      const again = await this.#load(name);
      if (again && (!best || again.notBefore.getTime() > best.notBefore.getTime()) && !this.#isDue(again)) {
        this.#adopt(name, again, 'storage');
        this.#backoff.succeed(name);
        return again;
      }
      const cert = await this.#order(name, renew);
      await this.#save(name, cert);
      this.#backoff.succeed(name);
      this.#adopt(name, cert, renew ? 'renewal' : 'order');
      return cert;
    } catch (error) {
      this.#failures++;
      const failure = this.#backoff.fail(name, error instanceof AcmeError ? error.retryAfterMs : undefined);
      this.#log.obtain.error({
        names: [name],
        issuer: this.directoryUrl,
        renewal: renew,
        ...errorFields(error),
        attempt: failure.failures,
        retry_in_ms: failure.retryAt - Date.now(),
      }, 'could not get certificate');
      throw error;
    } finally {
      await lock?.release();
    }
  }

  /** Order with each challenge type in turn; a failed validation moves on to the next type. */
  async #order(name: string, renew: boolean): Promise<Certificate> {
    const account = await this.#accountReady();
    this.#log.obtain.info({ names: [name], issuer: this.directoryUrl, challenges: this.#challenges, renewal: renew }, renew ? 'renewing certificate' : 'obtaining certificate');
    let lastError: unknown;
    let reRegistered = false;
    for (let i = 0; i < this.#challenges.length; i++) {
      const type = this.#challenges[i]!;
      try {
        const cert = await this.#orderWith(account, name, type);
        this.#log.obtain.info({
          names: [name], issuer: this.directoryUrl, challenge: type, renewal: renew,
          not_before: cert.notBefore.toISOString(), not_after: cert.notAfter.toISOString(),
        }, renew ? 'certificate renewed' : 'certificate obtained');
        return cert;
      } catch (error) {
        lastError = error;
        if (error instanceof AcmeError && error.is('accountDoesNotExist') && !reRegistered) {
          // The CA forgot the account (a test CA restarted, an account deactivated): register again.
          reRegistered = true;
          this.#log.obtain.warn({ names: [name], issuer: this.directoryUrl, problem: error.problem }, 'ACME account unknown to the CA; registering again');
          account.forgetRegistration();
          await account.register();
          i--;
          continue;
        }
        if (!(error instanceof AcmeError && error.code === 'GH_ACME_VALIDATION_FAILED')) throw error;
        const next = this.#challenges[i + 1];
        this.#log.obtain.warn({ names: [name], challenge: type, problem: error.problem, next_challenge: next }, next ? `${type} challenge failed; trying ${next}` : `${type} challenge failed`);
      }
    }
    throw lastError;
  }

  /** One order (RFC 8555 §7.4) validated with `type`, finalized with a new ECDSA P-256 key. */
  async #orderWith(account: AcmeAccount, name: string, type: ChallengeType): Promise<Certificate> {
    const client = account.client;
    const order = await client.createOrder({ identifiers: [{ type: 'dns', value: name }] });
    this.#orders++;
    this.#log.obtain.debug({ names: [name], order: order.url, challenge: type }, 'order created');
    const authorizations = await client.getAuthorizations(order);
    for (const authz of authorizations) {
      if (authz.status === 'valid') continue; // reused authorization (RFC 8555 §7.1.4)
      const challenge = authz.challenges.find((c) => c.type === type);
      if (!challenge) {
        throw new AcmeError('GH_ACME_VALIDATION_FAILED', `${this.directoryUrl} offers no ${type} challenge for ${authz.identifier.value}`);
      }
      const keyAuthorization = await client.getChallengeKeyAuthorization(challenge);
      const cleanUp = await this.#present(type, authz, challenge, keyAuthorization);
      try {
        await client.completeChallenge(challenge);
        try {
          await client.waitForValidStatus(challenge);
        } catch (error) {
          if (error instanceof AcmeError) throw error;
          const problem = await this.#challengeProblem(account, authz.url, challenge.url);
          throw new AcmeError('GH_ACME_VALIDATION_FAILED', `${type} validation of ${authz.identifier.value} failed: ${problem?.detail ?? (error as Error).message}`, {
            ...(problem ? { problem } : {}),
            cause: error,
          });
        }
      } finally {
        cleanUp();
      }
    }
    const key = await acme.crypto.createPrivateEcdsaKey('P-256');
    // CN is limited to 64 characters (RFC 5280 ub-common-name); the SAN is what counts.
    const [, csr] = await acme.crypto.createCsr({ ...(name.length <= 64 ? { commonName: name } : {}), altNames: [name] }, key);
    const finalized = await client.finalizeOrder(order, csr);
    const chain = await client.getCertificate(finalized);
    return certificateFromPem(chain, key.toString('utf8'), 'acme');
  }

  async #present(type: ChallengeType, authz: acme.Authorization, challenge: { token?: string }, keyAuthorization: string): Promise<() => void> {
    if (type === 'http-01') {
      const token = challenge.token ?? '';
      this.http01.present(token, keyAuthorization);
      return () => this.http01.cleanUp(token);
    }
    await this.tlsAlpn.present(authz, keyAuthorization);
    return () => this.tlsAlpn.cleanUp(authz.identifier.value);
  }

  /** The problem document of a failed challenge (RFC 8555 §8: `challenge.error`), re-read from the CA. */
  async #challengeProblem(account: AcmeAccount, authzUrl: string, challengeUrl: string): Promise<AcmeProblem | undefined> {
    try {
      const [authz] = await account.client.getAuthorizations({ authorizations: [authzUrl] } as unknown as acme.Order);
      const failed = authz?.challenges.find((c) => c.url === challengeUrl) as { error?: AcmeProblem } | undefined;
      const error = failed?.error;
      if (!error) return undefined;
      return {
        type: error.type,
        ...(error.detail !== undefined ? { detail: error.detail } : {}),
        ...(error.status !== undefined ? { status: error.status } : {}),
        ...(error.subproblems !== undefined ? { subproblems: error.subproblems } : {}),
      };
    } catch {
      return undefined;
    }
  }

  #accountReady(): Promise<AcmeAccount> {
    this.#account ??= AcmeAccount.open({
      directoryUrl: this.directoryUrl,
      storage: this.#storage,
      agreeTos: this.#options.agreeTos,
      transport: this.#transport,
      ...(this.#options.email !== undefined ? { email: this.#options.email } : {}),
      ...(this.#options.eab ? { eab: this.#options.eab } : {}),
      ...(this.#options.pollIntervalMs !== undefined ? { pollIntervalMs: this.#options.pollIntervalMs } : {}),
    }).catch((error: unknown) => {
      this.#account = undefined;
      throw error;
    });
    return this.#account.then(async (account) => {
      await account.register();
      return account;
    });
  }

  /** True when at most `renewWindow` of the lifetime is left (no jitter). */
  #isDue(cert: Certificate, now = Date.now()): boolean {
    const lifetime = cert.notAfter.getTime() - cert.notBefore.getTime();
    return cert.notAfter.getTime() - now <= lifetime * this.#renewWindow;
  }

  /** Hold `cert` for `name`, schedule its renewal, hand it to `onCertificate` (once per certificate). */
  #adopt(name: string, cert: Certificate, origin: 'storage' | 'order' | 'renewal'): void {
    const previous = this.#held.get(name);
    if (previous && previous.cert.cert === cert.cert) return;
    const lifetime = cert.notAfter.getTime() - cert.notBefore.getTime();
    const window = lifetime * this.#renewWindow;
    const jitter = Math.random() * Math.min(window * 0.1, 6 * 3_600_000);
    const renewAt = Math.round(cert.notAfter.getTime() - window - jitter);
    this.#held.set(name, { cert, renewAt });
    if (origin === 'storage') this.#log.obtain.info({ names: [name], not_after: cert.notAfter.toISOString() }, 'using certificate from storage');
    this.#log.renew.info({ names: [name], renew_at: new Date(renewAt).toISOString(), not_after: cert.notAfter.toISOString() }, 'renewal scheduled');
    try {
      this.#options.onCertificate?.(cert);
    } catch (error) {
      this.#log.obtain.error({ names: [name], ...errorFields(error) }, 'onCertificate callback failed');
    }
    this.#schedule();
  }

  /** Arm the loop's timer for the earliest due renewal, retry or missing certificate (at most checkIntervalMs away). */
  #schedule(delayMs?: number): void {
    if (!this.#running) return;
    const now = Date.now();
    let wake = now + this.#checkIntervalMs;
    if (delayMs !== undefined) wake = Math.min(wake, now + delayMs);
    for (const name of this.#names()) {
      if (this.#inflight.has(name)) continue;
      const held = this.#held.get(name);
      const retryAt = this.#backoff.get(name)?.retryAt ?? 0;
      const due = held ? Math.max(held.renewAt, retryAt) : Math.max(now, retryAt);
      if (due < wake) wake = due;
    }
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#tick(), Math.max(0, wake - now));
    this.#timer.unref();
  }

  /** Start the work that is due; each finished piece of work re-arms the timer. */
  #tick(): void {
    this.#timer = undefined;
    if (!this.#running) return;
    const now = Date.now();
    for (const name of this.#names()) {
      if (this.#inflight.has(name)) continue;
      const retryAt = this.#backoff.get(name)?.retryAt;
      if (retryAt !== undefined && retryAt > now) continue;
      const held = this.#held.get(name);
      if (held && held.renewAt > now) continue;
      // Failures are logged and backed off in #acquire.
      this.#get(name, held !== undefined).catch(() => {});
    }
    this.#schedule();
  }

  /** Managed names and every name holding a certificate (on-demand ones included). */
  #names(): Set<string> {
    return new Set([...this.#managed, ...this.#held.keys()]);
  }

  #key(name: string, extension: 'crt' | 'key' | 'json'): string {
    return `certificates/${this.#folder}/${name}/${name}.${extension}`;
  }

  /** The stored certificate of `name`, or undefined when absent or unusable (logged). */
  async #load(name: string): Promise<Certificate | undefined> {
    try {
      const [chain, key] = await Promise.all([this.#storage.load(this.#key(name, 'crt')), this.#storage.load(this.#key(name, 'key'))]);
      if (!chain || !key) return undefined;
      const cert = certificateFromPem(chain.toString('utf8'), key.toString('utf8'), 'acme', { certFile: this.#key(name, 'crt'), keyFile: this.#key(name, 'key') });
      if (!cert.names.includes(name)) return undefined;
      return cert;
    } catch (error) {
      this.#log.obtain.warn({ names: [name], ...errorFields(error) }, 'ignoring unusable certificate in storage');
      return undefined;
    }
  }

  /** Key first, then chain, then metadata; each write is atomic. */
  async #save(name: string, cert: Certificate): Promise<void> {
    await this.#storage.store(this.#key(name, 'key'), cert.key, { secret: true });
    await this.#storage.store(this.#key(name, 'crt'), cert.cert);
    await this.#storage.store(this.#key(name, 'json'), `${JSON.stringify({
      names: cert.names,
      issuer: cert.issuer,
      not_before: cert.notBefore.toISOString(),
      not_after: cert.notAfter.toISOString(),
      directory: this.directoryUrl,
      obtained_at: new Date().toISOString(),
    }, null, 2)}\n`);
  }
}

/** A DNS name an ACME CA can validate over HTTP-01/TLS-ALPN-01: no wildcard, no IP, LDH labels. */
export function isIssuableName(name: string): boolean {
  if (name.length === 0 || name.length > 253 || isIP(name) !== 0) return false;
  const labels = name.split('.');
  if (labels.length < 2) return false;
  return labels.every((label) => label.length > 0 && label.length <= 63 && /^[a-z0-9_]([a-z0-9_-]*[a-z0-9])?$/.test(label));
}
