/**
 * The certificate store and what happens at ClientHello (certmagic's cache.go + handshake.go):
 * certificates indexed by the names they cover, SNI lookup (exact name, then a one-label wildcard),
 * SecureContexts built lazily and kept in a bounded LRU, a policy deciding which
 * {@link CertificateSource} may obtain a missing name, and the default certificate for handshakes
 * without SNI or for names nothing covers.
 *
 * The HTTPS listener spreads {@link CertificateStore.serverOptions} into
 * `http2.createSecureServer(...)` and calls {@link CertificateStore.attach} so the default
 * certificate follows changes. OpenSSL applies the protocol versions and the cipher list of the
 * listener's own context, not those of the context picked by SNI, so both carry
 * {@link TLS_SERVER_OPTIONS}.
 */
import { readFileSync } from 'node:fs';
import { createSecureContext, type SecureContext, type SecureContextOptions, type Server as TlsServer } from 'node:tls';
import { createHash, randomBytes } from 'node:crypto';
import { LRUCache } from 'lru-cache';
import type { Certificate, CertificateSource } from './source.js';
import { availableParallelism } from 'node:os';
import { fork, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { CertificateError, certificateFromVerifiedPem, normalizeHostName, verifyPemPair, type CertificateErrorCode, type LeafFacts } from './pem.js';
import type { VerifyBatch, VerifyBatchResult, VerifyJob } from './verify-worker.js';
import type { Storage } from './storage.js';

/**
 * TLS settings of every context (Mozilla "intermediate" profile, 2024): TLS 1.2 minimum; for TLS 1.2
 * only ECDHE key exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305), so forward secrecy always
 * and no CBC (Lucky13-style padding oracles); the server's order wins; X25519 first, then P-256/P-384.
 */
export const TLS_SERVER_OPTIONS = Object.freeze({
  minVersion: 'TLSv1.2',
  ciphers: [
    'TLS_AES_128_GCM_SHA256', 'TLS_AES_256_GCM_SHA384', 'TLS_CHACHA20_POLY1305_SHA256',
    'ECDHE-ECDSA-AES128-GCM-SHA256', 'ECDHE-RSA-AES128-GCM-SHA256',
    'ECDHE-ECDSA-AES256-GCM-SHA384', 'ECDHE-RSA-AES256-GCM-SHA384',
    'ECDHE-ECDSA-CHACHA20-POLY1305', 'ECDHE-RSA-CHACHA20-POLY1305',
  ].join(':'),
  honorCipherOrder: true,
  ecdhCurve: 'X25519:P-256:P-384',
} satisfies SecureContextOptions);

/** What the policy answers for a name the store has no certificate for. */
export interface ObtainDecision {
  /** The source that may obtain a certificate for the name. */
  readonly source: CertificateSource;
  /** true: the handshake waits for `source.obtain` (on-demand ACME, local CA), up to `obtainTimeout`.
   * false: the handshake is served at once (with `temporary`, else the default certificate) while
   * `source` works in the background; its certificate serves the following handshakes. */
  readonly waitInHandshake: boolean;
  /** Serves the handshakes while `source` works in the background (e.g. the local CA while ACME runs). */
  readonly temporary?: CertificateSource;
}

/** Decides which source, if any, may obtain a certificate for a name (normalised: lowercase, no trailing dot). */
export type ObtainPolicy = (serverName: string) => ObtainDecision | undefined;

/** Where the default certificate comes from: a certificate, or a function producing one (called again near its expiry). */
export type DefaultCertificate = Certificate | (() => Promise<Certificate | undefined>);

/** The part of a pino logger the store uses; a pino child logger (`tls.handshake`) fits. */
export interface TlsLogger {
  warn(fields: object, message: string): void;
  error(fields: object, message: string): void;
}

/** A certificate as `list()` shows it (for /status). */
export interface CertificateInfo {
  readonly names: readonly string[];
  readonly source: string;
  readonly issuer: string;
  readonly notBefore: Date;
  readonly notAfter: Date;
  /** Served only until the real certificate arrives. */
  readonly temporary: boolean;
}

/** Options of {@link CertificateStore}. */
export interface CertificateStoreOptions {
  /** Longest a handshake waits for `obtain` (ms); then the handshake fails cleanly and the obtain
   * goes on in the background. Default 10 000 (certmagic waits up to 90 s for on-demand issuance;
   * clients give up far sooner). */
  readonly obtainTimeout?: number;
  /** SecureContexts kept (LRU, by certificate). Default 1000; a context holds about 10 KiB of
   * parsed keys. An evicted context still held by a live connection serves its name again; one no
   * connection holds is built again on its next handshake (~0.1 ms). */
  readonly contextCacheSize?: number;
  /** A certificate is replaced in the background (when the policy names a source) once this
   * fraction of its lifetime is left. Default 1/3 (Let's Encrypt's advice). */
  readonly renewWindow?: number;
  /** Wait after a failed background obtain before the next attempt for that name (ms). Default 60 000. */
  readonly retryAfter?: number;
  /** Session ticket keys (48 bytes, RFC 5077 / RFC 8446 §4.6.1) given to every listener built from
   * {@link CertificateStore.serverOptions} and to every context, so a ticket resumes whichever
   * context served the name and whichever listener took the connection (OpenSSL decrypts tickets
   * with the listener's keys). Default: 48 random bytes per store. Give the same keys to every
   * process behind one address to resume across them; rotate them by building a new store. */
  readonly ticketKeys?: Buffer;
  /** Where failed lookups and obtains are reported. Default: nothing. */
  readonly logger?: TlsLogger;
}

/** `SNICallback`'s callback. */
export type SniDone = (error: Error | null, context?: SecureContext) => void;

interface Entry {
  readonly certificate: Certificate;
  readonly temporary: boolean;
  /** Names of the index that point at this entry. */
  references: number;
  readonly expiresAt: number;
  readonly renewAt: number;
  /** No background renewal is attempted before this time (ms since epoch). */
  nextRenewal: number;
}

const SESSION_ID_CONTEXT = 'gatehouse';

/** On a native SecureContext: its `tls.SecureContext` wrapper (see `#contextOf`). */
const WRAPPER = Symbol('gatehouse.secureContextWrapper');

/**
 * Certificates by name and the SNI callback that serves them.
 * Lookups are two Map reads (exact, then wildcard), whatever the number of certificates.
 */
export class CertificateStore {
  readonly #index = new Map<string, Entry>();
  readonly #entries = new Set<Entry>();
  readonly #contexts: LRUCache<Entry, SecureContext>;
  /** Contexts the LRU evicted, weakly: live connections may still hold them (see `#contextOf`). */
  readonly #evicted = new Map<Entry, WeakRef<SecureContext>>();
  readonly #inflight = new Map<string, Promise<Certificate | undefined>>();
  readonly #failedAt = new Map<string, number>();
  readonly #servers = new Set<TlsServer>();
  readonly #obtainTimeout: number;
  readonly #renewWindow: number;
  readonly #retryAfter: number;
  readonly #ticketKeys: Buffer;
  readonly #logger: TlsLogger | undefined;
  #policy: ObtainPolicy | undefined;
  #firstStatic: Entry | undefined;
  #explicitDefault: Entry | undefined;
  #defaultProvider: (() => Promise<Certificate | undefined>) | undefined;
  #providedDefault: Entry | undefined;
  #defaultRefresh: Promise<Certificate | undefined> | undefined;
  #appliedDefault: Entry | undefined;

  constructor(options: CertificateStoreOptions = {}) {
    this.#obtainTimeout = options.obtainTimeout ?? 10_000;
    this.#renewWindow = options.renewWindow ?? 1 / 3;
    this.#retryAfter = options.retryAfter ?? 60_000;
    this.#ticketKeys = options.ticketKeys ?? randomBytes(48);
    if (this.#ticketKeys.length !== 48) throw new RangeError('ticketKeys must be 48 bytes');
    this.#logger = options.logger;
    this.#contexts = new LRUCache<Entry, SecureContext>({
      max: options.contextCacheSize ?? 1000,
      dispose: (context, entry, reason) => {
        if (reason === 'evict') this.#evicted.set(entry, new WeakRef(context));
      },
    });
  }

  /**
   * A store holding the static certificates of `tls.certificates` (see {@link loadStaticCertificates}).
   * @throws {CertificateError} naming the file at fault.
   */
  static async fromFiles(entries: readonly { readonly cert: string; readonly key: string }[], options?: CertificateStoreOptions): Promise<CertificateStore> {
    const store = new CertificateStore(options);
    for (const certificate of await loadStaticCertificates(entries)) store.put(certificate);
    return store;
  }

  /** Whether `certificate` covers `host` (exact or one-label wildcard); see {@link covers}. */
  static covers(certificate: Certificate, host: string): boolean {
    return covers(certificate, host);
  }

  /**
   * Index a certificate under each of its names. For a name already served, the certificate put
   * last wins at once (renewals, run-time swaps); a certificate no name points at any more is
   * dropped with its SecureContext. The first `static` certificate becomes the default unless
   * {@link setDefault} chose one.
   */
  put(certificate: Certificate): void {
    this.#put(certificate, false);
  }

  /** Remove a certificate from every name it serves (no-op when absent). */
  remove(certificate: Certificate): void {
    for (const name of certificate.names) {
      const entry = this.#index.get(name);
      if (entry?.certificate === certificate) {
        this.#index.delete(name);
        this.#release(entry);
      }
    }
  }

  /**
   * The certificate serving `serverName`: exact name first, then the wildcard one label up
   * (`a.b.example.com` → `*.b.example.com`, never `*.example.com`, RFC 6125 §6.4.3).
   * Case-insensitive; a trailing dot is ignored. Undefined when nothing covers it (the default
   * certificate is not returned here).
   */
  forServerName(serverName: string): Certificate | undefined {
    return this.#lookup(normalizeHostName(serverName))?.certificate;
  }

  /** Set (or clear with undefined) the policy consulted for names without a usable certificate. */
  setPolicy(policy: ObtainPolicy | undefined): void {
    this.#policy = policy;
  }

  /**
   * Choose the certificate for handshakes without SNI and for names nothing covers. Default: the
   * first static certificate put. A function (e.g. `() => localCA.issue(['localhost', '127.0.0.1', '::1'])`)
   * is called by {@link refreshDefault} and again when a third of its certificate's life is left.
   * `undefined` returns to the default.
   */
  setDefault(value: DefaultCertificate | undefined): void {
    this.#explicitDefault = undefined;
    this.#defaultProvider = undefined;
    this.#providedDefault = undefined;
    if (typeof value === 'function') this.#defaultProvider = value;
    else if (value !== undefined) this.#explicitDefault = newEntry(value, false, this.#renewWindow);
    this.#applyDefault();
  }

  /**
   * Produce the default certificate now when it comes from a function (call before listening).
   * @returns the default certificate, if any.
   * @throws what the function throws.
   */
  async refreshDefault(): Promise<Certificate | undefined> {
    if (this.#defaultProvider === undefined) return this.#defaultEntry()?.certificate;
    const provider = this.#defaultProvider;
    this.#defaultRefresh ??= (async () => {
      const certificate = await provider();
      if (this.#defaultProvider === provider && certificate !== undefined) {
        this.#providedDefault = newEntry(certificate, false, this.#renewWindow);
        this.#applyDefault();
      }
      return certificate;
    })().finally(() => {
      this.#defaultRefresh = undefined;
    });
    return this.#defaultRefresh;
  }

  /** The certificate served without SNI or for uncovered names, if any. */
  get defaultCertificate(): Certificate | undefined {
    return this.#defaultEntry()?.certificate;
  }

  /**
   * Options to spread into `tls.createServer` / `https.createServer` / `http2.createSecureServer`:
   * {@link TLS_SERVER_OPTIONS}, the shared session ticket keys, the SNI callback, and the default
   * certificate when one is known.
   */
  serverOptions(): SecureContextOptions & { SNICallback: (serverName: string, done: SniDone) => void; ticketKeys: Buffer } {
    const fallback = this.#defaultEntry()?.certificate;
    return {
      ...this.#contextOptions(fallback),
      SNICallback: this.sniCallback,
    } as SecureContextOptions & { SNICallback: (serverName: string, done: SniDone) => void; ticketKeys: Buffer };
  }

  /**
   * Keep `server`'s own context (used without SNI) on the current default certificate, now and
   * whenever it changes. @returns a function that stops it.
   */
  attach(server: TlsServer): () => void {
    this.#servers.add(server);
    const entry = this.#defaultEntry();
    if (entry !== undefined) server.setSecureContext(this.#contextOptions(entry.certificate));
    return () => this.#servers.delete(server);
  }

  /** Every certificate currently indexed (for /status). */
  list(): CertificateInfo[] {
    return [...this.#entries].map(({ certificate, temporary }) => ({
      names: certificate.names,
      source: certificate.source,
      issuer: certificate.issuer,
      notBefore: certificate.notBefore,
      notAfter: certificate.notAfter,
      temporary,
    }));
  }

  /**
   * `SNICallback` for `tls.createServer` and `http2.createSecureServer`. Never throws: a failing
   * lookup, policy or source ends that handshake only (error to `done`, and to the logger). A
   * handshake waiting for `obtain` gives up after `obtainTimeout`; other names are never held up.
   */
  readonly sniCallback = (serverName: string, done: SniDone): void => {
    let name = '';
    try {
      name = normalizeHostName(serverName);
      const entry = this.#lookup(name);
      if (entry !== undefined) {
        const now = Date.now();
        if (now < entry.renewAt && !entry.temporary) {
          done(null, this.#contextOf(entry));
          return;
        }
        if (now < entry.expiresAt) {
          if (now >= entry.nextRenewal) this.#renewInBackground(name, entry, now);
          done(null, this.#contextOf(entry));
          return;
        }
      }
      this.#handleMissing(name, entry, done);
    } catch (error) {
      this.#fail(name || String(serverName), error, done);
    }
  };

  // --- internals ---

  #put(certificate: Certificate, temporary: boolean): Entry {
    const entry = newEntry(certificate, temporary, this.#renewWindow);
    for (const raw of certificate.names) {
      const name = normalizeHostName(raw);
      const previous = this.#index.get(name);
      if (previous === entry) continue;
      this.#index.set(name, entry);
      entry.references++;
      if (previous !== undefined) this.#release(previous);
    }
    if (entry.references > 0) this.#entries.add(entry);
    if (!temporary) for (const name of certificate.names) this.#failedAt.delete(name);
    if (certificate.source === 'static' && this.#firstStatic === undefined) {
      this.#firstStatic = entry;
      this.#applyDefault();
    } else if (this.#firstStatic !== undefined && this.#firstStatic.references === 0 && certificate.source === 'static') {
      this.#firstStatic = entry; // the first static certificate was replaced: its successor is the default
      this.#applyDefault();
    }
    return entry;
  }

  #release(entry: Entry): void {
    entry.references--;
    if (entry.references > 0) return;
    this.#entries.delete(entry);
    this.#contexts.delete(entry);
    this.#evicted.delete(entry);
  }

  #lookup(name: string): Entry | undefined {
    const exact = this.#index.get(name);
    if (exact !== undefined) return exact;
    const dot = name.indexOf('.');
    if (dot <= 0) return undefined;
    return this.#index.get('*' + name.slice(dot));
  }

  /**
   * The context of an entry: from the LRU; else the one the LRU evicted, while connections still
   * hold it (with more names in use than the LRU keeps, building it again would give each such
   * name a second live copy, ~30 KiB each); else a new one. Node keeps a connection's SNI context
   * by its native part (`context.context`), so the native part keeps its wrapper: the weak
   * reference lives exactly as long as some connection uses the context.
   */
  #contextOf(entry: Entry): SecureContext {
    let context = this.#contexts.get(entry);
    if (context === undefined) {
      context = this.#evicted.get(entry)?.deref();
      this.#evicted.delete(entry);
      if (context === undefined) {
        context = createSecureContext(this.#contextOptions(entry.certificate));
        (context.context as Record<symbol, unknown>)[WRAPPER] = context;
      }
      this.#contexts.set(entry, context);
    }
    return context;
  }

  #contextOptions(certificate: Certificate | undefined): SecureContextOptions {
    return {
      ...TLS_SERVER_OPTIONS,
      ticketKeys: this.#ticketKeys,
      sessionIdContext: SESSION_ID_CONTEXT,
      ...(certificate === undefined ? {} : { cert: certificate.cert, key: certificate.key }),
    } as SecureContextOptions;
  }

  /** No usable certificate (absent, expired or temporary past its life): ask the policy. */
  #handleMissing(name: string, stale: Entry | undefined, done: SniDone): void {
    const decision = this.#policy?.(name);
    if (decision === undefined) {
      // Nobody may obtain one: an expired certificate still beats a wrong-name one.
      if (stale !== undefined) done(null, this.#contextOf(stale));
      else this.#serveDefault(done);
      return;
    }
    if (decision.waitInHandshake) {
      this.#obtainInHandshake(name, decision.source, false, done);
      return;
    }
    this.#startBackground(name, decision.source);
    if (decision.temporary !== undefined) this.#obtainInHandshake(name, decision.temporary, true, done);
    else if (stale !== undefined) done(null, this.#contextOf(stale));
    else this.#serveDefault(done);
  }

  #serveDefault(done: SniDone): void {
    const entry = this.#defaultEntry();
    if (entry !== undefined && this.#defaultProvider !== undefined && Date.now() >= entry.renewAt) {
      this.refreshDefault().catch((error: unknown) => this.#logger?.error({ error }, 'default certificate: refresh failed'));
    }
    if (entry === undefined && this.#defaultProvider !== undefined) {
      // Not produced yet: wait for it like for any obtain.
      const pending = this.refreshDefault();
      this.#wait(pending, 'default', (certificate) => {
        const now = this.#defaultEntry();
        done(null, certificate !== undefined && now !== undefined ? this.#contextOf(now) : undefined);
      }, done);
      return;
    }
    // undefined keeps the listener's own context, which attach() keeps on the default.
    done(null, entry === undefined ? undefined : this.#contextOf(entry));
  }

  #obtainInHandshake(name: string, source: CertificateSource, temporary: boolean, done: SniDone): void {
    const pending = this.#obtain(name, source, temporary);
    this.#wait(pending, name, (certificate) => {
      if (certificate === undefined) {
        this.#serveDefault(done);
        return;
      }
      const entry = this.#lookup(name);
      // The shared obtain put it; serve what the index now holds for the name (the real one may
      // already have replaced a temporary one), else the certificate itself.
      done(null, this.#contextOf(entry ?? newEntry(certificate, temporary, this.#renewWindow)));
    }, done);
  }

  /** Call `then` with the result, or fail the handshake on rejection or after `obtainTimeout`. */
  #wait(pending: Promise<Certificate | undefined>, name: string, then: (certificate: Certificate | undefined) => void, done: SniDone): void {
    let settled = false;
    const timer = setTimeout(() => {
      if (settled) return;
      settled = true;
      this.#fail(name, new ObtainTimeoutError(name, this.#obtainTimeout), done);
    }, this.#obtainTimeout);
    timer.unref();
    pending.then((certificate) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      try {
        then(certificate);
      } catch (error) {
        this.#fail(name, error, done);
      }
    }, (error: unknown) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      this.#fail(name, error, done);
    });
  }

  /** One obtain per (source, name) at a time; its certificate is put into the index once. */
  #obtain(name: string, source: CertificateSource, temporary: boolean): Promise<Certificate | undefined> {
    const key = `${source.name}\u0000${temporary ? 't' : ''}\u0000${name}`;
    let pending = this.#inflight.get(key);
    if (pending === undefined) {
      pending = (async () => {
        const certificate = await source.obtain(name);
        if (certificate !== undefined) {
          // A temporary certificate never replaces a real one that arrived meanwhile.
          const current = this.#lookup(name);
          if (!temporary || current === undefined || current.temporary) this.#put(certificate, temporary);
        }
        return certificate;
      })().finally(() => this.#inflight.delete(key));
      this.#inflight.set(key, pending);
    }
    return pending;
  }

  #renewInBackground(name: string, entry: Entry, now: number): void {
    entry.nextRenewal = now + this.#retryAfter;
    let decision: ObtainDecision | undefined;
    try {
      decision = this.#policy?.(name);
    } catch (error) {
      this.#logger?.error({ serverName: name, error }, 'certificate policy failed');
      return;
    }
    if (decision !== undefined) this.#startBackground(name, decision.source);
  }

  #startBackground(name: string, source: CertificateSource): void {
    const failedAt = this.#failedAt.get(name);
    if (failedAt !== undefined && Date.now() - failedAt < this.#retryAfter) return;
    this.#obtain(name, source, false).then((certificate) => {
      if (certificate === undefined) this.#failedAt.set(name, Date.now());
    }, (error: unknown) => {
      this.#failedAt.set(name, Date.now());
      this.#logger?.warn({ serverName: name, source: source.name, error }, 'background certificate obtain failed');
    });
  }

  #fail(name: string, error: unknown, done: SniDone): void {
    const failure = error instanceof Error ? error : new Error(String(error));
    this.#logger?.warn({ serverName: name, error: failure }, 'TLS handshake failed: no certificate');
    try {
      done(failure);
    } catch {
      // done() only destroys the socket; nothing useful to do if that throws
    }
  }

  #defaultEntry(): Entry | undefined {
    // The first static certificate stays the default even when another source took over its names.
    return this.#explicitDefault ?? this.#providedDefault ?? this.#firstStatic;
  }

  #applyDefault(): void {
    const entry = this.#defaultEntry();
    if (entry === undefined || entry === this.#appliedDefault) return;
    this.#appliedDefault = entry;
    for (const server of this.#servers) server.setSecureContext(this.#contextOptions(entry.certificate));
  }
}

