/**
 * Errors of the ACME issuer. Callers branch on {@link AcmeError.code}, never on message text; an
 * error that came from the ACME server carries its problem document (RFC 8555 §6.7, RFC 7807).
 */

/** Codes of {@link AcmeError}. */
export type AcmeErrorCode =
  /** `tls.acme.agree_tos` is not true: the CA's terms must be accepted (RFC 8555 §7.3). */
  | 'GH_ACME_TOS_NOT_AGREED'
  /** Bad ACME settings: unknown directory, not https, unreadable `ca_bundle`. */
  | 'GH_ACME_CONFIG'
  /** The ACME server answered with an error (problem document in {@link AcmeError.problem}). */
  | 'GH_ACME_PROBLEM'
  /** The ACME server could not be reached (DNS, TCP, TLS, timeout). */
  | 'GH_ACME_UNREACHABLE'
  /** Every configured challenge failed for the name (RFC 8555 §8); the last problem is attached. */
  | 'GH_ACME_VALIDATION_FAILED'
  /** The name failed recently and is waiting out its backoff; see {@link AcmeError.retryAt}. */
  | 'GH_ACME_BACKOFF'
  /** On-demand TLS refused the name (not in `allow`, or `ask` did not answer 2xx). */
  | 'GH_ACME_NOT_ALLOWED'
  /** Another process held the storage lock for the name longer than the lock timeout. */
  | 'GH_ACME_LOCK_TIMEOUT'
  /** The name cannot be issued over HTTP-01/TLS-ALPN-01 (wildcard, IP literal, invalid name). */
  | 'GH_ACME_UNSUPPORTED_NAME';

/** An ACME problem document (RFC 8555 §6.7): `type` is a URN such as `urn:ietf:params:acme:error:rateLimited`. */
export interface AcmeProblem {
  readonly type: string;
  readonly detail?: string;
  /** HTTP status of the response that carried it. */
  readonly status?: number;
  /** Per-identifier problems (RFC 8555 §6.7.1). */
  readonly subproblems?: readonly AcmeProblem[];
}

/** The `urn:ietf:params:acme:error:` prefix of problem types (RFC 8555 §6.7). */
export const ACME_ERROR_PREFIX = 'urn:ietf:params:acme:error:';

/** An error of the ACME issuer, with a code and, when the server sent one, its problem document. */
export class AcmeError extends Error {
  readonly code: AcmeErrorCode;
  readonly problem: AcmeProblem | undefined;
  /** Server's Retry-After (RFC 8555 §6.6), in ms from when the error was created. */
  readonly retryAfterMs: number | undefined;
  /** For `GH_ACME_BACKOFF`: when the next attempt is allowed (ms since epoch). */
  readonly retryAt: number | undefined;

  constructor(code: AcmeErrorCode, message: string, options: { problem?: AcmeProblem; retryAfterMs?: number; retryAt?: number; cause?: unknown } = {}) {
    super(`${code}: ${message}`, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'AcmeError';
    this.code = code;
    this.problem = options.problem;
    this.retryAfterMs = options.retryAfterMs;
    this.retryAt = options.retryAt;
  }

  /** True when the problem type is `urn:ietf:params:acme:error:<short>` (e.g. `rateLimited`). */
  is(short: string): boolean {
    return this.problem?.type === ACME_ERROR_PREFIX + short;
  }
}

/** The fields of an error worth logging: code, message, problem document. */
export function errorFields(error: unknown): Record<string, unknown> {
  if (error instanceof AcmeError) {
    return { code: error.code, error: error.message, ...(error.problem ? { problem: error.problem } : {}) };
  }
  return { error: error instanceof Error ? error.message : String(error) };
}
