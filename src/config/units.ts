/**
 * Units used in the config file: durations (`250ms`, `10s`, `5m`, `1y`) and sizes (`64KiB`, `10MB`).
 *
 * Durations are parsed by the `ms` package (vercel/ms), which understands ms, s, m, h, d, w, y.
 * Sizes follow IEC (KiB = 1024) and SI (KB = 1000) prefixes; a bare number is bytes.
 */
import ms from 'ms';

/**
 * Parse a duration string into milliseconds.
 * @param value a string with a unit (`"250ms"`, `"10s"`, `"5m"`), or the number 0.
 * @returns the duration in milliseconds (integer, >= 0).
 * @throws {RangeError} when the string has no recognisable unit or is negative.
 */
export function parseDuration(value: string | number): number {
  if (typeof value === 'number') {
    // Only 0 needs no unit; any other bare number is ambiguous (ms? seconds?), as in Caddy.
    if (value === 0) return 0;
    throw new RangeError(`expected a duration with a unit such as "250ms", "10s" or "5m", got ${value}`);
  }
  const trimmed = value.trim();
  // A bare number in a string is ambiguous ("10" ms or s?): require a unit, as Caddy does.
  if (!/^\d+(\.\d+)?\s*[a-zA-Z]+$/.test(trimmed)) {
    throw new RangeError(`expected a duration with a unit such as "250ms", "10s" or "5m", got "${value}"`);
  }
  const result = ms(trimmed as ms.StringValue);
  if (typeof result !== 'number' || !Number.isFinite(result) || result < 0) {
    throw new RangeError(`expected a duration with a unit such as "250ms", "10s" or "5m", got "${value}"`);
  }
  return Math.round(result);
}

const SIZE_UNITS: Readonly<Record<string, number>> = {
  b: 1,
  k: 1000, kb: 1000, kib: 1024,
  m: 1000 ** 2, mb: 1000 ** 2, mib: 1024 ** 2,
  g: 1000 ** 3, gb: 1000 ** 3, gib: 1024 ** 3,
};

/**
 * Parse a size into bytes.
 * @param value `"64KiB"` (IEC, 1024-based), `"10MB"` (SI, 1000-based), `"512"` or a number of bytes.
 * @returns the size in bytes (integer, >= 0).
 * @throws {RangeError} for an unknown unit or a negative value.
 */
export function parseSize(value: string | number): number {
  if (typeof value === 'number') {
    if (!Number.isFinite(value) || value < 0) throw new RangeError(`expected a size >= 0, got ${value}`);
    return Math.floor(value);
  }
  const match = /^(\d+(?:\.\d+)?)\s*([a-zA-Z]*)$/.exec(value.trim());
  const unit = match ? SIZE_UNITS[(match[2] || 'b').toLowerCase()] : undefined;
  if (!match || unit === undefined) {
    throw new RangeError(`expected a size such as "64KiB", "10MB" or a number of bytes, got "${value}"`);
  }
  return Math.floor(Number(match[1]) * unit);
}