/** A handshake waited longer than `obtainTimeout` for a certificate. */
export class ObtainTimeoutError extends Error {
  readonly code = 'GH_TLS_OBTAIN_TIMEOUT';

  constructor(serverName: string, timeout: number) {
    super(`GH_TLS_OBTAIN_TIMEOUT: no certificate for ${serverName} within ${timeout} ms; it is still being obtained, retry shortly`);
    this.name = 'ObtainTimeoutError';
  }
}

/**
 * Whether `certificate` covers `host`: one of its names equals the host, or is the wildcard one
 * label up (`*.example.com` covers `a.example.com`, not `example.com` nor `a.b.example.com`).
 * Case-insensitive; a trailing dot and IPv6 brackets are ignored. The HTTPS listener answers 421
 * Misdirected Request (RFC 9110 §15.5.20) when an HTTP/2 connection's certificate does not cover
 * a request's host (connection coalescing, RFC 9113 §9.1.1).
 */
export function covers(certificate: Certificate, host: string): boolean {
  const name = normalizeHostName(host);
  const names = certificate.names;
  if (names.includes(name)) return true;
  const dot = name.indexOf('.');
  return dot > 0 && names.includes('*' + name.slice(dot));
}

/** Options of {@link loadStaticCertificates}. */
export interface StaticLoadOptions {
  /**
   * The storage folder (`tls.storage`) that keeps the cache of verified pairs
   * ({@link VERIFIED_PAIRS_KEY}). Default: none; every pair is parsed and checked by OpenSSL and
   * nothing is written.
   */
  readonly storage?: Storage;
  /** Where an unusable cache file or a failed cache write is reported (warn; the load goes on).
   * Default: nothing. */
  readonly logger?: Pick<TlsLogger, 'warn'>;
  /** Receives what the cache did during this load (for logs and tests). Default: nothing. */
  readonly onCacheStats?: (stats: StaticCacheStats) => void;
  /**
   * Worker processes (`tls/verify-worker.ts`) that verify the pairs the cache does not know
   * (OpenSSL parsing is ~0.6 ms a pair on one core). 0 or 1: in this process. Default: when at
   * least 256 pairs need verifying, `os.availableParallelism()` (the CPUs this process may run on,
   * so 1 under `taskset -c 1`) up to 4, else 0. Every check and every error is the same either way.
   */
  readonly workers?: number;
}

