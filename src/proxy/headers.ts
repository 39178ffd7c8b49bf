/**
 * Header translation between the client and the upstream, in both directions.
 *
 * Request direction (client → upstream): one pass over `req.rawHeaders` (HTTP/1.x or HTTP/2, whose
 * compat request exposes the pseudo-headers there too) that drops hop-by-hop fields (RFC 9110
 * §7.6.1), the fields named by `Connection`, HTTP/2 pseudo-headers (RFC 9113 §8.3) and `Expect`,
 * builds `Host` from `:authority` for HTTP/2 clients (RFC 9113 §8.3.1), and adds `X-Forwarded-For`,
 * `X-Forwarded-Proto`, `X-Forwarded-Host`, `Via` (RFC 9110 §7.6.3) and `X-Request-Id`.
 *
 * Response direction (upstream → client): drops hop-by-hop fields and the fields named by
 * `Connection`, so that an HTTP/2 client never gets a connection-specific field (RFC 9113 §8.2.2;
 * Node's http2 throws on them), skips names and values Node would reject (without throwing),
 * appends `Via` and sets `X-Request-Id`.
 */
import { INVALID_VALUE_CHAR, TOKEN } from '../upstream/field-syntax.js';

/**
 * True when an HTTP/1.x request carries a body: it has `Transfer-Encoding`, or a `Content-Length`
 * other than 0 (RFC 9112 §6.3; Node's parser already refused conflicting or malformed ones).
 * Reads `req.headers`, which node:http builds for every HTTP/1.1 request anyway. Never throws.
 */
export function hasHttp1Body(req: { readonly headers: Readonly<Record<string, string | string[] | undefined>> }): boolean {
  const headers = req.headers;
  const length = headers['content-length'];
  return (length !== undefined && length !== '0') || headers['transfer-encoding'] !== undefined;
}

/**
 * Hop-by-hop header fields (lowercase), removed by every intermediary (RFC 9110 §7.6.1; RFC 9112
 * §6.1 for Transfer-Encoding). `Proxy-Connection` is the non-standard field some clients still send;
 * `Trailer` is removed because Gatehouse re-frames the body (and the upstream pool sends no request
 * trailers, so announcing them upstream would be false). HTTP/2 forbids all of these except `te:
 * trailers` (RFC 9113 §8.2.2). Upgrade code keeps `connection`/`upgrade` itself.
 */
export const HOP_BY_HOP_HEADERS: readonly string[] = Object.freeze([
  'connection',
  'keep-alive',
  'proxy-connection',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
]);

const HOP_BY_HOP = new Set<string>(HOP_BY_HOP_HEADERS);

/** True when `lowercaseName` is a hop-by-hop field (see `HOP_BY_HOP_HEADERS`). */
export function isHopByHopHeader(lowercaseName: string): boolean {
  return HOP_BY_HOP.has(lowercaseName);
}

/** A Content-Length value (RFC 9110 §8.6), at most 15 digits so that it stays an exact number. */
const DECIMAL = /^\d{1,15}$/;
/** A request id worth keeping: 1–200 visible ASCII characters. */
const SANE_REQUEST_ID = /^[\x21-\x7e]{1,200}$/;

/** True when `value` is a field value Node's http and http2 modules accept (RFC 9110 §5.5). */
export function isValidHeaderValue(value: string): boolean {
  return !INVALID_VALUE_CHAR.test(value);
}

const REQUEST_ID_PREFIX = (Date.now().toString(36) + Math.random().toString(36).slice(2, 10)).slice(-14);
let requestIdCounter = 0;

/**
 * A new request id: a per-process random prefix and a counter (`lx1k2f9a3bqz7c-1f`), unique within
 * the process and very likely across processes; about 30× cheaper than `crypto.randomUUID()`.
 */
export function generateRequestId(): string {
  requestIdCounter = (requestIdCounter + 1) | 0;
  return `${REQUEST_ID_PREFIX}-${(requestIdCounter >>> 0).toString(36)}`;
}

/** The client-side facts the request headers need. */
export interface ForwardedFor {
  /** The client's IP address (the TCP peer), e.g. `203.0.113.7` or `2001:db8::1`. */
  readonly clientIp: string;
  /** The protocol the client used towards Gatehouse: `https` (TLS listener) or `http`. */
  readonly protocol: 'http' | 'https';
  /** A request id decided earlier (middleware); when absent the client's sane id is kept, else one is generated. */
  readonly requestId?: string | undefined;
}

