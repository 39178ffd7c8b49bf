/**
 * Loading the config: YAML text → validated, resolved, frozen {@link GatehouseConfig}.
 *
 * Every error names the option path and the file:line it comes from, e.g.
 * `GH_CONFIG_INVALID: sites[1].routes[0].upstreams[0]: expected a URL such as "http://127.0.0.1:8080",
 * got "localhost:80" (config/gatehouse.yaml:14)`.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { CST, isMap, isSeq, Lexer, LineCounter, parseDocument, Parser, type Node as YamlNode } from 'yaml';
import type { z } from 'zod';
import { FileStorage } from '../tls/storage.js';
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

/** Options of {@link loadConfigFile}. */
export interface LoadConfigOptions {
  /**
   * Use and keep the cache of parsed config files ({@link CONFIG_CACHE_FOLDER} in the config's
   * `tls.storage`). Default false (`gatehouse validate` and reloads parse the file every time);
   * `gatehouse run` turns it on.
   */
  readonly cache?: boolean;
  /** Receives what the cache did (for tests and logs). Called once per load when `cache` is on. */
  readonly onCacheResult?: (result: ConfigCacheResult) => void;
}

/** What the parsed-config cache did during one {@link loadConfigFile}. */
export interface ConfigCacheResult {
  /** The config was built from the cache: no YAML parse. */
  readonly hit: boolean;
  /** The cache file was (re)written after a real parse. */
  readonly written: boolean;
}

/**
 * Read and validate a config file.
 *
 * With `options.cache`, a file whose exact bytes were parsed before is not parsed again: the plain
 * JavaScript value the `yaml` package produced for them (`doc.toJS()`) is read back from the cache
 * (see {@link CONFIG_CACHE_FOLDER}) and goes through the same validation (zod schema and the rules
 * of {@link resolveConfig}) as a freshly parsed file. Any change to the file (one byte), another
 * `yaml` package version, an unreadable or malformed cache file, or a cached value that no longer
 * validates means a real parse, so every error still carries the file:line of the real YAML.
 * @param file path of a YAML file; relative paths inside it resolve against its folder.
 * @throws {ConfigError} (code `GH_CONFIG_INVALID`) with file:line for each problem, including an
 *   unreadable file. Cache problems are never errors: the file is parsed instead.
 */
export async function loadConfigFile(file: string, options: LoadConfigOptions = {}): Promise<GatehouseConfig> {
  const { bytes, text, where } = await readConfigFile(file);
  if (!options.cache) return parseConfig(text, where);
  const cache = configCacheOf(file, text, bytes, where.baseDir);
  const cached = cache === undefined ? undefined : await readConfigCache(cache, where);
  if (cached !== undefined) {
    options.onCacheResult?.({ hit: true, written: false });
    return cached;
  }
  const raw: { value?: unknown } = {};
  const config = parseConfig(text, where, raw);
  // Written only where the next start looks: the storage folder the hint names is the real one.
  const written = cache !== undefined && config.tls.storage === cache.storage.root && await writeConfigCache(cache, raw.value);
  options.onCacheResult?.({ hit: false, written });
  return config;
}

/**
 * The bytes of a config file, as text, and where its errors and relative paths point.
 * @throws {ConfigError} naming the file when it cannot be read.
 */
async function readConfigFile(file: string): Promise<{ bytes: Buffer; text: string; where: { source: string; baseDir: string } }> {
  let bytes: Buffer;
  try {
    bytes = await readFile(file);
  } catch (error) {
    throw new ConfigError(file, [{ path: '', message: `cannot read the config file: ${(error as Error).message}`, line: undefined }]);
  }
  return { bytes, text: bytes.toString('utf8'), where: { source: file, baseDir: dirname(resolve(file)) } };
}