/** What the cache of verified pairs did during one {@link loadStaticCertificates}. */
export interface StaticCacheStats {
  /** Pairs built from the cache, without OpenSSL. */
  readonly hits: number;
  /** Pairs parsed and checked by OpenSSL (and recorded). */
  readonly misses: number;
  /** Cache entries dropped: no pair of this load has their bytes any more. */
  readonly dropped: number;
  /** Whether the cache file was (re)written. */
  readonly written: boolean;
}

/**
 * Storage key of the cache of verified static pairs: `static/verified.json` in the storage folder.
 *
 * What is cached: for each `tls.certificates` pair that {@link certificateFromPem} accepted (every
 * chain block parsed by OpenSSL, the key parsed, `checkPrivateKey` true, the leaf names a host),
 * the facts it read from the leaf (names, notBefore, notAfter, issuer), keyed by a SHA-256 over the
 * exact bytes of the certificate file and of the key file. Why: OpenSSL parsing is ~0.5 ms a pair,
 * ~8 s for 10 000 certificates; a restart with unchanged files skips it all.
 *
 * Why it is safe: an entry is used only for files whose bytes hash to it, i.e. the very bytes that
 * were verified; any change to either file (another key, another chain, one byte) is a miss and is
 * verified again, with the same errors. The file sits in the folder that holds the private keys
 * (0700), written atomically with mode 0600: whoever can change it can change those keys already.
 * The whole file is discarded (and rebuilt) when its shape is wrong in any way, when it was written
 * with another {@link VERIFIED_PAIRS_FORMAT} or another OpenSSL version; it is never used in part.
 */
