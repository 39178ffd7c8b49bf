/**
 * The ACME account (RFC 8555 §7.3): one key per directory, generated once and kept in storage,
 * registered (or found again) with `newAccount` before the first order.
 *
 * Storage: `acme/<directory-host>/account.key` (PEM, ECDSA P-256, mode 0600, created atomically and
 * exclusively so two processes sharing the folder end up with the same key) and
 * `acme/<directory-host>/account.json` (`{ url, contact, directory }`, informational).
 */
import acme from 'acme-client';
import type { Storage } from '../tls/storage.js';
import { AcmeError } from './errors.js';
import { AcmeTransport } from './transport.js';

/** Directory names accepted in `tls.acme.directory`, and their URLs. */
export const KNOWN_DIRECTORIES: Readonly<Record<string, string>> = Object.freeze({
  letsencrypt: 'https://acme-v02.api.letsencrypt.org/directory',
  'letsencrypt-staging': 'https://acme-staging-v02.api.letsencrypt.org/directory',
});

/**
 * The directory URL for `tls.acme.directory`.
 * @param directory `letsencrypt`, `letsencrypt-staging` or an `https://` URL.
 * @throws {AcmeError} `GH_ACME_CONFIG` for anything else (plain http is refused: RFC 8555 §6.1
 *   requires HTTPS).
 */
export function resolveDirectoryUrl(directory: string): string {
  const known = KNOWN_DIRECTORIES[directory];
  if (known) return known;
  let url: URL;
  try {
    url = new URL(directory);
  } catch {
    throw new AcmeError('GH_ACME_CONFIG', `tls.acme.directory: expected letsencrypt, letsencrypt-staging or an https URL, got ${JSON.stringify(directory)}`);
  }
  if (url.protocol !== 'https:') {
    throw new AcmeError('GH_ACME_CONFIG', `tls.acme.directory: the ACME server must be reached over https (RFC 8555 §6.1), got ${directory}`);
  }
  return url.href;
}

/**
 * The storage folder name of a directory: its host, plus `-<port>` when the URL names a port
 * (`acme-v02.api.letsencrypt.org`, `127.0.0.1-14000`). Safe as a single path segment.
 */
export function directoryFolder(directoryUrl: string): string {
  const url = new URL(directoryUrl);
  const host = url.hostname.replace(/^\[|\]$/g, '').toLowerCase();
  return `${host}${url.port ? `-${url.port}` : ''}`.replace(/[^a-z0-9.-]/g, '_');
}

/** Options of {@link AcmeAccount}. */
export interface AcmeAccountOptions {
  /** Directory URL (see {@link resolveDirectoryUrl}). */
  readonly directoryUrl: string;
  readonly storage: Storage;
  /** Contact email (RFC 8555 §7.3 `contact: ["mailto:..."]`). */
  readonly email?: string;
  /** The operator agreed to the CA's terms (`termsOfServiceAgreed`). Must be true. */
  readonly agreeTos: boolean;
  /** External account binding (RFC 8555 §7.3.4): key id and base64url HMAC key from the CA. */
  readonly eab?: { readonly kid: string; readonly hmacKey: string };
  /** HTTP layer (CA trust, timeouts). */
  readonly transport: AcmeTransport;
  /** First delay between status polls of challenges and orders, ms; doubles to 10 s. Default 1000. */
  readonly pollIntervalMs?: number;
}

/** An ACME account: the acme-client {@link acme.Client} to use and its one-time registration. */
export class AcmeAccount {
  readonly directoryUrl: string;
  readonly client: acme.Client;
  readonly #options: AcmeAccountOptions;
  #registration: Promise<string> | undefined;

  private constructor(options: AcmeAccountOptions, client: acme.Client) {
    this.directoryUrl = options.directoryUrl;
    this.#options = options;
    this.client = client;
  }

  /**
   * Load the account key from storage, or generate and store it (first start). Does not contact the
   * ACME server.
   * @throws {AcmeError} `GH_ACME_TOS_NOT_AGREED` unless `agreeTos`.
   */
  static async open(options: AcmeAccountOptions): Promise<AcmeAccount> {
    if (!options.agreeTos) {
      throw new AcmeError('GH_ACME_TOS_NOT_AGREED', `set tls.acme.agree_tos: true once you have read and accepted the terms of service of ${options.directoryUrl}`);
    }
    const keyName = `acme/${directoryFolder(options.directoryUrl)}/account.key`;
    const accountKey = await loadOrCreateKey(options.storage, keyName);
    const pollMin = options.pollIntervalMs ?? 1000;
    const client = new acme.Client({
      directoryUrl: options.directoryUrl,
      accountKey,
      ...(options.eab ? { externalAccountBinding: { kid: options.eab.kid, hmacKey: options.eab.hmacKey } } : {}),
      backoffMin: pollMin,
      backoffMax: Math.max(pollMin, 10_000),
      backoffAttempts: 12,
    });
    options.transport.install(client);
    return new AcmeAccount(options, client);
  }

  /**
   * Register the account (`newAccount`, RFC 8555 §7.3); a key already known to the CA gets its
   * existing account back. Done once; concurrent callers share the request; a failure is retried by
   * the next caller.
   * @returns the account URL.
   * @throws {AcmeError} from the transport (unreachable, problem document).
   */
  register(): Promise<string> {
    this.#registration ??= this.#register().catch((error: unknown) => {
      this.#registration = undefined;
      throw error;
    });
    return this.#registration;
  }

  /** Forget the registration (after `accountDoesNotExist`, e.g. a CA that lost its state) so the next {@link register} runs again. */
  forgetRegistration(): void {
    this.#registration = undefined;
    // acme-client caches the account URL in its API layer; a fresh newAccount replaces it.
    const api = (this.client as unknown as { api?: { accountUrl?: string | null } }).api;
    if (api) api.accountUrl = null;
  }

  async #register(): Promise<string> {
    const { email, storage } = this.#options;
    await this.client.createAccount({
      termsOfServiceAgreed: true,
      ...(email ? { contact: [`mailto:${email}`] } : {}),
    });
    const url = this.client.getAccountUrl();
    await storage.store(`acme/${directoryFolder(this.directoryUrl)}/account.json`, `${JSON.stringify({
      url,
      contact: email ? [`mailto:${email}`] : [],
      directory: this.directoryUrl,
    }, null, 2)}\n`);
    return url;
  }
}

/** Load a PEM key, or create it exclusively (another process may win; then its key is used). */
async function loadOrCreateKey(storage: Storage, key: string): Promise<Buffer> {
  const existing = await storage.load(key);
  if (existing) return existing;
  const created = await acme.crypto.createPrivateEcdsaKey('P-256');
  if (storage.storeExclusive) {
    if (await storage.storeExclusive(key, created, { secret: true })) return created;
    const winner = await storage.load(key);
    if (winner) return winner;
  }
  await storage.store(key, created, { secret: true });
  return created;
}