/**
 * {@link loadConfigFile} for a server that is serving (reloads): the YAML parse and the schema run
 * in a worker thread, so the event loop keeps answering while a large file is parsed. For 10 000
 * sites the parse and validation take ~0.8–1.2 s, and a reload used to hold every request that long;
 * what stays on this thread is reading the file, taking the validated value back (~30 ms) and
 * {@link resolveConfig} (~30 ms), each in its own turn of the event loop.
 *
 * Same result and same errors as `loadConfigFile(file)` (no cache): the worker runs the same
 * {@link parseConfig}. When no worker thread can run (or it fails for another reason than the
 * config), the file is parsed here instead.
 * @param file path of a YAML file; relative paths inside it resolve against its folder.
 * @param options.onParsed told where the file was parsed: `worker`, or `here` when it had to be.
 * @throws {ConfigError} (code `GH_CONFIG_INVALID`) with file:line for each problem, including an
 *   unreadable file.
 */
export async function loadConfigFileOffThread(file: string, options: { onParsed?: (where: 'worker' | 'here') => void } = {}): Promise<GatehouseConfig> {
  const { text, where } = await readConfigFile(file);
  const here = () => {
    options.onParsed?.('here');
    return parseConfig(text, where);
  };
  let answer: ParseAnswer;
  try {
    answer = await parseInWorker({ text, ...where });
  } catch {
    return here();
  }
  if ('failure' in answer) return here();
  options.onParsed?.('worker');
  if ('issues' in answer) throw new ConfigError(file, answer.issues);
  await nextTurn(); // taking the value back was one turn
  let unexpected = false;
  const config = resolveConfig(answer.parsed as ParsedConfig, where, () => { unexpected = true; });
  // The worker ran the same rules: a problem here would be a bug; the parse here gives its lines.
  return unexpected ? here() : config;
}

/** What {@link loadConfigFileOffThread} hands its worker thread (`config/parse-worker.ts`). */
export interface ParseJob {
  readonly text: string;
  readonly source: string;
  readonly baseDir: string;
}

/** The worker's answer: the schema's output, the config's problems, or another failure. */
export type ParseAnswer = { readonly parsed: unknown } | { readonly issues: readonly ConfigIssue[] } | { readonly failure: string };

/**
 * The worker script next to this module. When the sources run under tsx (tests), a small entry
 * registers tsx's loader in the thread first and then imports `parse-worker.ts`: on Node 20 a
 * worker's own `--import tsx` comes too late for its entry module.
 */
function parseWorkerEntry(): URL {
  if (!import.meta.url.endsWith('.ts')) return new URL('./parse-worker.js', import.meta.url);
  const target = new URL('./parse-worker.ts', import.meta.url).href;
  const code = `import { register } from ${JSON.stringify(import.meta.resolve('tsx/esm/api'))}; register(); await import(${JSON.stringify(target)});`;
  return new URL(`data:text/javascript,${encodeURIComponent(code)}`);
}

function parseInWorker(job: ParseJob): Promise<ParseAnswer> {
  return new Promise((resolveAnswer, reject) => {
    const worker = new Worker(parseWorkerEntry(), { workerData: job });
    let answered = false;
    worker.once('message', (answer: ParseAnswer) => {
      answered = true;
      resolveAnswer(answer);
      void worker.terminate();
    });
    worker.once('error', reject);
    worker.once('exit', (code) => {
      if (!answered) reject(new Error(`the config parser thread exited with code ${code}`));
    });
  });
}

/**
 * Folder of the parsed-config cache inside `tls.storage`: one file per config file path
 * (`config-cache/<SHA-256 of the absolute path>.json`), holding the SHA-256 of the exact bytes
 * last parsed, the version of the `yaml` package that parsed them, and `doc.toJS()` of that parse
 * as JSON. Why: the `yaml` package builds a full syntax tree with source ranges (for the file:line
 * of errors); for 10 000 sites that is ~1.5 s and most of a restart, where reading the cached
 * value back is ~10 ms.
 *
 * Finding `tls.storage` before the file is parsed: the `yaml` package's own streaming parser
 * (`Lexer` + `Parser`) reads the beginning of the file (at most {@link STORAGE_HINT_BUDGET}
 * characters) until the top-level `tls` mapping is complete, and `CST.resolveAsScalar` gives the
 * value of its `storage` key; default `./certs`. That guess only decides where to look: a cache
 * file is used only when its SHA-256 matches the file's bytes and the config it holds resolves
 * `tls.storage` to that same folder, and it is written only when the real parse of these bytes
 * names that folder. So the cache sits with the private keys and `static/verified.json`, and
 * whoever can change it can change those already.
 */