export const VERIFIED_PAIRS_KEY = 'static/verified.json';

/** Version of the cache file; bump it when what {@link certificateFromPem} derives (names,
 * issuer text) changes, so entries written by older code are not served. */
const VERIFIED_PAIRS_FORMAT = 1;

/**
 * Read the `tls.certificates` files: each `cert` a PEM chain (leaf first), each `key` the leaf's
 * unencrypted PEM key. Names come from the leaf's SANs (DNS and IP).
 *
 * With `options.storage`, pairs already verified with the same bytes are built from the cache of
 * verified pairs ({@link VERIFIED_PAIRS_KEY}) without OpenSSL; the others are verified as ever and
 * recorded. When anything changed, the cache is rewritten once at the end, holding exactly the
 * pairs of this load (entries of removed certificates are dropped). Nothing is written when the
 * load fails; a cache that cannot be read or written is reported to `options.logger` and ignored.
 * The pairs the cache does not know are verified in worker processes when there are many and
 * several CPUs (see {@link StaticLoadOptions.workers}), with the same checks and errors.
 * @returns certificates with source `static`, in the order given.
 * @throws {CertificateError} `GH_TLS_FILE_UNREADABLE` (missing file, permissions) or any code of
 *   {@link certificateFromPem}; the message names the file. When several pairs are bad, the error
 *   is the one of the first in the order given. An Error when a worker process cannot start or dies.
 */