/** What the request-header translation learnt on the way; filled in by `toUpstreamRequestHeaders`. */
export interface RequestHeadFacts {
  /** The original host (`Host`, or `:authority` for HTTP/2); `''` when the client sent none. */
  host: string;
  /** The request id sent upstream and back to the client. */
  requestId: string;
  /** The `Content-Length` the client declared, or -1 when none. */
  contentLength: number;
  /** True when the client sent `Transfer-Encoding` (an HTTP/1.1 body of unknown length). */
  chunked: boolean;
  /** True when the client sent `TE: trailers` (forwarded as `te: trailers`). */
  teTrailers: boolean;
  /** Lowercased value of the client's `Upgrade` field, `''` when none. */
  upgrade: string;
}

/** Returns a blank `RequestHeadFacts` to be filled by `toUpstreamRequestHeaders`. */
export function newRequestHeadFacts(): RequestHeadFacts {
  return { host: '', requestId: '', contentLength: -1, chunked: false, teTrailers: false, upgrade: '' };
}

/**
 * Translates the client's request header fields into the flat `[name, value, ...]` list sent upstream.
 *
 * Removes: hop-by-hop fields and those `Connection` names (RFC 9110 §7.6.1), pseudo-headers (RFC
 * 9113 §8.3), `Expect` (Node answers `100-continue` itself),
 * `HTTP2-Settings`, and the client's `X-Forwarded-Proto`/`X-Forwarded-Host`. `TE` is sent as `te:
 * trailers` when the client's listed `trailers`. Adds: `host` from `:authority` for HTTP/2;
 * `x-forwarded-for` (the client's value with `, <clientIp>` appended), `x-forwarded-proto`,
 * `x-forwarded-host` (original host), `via` (`1.1 gatehouse`, `2 gatehouse` for HTTP/2, appended to
 * the client's), `x-request-id`. When `upgrade` is true, `connection: upgrade` and the client's
 * `Upgrade` are kept (HTTP/1.1 Upgrade, RFC 9110 §7.8).
 *
 * Never throws. Fields with an invalid name (not a token) or value (controls, DEL, characters above
 * U+00FF) are dropped, and `Content-Length` is sent once in canonical form: Node's parsers already
 * refuse such input, this holds for any list.
 *
 * @param rawHeaders `req.rawHeaders` (alternating names and values, as received).
 * @param httpVersion `req.httpVersion` (`"1.1"`, `"1.0"`, `"2.0"`).
 * @param client client IP, protocol and an optional request id.
 * @param facts receives the host, request id, body framing and TE of the request.
 * @param upgrade keep `Connection: upgrade` and `Upgrade` (default false).
 * @returns the header list for the upstream pool (`upstream/http1-pool.ts`) or a raw HTTP/1.1 head.
 */
export function toUpstreamRequestHeaders(
  rawHeaders: readonly string[],
  httpVersion: string,
  client: ForwardedFor,
  facts: RequestHeadFacts,
  upgrade = false,
): string[] {
  const out: string[] = [];
  let authority = '';
  let host = '';
  let forwardedFor = '';
  let via = '';
  let clientRequestId = '';
  let connectionTokens = '';
  let contentLength = '';
  const n = rawHeaders.length;
  for (let i = 0; i < n; i += 2) {
    const name = rawHeaders[i]!;
    const value = rawHeaders[i + 1]!;
    const lower = name.toLowerCase();
    if (lower === 'connection') {
      if (!isPlainConnectionValue(value)) connectionTokens = connectionTokens === '' ? value.toLowerCase() : `${connectionTokens},${value.toLowerCase()}`;
      continue;
    }
    if (INVALID_VALUE_CHAR.test(value)) continue; // Node's parsers refuse these; never pass one on
    switch (lower) {
      case 'host':
        if (host === '') host = value;
        continue;
      case 'te':
        if (/(?:^|,)\s*trailers\s*(?:[;,]|$)/i.test(value)) facts.teTrailers = true;
        continue;
      case 'transfer-encoding':
        facts.chunked = true;
        continue;
      case 'upgrade':
        facts.upgrade = value.toLowerCase();
        continue;
      case 'keep-alive':
      case 'proxy-connection':
      case 'trailer':
      case 'expect':
      case 'http2-settings':
      case 'x-forwarded-proto':
      case 'x-forwarded-host':
        continue;
      case 'content-length':
        // Forwarded once, in canonical form (`007` → `7`); a second or malformed one is dropped
        // (Node's parsers refuse both; this is the last line of defence).
        if (contentLength === '' && DECIMAL.test(value)) {
          facts.contentLength = Number(value);
          contentLength = String(facts.contentLength);
          out.push(name, contentLength);
        }
        continue;
      case 'x-forwarded-for':
        forwardedFor = forwardedFor === '' ? value : `${forwardedFor}, ${value}`;
        continue;
      case 'via':
        via = via === '' ? value : `${via}, ${value}`;
        continue;
      case 'x-request-id':
        if (clientRequestId === '') clientRequestId = value;
        continue;
      default:
        if (lower.charCodeAt(0) === 58 /* ':' */) {
          if (lower === ':authority') authority = value;
          continue;
        }
        if (!TOKEN.test(name)) continue;
    }
    out.push(name, value);
  }

  if (connectionTokens !== '') removeConnectionListed(out, connectionTokens);

  const originalHost = authority !== '' ? authority : host;
  facts.host = originalHost;
  const requestId = client.requestId ?? (clientRequestId !== '' && SANE_REQUEST_ID.test(clientRequestId) ? clientRequestId : generateRequestId());
  facts.requestId = requestId;

  if (originalHost !== '') out.push('host', originalHost);
  if (facts.teTrailers && !upgrade) out.push('te', 'trailers');
  if (upgrade && facts.upgrade !== '') out.push('connection', 'upgrade', 'upgrade', facts.upgrade);
  out.push(
    'x-forwarded-for', forwardedFor === '' ? client.clientIp : `${forwardedFor}, ${client.clientIp}`,
    'x-forwarded-proto', client.protocol,
  );
  if (originalHost !== '') out.push('x-forwarded-host', originalHost);
  out.push(
    'via', via === '' ? viaEntry(httpVersion) : `${via}, ${viaEntry(httpVersion)}`,
    'x-request-id', requestId,
  );
  return out;
}

