/**
 * Loading the config: YAML text → validated, resolved, frozen {@link GatehouseConfig}.
 *
 * Every error names the option path and the file:line it comes from, e.g.
 * `GH_CONFIG_INVALID: sites[1].routes[0].upstreams[0]: expected a URL such as "http://127.0.0.1:8080",
 * got "localhost:80" (config/gatehouse.yaml:14)`.
 */
import { readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { isMap, isSeq, LineCounter, parseDocument, type Node as YamlNode } from 'yaml';
import type { z } from 'zod';
import {
  configSchema, isLocalName, type GatehouseConfig, type ParsedConfig, type SiteConfig,
} from './schema.js';

/** One problem in a config file. */
export interface ConfigIssue {
  /** Option path, e.g. `sites[0].routes[1].path`. */
  readonly path: string;
  readonly message: string;
  /** 1-based line in the source, when known. */
  readonly line: number | undefined;
}

/** A config that cannot be used. `code` is always `GH_CONFIG_INVALID`. */
export class ConfigError extends Error {
  readonly code = 'GH_CONFIG_INVALID';
  constructor(readonly source: string, readonly issues: readonly ConfigIssue[]) {
    super(issues.map((issue) => `GH_CONFIG_INVALID: ${formatIssue(source, issue)}`).join('\n'));
    this.name = 'ConfigError';
  }
}

function formatIssue(source: string, issue: ConfigIssue): string {
  const where = issue.line ? `${source}:${issue.line}` : source;
  return `${issue.path ? `${issue.path}: ` : ''}${issue.message} (${where})`;
}

/** The config used when no file is given and `config/gatehouse.yaml` does not exist. */
export const EMBEDDED_DEFAULT_PATH = fileURLToPath(new URL('../../config/default.yaml', import.meta.url));

/**
 * Read and validate a config file.
 * @param file path of a YAML file; relative paths inside it resolve against its folder.
 * @throws {ConfigError} (code `GH_CONFIG_INVALID`) with file:line for each problem, including an
 *   unreadable file.
 */
export async function loadConfigFile(file: string): Promise<GatehouseConfig> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (error) {
    throw new ConfigError(file, [{ path: '', message: `cannot read the config file: ${(error as Error).message}`, line: undefined }]);
  }
  return parseConfig(text, { source: file, baseDir: dirname(resolve(file)) });
}

/**
 * Validate config text.
 * @param text YAML (JSON is YAML too).
 * @param options.source name used in errors (a path); options.baseDir resolves relative paths.
 * @throws {ConfigError} with every problem found, each with its option path and line.
 */
export function parseConfig(text: string, options: { source: string; baseDir: string }): GatehouseConfig {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false, uniqueKeys: true });
  const lineOf = (offset: number | undefined) => (offset === undefined ? undefined : lineCounter.linePos(offset).line);
  if (doc.errors.length > 0) {
    throw new ConfigError(options.source, doc.errors.map((error) => ({
      path: '', message: `YAML: ${error.message.split('\n')[0]}`, line: lineOf(error.pos[0]),
    })));
  }
  const raw: unknown = doc.toJS() ?? {};
  const result = configSchema.safeParse(raw);
  if (!result.success) {
    throw new ConfigError(options.source, result.error.issues.map((zodIssue) => {
      const issue = unwrapUnion(zodIssue);
      const path = [...zodIssue.path, ...(issue === zodIssue ? [] : issue.path)];
      const keyPath = issue.code === 'unrecognized_keys' ? [...path, issue.keys[0]!] : path;
      return { path: formatPath(path), message: describeIssue(issue), line: lineOf(nodeAt(doc.contents, keyPath)?.range?.[0]) };
    }));
  }
  const issues: ConfigIssue[] = [];
  const config = resolveConfig(result.data, options, (path, message) => {
    issues.push({ path: formatPath(path), message, line: lineOf(nodeAt(doc.contents, path)?.range?.[0]) });
  });
  if (issues.length > 0) throw new ConfigError(options.source, issues);
  return config;
}

/**
 * Fill in the defaults that depend on other options, make paths absolute, check the rules that
 * span several options, and freeze. Exported for quick mode, which builds a ParsedConfig itself.
 */