export async function loadStaticCertificates(entries: readonly { readonly cert: string; readonly key: string }[], options: StaticLoadOptions = {}): Promise<Certificate[]> {
  const { storage, logger } = options;
  const cached = storage === undefined ? undefined : await readVerifiedPairs(storage, logger);
  const seen = new Map<string, LeafFacts>();
  let hits = 0;
  // Synchronous reads in batches, yielding to the event loop between batches (a reload must not
  // stall the connections being served): 20 000 small files take ~0.15 s this way against ~1.3 s
  // through fs/promises (a FileHandle, fstat and close per file, each a thread-pool round trip),
  // and only two files are open at any time (10 000 certificates once failed with EMFILE).
  // Phase 1 reads every pair and takes what the cache knows; phase 2 verifies the rest with
  // OpenSSL, in worker threads when there are many. The error thrown is the one of the first pair
  // (in the order given) that fails, whichever phase found it, as when pairs were checked one by one.
  const certificates: (Certificate | undefined)[] = [];
  const misses: Miss[] = [];
  let unreadable: CertificateError | undefined;
  for (let index = 0; index < entries.length; index++) {
    if (index > 0 && index % STATIC_BATCH === 0) await nextTurn();
    const { cert, key } = entries[index]!;
    let certBytes: Buffer;
    let keyBytes: Buffer;
    try {
      certBytes = readBytes(cert);
      keyBytes = readBytes(key);
    } catch (error) {
      unreadable = error as CertificateError;
      break;
    }
    const certPem = certBytes.toString('utf8');
    const keyPem = keyBytes.toString('utf8');
    const digest = storage === undefined ? undefined : pairDigest(certBytes, keyBytes);
    const facts = digest === undefined ? undefined : cached?.get(digest) ?? seen.get(digest);
    const hit = facts === undefined ? undefined : certificateFromVerifiedPem(certPem, keyPem, 'static', facts);
    if (hit !== undefined) {
      hits++;
      seen.set(digest!, facts!);
      certificates.push(hit);
      continue;
    }
    certificates.push(undefined);
    misses.push({ index, digest, job: { certPem, keyPem, certFile: cert, keyFile: key } });
  }
  const workers = misses.length === 0 ? 0 : options.workers ?? (misses.length >= WORKERS_MIN_PAIRS ? Math.min(availableParallelism(), MAX_WORKERS) : 0);
  const verified = workers > 1 ? await verifyInWorkers(misses, workers) : await verifyInThread(misses);
  let failure: { index: number; error: CertificateError } | undefined;
  for (let i = 0; i < misses.length; i++) {
    const { index, digest, job } = misses[i]!;
    const result = verified[i];
    if (result === undefined) break; // not verified: a pair before it failed
    if (result instanceof CertificateError) {
      failure ??= { index, error: result };
      continue;
    }
    certificates[index] = certificateFromVerifiedPem(job.certPem, job.keyPem, 'static', result);
    if (digest !== undefined) seen.set(digest, result);
  }
  if (failure !== undefined) throw failure.error; // misses are in order: the first failure is the earliest pair
  if (unreadable !== undefined) throw unreadable;
  if (storage !== undefined) {
    let dropped = 0;
    for (const digest of cached?.keys() ?? []) if (!seen.has(digest)) dropped++;
    const changed = misses.length > 0 || dropped > 0 || (cached === undefined && seen.size > 0);
    const written = changed && await writeVerifiedPairs(storage, seen, logger);
    options.onCacheStats?.({ hits, misses: misses.length, dropped, written });
  } else {
    options.onCacheStats?.({ hits: 0, misses: misses.length, dropped: 0, written: false });
  }
  return certificates as Certificate[];
}

