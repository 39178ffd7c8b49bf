/**
 * Logging with pino: JSON lines on stdout (or pretty for a terminal), named sub-loggers as Caddy
 * names them (`tls.obtain`, `http.log.access`, `upstream.health`).
 */
import pino, { type Logger } from 'pino';

export type { Logger } from 'pino';

/** Options of {@link createLogger}; they mirror the `log` config section. */
export interface LogOptions {
  /** pino level. Default `info`. */
  readonly level?: pino.LevelWithSilent;
  /** `json` (default) or `pretty` (pino-pretty on stdout; slower, for people). */
  readonly format?: 'json' | 'pretty';
  /** Where JSON lines go: a file descriptor. Default 1 (stdout). */
  readonly destination?: number;
}

/**
 * The root logger. JSON output goes through an asynchronous SonicBoom destination so that a slow
 * terminal or pipe does not block the event loop; {@link flushLogger} empties it before exit.
 */
export function createLogger(options: LogOptions = {}): Logger {
  const level = options.level ?? 'info';
  if (options.format === 'pretty') {
    return pino({ level, transport: { target: 'pino-pretty', options: { destination: options.destination ?? 1 } } });
  }
  const destination = pino.destination({ dest: options.destination ?? 1, sync: false });
  return pino({
    level,
    base: { pid: process.pid },
    timestamp: pino.stdTimeFunctions.isoTime,
    formatters: { level: (label) => ({ level: label }) },
  }, destination);
}

/** Write out buffered log lines (call before process exit). Never throws. */
export function flushLogger(logger: Logger): void {
  try {
    logger.flush();
  } catch {
    // a closed stdout must not turn an orderly exit into a crash
  }
}
