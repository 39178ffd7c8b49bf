/**
 * HTTP/1.1 Upgrade (RFC 9110 §7.8), in practice WebSocket (RFC 6455): relays the upgrade request on
 * a fresh connection to the upstream and, only when the upstream answers `101 Switching Protocols`,
 * turns both connections into a byte tunnel.
 *
 * The upstream connection is made by Node's HTTP client with `agent: false` (one new TCP or TLS
 * socket, never pooled) so that the upstream's answer is parsed by llhttp: a 101 gives the raw
 * socket back (`'upgrade'`), anything else is a normal, correctly framed response that is relayed
 * to the client, after which the client connection is closed. It never becomes a tunnel — a client
 * must not get a raw pipe to an upstream that refused the upgrade (WebSocket request smuggling).
 *
 * Both sockets are destroyed as soon as either closes or fails, and every timer is cleared, so no
 * descriptor outlives its tunnel.
 */
import http, { type IncomingMessage } from 'node:http';
import https from 'node:https';
import type { Duplex } from 'node:stream';
import type { Socket } from 'node:net';
import type { TimeoutsConfig } from '../config/schema.js';
import type { Upstream } from '../upstream/pool.js';
import { classifyUpstreamError, errorBody, FAILURES, type ProxyFailure } from './errors.js';
import { isHopByHopHeader, newRequestHeadFacts, toUpstreamRequestHeaders } from './headers.js';
import type { ExchangeOutcome } from './forward.js';
import { busyPollKick } from '../busy-poll.js';

/** What `proxyUpgrade` needs besides the request; built by the router per request. */
export interface UpgradeTarget {
  /** The upstream chosen by the balancer; its `inFlight` counts open tunnels too. */
  readonly upstream: Upstream;
  /** Request target sent upstream (path and query, starting with `/`), prefix already stripped. */
  readonly path: string;
  /** The client's IP address, appended to `X-Forwarded-For`. */
  readonly clientIp: string;
  /** `https` on the TLS listener, `http` on the plain one. */
  readonly protocol: 'http' | 'https';
  /** A request id chosen earlier; default: the client's if sane, else a new one. */
  readonly requestId?: string;
  /**
   * Overrides of the upstream's timeouts (ms): `connect` (TCP/TLS connect) and `response_header`
   * (wait for the upstream's answer to the upgrade request). Both give 504. Default: the
   * `Upstream`'s timeouts.
   */
  readonly timeouts?: Partial<Pick<TimeoutsConfig, 'connect' | 'response_header'>>;
  /** Called once when the exchange is over: the tunnel closed, the refusal was relayed, or it failed. */
  readonly onDone?: (outcome: UpgradeOutcome) => void;
}

/** The result of one upgrade exchange, for the access log: 101 for a tunnel, the upstream's
 * status when it refused, 4xx/5xx on failure; bytes are those relayed after the switch, or of the
 * relayed refusal's body. */
export type UpgradeOutcome = ExchangeOutcome;

/**
 * Proxies an HTTP/1.1 Upgrade request; call it from the server's `'upgrade'` event with its three
 * arguments. `Upgrade: h2c` is answered with 400 (h2c is never forwarded: the listener speaks
 * HTTP/2 itself, and a forwarded h2c upgrade could bypass routing). Connect failures give 502,
 * connect and response timeouts 504, written on the raw socket with `Connection: close`.
 *
 * Never throws; errors on either socket end the exchange.
 *
 * @param req the upgrade request (`http.IncomingMessage` from the `'upgrade'` event).
 * @param socket the client's socket (`net.Socket` or `tls.TLSSocket`).
 * @param head bytes the client sent after the request head (may be empty).
 * @param target upstream, path, client facts, timeouts and the completion callback.
 */
export function proxyUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer, target: UpgradeTarget): void {
  new UpgradeExchange(req, socket as Socket, head, target).start();
}

type Phase = 'connecting' | 'waiting' | 'tunnel' | 'relaying' | 'done';

class UpgradeExchange implements UpgradeOutcome {
  status = 0;
  bytesIn = 0;
  bytesOut = 0;
  error: string | undefined = undefined;
  requestId = '';
  readonly upstream: string;

  private phase: Phase = 'connecting';
  private timer: NodeJS.Timeout | undefined;
  private upstreamRequest: http.ClientRequest | undefined;
  private upstreamSocket: Socket | undefined;
  private upstreamResponse: IncomingMessage | undefined;

  constructor(
    private readonly req: IncomingMessage,
    private readonly socket: Socket,
    private readonly head: Buffer,
    private readonly target: UpgradeTarget,
  ) {
    this.upstream = target.upstream.origin;
  }

