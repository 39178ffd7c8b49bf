/**
 * HTTP for the ACME client, over undici.
 *
 * acme-client speaks the protocol (JWS, nonces, orders) but sends its requests through one
 * process-wide axios instance whose TLS settings are global and which silently retries refused
 * connections and 429/5xx answers for up to 75 s. Gatehouse replaces the request function of each
 * client's HTTP layer with {@link AcmeTransport.request}, which:
 * - trusts the system roots plus `tls.acme.ca_bundle` for this client only (TLS verification is
 *   never turned off, and nothing global changes);
 * - bounds every request with a timeout;
 * - turns error answers into {@link AcmeError}s that keep the problem document (RFC 8555 §6.7) and
 *   the Retry-After header (RFC 8555 §6.6), so the issuer's backoff can honour them;
 * - leaves `badNonce` answers to acme-client, which retries them with the fresh nonce the error
 *   carries (RFC 8555 §6.5).
 */
import { rootCertificates } from 'node:tls';
import { Agent, request, errors as undiciErrors } from 'undici';
import { AcmeError, ACME_ERROR_PREFIX, type AcmeProblem } from './errors.js';

/** How often one request is re-signed with a fresh nonce after `badNonce` (RFC 8555 §6.5). */
export const BAD_NONCE_RETRIES = 20;

/** What acme-client's HttpClient.request returns (the subset of an axios response it reads). */
export interface AcmeHttpResponse {
  readonly status: number;
  readonly headers: Record<string, string>;
  readonly data: unknown;
}

/** Options of {@link AcmeTransport}. */
export interface AcmeTransportOptions {
  /** Extra PEM CA(s) trusted for the ACME server's TLS, on top of the system roots. */
  readonly ca?: string;
  /** Per-request timeout (connect, headers, body), ms. Default 30 000. */
  readonly timeoutMs?: number;
  /** User-Agent header (RFC 8555 §6.1 asks clients to send one). */
  readonly userAgent?: string;
}

/** Per-client HTTP layer for acme-client; see the file comment. */
export class AcmeTransport {
  readonly #agent: Agent;
  readonly #timeoutMs: number;
  readonly #userAgent: string;