function viaEntry(httpVersion: string): string {
  switch (httpVersion) {
    case '1.1': return '1.1 gatehouse';
    case '2.0': return '2 gatehouse';
    case '1.0': return '1.0 gatehouse';
    default: return `${httpVersion} gatehouse`;
  }
}

/** True for the common `Connection` values that name no other field (the fast path skips the scan). */
function isPlainConnectionValue(value: string): boolean {
  switch (value) {
    case 'keep-alive': case 'Keep-Alive': case 'close': case 'Close': case 'upgrade': case 'Upgrade':
      return true;
    default:
      return false;
  }
}

/** Removes from a flat name/value list every field named in a `Connection` value (RFC 9110 §7.6.1). */
function removeConnectionListed(list: string[], connectionTokens: string): void {
  const listed = new Set<string>();
  for (const token of connectionTokens.split(',')) {
    const t = token.trim();
    if (t !== '' && t !== 'close' && t !== 'keep-alive' && t !== 'upgrade') listed.add(t);
  }
  if (listed.size === 0) return;
  let w = 0;
  for (let r = 0; r < list.length; r += 2) {
    if (listed.has(list[r]!.toLowerCase())) continue;
    list[w++] = list[r]!;
    list[w++] = list[r + 1]!;
  }
  list.length = w;
}

/**
 * Lengths of the response field names {@link toClientResponseHeaders} handles by name: the
 * hop-by-hop ones, `via`, `content-length` and `x-request-id`. A name of any other length cannot be
 * one of them, so an HTTP/1.x response passes it on without lowercasing it.
 */
const HANDLED_RESPONSE_NAME_LENGTHS = new Set([...HOP_BY_HOP_HEADERS, 'via', 'content-length', 'x-request-id'].map((name) => name.length));

/** Response header fields for the client: a flat list (HTTP/1.x) or an object (HTTP/2). */
export type ClientResponseHeaders = string[] | Record<string, string | string[]>;

/**
 * Translates the upstream's raw response header fields (the pool's `string[]`, alternating names and
 * values) into what `res.writeHead` takes: a flat `[name, value, ...]` list for HTTP/1.x clients
 * (order and case kept) or an object with lowercase names for HTTP/2 clients (repeated fields as
 * arrays). Drops hop-by-hop fields and those named by `Connection` (RFC 9110 §7.6.1; for HTTP/2,
 * RFC 9113 §8.2.2), names that are not tokens and values with forbidden characters (skipped, never
 * thrown on), and the upstream's `x-request-id`; appends `via: 1.1 gatehouse` and sets
 * `x-request-id` when `requestId` is not `''`. Values are decoded as latin1, so obs-text bytes pass
 * through unchanged.
 *
 * @param raw the raw header list (`string` or latin1 `Buffer` items).
 * @param http2 true for an HTTP/2 client.
 * @param requestId the request id to return, or `''`.
 * @param status the response status; `Content-Length` is dropped for 1xx and 204. Default 200.
 * @param validated true when the caller knows every name is a token and every value free of the
 *   forbidden characters (the upstream pool's response parser says so per head): those two checks
 *   are then skipped. Default false.
 */