export const CONFIG_CACHE_FOLDER = 'config-cache';

/** Version of the cache file's layout; bump it when what is stored changes. */
const CONFIG_CACHE_FORMAT = 1;

/** Characters of the config read by the streaming parser to find `tls.storage` (~30 ms at most). */
const STORAGE_HINT_BUDGET = 64 * 1024;

const YAML_VERSION: string = (() => {
  try {
    return (createRequire(import.meta.url)('yaml/package.json') as { version?: string }).version ?? 'unknown';
  } catch {
    return 'unknown';
  }
})();

interface ConfigCacheRef {
  readonly storage: FileStorage;
  readonly key: string;
  readonly file: string;
  readonly digest: string;
}

function configCacheOf(file: string, text: string, bytes: Buffer, baseDir: string): ConfigCacheRef | undefined {
  const storage = storageHint(text) ?? './certs';
  const path = resolve(file);
  return {
    storage: new FileStorage(resolve(baseDir, storage)),
    key: `${CONFIG_CACHE_FOLDER}/${createHash('sha256').update(path).digest('hex')}.json`,
    file: path,
    digest: createHash('sha256').update(bytes).digest('hex'),
  };
}

/**
 * The value of the top-level `tls.storage` as the `yaml` package's streaming parser sees it in the
 * first {@link STORAGE_HINT_BUDGET} characters, once the `tls` entry is complete (another top-level
 * key follows it). Undefined when it cannot tell; only ever a guess (see {@link CONFIG_CACHE_FOLDER}).
 */
export function storageHint(text: string): string | undefined {
  try {
    const parser = new Parser();
    let read = 0;
    for (const lexeme of new Lexer().lex(text)) {
      read += lexeme.length;
      if (read > STORAGE_HINT_BUDGET) return undefined;
      for (const token of parser.next(lexeme)) if (token.type === 'document') return tlsStorageOf([token, token.value], true) ?? undefined;
      if (lexeme.endsWith('\n')) {
        const found = tlsStorageOf(parser.stack, false);
        if (found !== null) return found;
      }
    }
    for (const token of parser.end()) if (token.type === 'document') return tlsStorageOf([token, token.value], true) ?? undefined;
  } catch {
    // a guess only
  }
  return undefined;
}

/**
 * `tls.storage` in the parser's stack of open CST nodes (`[document, top-level map, ...]`):
 * a string or undefined once that is known, null while it may still change (the `tls` or
 * `storage` entry is the last one seen so far and could still grow).
 */
function tlsStorageOf(stack: readonly (CST.Token | undefined)[], complete: boolean): string | undefined | null {
  const unknown = complete ? undefined : null;
  const top = stack[1];
  if (top === undefined || top.type !== 'block-map') return unknown;
  const index = top.items.findIndex((item) => CST.resolveAsScalar(item.key)?.value === 'tls');
  if (index < 0) return unknown;
  const tlsComplete = complete || index < top.items.length - 1;
  const tls = top.items[index]!.value ?? (tlsComplete ? undefined : stack[2]);
  if (tls === undefined || (tls.type !== 'block-map' && tls.type !== 'flow-collection')) return tlsComplete ? undefined : null;
  const at = tls.items.findIndex((item) => CST.resolveAsScalar(item.key)?.value === 'storage');
  if (at < 0 || (!tlsComplete && at === tls.items.length - 1)) return tlsComplete ? undefined : null;
  const scalar = CST.resolveAsScalar(tls.items[at]!.value);
  return scalar && scalar.value !== '' ? scalar.value : undefined;
}

/** The shape of a cache file (see {@link CONFIG_CACHE_FOLDER}). */
interface ConfigCacheFile {
  readonly format: number;
  readonly yaml: string;
  readonly file: string;
  readonly sha256: string;
  readonly config: unknown;
}