export function resolveConfig(
  parsed: ParsedConfig,
  options: { source: string; baseDir: string },
  report: (path: PropertyKey[], message: string) => void,
): GatehouseConfig {
  const abs = (p: string) => resolve(options.baseDir, p);
  const seenHosts = new Map<string, number>();
  const sites: SiteConfig[] = parsed.sites.map((site, index) => {
    for (const host of site.hosts) {
      const previous = seenHosts.get(host);
      if (previous !== undefined) report(['sites', index, 'hosts'], `host "${host}" is already served by sites[${previous}]`);
      seenHosts.set(host, index);
    }
    const tls = site.tls ?? (site.hosts.every(isLocalName) ? 'internal' : 'acme');
    if (tls === 'static' && parsed.tls.certificates.length === 0) {
      report(['sites', index, 'tls'], 'tls: static needs at least one entry in tls.certificates');
    }
    if (tls === 'acme' && !parsed.tls.acme.agree_tos) {
      report(['tls', 'acme', 'agree_tos'], `sites[${index}] uses ACME: set tls.acme.agree_tos: true to agree to the CA's terms of service`);
    }
    return { ...site, tls, redirect: site.redirect ?? tls !== 'off' };
  });
  const onDemand = parsed.tls.on_demand;
  if (onDemand && !parsed.tls.acme.agree_tos && !sites.some((site) => site.tls === 'acme')) {
    report(['tls', 'acme', 'agree_tos'], "on-demand TLS uses ACME: set tls.acme.agree_tos: true to agree to the CA's terms of service");
  }
  if (onDemand && !onDemand.ask && !(onDemand.allow && onDemand.allow.length > 0)) {
    report(['tls', 'on_demand'], 'on-demand TLS needs "ask" (a URL that approves each name) or an "allow" list: an open on-demand endpoint lets anyone spend the rate limits');
  }
  const config: GatehouseConfig = {
    ...parsed,
    source: options.source,
    tls: {
      ...parsed.tls,
      storage: abs(parsed.tls.storage),
      acme: { ...parsed.tls.acme, ca_bundle: parsed.tls.acme.ca_bundle ? abs(parsed.tls.acme.ca_bundle) : undefined },
      certificates: parsed.tls.certificates.map((c) => ({ cert: abs(c.cert), key: abs(c.key) })),
    },
    log: { ...parsed.log, access_file: parsed.log.access_file === undefined ? undefined : abs(parsed.log.access_file) },
    sites,
  };
  return deepFreeze(config);
}

/** For a value that matched no branch of a union, the issue of the branch that came closest:
 * one that failed on a rule rather than on the type. */
function unwrapUnion(issue: z.core.$ZodIssue): z.core.$ZodIssue {
  if (issue.code !== 'invalid_union' || issue.errors.length === 0) return issue;
  const branch = issue.errors.find((errors) => errors.some((e) => e.code !== 'invalid_type')) ?? issue.errors[0]!;
  const inner = branch.find((e) => e.code !== 'invalid_type') ?? branch[0];
  return inner ? unwrapUnion(inner) : issue;
}

function describeIssue(issue: z.core.$ZodIssue): string {
  if (issue.code === 'unrecognized_keys') return `unknown option${issue.keys.length > 1 ? 's' : ''} ${issue.keys.map((k) => `"${k}"`).join(', ')}`;
  if (issue.code === 'invalid_type' && issue.input === undefined) return `is required (${issue.expected})`;
  return issue.message;
}

/** `['sites', 0, 'routes', 1, 'path']` → `sites[0].routes[1].path` */
export function formatPath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const key of path) {
    if (typeof key === 'number') out += `[${key}]`;
    else out += out ? `.${String(key)}` : String(key);
  }
  return out;
}

/** The deepest YAML node along `path` (the parent when the key itself is missing). */
function nodeAt(root: unknown, path: readonly PropertyKey[]): YamlNode | undefined {
  let node = root as YamlNode | undefined;
  for (const key of path) {
    let next: unknown;
    if (isMap(node)) {
      const pair = node.items.find((item) => (item.key as { value?: unknown } | null)?.value === key);
      next = pair ? (pair.value ?? pair.key) : undefined;
    } else if (isSeq(node) && typeof key === 'number') {
      next = node.items[key];
    }
    if (!next || typeof next !== 'object') break;
    node = next as YamlNode;
  }
  return node;
}

function deepFreeze<T>(value: T): T {
  if (value && typeof value === 'object' && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const child of Object.values(value)) deepFreeze(child);
  }
  return value;
}