  start(): void {
    const { req, socket, target } = this;
    const up = target.upstream;
    up.inFlight++;
    socket.on('error', this.onClientError);
    socket.on('close', this.onClientClose);

    const facts = newRequestHeadFacts();
    const headers = toUpstreamRequestHeaders(req.rawHeaders, req.httpVersion, target, facts, true);
    this.requestId = facts.requestId;
    const protocols = facts.upgrade.split(',').map((p) => p.trim());
    if (facts.upgrade === '' || protocols.some((p) => p === 'h2c' || p.startsWith('h2c/'))) {
      this.failRaw(FAILURES.badUpgrade);
      return;
    }

    const connectTimeout = target.timeouts?.connect ?? up.timeouts.connect;
    const options: https.RequestOptions = {
      host: up.hostname,
      port: up.port,
      method: req.method,
      path: target.path,
      headers: headers as unknown as http.OutgoingHttpHeaders, // a flat raw list: order and case kept
      setHost: false,
      agent: false,
    };
    if (up.secure) {
      options.servername = up.tls?.servername ?? (isIpLiteral(up.hostname) ? undefined : up.hostname);
      if (up.tls?.ca !== undefined) options.ca = up.tls.ca;
      if (up.tls?.rejectUnauthorized !== undefined) options.rejectUnauthorized = up.tls.rejectUnauthorized;
    }
    let upstreamRequest: http.ClientRequest;
    try {
      upstreamRequest = (up.secure ? https : http).request(options);
    } catch (error) {
      this.failRaw(classifyUpstreamError(error));
      return;
    }
    this.upstreamRequest = upstreamRequest;
    upstreamRequest.on('socket', this.onUpstreamSocket);
    upstreamRequest.on('upgrade', this.onUpstreamUpgrade);
    upstreamRequest.on('response', this.onUpstreamResponse);
    upstreamRequest.on('error', this.onUpstreamError);
    this.timer = setTimeout(this.onTimeout, connectTimeout);
    upstreamRequest.end();
  }

  // Arrow properties: these run once per tunnel (not per request), and bind `this` for the events.

  private readonly onUpstreamSocket = (upstreamSocket: Socket): void => {
    this.upstreamSocket = upstreamSocket;
    upstreamSocket.once(this.target.upstream.secure ? 'secureConnect' : 'connect', this.onUpstreamConnect);
  };

  private readonly onUpstreamConnect = (): void => {
    if (this.phase !== 'connecting') return;
    this.phase = 'waiting';
    clearTimeout(this.timer);
    this.timer = setTimeout(this.onTimeout, this.target.timeouts?.response_header ?? this.target.upstream.timeouts.response_header);
  };

  private readonly onTimeout = (): void => {
    this.timer = undefined;
    if (this.phase === 'connecting') this.failRaw(FAILURES.connectTimeout);
    else if (this.phase === 'waiting') this.failRaw(FAILURES.headersTimeout);
  };

  private readonly onUpstreamUpgrade = (response: IncomingMessage, upstreamSocket: Socket, upstreamHead: Buffer): void => {
    clearTimeout(this.timer);
    this.timer = undefined;
    const { socket } = this;
    if (this.phase === 'done' || socket.destroyed) {
      upstreamSocket.destroy();
      return;
    }
    this.phase = 'tunnel';
    this.status = 101;
    this.upstreamSocket = upstreamSocket;
    upstreamSocket.on('error', this.onTunnelError);
    upstreamSocket.on('close', this.onTunnelClose);
    upstreamSocket.setNoDelay(true);
    upstreamSocket.setTimeout(0);
    socket.setNoDelay(true);
    socket.setTimeout(0);

    socket.write(responseHead(response, true));
    if (upstreamHead.length > 0) {
      this.bytesOut += upstreamHead.length;
      socket.write(upstreamHead);
    }
    if (this.head.length > 0) {
      this.bytesIn += this.head.length;
      upstreamSocket.write(this.head);
    }
    socket.on('data', this.countIn);
    upstreamSocket.on('data', this.countOut);
    socket.pipe(upstreamSocket);
    upstreamSocket.pipe(socket);
    // A tunnel is only as alive as both of its ends.
    if (upstreamSocket.destroyed) this.close();
  };

  private readonly onUpstreamResponse = (response: IncomingMessage): void => {
    clearTimeout(this.timer);
    this.timer = undefined;
    const { socket } = this;
    if (this.phase === 'done' || socket.destroyed) {
      this.close();
      return;
    }
    // Not a 101: relay it as a plain response and close; never a tunnel.
    this.phase = 'relaying';
    this.status = response.statusCode ?? 502;
    this.error = FAILURES.badUpgrade.code;
    this.upstreamResponse = response;
    response.on('error', this.onTunnelError);
    response.on('aborted', this.onTunnelError);
    response.on('data', this.countOut);
    response.on('end', this.onRelayEnd);
    socket.write(responseHead(response, false));
    response.pipe(socket, { end: false });
  };