async function readConfigCache(cache: ConfigCacheRef, where: { source: string; baseDir: string }): Promise<GatehouseConfig | undefined> {
  try {
    const bytes = await cache.storage.load(cache.key);
    if (bytes === undefined) return undefined;
    const entry = JSON.parse(bytes.toString('utf8')) as Partial<ConfigCacheFile> | null;
    if (entry === null || typeof entry !== 'object' || entry.format !== CONFIG_CACHE_FORMAT || entry.yaml !== YAML_VERSION
      || entry.file !== cache.file || entry.sha256 !== cache.digest || entry.config === null || typeof entry.config !== 'object') return undefined;
    const result = configSchema.safeParse(entry.config);
    if (!result.success) return undefined; // parsed again, for the errors' lines
    let failed = false;
    const config = resolveConfig(result.data, where, () => { failed = true; });
    return failed || config.tls.storage !== cache.storage.root ? undefined : config;
  } catch {
    return undefined;
  }
}

async function writeConfigCache(cache: ConfigCacheRef, value: unknown): Promise<boolean> {
  const json = jsonExactly(value);
  if (json === undefined) return false;
  const entry: ConfigCacheFile = { format: CONFIG_CACHE_FORMAT, yaml: YAML_VERSION, file: cache.file, sha256: cache.digest, config: undefined };
  try {
    // The config text is spliced in as it is: no second stringify of 10 000 sites.
    await cache.storage.store(cache.key, JSON.stringify(entry).replace(/}$/, `,"config":${json}}`), { secret: true });
    return true;
  } catch {
    return false; // a cache only: the next start parses the file
  }
}

/**
 * JSON text of `value` when JSON gives back exactly the same plain value (finite numbers other than
 * -0, strings, booleans, null, plain arrays and objects, no `__proto__` key); else undefined.
 */
function jsonExactly(value: unknown): string | undefined {
  let exact = true;
  const json = JSON.stringify(value, function (this: unknown, key: string, item: unknown) {
    const original = (this as Record<string, unknown>)[key]; // before toJSON (a Date would pass as a string)
    if (original !== item) exact = false;
    else if (key === '__proto__') exact = false;
    else if (typeof item === 'number') exact &&= Number.isFinite(item) && !Object.is(item, -0);
    else if (item === undefined || typeof item === 'bigint' || typeof item === 'function' || typeof item === 'symbol') exact = false;
    else if (typeof item === 'object' && item !== null && !Array.isArray(item) && Object.getPrototypeOf(item) !== Object.prototype) exact = false;
    return item;
  });
  return exact && typeof json === 'string' ? json : undefined;
}

/**
 * Validate config text.
 * @param text YAML (JSON is YAML too).
 * @param options.source name used in errors (a path); options.baseDir resolves relative paths.
 * @param raw when given, receives `doc.toJS()` of the parse (`value`, what the config cache
 *   stores) and the schema's output before {@link resolveConfig} (`parsed`, what the reload's
 *   worker thread hands back).
 * @throws {ConfigError} with every problem found, each with its option path and line.
 */
export function parseConfig(text: string, options: { source: string; baseDir: string }, raw?: { value?: unknown; parsed?: unknown }): GatehouseConfig {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false, uniqueKeys: true });
  const lineOf = (offset: number | undefined) => (offset === undefined ? undefined : lineCounter.linePos(offset).line);
  if (doc.errors.length > 0) {
    throw new ConfigError(options.source, doc.errors.map((error) => ({
      path: '', message: `YAML: ${error.message.split('\n')[0]}`, line: lineOf(error.pos[0]),
    })));
  }
  const value: unknown = doc.toJS() ?? {};
  if (raw !== undefined) raw.value = value;
  const result = configSchema.safeParse(value);
  if (!result.success) {
    throw new ConfigError(options.source, result.error.issues.map((zodIssue) => {
      const issue = unwrapUnion(zodIssue);
      const path = [...zodIssue.path, ...(issue === zodIssue ? [] : issue.path)];
      const keyPath = issue.code === 'unrecognized_keys' ? [...path, issue.keys[0]!] : path;
      return { path: formatPath(path), message: describeIssue(issue), line: lineOf(nodeAt(doc.contents, keyPath)?.range?.[0]) };
    }));
  }
  if (raw !== undefined) raw.parsed = result.data;
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