/** Certificates read (and, in this thread, verified) by {@link loadStaticCertificates} between two yields (~3 ms to read, ~80 ms to verify). */
const STATIC_BATCH = 128;

/** A pair the cache did not know: its place in the list, its cache key, and what to verify. */
interface Miss {
  readonly index: number;
  readonly digest: string | undefined;
  readonly job: VerifyJob;
}

/** Pairs to verify before {@link loadStaticCertificates} uses worker processes by default: below
 * this, starting them (~50 ms each) costs more than it saves. */
const WORKERS_MIN_PAIRS = 256;
/** Most worker processes {@link loadStaticCertificates} starts by default. */
const MAX_WORKERS = 4;
/** Pairs per message to a worker (~40 ms of OpenSSL work). */
const WORKER_BATCH = 64;

/** Verify in this thread, yielding to the event loop between batches. */
async function verifyInThread(misses: readonly Miss[]): Promise<(LeafFacts | CertificateError)[]> {
  const parsedChain = new Set<string>();
  const out: (LeafFacts | CertificateError)[] = [];
  for (let i = 0; i < misses.length; i++) {
    if (i > 0 && i % STATIC_BATCH === 0) await nextTurn();
    const { job } = misses[i]!;
    try {
      out.push(verifyPemPair(job.certPem, job.keyPem, { certFile: job.certFile, keyFile: job.keyFile }, parsedChain));
    } catch (error) {
      if (!(error instanceof CertificateError)) throw error;
      out.push(error);
      break; // the first failure is the one reported; the pairs after it need no work
    }
  }
  return out;
}