export function toClientResponseHeaders(raw: readonly (Buffer | string)[], http2: boolean, requestId: string, status = 200, validated = false): ClientResponseHeaders {
  // RFC 9110 §8.6: no Content-Length in a 1xx or 204 (an upstream that sends one anyway must not
  // make the client wait for a body, nor node:http2 refuse the response).
  const noLength = status < 200 || status === 204;
  let connectionTokens = '';
  let via = '';
  const list: string[] = [];
  const n = raw.length;
  for (let i = 0; i < n; i += 2) {
    const rawName = raw[i]!;
    const rawValue = raw[i + 1]!;
    const name = typeof rawName === 'string' ? rawName : rawName.toString('latin1');
    const value = typeof rawValue === 'string' ? rawValue : rawValue.toString('latin1');
    // HTTP/1.x keeps the name as it came; only a name as long as one handled below is lowercased.
    const lower = http2 || HANDLED_RESPONSE_NAME_LENGTHS.has(name.length) ? name.toLowerCase() : name;
    if (lower === 'connection') {
      if (!isPlainConnectionValue(value)) connectionTokens = connectionTokens === '' ? value.toLowerCase() : `${connectionTokens},${value.toLowerCase()}`;
      continue;
    }
    if (!validated && INVALID_VALUE_CHAR.test(value)) continue; // skipped, never thrown on
    switch (lower) {
      case 'keep-alive':
      case 'proxy-connection':
      case 'te':
      case 'trailer':
      case 'transfer-encoding':
      case 'upgrade':
      case 'x-request-id':
        continue;
      case 'via':
        via = via === '' ? value : `${via}, ${value}`;
        continue;
      case 'content-length':
        if (noLength) continue;
        break;
    }
    if (!validated && !TOKEN.test(name)) continue;
    list.push(http2 ? lower : name, value);
  }
  if (connectionTokens !== '') removeConnectionListed(list, connectionTokens);
  list.push('via', via === '' ? '1.1 gatehouse' : `${via}, 1.1 gatehouse`);
  if (requestId !== '') list.push('x-request-id', requestId);
  if (!http2) return list;
  return toHeaderObject(list);
}

/**
 * Translates raw trailer fields (the pool's `string[]`) into an object for `res.addTrailers`, dropping
 * hop-by-hop, pseudo and invalid fields (RFC 9110 §6.5.1 — framing and routing fields are not
 * allowed in trailers). Names are lowercased.
 *
 * @returns the trailers, or `undefined` when none are left.
 */
export function toClientTrailers(raw: readonly (Buffer | string)[] | null | undefined): Record<string, string | string[]> | undefined {
  if (!raw || raw.length === 0) return undefined;
  const list: string[] = [];
  for (let i = 0; i < raw.length; i += 2) {
    const rawName = raw[i]!;
    const rawValue = raw[i + 1]!;
    const name = (typeof rawName === 'string' ? rawName : rawName.toString('latin1')).toLowerCase();
    const value = typeof rawValue === 'string' ? rawValue : rawValue.toString('latin1');
    if (HOP_BY_HOP.has(name) || name === 'content-length' || name === 'host') continue;
    if (!TOKEN.test(name) || INVALID_VALUE_CHAR.test(value)) continue;
    list.push(name, value);
  }
  return list.length === 0 ? undefined : toHeaderObject(list);
}

/** Fields node:http2 allows once per message (it throws ERR_HTTP2_HEADER_SINGLE_VALUE on repeats). */
const SINGLE_VALUE_HEADERS = new Set([
  'access-control-allow-credentials', 'access-control-max-age', 'access-control-request-method', 'age',
  'authorization', 'content-encoding', 'content-language', 'content-length', 'content-location',
  'content-md5', 'content-range', 'content-type', 'date', 'dnt', 'etag', 'expires', 'from', 'host',
  'if-match', 'if-modified-since', 'if-none-match', 'if-range', 'if-unmodified-since', 'last-modified',
  'location', 'max-forwards', 'proxy-authorization', 'range', 'referer', 'retry-after', 'tk',
  'upgrade-insecure-requests', 'user-agent', 'x-content-type-options',
]);

/** A flat list whose names are lowercase already (both callers lowercase them) as an HTTP/2 header object. */
function toHeaderObject(list: readonly string[]): Record<string, string | string[]> {
  const object: Record<string, string | string[]> = Object.create(null);
  for (let i = 0; i < list.length; i += 2) {
    const name = list[i]!;
    const value = list[i + 1]!;
    const existing = object[name];
    if (existing === undefined) object[name] = value;
    else if (SINGLE_VALUE_HEADERS.has(name)) continue; // node:http2 throws on a repeated one; keep the first
    else if (Array.isArray(existing)) existing.push(value);
    else object[name] = [existing, value];
  }
  return object;
}
