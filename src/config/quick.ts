/**
 * Quick mode: `gatehouse --from HOST[:PORT] --to URL [--to URL ...] [--internal-certs]`, one site
 * without a config file, as `caddy reverse-proxy --from --to` does.
 *
 * - `--from example.com` → HTTPS on 443 with ACME (terms of service agreed, as Caddy does) and the
 *   HTTP→HTTPS redirect on 80.
 * - `--from localhost:8443` → HTTPS on 8443 with the local CA; no plain listener (port 80 usually
 *   needs root, and a redirect from it is not what a developer asked for).
 * - `--from http://HOST:PORT` → plain HTTP only.
 * - `--internal-certs` → the local CA even for a public name.
 */
import { configSchema, type GatehouseConfig } from './schema.js';
import { ConfigError, formatPath, resolveConfig, type ConfigIssue } from './load.js';

/** Options of {@link quickConfig}. */
export interface QuickOptions {
  /** `HOST`, `HOST:PORT`, `https://HOST[:PORT]` or `http://HOST[:PORT]`. Default `localhost`. */
  readonly from: string | undefined;
  /** Upstream URLs; at least one. */
  readonly to: readonly string[];
  /** Use the local CA whatever the name. */
  readonly internalCerts: boolean;
}

/**
 * Build the config of quick mode.
 * @throws {ConfigError} when `--to` is missing or a value is malformed.
 */
export function quickConfig(options: QuickOptions): GatehouseConfig {
  const source = '<quick mode>';
  if (options.to.length === 0) {
    throw new ConfigError(source, [{ path: '--to', message: 'at least one --to URL is needed', line: undefined }]);
  }
  let from = options.from ?? 'localhost';
  let scheme: 'http' | 'https' = 'https';
  const schemeMatch = /^(https?):\/\//i.exec(from);
  if (schemeMatch) {
    scheme = schemeMatch[1]!.toLowerCase() as 'http' | 'https';
    from = from.slice(schemeMatch[0].length).replace(/\/.*$/, '');
  }
  const portMatch = /^(.*?)(?::(\d+))?$/.exec(from)!;
  const host = portMatch[1]!.replace(/^\[|\]$/g, '') || 'localhost';
  const port = portMatch[2] === undefined ? undefined : Number(portMatch[2]);
  const raw = {
    listen: scheme === 'http'
      ? { http: port ?? 80, https: null }
      : { http: port === undefined ? 80 : null, https: port ?? 443 },
    tls: { acme: { agree_tos: true } },
    sites: [{
      hosts: [host],
      ...(scheme === 'http' ? { tls: 'off' } : options.internalCerts ? { tls: 'internal' } : {}),
      routes: [{ upstreams: options.to.map((url) => (/^[a-z]+:\/\//i.test(url) ? url : `http://${url}`)) }],
    }],
  };
  const result = configSchema.safeParse(raw);
  if (!result.success) {
    throw new ConfigError(source, result.error.issues.map((issue) => ({
      path: quickPath(issue.path), message: issue.message, line: undefined,
    })));
  }
  const issues: ConfigIssue[] = [];
  const config = resolveConfig(result.data, { source, baseDir: process.cwd() }, (path, message) => {
    issues.push({ path: quickPath(path), message, line: undefined });
  });
  if (issues.length > 0) throw new ConfigError(source, issues);
  return config;
}

function quickPath(path: readonly PropertyKey[]): string {
  const text = formatPath(path);
  if (text.includes('upstreams')) return '--to';
  if (text.includes('hosts') || text.startsWith('listen')) return '--from';
  return text;
}