  private readonly onRelayEnd = (): void => {
    this.socket.end(this.close);
  };

  private readonly countIn = (chunk: Buffer): void => {
    this.bytesIn += chunk.length;
    busyPollKick();
  };

  private readonly countOut = (chunk: Buffer): void => {
    this.bytesOut += chunk.length;
    busyPollKick();
  };

  private readonly onUpstreamError = (error: Error): void => {
    if (this.phase === 'connecting' || this.phase === 'waiting') this.failRaw(classifyUpstreamError(error));
    else this.close();
  };

  private readonly onTunnelError = (): void => {
    this.close();
  };

  private readonly onTunnelClose = (): void => {
    this.close();
  };

  private readonly onClientError = (): void => {
    if (this.error === undefined && this.phase !== 'tunnel') this.error = FAILURES.clientAborted.code;
    this.close();
  };

  private readonly onClientClose = (): void => {
    if (this.phase === 'connecting' || this.phase === 'waiting') {
      this.error = FAILURES.clientAborted.code;
      this.status = FAILURES.clientAborted.status;
    }
    this.close();
  };

  /** Answers the client with an error on the raw socket and closes both sides. */
  private failRaw(failure: ProxyFailure): void {
    if (this.phase === 'done') return;
    this.status = failure.status;
    this.error = failure.code;
    const { socket } = this;
    this.destroyUpstream();
    if (!socket.destroyed && socket.writable) {
      const body = errorBody(failure);
      socket.end(
        `HTTP/1.1 ${failure.status} ${http.STATUS_CODES[failure.status] ?? 'Error'}\r\n`
          + 'Content-Type: text/plain; charset=utf-8\r\n'
          + `Content-Length: ${Buffer.byteLength(body)}\r\n`
          + (this.requestId !== '' ? `X-Request-Id: ${this.requestId}\r\n` : '')
          + `Connection: close\r\n\r\n${body}`,
        this.close,
      );
      // If the client never reads, 'finish' never comes: 'close' or the timer below ends it.
      this.timer = setTimeout(this.close, 5_000);
      this.timer.unref();
      this.phase = 'relaying';
    } else {
      this.close();
    }
  }

  private destroyUpstream(): void {
    this.upstreamResponse?.destroy();
    this.upstreamRequest?.destroy();
    this.upstreamSocket?.destroy();
  }

  /** Ends the exchange: destroys both sockets, clears the timer, reports once. Idempotent. */
  private readonly close = (): void => {
    if (this.phase === 'done') return;
    this.phase = 'done';
    clearTimeout(this.timer);
    this.timer = undefined;
    this.destroyUpstream();
    this.socket.destroy();
    this.target.upstream.inFlight--;
    const onDone = this.target.onDone;
    if (onDone !== undefined) {
      try {
        onDone(this);
      } catch {
        // A failing access log must not break the proxy.
      }
    }
  };
}

/**
 * Serialises the upstream's response head for the client. For a 101 the `Connection: Upgrade` and
 * `Upgrade` fields are kept; every other hop-by-hop field (`HOP_BY_HOP_HEADERS`) is dropped. A
 * relayed non-101 response loses `Transfer-Encoding` (Node decoded the body) and gets
 * `Connection: close`: its body is delimited by `Content-Length` or by the end of the connection.
 */
function responseHead(response: IncomingMessage, switching: boolean): string {
  const status = response.statusCode ?? 502;
  let head = `HTTP/1.1 ${status} ${sanitizeReason(response.statusMessage, status)}\r\n`;
  const raw = response.rawHeaders;
  let upgrade = '';
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!;
    const value = raw[i + 1]!;
    const lower = name.toLowerCase();
    if (lower === 'upgrade') {
      upgrade = value;
      continue;
    }
    if (isHopByHopHeader(lower)) continue;
    if (/[\r\n\0]/.test(value)) continue;
    head += `${name}: ${value}\r\n`;
  }
  head += switching ? `Connection: Upgrade\r\nUpgrade: ${upgrade}\r\n\r\n` : 'Connection: close\r\n\r\n';
  return head;
}

function sanitizeReason(reason: string | undefined, status: number): string {
  if (reason === undefined || /[\r\n\0]/.test(reason)) return http.STATUS_CODES[status] ?? '';
  return reason;
}

function isIpLiteral(host: string): boolean {
  return /^[\d.]+$/.test(host) || host.includes(':');
}
