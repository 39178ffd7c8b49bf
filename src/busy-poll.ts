/**
 * Busy polling: after traffic, the event loop keeps polling its sockets without blocking for a
 * short window, so the core stays awake for the next packet instead of going idle between two.
 *
 * Why: on a virtual machine an idle vCPU halts, and waking it costs the sender an inter-processor
 * interrupt (a VM exit) and the receiver a reschedule, tens of microseconds each time. A proxy
 * with spare CPU sleeps between most packets, so every request, upstream answer and handshake
 * flight pays it, and the peers on the other cores (clients, upstreams) pay their part too.
 * HAProxy's `busy-polling` does the same, always; Go's scheduler spins a little before it parks.
 *
 * How: the hot paths call {@link busyPollKick} (a flag store). While the window since the last
 * kick has not passed, a `setImmediate` chain keeps libuv's poll phase at a zero timeout; when it
 * has, the chain stops and the loop blocks in `epoll_wait` as usual. An idle process spins for at
 * most one window after its last request: nothing between.
 *
 * The window is the config's `busy_polling` (ms; 0 = off, the default), set at start and on every
 * reload and turned off when the server stops. Off, a kick is one flag store and a comparison.
 * Measured (bench/README.md, 2026-12-03 18:41, "busy polling"): new TLS connections +6.6% on
 * average with 1 ms, the client on the other core spending a median 30 µs less per connection;
 * keep-alive scenarios unchanged; 256 KiB bodies 3.5% fewer with `bbr` congestion control.
 */

/** The window (ms); 0 = off. */
let windowMs = 0;
/** A kick came since the chain last looked. */
let kicked = false;
/** The setImmediate chain runs. */
let spinning = false;
/** When the chain last saw a kick (performance.now(), ms). */
let lastKick = 0;

/**
 * Turns busy polling on for `window` ms after each kick, or off (0). A running chain stops at its
 * next turn when turned off, so a process shutting down is not held by it.
 * @param window the window in ms (fractions allowed), >= 0.
 * @throws {RangeError} for a negative or non-finite window.
 */
export function setBusyPolling(window: number): void {
  if (!Number.isFinite(window) || window < 0) throw new RangeError(`busy polling window must be >= 0 ms, got ${window}`);
  windowMs = window;
}

/** The current window (ms); 0 when off. */
export function busyPollingWindow(): number {
  return windowMs;
}

/**
 * Marks traffic: the loop keeps polling for the window from now. Called on accepted connections,
 * requests, upstream reads and tunnel (WebSocket) data; costs a flag store and a comparison, and a
 * `setImmediate` when the chain was stopped.
 */
export function busyPollKick(): void {
  kicked = true;
  if (spinning || windowMs === 0) return;
  spinning = true;
  lastKick = performance.now();
  setImmediate(spin);
}

function spin(): void {
  const now = performance.now();
  if (kicked) {
    kicked = false;
    lastKick = now;
  }
  if (windowMs > 0 && now - lastKick < windowMs) setImmediate(spin);
  else spinning = false;
}
