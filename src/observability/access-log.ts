/**
 * Where the access log (`http.log.access`) and debug captures (`http.log.capture`) go, with the
 * credentials in them redacted (pino `redact`, `log.redact`: Authorization, Cookie, Set-Cookie and
 * Proxy-Authorization by default).
 *
 * The access log goes to the main log (stdout) by default, or to `log.access_file`, appended to
 * and reopened by {@link AccessLog.reopen} — on SIGUSR1, after logrotate moved the file away:
 *
 * ```
 * /var/log/gatehouse/access.log {
 *   daily
 *   rotate 14
 *   compress
 *   delaycompress
 *   postrotate
 *     systemctl kill --signal=SIGUSR1 gatehouse
 *   endscript
 * }
 * ```
 */
import pino, { type Logger } from 'pino';
import type { GatehouseConfig } from '../config/schema.js';

type LogConfig = GatehouseConfig['log'];

/** A SonicBoom file destination, as far as it is used here. */
type FileDestination = pino.DestinationStream & { reopen?: (file?: string) => void; flushSync?: () => void; end?: () => void };

/** The text that replaces a redacted value. */
export const REDACTED = '[REDACTED]';

/** The access and capture loggers of one `log` config. */
export class AccessLog {
  /** One line per exchange. */
  readonly access: Logger;
  /** One line per captured exchange (routes with `capture`). */
  readonly capture: Logger;
  readonly #file: FileDestination | undefined;
  readonly #key: string;

  private constructor(access: Logger, capture: Logger, file: FileDestination | undefined, key: string) {
    this.access = access;
    this.capture = capture;
    this.#file = file;
    this.#key = key;
  }

  /**
   * @param config the `log` section.
   * @param root the main logger (captures always go there; the access log too without `access_file`).
   */
  static create(config: LogConfig, root: Logger): AccessLog {
    const redact = { paths: redactPaths(config.redact), censor: REDACTED };
    const capture = root.child({ logger: 'http.log.capture' }, { redact });
    if (config.access_file === undefined) {
      return new AccessLog(root.child({ logger: 'http.log.access' }, { redact }), capture, undefined, keyOf(config));
    }
    // Asynchronous writes (SonicBoom) so a slow disk does not stall the event loop; mkdir for a fresh /var/log folder.
    const file = pino.destination({ dest: config.access_file, sync: false, mkdir: true, append: true });
    const access = pino({
      level: 'info',
      base: { pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
      redact,
    }, file).child({ logger: 'http.log.access' });
    return new AccessLog(access, capture, file as FileDestination, keyOf(config));
  }

  /** Whether `config` gives the same destination and redaction as this one. */
  sameAs(config: LogConfig): boolean {
    return this.#key === keyOf(config);
  }

  /** The access log file, if any (reopened by {@link reopen}). */
  get file(): string | undefined {
    return this.#file === undefined ? undefined : JSON.parse(this.#key).file as string;
  }

  /** Reopen the access log file (after logrotate moved it). No-op when logging to stdout. */
  reopen(): void {
    this.#file?.reopen?.();
  }

  /** Write out what is buffered and close the file (not stdout). */
  close(): void {
    const file = this.#file;
    if (file === undefined) return;
    try {
      file.flushSync?.();
    } catch {
      // not yet open: nothing buffered
    }
    file.end?.();
  }
}

function keyOf(config: LogConfig): string {
  return JSON.stringify({ file: config.access_file, redact: config.redact });
}

/** pino redact paths of the header names, in access lines (`headers`) and captures (`request.headers`, `response.headers`). */
function redactPaths(names: readonly string[]): string[] {
  const paths: string[] = [];
  for (const name of names) {
    const key = `["${name}"]`;
    paths.push(`headers${key}`, `request.headers${key}`, `response.headers${key}`);
  }
  return paths;
}