/** The worker script next to this module (`.ts` when the sources run under tsx, in tests). */
const VERIFY_WORKER_TS = import.meta.url.endsWith('.ts');
const VERIFY_WORKER_FILE = fileURLToPath(new URL(VERIFY_WORKER_TS ? './verify-worker.ts' : './verify-worker.js', import.meta.url));

/**
 * Verify in `count` worker processes ({@link VERIFY_WORKER_FILE}), batches of {@link WORKER_BATCH}
 * pairs (the bytes read here, so what is verified is what was hashed) handed to whichever worker
 * is free. The workers are stopped before this returns.
 * @throws when a worker cannot start or dies (not a certificate problem).
 */
async function verifyInWorkers(misses: readonly Miss[], count: number): Promise<(LeafFacts | CertificateError)[]> {
  const out: (LeafFacts | CertificateError)[] = new Array(misses.length);
  const batches = Math.ceil(misses.length / WORKER_BATCH);
  const workers: ChildProcess[] = [];
  let next = 0;
  let done = 0;
  try {
    await new Promise<void>((resolveAll, rejectAll) => {
      const send = (worker: ChildProcess): void => {
        if (next >= batches) return;
        const id = next++;
        worker.send({ id, jobs: misses.slice(id * WORKER_BATCH, (id + 1) * WORKER_BATCH).map((miss) => miss.job) } satisfies VerifyBatch);
      };
      for (let w = 0; w < Math.min(count, batches); w++) {
        const worker = fork(VERIFY_WORKER_FILE, [], {
          serialization: 'advanced',
          stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
          execArgv: VERIFY_WORKER_TS ? ['--import', 'tsx'] : [],
        });
        workers.push(worker);
        worker.on('message', ({ id, results }: VerifyBatchResult) => {
          results.forEach((result, offset) => {
            out[id * WORKER_BATCH + offset] = 'error' in result
              ? new CertificateError(result.error.code as CertificateErrorCode, result.error.message.replace(/^GH_TLS_[A-Z_]+: /, ''), { file: result.error.file })
              : { names: result.names, notBefore: new Date(result.notBefore), notAfter: new Date(result.notAfter), issuer: result.issuer };
          });
          if (++done === batches) resolveAll();
          else send(worker);
        });
        worker.on('error', rejectAll);
        worker.on('exit', (code, signal) => {
          if (done < batches) rejectAll(new Error(`certificate verification worker exited (${signal ?? `code ${code}`}) before it was done`));
        });
        send(worker);
      }
    });
  } finally {
    for (const worker of workers) if (worker.exitCode === null && worker.signalCode === null) worker.kill();
  }
  return out;
}

