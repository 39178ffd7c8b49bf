/**
 * What the proxy answers when it cannot relay the upstream's answer: a status (RFC 9110 §15), a
 * stable code for logs and metrics, and a short text for the client. Callers branch on `code`,
 * never on message text.
 */
import { STATUS_CODES } from 'node:http';

/** A failure of one proxied exchange, as the client and the access log see it. */
export interface ProxyFailure {
  /** Status sent when no response header was sent yet (502, 504, 413, 400; 499 = client went away). */
  readonly status: number;
  /** Stable code: `GH_UPSTREAM_REFUSED`, `GH_UPSTREAM_RESET`, `GH_UPSTREAM_CONNECT_TIMEOUT`, ... */
  readonly code: string;
  /** One line for the client's plain-text body. */
  readonly message: string;
}

/** A frozen {@link ProxyFailure}: every layer's answers are singletons made with this. */
export function failure(status: number, code: string, message: string): ProxyFailure {
  return Object.freeze({ status, code, message });
}

/** The failures the proxy knows; frozen singletons so the error path allocates nothing. */
export const FAILURES = Object.freeze({
  refused: failure(502, 'GH_UPSTREAM_REFUSED', 'the upstream refused the connection'),
  reset: failure(502, 'GH_UPSTREAM_RESET', 'the upstream closed the connection before answering'),
  dns: failure(502, 'GH_UPSTREAM_DNS', 'the upstream host name does not resolve'),
  tls: failure(502, 'GH_UPSTREAM_TLS', 'the TLS handshake with the upstream failed'),
  badResponse: failure(502, 'GH_UPSTREAM_BAD_RESPONSE', 'the upstream sent an invalid response'),
  other: failure(502, 'GH_UPSTREAM_ERROR', 'the upstream request failed'),
  noUpstream: failure(503, 'GH_NO_UPSTREAM', 'no upstream is available'),
  connectTimeout: failure(504, 'GH_UPSTREAM_CONNECT_TIMEOUT', 'connecting to the upstream timed out'),
  headersTimeout: failure(504, 'GH_UPSTREAM_HEADERS_TIMEOUT', 'the upstream did not answer in time'),
  bodyTimeout: failure(504, 'GH_UPSTREAM_BODY_TIMEOUT', 'the upstream stopped sending the response body'),
  bodyTooLarge: failure(413, 'GH_BODY_TOO_LARGE', 'the request body is larger than this route allows'),
  clientAborted: failure(499, 'GH_CLIENT_ABORTED', 'the client closed the request'),
  badUpgrade: failure(400, 'GH_UPGRADE_REFUSED', 'this upgrade is not supported'),
});

/**
 * Classifies an error of the upstream pool (`GH_UPSTREAM_*` codes, `upstream/http1-pool.ts`) or of
 * `net`/`tls` (`ECONNREFUSED`, ...).
 * Connect and response-header timeouts give 504 (RFC 9110 §15.6.5), every other upstream failure
 * 502 (RFC 9110 §15.6.3).
 */
export function classifyUpstreamError(error: unknown): ProxyFailure {
  let code = (error as { code?: unknown } | null)?.code;
  if (code === undefined && error instanceof AggregateError && error.errors.length > 0) {
    code = (error.errors[0] as { code?: unknown }).code; // happy eyeballs: every address failed
  }
  switch (code) {
    case 'ECONNREFUSED':
      return FAILURES.refused;
    case 'ECONNRESET':
    case 'EPIPE':
    case 'GH_UPSTREAM_RESET':
    case 'GH_UPSTREAM_CLOSED':
      return FAILURES.reset;
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
    case 'EAI_NONAME':
      return FAILURES.dns;
    case 'GH_UPSTREAM_CONNECT_TIMEOUT':
    case 'ETIMEDOUT':
      return FAILURES.connectTimeout;
    case 'GH_UPSTREAM_HEADERS_TIMEOUT':
      return FAILURES.headersTimeout;
    case 'GH_UPSTREAM_BODY_TIMEOUT':
      return FAILURES.bodyTimeout;
    case 'GH_UPSTREAM_BAD_RESPONSE':
      return FAILURES.badResponse;
    case 'GH_BODY_TOO_LARGE':
      return FAILURES.bodyTooLarge;
    case 'GH_CLIENT_ABORTED':
      return FAILURES.clientAborted;
  }
  if (typeof code === 'string' && (code.startsWith('ERR_TLS') || code.startsWith('ERR_SSL') || code.includes('CERT'))) {
    return FAILURES.tls;
  }
  return FAILURES.other;
}

/** An error with a `code`, used to abort an upstream request for a reason of the proxy's own. */
export class ProxyAbortError extends Error {
  readonly code: string;
  constructor(failure: ProxyFailure) {
    super(failure.message);
    this.name = 'ProxyAbortError';
    this.code = failure.code;
  }
}

/** The plain-text body of an error response: `502 Bad Gateway: <message> (<code>)\n`. */
export function errorBody(failure: ProxyFailure): string {
  return `${failure.status} ${STATUS_CODES[failure.status] ?? 'Error'}: ${failure.message} (${failure.code})\n`;
}
