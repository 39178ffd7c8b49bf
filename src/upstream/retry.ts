/**
 * The retry decision for a failed upstream attempt: may the proxy send this request again (to
 * another upstream when there is one)? Pure functions, no I/O, no clock of their own.
 *
 * The rules, as nginx (`proxy_next_upstream`, non-idempotent requests are not retried since
 * 1.9.13) and Caddy (`lb_retries`, `lb_try_duration`, dial errors always retryable) apply them:
 *
 * 1. A connection failure before any byte of the request was written (refused, unreachable,
 *    connect timeout, DNS) is retried for ANY method: the upstream never saw the request.
 * 2. A stale keep-alive connection (the upstream closed an idle pooled socket just as we wrote on
 *    it: `ECONNRESET`, `EPIPE`, `GH_UPSTREAM_RESET`) with no response byte received is retried for
 *    idempotent methods whose body can be sent again. This is the "keep-alive race".
 * 3. Any other retryable error after bytes were sent (reset, timeout waiting for headers) is
 *    retried only for idempotent methods (RFC 9110 §9.2.2) with no body or a replayable one.
 *    A POST (or PATCH) that reached the upstream is never sent twice.
 * 4. Never once response bytes were received (they may already be on their way to the client),
 *    never for errors the client caused (it aborted), and never past `retries.count` extra
 *    attempts or `retries.try_duration` since the first attempt started.
 *
 * Errors are classified by their `code` (`err.code`, or the code of `err.cause` / the first of an
 * `AggregateError`'s errors), never by message text.
 */
import type { RetriesConfig } from '../config/schema.js';

/** What the proxy knows about a failed attempt. */
export interface RetryInput {
  /** Request method, upper case as received (`GET`, `POST`, …). */
  readonly method: string;
  /** Attempts made so far, including the one that just failed (1 after the first attempt). */
  readonly attempt: number;
  /** When the first attempt started (ms, same clock as `now`). */
  readonly startedAt: number;
  /** Now (ms). */
  readonly now: number;
  /** The error the attempt failed with (the upstream pool's or a node:net error, carrying a `code`). */
  readonly error: unknown;
  /** True when the request has no body, or its body is buffered and can be sent again. */
  readonly requestBodyReplayable: boolean;
  /** Bytes of the request (head and body) written to the upstream socket by this attempt. */
  readonly bytesSent: number;
  /** True once any byte of the upstream's response was received. Default false. */
  readonly responseStarted?: boolean;
}

/** Bounds on retrying: the route's `retries` config (`count` extra attempts, `try_duration` ms). */
export type RetryBudget = Pick<RetriesConfig, 'count' | 'try_duration'>;

/**
 * Why a request is, or is not, retried. The `retry_*` values mean yes. Constant strings, so the
 * proxy can log or count them without allocating.
 */
export type RetryVerdict =
  | 'retry_connect_failure'
  | 'retry_stale_connection'
  | 'retry_idempotent'
  | 'no_attempts_left'
  | 'no_time_left'
  | 'no_response_started'
  | 'no_not_idempotent'
  | 'no_body_not_replayable'
  | 'no_error_not_retryable';

/**
 * Safe-to-repeat methods of RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE.
 * @param method request method; compared case-sensitively, as RFC 9110 §9.1 says methods are.
 */
export function isIdempotent(method: string): boolean {
  switch (method) {
    case 'GET': case 'HEAD': case 'OPTIONS': case 'TRACE': case 'PUT': case 'DELETE':
      return true;
    default:
      return false;
  }
}

/**
 * Should the proxy make another attempt? See the file comment for the rules.
 * @param input the failed attempt.
 * @param budget `retries` of the route: `count` extra attempts (default 2), `try_duration` ms
 *   (default 5000; 0 means no time bound, only `count`).
 * @returns true to retry (on another upstream when there is one).
 */
export function shouldRetry(input: RetryInput, budget: RetryBudget): boolean {
  return retryVerdict(input, budget).startsWith('retry_');
}

/**
 * The same decision as {@link shouldRetry}, with its reason (for logs and metrics).
 * Checks run in this order: attempt count, time budget, response started, error class, method,
 * body.
 */
export function retryVerdict(input: RetryInput, budget: RetryBudget): RetryVerdict {
  if (input.attempt > budget.count) return 'no_attempts_left';
  if (budget.try_duration > 0 && input.now - input.startedAt >= budget.try_duration) return 'no_time_left';
  if (input.responseStarted === true) return 'no_response_started';

  const code = errorCode(input.error);
  const nothingSent = input.bytesSent <= 0;
  if (code !== undefined && isConnectFailure(code) && nothingSent) return 'retry_connect_failure';
  // A pooled socket that dies before we wrote a byte is as good as a refused connection.
  if (code !== undefined && isConnectionReset(code) && nothingSent) return 'retry_connect_failure';
  if (code === undefined || !(isConnectFailure(code) || isConnectionReset(code) || isTimeoutBeforeResponse(code))) {
    return 'no_error_not_retryable';
  }
  if (!isIdempotent(input.method)) return 'no_not_idempotent';
  if (!input.requestBodyReplayable) return 'no_body_not_replayable';
  return isConnectionReset(code) ? 'retry_stale_connection' : 'retry_idempotent';
}

/**
 * The error code of an upstream failure: `err.code`, else `err.cause.code`, else the code of the
 * first error of an `AggregateError` (Node's happy-eyeballs connect gives one per address).
 * @returns the code (`ECONNREFUSED`, `GH_UPSTREAM_RESET`, …) or undefined.
 */
export function errorCode(error: unknown): string | undefined {
  if (typeof error !== 'object' || error === null) return undefined;
  const own = (error as { code?: unknown }).code;
  if (typeof own === 'string') return own;
  const cause = (error as { cause?: unknown }).cause;
  if (typeof cause === 'object' && cause !== null) {
    const code = (cause as { code?: unknown }).code;
    if (typeof code === 'string') return code;
  }
  const errors = (error as { errors?: unknown }).errors;
  if (Array.isArray(errors) && errors.length > 0) return errorCode(errors[0]);
  return undefined;
}

/**
 * Codes meaning the connection to the upstream could not be made, so nothing was sent:
 * refused, unreachable, DNS failure, connect timeout (the pool's `GH_UPSTREAM_CONNECT_TIMEOUT`, the
 * kernel's `ETIMEDOUT`), and no free local port.
 */
export function isConnectFailure(code: string): boolean {
  switch (code) {
    case 'ECONNREFUSED': case 'EHOSTUNREACH': case 'ENETUNREACH': case 'EHOSTDOWN': case 'ENETDOWN':
    case 'ENOTFOUND': case 'EAI_AGAIN': case 'ETIMEDOUT': case 'EADDRNOTAVAIL':
    case 'GH_UPSTREAM_CONNECT_TIMEOUT':
      return true;
    default:
      return false;
  }
}

/**
 * Codes meaning an established connection died under us: reset, broken pipe, or the pool's
 * `GH_UPSTREAM_RESET` (the upstream closed it mid-exchange). On a reused keep-alive socket this is the race where the
 * upstream closed it while idle.
 */
export function isConnectionReset(code: string): boolean {
  switch (code) {
    case 'ECONNRESET': case 'EPIPE': case 'ECONNABORTED': case 'GH_UPSTREAM_RESET':
      return true;
    default:
      return false;
  }
}

/** The pool's `GH_UPSTREAM_HEADERS_TIMEOUT`: the request was sent, no response head came in time. */
function isTimeoutBeforeResponse(code: string): boolean {
  return code === 'GH_UPSTREAM_HEADERS_TIMEOUT';
}