function readBytes(file: string): Buffer {
  try {
    return readFileSync(file);
  } catch (error) {
    throw new CertificateError('GH_TLS_FILE_UNREADABLE', `cannot read ${file}: ${(error as Error).message}`, { file, cause: error });
  }
}

/**
 * The cache key of a pair: SHA-256 over a domain tag, the certificate file's length and bytes, then
 * the key file's bytes. The length prefix separates the two files, so no other split of the same
 * bytes into a certificate and a key hashes alike.
 */
function pairDigest(certBytes: Buffer, keyBytes: Buffer): string {
  return createHash('sha256')
    .update(`gatehouse static pair\0${certBytes.length}\0`)
    .update(certBytes)
    .update(keyBytes)
    .digest('hex');
}

/** The cache file: {@link VERIFIED_PAIRS_FORMAT}, the OpenSSL that verified, and the pairs by digest. */
interface VerifiedPairsFile {
  readonly format: number;
  readonly openssl: string;
  readonly pairs: Record<string, { names: string[]; notBefore: string; notAfter: string; issuer: string }>;
}

/**
 * The cached pairs, or undefined when there is no usable cache (absent, unreadable, not JSON, a
 * wrong shape anywhere, another format or OpenSSL version): all or nothing.
 */
async function readVerifiedPairs(storage: Storage, logger: Pick<TlsLogger, 'warn'> | undefined): Promise<Map<string, LeafFacts> | undefined> {
  let bytes: Buffer | undefined;
  try {
    bytes = await storage.load(VERIFIED_PAIRS_KEY);
  } catch (error) {
    logger?.warn({ key: VERIFIED_PAIRS_KEY, err: error }, 'cannot read the cache of verified static certificates; verifying every pair again');
    return undefined;
  }
  if (bytes === undefined) return undefined;
  let parsed: unknown;
  try {
    parsed = JSON.parse(bytes.toString('utf8'));
  } catch {
    parsed = undefined;
  }
  if (isRecord(parsed) && (parsed.format !== VERIFIED_PAIRS_FORMAT || parsed.openssl !== process.versions.openssl)) {
    return undefined; // written by another version: rebuilt quietly
  }
  const pairs = parsed === undefined ? undefined : pairsOf(parsed);
  if (pairs === undefined) {
    logger?.warn({ key: VERIFIED_PAIRS_KEY }, 'the cache of verified static certificates is corrupt; ignoring it and verifying every pair again');
  }
  return pairs;
}

function pairsOf(parsed: unknown): Map<string, LeafFacts> | undefined {
  if (!isRecord(parsed) || !isRecord(parsed.pairs)) return undefined;
  const pairs = new Map<string, LeafFacts>();
  for (const [digest, value] of Object.entries(parsed.pairs)) {
    if (!/^[0-9a-f]{64}$/.test(digest) || !isRecord(value)) return undefined;
    const { names, notBefore, notAfter, issuer } = value;
    if (!Array.isArray(names) || names.length === 0 || !names.every((name) => typeof name === 'string' && name !== '')) return undefined;
    if (typeof issuer !== 'string') return undefined;
    const from = isoDate(notBefore);
    const to = isoDate(notAfter);
    if (from === undefined || to === undefined) return undefined;
    pairs.set(digest, { names: names as string[], notBefore: from, notAfter: to, issuer });
  }
  return pairs;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** A date written by `toISOString`, exactly; anything else is undefined. */
function isoDate(value: unknown): Date | undefined {
  if (typeof value !== 'string') return undefined;
  const date = new Date(value);
  return Number.isNaN(date.getTime()) || date.toISOString() !== value ? undefined : date;
}

/** Write the cache atomically, owner-only. @returns whether it was written (a failure is reported, not thrown). */
async function writeVerifiedPairs(storage: Storage, pairs: ReadonlyMap<string, LeafFacts>, logger: Pick<TlsLogger, 'warn'> | undefined): Promise<boolean> {
  const file: VerifiedPairsFile = { format: VERIFIED_PAIRS_FORMAT, openssl: process.versions.openssl, pairs: {} };
  for (const [digest, facts] of pairs) {
    if (Number.isNaN(facts.notBefore.getTime()) || Number.isNaN(facts.notAfter.getTime())) continue; // not representable: verified again next time
    file.pairs[digest] = { names: [...facts.names], notBefore: facts.notBefore.toISOString(), notAfter: facts.notAfter.toISOString(), issuer: facts.issuer };
  }
  try {
    await storage.store(VERIFIED_PAIRS_KEY, JSON.stringify(file), { secret: true });
    return true;
  } catch (error) {
    logger?.warn({ key: VERIFIED_PAIRS_KEY, err: error }, 'cannot write the cache of verified static certificates; the next start verifies every pair again');
    return false;
  }
}

function newEntry(certificate: Certificate, temporary: boolean, renewWindow: number): Entry {
  const notBefore = certificate.notBefore.getTime();
  const expiresAt = certificate.notAfter.getTime();
  return {
    certificate,
    temporary,
    references: 0,
    expiresAt,
    renewAt: expiresAt - (expiresAt - notBefore) * renewWindow,
    nextRenewal: 0,
  };
}
