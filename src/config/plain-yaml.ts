/**
 * A fast reader for the plain subset of YAML that config files are written in: block mappings and
 * sequences, one-line flow collections (`{ hosts: [a.test], routes: [...] }`), plain, single- and
 * double-quoted scalars without escapes, comments.
 *
 * Why: the `yaml` package builds a concrete syntax tree with source ranges for every token, which
 * costs ~0.13 ms per site line (10 000 sites: ~1.3 s of a 2 s start-up budget). This reader is
 * ~10× faster. It is a shortcut, never a judge: for anything outside the subset (anchors, aliases,
 * tags, block scalars, multi-line flow, escapes, numbers other than plain integers, tabs, several
 * documents, duplicate keys…) it returns undefined, and `load.ts` parses with `yaml`. It gives
 * no positions either: whenever the config has a problem, `load.ts` parses again with `yaml` to
 * report each one with its file:line.
 */

/** The value of `text` as `yaml`'s `parse(text)` would give it (YAML 1.2 core schema), or undefined. */
export function parsePlainYaml(text: string): unknown {
  try {
    const lines = toLines(text);
    if (lines === undefined) return undefined;
    const reader = new BlockReader(lines);
    if (lines.length === 0) return null;
    const value = reader.block(lines[0]!.indent);
    return reader.at === lines.length ? value : undefined;
  } catch (error) {
    if (error === OUTSIDE) return undefined;
    throw error;
  }
}

// --- internals ---

/** Thrown inside the reader when the text leaves the subset; never escapes {@link parsePlainYaml}. */
const OUTSIDE = Symbol('outside the plain subset');

function outside(): never {
  throw OUTSIDE;
}

interface Line {
  readonly indent: number;
  /** The line without indentation and without a trailing comment or spaces. */
  readonly text: string;
}

/** Non-empty lines, comments removed; undefined when something needs the full parser. */
function toLines(text: string): Line[] | undefined {
  if (text.includes('\t') || text.includes('\r') || text.charCodeAt(0) === 0xfeff) return undefined;
  const lines: Line[] = [];
  for (const raw of text.split('\n')) {
    let indent = 0;
    while (raw.charCodeAt(indent) === 32) indent++;
    if (indent === raw.length || raw[indent] === '#') continue;
    const body = stripComment(raw.slice(indent));
    if (indent === 0 && (body.startsWith('---') || body.startsWith('...') || body.startsWith('%'))) return undefined;
    lines.push({ indent, text: body });
  }
  return lines;
}

/** Remove a ` #` comment outside quotes, and trailing spaces. */
function stripComment(text: string): string {
  let quote = '';
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quote) {
      if (c === quote) quote = '';
    } else if (c === '"' || c === "'") {
      if (i === 0 || ' [{,:'.includes(text[i - 1]!)) quote = c;
    } else if (c === '#' && text[i - 1] === ' ') {
      return text.slice(0, i).trimEnd();
    }
  }
  if (quote) outside();
  return text.trimEnd();
}

class BlockReader {
  at = 0;
  constructor(readonly lines: readonly Line[]) {}

  /** The block (mapping or sequence) starting at the current line, whose lines have `indent`. */
  block(indent: number): unknown {
    const line = this.lines[this.at]!;
    if (line.indent !== indent) outside();
    return line.text === '-' || line.text.startsWith('- ') ? this.sequence(indent) : this.mapping(indent, undefined);
  }

  sequence(indent: number): unknown[] {
    const items: unknown[] = [];
    for (let line = this.lines[this.at]; line !== undefined && line.indent === indent; line = this.lines[this.at]) {
      if (line.text !== '-' && !line.text.startsWith('- ')) break;
      const rest = line.text.slice(1).trimStart();
      this.at++;
      if (rest === '') {
        items.push(this.nested(indent, false));
      } else if (isKeyLine(rest)) {
        // `- key: value` starts a mapping whose other keys are indented to `key`.
        const column = indent + line.text.length - rest.length;
        items.push(this.mapping(column, rest));
      } else {
        items.push(flowOrScalar(rest));
      }
    }
    return items;
  }

  /** A mapping at `indent`; `first` is its first line's text when it was already consumed (`- key: value`). */
  mapping(indent: number, first: string | undefined): Record<string, unknown> {
    const map: Record<string, unknown> = {};
    let text = first;
    for (;;) {
      if (text === undefined) {
        const line = this.lines[this.at];
        if (line === undefined || line.indent !== indent) break;
        text = line.text;
        this.at++;
      }
      const colon = keyEnd(text);
      if (colon < 0) outside();
      const key = scalarKey(text.slice(0, colon));
      if (Object.prototype.hasOwnProperty.call(map, key) || key === '__proto__' || key === '<<') outside();
      const rest = text.slice(colon + 1).trimStart();
      map[key] = rest === '' ? this.nested(indent, true) : flowOrScalar(rest);
      text = undefined;
      const next = this.lines[this.at];
      if (next !== undefined && next.indent > indent) outside();
    }
    return map;
  }