  constructor(options: AcmeTransportOptions = {}) {
    this.#timeoutMs = options.timeoutMs ?? 30_000;
    this.#userAgent = options.userAgent ?? 'gatehouse';
    this.#agent = new Agent({
      connect: { timeout: this.#timeoutMs, ...(options.ca ? { ca: [...rootCertificates, options.ca] } : {}) },
      headersTimeout: this.#timeoutMs,
      bodyTimeout: this.#timeoutMs,
      keepAliveTimeout: 4_000,
    });
  }

  /**
   * Install this transport in an `acme.Client`: its internal HTTP layer (`client.http`, acme-client
   * 5.x) gets its `request(url, method, opts)` replaced, and its badNonce retries raised from 5 to
   * {@link BAD_NONCE_RETRIES}: a CA that rejects half the nonces (Pebble's
   * `PEBBLE_WFE_NONCEREJECT=50`) would otherwise fail one request in 64.
   * @throws {Error} when the client has no such layer (an incompatible acme-client version).
   */
  install(client: object): void {
    const http = (client as { http?: { request?: unknown; maxBadNonceRetries?: number } }).http;
    if (!http || typeof http.request !== 'function') {
      throw new Error('acme-client has no replaceable HTTP layer (client.http.request); Gatehouse needs acme-client 5.x');
    }
    http.maxBadNonceRetries = BAD_NONCE_RETRIES;
    http.request = (url: string, method: string, opts: { data?: unknown; headers?: Record<string, string> } = {}) => this.request(url, method, opts);
  }

  /**
   * One HTTP request to the ACME server.
   * @param method `get`, `head` or `post` (any case).
   * @param opts.data a JWS object (sent as `application/jose+json`, RFC 8555 §6.2).
   * @returns the answer for 2xx/3xx and for `badNonce` (acme-client retries those).
   * @throws {AcmeError} `GH_ACME_UNREACHABLE` on network/TLS/timeout errors; `GH_ACME_PROBLEM` for
   *   any other error answer (with the problem document and Retry-After in ms when sent).
   */
  async request(url: string, method: string, opts: { data?: unknown; headers?: Record<string, string> } = {}): Promise<AcmeHttpResponse> {
    const upper = method.toUpperCase() as 'GET' | 'HEAD' | 'POST';
    let response;
    try {
      response = await request(url, {
        method: upper,
        dispatcher: this.#agent,
        headers: {
          'user-agent': this.#userAgent,
          ...(opts.data !== undefined ? { 'content-type': 'application/jose+json' } : {}),
          ...opts.headers,
        },
        body: opts.data !== undefined ? JSON.stringify(opts.data) : undefined,
        signal: AbortSignal.timeout(this.#timeoutMs),
      });
    } catch (error) {
      throw new AcmeError('GH_ACME_UNREACHABLE', `cannot reach the ACME server (${upper} ${url}): ${describeNetworkError(error)}`, { cause: error });
    }

    const headers: Record<string, string> = {};
    for (const [name, value] of Object.entries(response.headers)) {
      if (value !== undefined) headers[name] = Array.isArray(value) ? value.join(', ') : value;
    }
    let text: string;
    try {
      text = upper === 'HEAD' ? '' : await response.body.text();
    } catch (error) {
      throw new AcmeError('GH_ACME_UNREACHABLE', `reading the answer of ${upper} ${url} failed: ${describeNetworkError(error)}`, { cause: error });
    }
    const contentType = headers['content-type'] ?? '';
    let data: unknown = text;
    if (/json/i.test(contentType) && text !== '') {
      try {
        data = JSON.parse(text);
      } catch {
        // leave it as text; acme-client reports unexpected shapes itself
      }
    }

    const status = response.statusCode;
    if (status < 400) return { status, headers, data };

    const problem = toProblem(data, status);
    if (problem.type === `${ACME_ERROR_PREFIX}badNonce`) return { status, headers, data };
    const retryAfterMs = parseRetryAfter(headers['retry-after']);
    throw new AcmeError('GH_ACME_PROBLEM', `the ACME server answered ${status} to ${upper} ${url}: ${problem.type}${problem.detail ? `: ${problem.detail}` : ''}`, {
      problem,
      ...(retryAfterMs !== undefined ? { retryAfterMs } : {}),
    });
  }

  /** Close idle connections (pending requests fail). */
  async close(): Promise<void> {
    await this.#agent.close().catch(() => {});
  }
}

/** Retry-After (RFC 9110 §10.2.3): delay-seconds or an HTTP date, as ms from now; undefined when absent or past. */
export function parseRetryAfter(value: string | undefined, now = Date.now()): number | undefined {
  if (!value) return undefined;
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Number(trimmed) * 1000;
  const date = Date.parse(trimmed);
  if (Number.isNaN(date)) return undefined;
  return date > now ? date - now : undefined;
}

function toProblem(data: unknown, status: number): AcmeProblem {
  if (data && typeof data === 'object' && typeof (data as { type?: unknown }).type === 'string') {
    const body = data as { type: string; detail?: unknown; subproblems?: unknown };
    return {
      type: body.type,
      ...(typeof body.detail === 'string' ? { detail: body.detail } : {}),
      status,
      ...(Array.isArray(body.subproblems) ? { subproblems: body.subproblems as AcmeProblem[] } : {}),
    };
  }
  return { type: 'about:blank', detail: typeof data === 'string' ? data.slice(0, 200) : `HTTP ${status}`, status };
}

function describeNetworkError(error: unknown): string {
  if (error instanceof undiciErrors.UndiciError) return `${error.code}: ${error.message}`;
  const err = error as NodeJS.ErrnoException & { cause?: NodeJS.ErrnoException };
  const code = err?.code ?? err?.cause?.code;
  const message = err?.cause?.message ?? err?.message ?? String(error);
  return code ? `${code}: ${message}` : message;
}
