/**
 * Helpers for the operations tests: a strict Prometheus text-format parser, admin API requests,
 * HTTP/2 and HTTP/1.1 clients over TLS that trust nothing but accept the test's local CA.
 */
import { request as httpRequest } from 'node:http';
import { connect as http2Connect, type ClientHttp2Session, type IncomingHttpHeaders } from 'node:http2';
import { request as httpsRequest, Agent as HttpsAgent } from 'node:https';

/** One sample of the exposition. */
export interface Sample {
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly value: number;
}

/** A parsed exposition: families (name → type) and samples. */
export interface Exposition {
  readonly types: ReadonlyMap<string, string>;
  readonly samples: readonly Sample[];
  /** Sum of the values of samples named `name` whose labels include `labels`. */
  sum(name: string, labels?: Record<string, string>): number;
  /** Whether a sample named `name` exists. */
  has(name: string): boolean;
}

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);
const SUFFIXES: Record<string, string[]> = {
  counter: ['', '_total'], gauge: [''], untyped: [''], histogram: ['_bucket', '_sum', '_count'], summary: ['', '_sum', '_count'],
};

/**
 * Parse Prometheus text format 0.0.4 strictly: every line is a comment, HELP, TYPE or a sample;
 * each sample belongs to a family declared by TYPE before it; label values are quoted with the
 * three escapes the format allows; values are floats, NaN or ±Inf.
 * @throws Error naming the line that does not parse.
 */
export function parsePrometheus(text: string): Exposition {
  if (!text.endsWith('\n')) throw new Error('the exposition must end with a newline');
  const types = new Map<string, string>();
  const samples: Sample[] = [];
  const lines = text.split('\n');
  lines.pop();
  lines.forEach((line, index) => {
    const where = `line ${index + 1}: ${line}`;
    if (line === '') return;
    if (line.startsWith('#')) {
      const match = /^# (HELP|TYPE) (\S+) ?(.*)$/.exec(line);
      if (!match) return; // plain comment
      const [, kind, name, rest] = match as unknown as [string, string, string, string];
      if (!NAME.test(name)) throw new Error(`bad metric name: ${where}`);
      if (kind === 'TYPE') {
        if (!TYPES.has(rest)) throw new Error(`bad type: ${where}`);
        if (types.has(name)) throw new Error(`TYPE given twice: ${where}`);
        types.set(name, rest);
      }
      return;
    }
    const sample = parseSample(line, where);
    const family = familyOf(sample.name, types);
    if (family === undefined) throw new Error(`sample without a TYPE: ${where}`);
    samples.push(sample);
  });
  return {
    types, samples,
    sum(name, labels = {}) {
      let total = 0;
      for (const s of samples) {
        if (s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)) total += s.value;
      }
      return total;
    },
    has(name) {
      return samples.some((s) => s.name === name);
    },
  };
}

function familyOf(name: string, types: ReadonlyMap<string, string>): string | undefined {
  for (const [family, type] of types) {
    for (const suffix of SUFFIXES[type]!) if (name === family + suffix) return family;
  }
  return undefined;
}

function parseSample(line: string, where: string): Sample {
  let i = 0;
  while (i < line.length && line[i] !== '{' && line[i] !== ' ') i++;
  const name = line.slice(0, i);
  if (!NAME.test(name)) throw new Error(`bad sample name: ${where}`);
  const labels: Record<string, string> = {};
  if (line[i] === '{') {
    i++;
    while (line[i] !== '}') {
      const eq = line.indexOf('=', i);
      if (eq < 0) throw new Error(`bad label: ${where}`);
      const label = line.slice(i, eq);
      if (!LABEL_NAME.test(label)) throw new Error(`bad label name "${label}": ${where}`);
      if (line[eq + 1] !== '"') throw new Error(`unquoted label value: ${where}`);
      let value = '';
      let j = eq + 2;
      for (; j < line.length && line[j] !== '"'; j++) {
        if (line[j] === '\\') {
          const next = line[++j];
          if (next === 'n') value += '\n';
          else if (next === '\\' || next === '"') value += next;
          else throw new Error(`bad escape: ${where}`);
        } else value += line[j];
      }
      if (j >= line.length) throw new Error(`unterminated label value: ${where}`);
      if (label in labels) throw new Error(`label given twice: ${where}`);
      labels[label] = value;
      i = j + 1;
      if (line[i] === ',') i++;
      else if (line[i] !== '}') throw new Error(`expected , or }: ${where}`);
    }
    i++;
  }
  if (line[i] !== ' ') throw new Error(`expected a space before the value: ${where}`);
  const parts = line.slice(i + 1).split(' ');
  if (parts.length > 2) throw new Error(`trailing text: ${where}`);
  const raw = parts[0]!;
  const value = raw === '+Inf' ? Infinity : raw === '-Inf' ? -Infinity : raw === 'NaN' ? NaN : Number(raw);
  if (raw === '' || (Number.isNaN(value) && raw !== 'NaN')) throw new Error(`bad value: ${where}`);
  if (parts[1] !== undefined && !/^-?\d+$/.test(parts[1])) throw new Error(`bad timestamp: ${where}`);
  return { name, labels, value };
}

/** A request to the admin listener. */
export function adminRequest(port: number, method: string, path: string, headers: Record<string, string> = {}): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: '127.0.0.1', port, method, path, headers, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => { body += chunk; });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** An HTTP/2 session to 127.0.0.1:port for `localhost`, not checking the certificate. */
export function h2Session(port: number): Promise<ClientHttp2Session> {
  return new Promise((resolve, reject) => {
    const session = http2Connect(`https://127.0.0.1:${port}`, { servername: 'localhost', rejectUnauthorized: false });
    session.once('connect', () => resolve(session));
    session.once('error', reject);
  });
}

/** One HTTP/2 request. */
export function h2Request(session: ClientHttp2Session, path: string, headers: Record<string, string> = {}, body?: string): Promise<{ status: number; headers: IncomingHttpHeaders; body: string }> {
  return new Promise((resolve, reject) => {
    const stream = session.request({ ':path': path, ':authority': 'localhost', ...(body !== undefined ? { ':method': 'POST' } : {}), ...headers });
    let text = '';
    let responseHeaders: IncomingHttpHeaders = {};
    stream.setEncoding('utf8');
    stream.on('response', (h) => { responseHeaders = h; });
    stream.on('data', (chunk: string) => { text += chunk; });
    stream.on('end', () => resolve({ status: Number(responseHeaders[':status']), headers: responseHeaders, body: text }));
    stream.on('error', reject);
    stream.end(body);
  });
}

/** A keep-alive HTTPS agent for HTTP/1.1 requests to `localhost` (certificate not checked). */
export function h1Agent(): HttpsAgent {
  return new HttpsAgent({ keepAlive: true, rejectUnauthorized: false, servername: 'localhost', ALPNProtocols: ['http/1.1'] } as ConstructorParameters<typeof HttpsAgent>[0]);
}

/** One HTTP/1.1 request over TLS. */
export function h1Request(port: number, agent: HttpsAgent, path: string, headers: Record<string, string> = {}, body?: string): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpsRequest({
      host: '127.0.0.1', port, path, agent, method: body === undefined ? 'GET' : 'POST',
      headers: { host: 'localhost', ...headers }, servername: 'localhost', rejectUnauthorized: false,
    }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => { text += chunk; });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** Wait until `check()` is true, polling; throws after `timeoutMs`. */
export async function waitFor(check: () => boolean | Promise<boolean>, timeoutMs = 5_000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