  /** The value of `key:` or `-` with nothing after it: a deeper block, a sequence at the same
   * indent (mapping values only), or null. */
  nested(indent: number, inMapping: boolean): unknown {
    const next = this.lines[this.at];
    if (next === undefined) return null;
    if (next.indent > indent) return this.block(next.indent);
    if (inMapping && next.indent === indent && (next.text === '-' || next.text.startsWith('- '))) return this.sequence(indent);
    return null;
  }
}

/** Whether `text` is `key: value` or `key:` (a plain or quoted key). */
function isKeyLine(text: string): boolean {
  return keyEnd(text) > 0;
}

/** Index of the `:` ending a mapping key at the start of `text`, or -1. */
function keyEnd(text: string): number {
  if (text[0] === '"' || text[0] === "'") {
    const close = text.indexOf(text[0], 1);
    return close > 0 && text[close + 1] === ':' && (close + 2 === text.length || text[close + 2] === ' ') ? close + 1 : -1;
  }
  if (text[0] === '[' || text[0] === '{') return -1;
  for (let i = 0; i < text.length; i++) {
    if (text[i] === ':' && (i + 1 === text.length || text[i + 1] === ' ')) return i;
  }
  return -1;
}

function scalarKey(text: string): string {
  const value = scalar(text.trim());
  if (typeof value !== 'string') outside(); // numeric or boolean keys: let `yaml` decide
  return value;
}

/** A one-line flow collection or a scalar. */
function flowOrScalar(text: string): unknown {
  if (text[0] === '[' || text[0] === '{') {
    const flow = new FlowReader(text);
    const value = flow.value();
    flow.space();
    if (flow.at !== text.length) outside();
    return value;
  }
  return scalar(text);
}

class FlowReader {
  at = 0;
  constructor(readonly text: string) {}

  space(): void {
    while (this.text.charCodeAt(this.at) === 32) this.at++;
  }

  value(): unknown {
    this.space();
    const c = this.text[this.at];
    if (c === '[') return this.list();
    if (c === '{') return this.map();
    return scalar(this.plain());
  }

  list(): unknown[] {
    this.at++;
    const items: unknown[] = [];
    for (;;) {
      this.space();
      if (this.text[this.at] === ']') { this.at++; return items; }
      items.push(this.value());
      this.space();
      const c = this.text[this.at++];
      if (c === ']') return items;
      if (c !== ',') outside();
    }
  }

  map(): Record<string, unknown> {
    this.at++;
    const map: Record<string, unknown> = {};
    for (;;) {
      this.space();
      if (this.text[this.at] === '}') { this.at++; return map; }
      const key = scalar(this.plain());
      if (typeof key !== 'string' || Object.prototype.hasOwnProperty.call(map, key) || key === '__proto__' || key === '<<') outside();
      this.space();
      if (this.text[this.at] !== ':') outside();
      this.at++;
      if (this.text[this.at] !== ' ') outside();
      map[key] = this.value();
      this.space();
      const c = this.text[this.at++];
      if (c === '}') return map;
      if (c !== ',') outside();
    }
  }

  /** The raw text of one scalar in flow context (quoted, or plain up to `,` `]` `}` or `: `). */
  plain(): string {
    const start = this.at;
    const c = this.text[start];
    if (c === '"' || c === "'") {
      const close = this.text.indexOf(c, start + 1);
      if (close < 0) outside();
      this.at = close + 1;
      return this.text.slice(start, this.at);
    }
    let i = start;
    for (; i < this.text.length; i++) {
      const d = this.text[i];
      if (d === ',' || d === ']' || d === '}' || d === '[' || d === '{') break;
      if (d === ':' && (this.text[i + 1] === ' ' || this.text[i + 1] === ',' || this.text[i + 1] === '}' || this.text[i + 1] === ']')) break;
    }
    this.at = i;
    return this.text.slice(start, i).trimEnd();
  }
}

/** Plain text that `yaml` reads as a string under the core schema, with no characters that could
 * mean anything else (no leading indicator, no `: `, no ` #`). */
const PLAIN_STRING = /^[A-Za-z0-9_/.][A-Za-z0-9_./:@*+=~$()-]*(?: [A-Za-z0-9_./:@*+=~$()-]+)*$/;
/** Core-schema numbers, booleans and nulls other than those {@link scalar} resolves itself. */
const CORE_SPECIAL = /^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|0o[0-7]+|0x[0-9a-fA-F]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)|null|Null|NULL|true|True|TRUE|false|False|FALSE|~)$/;

/** A scalar's value under the YAML 1.2 core schema, for the forms this reader accepts. */
function scalar(text: string): unknown {
  if (text === '') return outside();
  const c = text[0];
  if (c === '"') {
    const body = text.slice(1, -1);
    if (text.length < 2 || !text.endsWith('"') || body.includes('"') || body.includes('\\')) outside();
    return body;
  }
  if (c === "'") {
    const body = text.slice(1, -1);
    if (text.length < 2 || !text.endsWith("'") || body.includes("'")) outside();
    return body;
  }
  if (text === 'true') return true;
  if (text === 'false') return false;
  if (text === 'null' || text === '~') return null;
  if (/^-?(?:0|[1-9][0-9]{0,14})$/.test(text)) return Number(text);
  if (CORE_SPECIAL.test(text) || !PLAIN_STRING.test(text) || text.includes(': ') || text.endsWith(':')) outside();
  return text;
}
