/**
 * Connection tracking for graceful shutdown, shared by both listeners.
 *
 * A draining listener stops accepting, lets in-flight requests finish (HTTP/1.1 answers carry
 * `Connection: close`, HTTP/2 sessions get GOAWAY), closes idle connections, and after the grace
 * period destroys whatever is left.
 */
import type { Server as NetServer, Socket } from 'node:net';
import type { Http2Session } from 'node:http2';

const ACTIVE = Symbol('gatehouse.activeRequests');
type CountedSocket = Socket & { [ACTIVE]?: number };

/** Count an HTTP/1.x request as in flight on its socket (not for HTTP/2 streams). */
export function requestStarted(socket: Socket): void {
  const counted = socket as CountedSocket;
  counted[ACTIVE] = (counted[ACTIVE] ?? 0) + 1;
}

/** The HTTP/1.x request counted by {@link requestStarted} is over. */
export function requestEnded(socket: Socket): void {
  const counted = socket as CountedSocket;
  counted[ACTIVE] = (counted[ACTIVE] ?? 1) - 1;
}

/** True when no HTTP/1.x request is in flight on the socket. */
export function isIdle(socket: Socket): boolean {
  return ((socket as CountedSocket)[ACTIVE] ?? 0) === 0;
}

const TRACKED_IN = Symbol('gatehouse.trackedIn');
type Tracked = (Socket | Http2Session) & { [TRACKED_IN]?: Set<Socket | Http2Session> };

/**
 * 'close' listener of every tracked socket and session: one shared function, the set it leaves
 * rides on a symbol. (A closure per connection, wrapped by `once`, cost four objects, ~200 bytes,
 * for as long as the connection lived.) 'close' is emitted once, so `on` is enough.
 */
function untrack(this: Tracked): void {
  this[TRACKED_IN]?.delete(this);
}

/** Sockets and HTTP/2 sessions of one server. */
export class ConnectionTracker {
  readonly #sockets = new Set<Socket>();
  readonly #sessions = new Set<Http2Session>();
  #draining = false;

  /** Start tracking `server`'s connections (call before `listen`). */
  constructor(server: NetServer, connectionEvent: 'connection' | 'secureConnection' = 'connection') {
    server.on(connectionEvent, (socket: Socket) => {
      this.#sockets.add(socket);
      (socket as Tracked)[TRACKED_IN] = this.#sockets as Set<Socket | Http2Session>;
      socket.on('close', untrack);
      if (this.#draining) socket.destroySoon();
    });
    server.on('session', (session: Http2Session) => {
      this.#sessions.add(session);
      (session as Tracked)[TRACKED_IN] = this.#sessions as Set<Socket | Http2Session>;
      session.on('close', untrack);
      if (this.#draining) session.close();
    });
  }

  /** True once {@link drain} was called: new HTTP/1.1 responses should close their connection. */
  get draining(): boolean {
    return this.#draining;
  }

  /** Open sockets (TLS and plain) and HTTP/2 sessions. */
  get size(): number {
    return this.#sockets.size + this.#sessions.size;
  }

  /**
   * Stop `server` accepting, close idle connections, wait for the rest up to `graceMs`, then
   * destroy what is left.
   * @param idle tells whether a socket has no request in flight (HTTP/1.1); such sockets close now.
   * @returns when every tracked connection is closed.
   */
  async drain(server: NetServer, graceMs: number, idle: (socket: Socket) => boolean = isIdle): Promise<void> {
    this.#draining = true;
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    for (const session of this.#sessions) session.close();
    for (const socket of this.#sockets) {
      if (!isHttp2Socket(socket) && idle(socket)) socket.destroySoon();
    }
    const deadline = Date.now() + graceMs;
    while (this.size > 0 && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 25));
      for (const socket of this.#sockets) {
        if (!isHttp2Socket(socket) && idle(socket)) socket.destroySoon();
      }
    }
    for (const session of this.#sessions) session.destroy();
    for (const socket of this.#sockets) socket.destroy();
    await closed;
  }
}

function isHttp2Socket(socket: Socket): boolean {
  return (socket as Socket & { alpnProtocol?: string | false }).alpnProtocol === 'h2';
}
