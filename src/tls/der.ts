/**
 * A small DER reader for the fields start-up needs from a certificate and its key, without
 * OpenSSL's parsers: `new X509Certificate` costs ~150 µs and `createPrivateKey` ~430 µs (OpenSSL 3
 * decoders), which made 10 000 static certificates take 8 s to load. Reading the same fields here
 * costs a few µs.
 *
 * This is a shortcut, never a judge: every function returns `undefined` for anything it does not
 * fully understand (an unusual string type, a compressed EC point, an Ed25519 key, a second CN…),
 * and the caller then takes the OpenSSL path (`pem.ts`), which gives the exact result and errors.
 * It never runs per request.
 */

/** Fields of a leaf certificate, as `pem.ts` would derive them with `X509Certificate`. */
export interface LeafFields {
  /** Names from the SAN (DNS lowercased, IPs canonical), else the subject CN; never empty. */
  readonly names: string[];
  readonly notBefore: Date;
  readonly notAfter: Date;
  /** Issuer CN, else O. */
  readonly issuer: string;
  /** The SubjectPublicKeyInfo's public key (see {@link PublicKeyFields}). */
  readonly publicKey: PublicKeyFields | undefined;
}

/** The public half of a key, in a form two encodings of the same key agree on byte for byte. */
export type PublicKeyFields =
  | { readonly type: 'rsa'; readonly n: Buffer; readonly e: Buffer }
  | { readonly type: 'ec'; readonly curve: Buffer; readonly point: Buffer };

interface Tlv {
  readonly tag: number;
  /** Content start and end (exclusive) in the buffer. */
  readonly start: number;
  readonly end: number;
}

const OID_COMMON_NAME = '550403';
const OID_ORGANIZATION = '55040a';
const OID_SUBJECT_ALT_NAME = '551d11';
const OID_RSA = '2a864886f70d010101';
const OID_EC = '2a8648ce3d0201';

/** The decoded body of the first PEM block labelled `label`, or undefined. */
export function pemBody(pem: string, label: string): Buffer | undefined {
  const begin = `-----BEGIN ${label}-----`;
  const from = pem.indexOf(begin);
  if (from < 0) return undefined;
  const to = pem.indexOf(`-----END ${label}-----`, from);
  if (to < 0) return undefined;
  const body = pem.slice(from + begin.length, to);
  if (!/^[A-Za-z0-9+/=\s]+$/.test(body)) return undefined;
  return Buffer.from(body, 'base64');
}

/**
 * Whether `der` is one well-formed certificate: a SEQUENCE spanning the whole buffer of
 * tbsCertificate, signatureAlgorithm and signature, every element's length within its parent.
 */
export function isCertificateShape(der: Buffer): boolean {
  return certificateParts(der) !== undefined;
}

/** The fields of a leaf certificate, or undefined when the shortcut cannot decide (see the file comment). */
export function leafFields(der: Buffer): LeafFields | undefined {
  const parts = certificateParts(der);
  if (parts === undefined) return undefined;
  const tbs = childrenOf(der, parts[0]!);
  if (tbs === undefined) return undefined;
  let i = tbs[0]?.tag === 0xa0 ? 1 : 0; // [0] version
  const [, , issuer, validity, subject, spki] = tbs.slice(i, i + 6);
  if (issuer?.tag !== 0x30 || validity?.tag !== 0x30 || subject?.tag !== 0x30 || spki?.tag !== 0x30) return undefined;
  i += 6;
  let san: Tlv | undefined;
  for (; i < tbs.length; i++) {
    if (tbs[i]!.tag !== 0xa3) continue;
    const list = childrenOf(der, tbs[i]!);
    const extensions = list?.length === 1 && list[0]!.tag === 0x30 ? childrenOf(der, list[0]!) : undefined;
    if (extensions === undefined) return undefined;
    for (const extension of extensions) {
      const fields = extension.tag === 0x30 ? childrenOf(der, extension) : undefined;
      if (fields === undefined || fields[0]?.tag !== 0x06) return undefined;
      if (hex(der, fields[0]) !== OID_SUBJECT_ALT_NAME) continue;
      const value = fields[fields.length - 1]!;
      if (san !== undefined || value.tag !== 0x04) return undefined;
      san = value;
    }
  }
  const times = childrenOf(der, validity);
  if (times?.length !== 2) return undefined;
  const notBefore = timeOf(der, times[0]!);
  const notAfter = timeOf(der, times[1]!);
  if (notBefore === undefined || notAfter === undefined) return undefined;
  const issuerName = nameAttribute(der, issuer, OID_COMMON_NAME) ?? nameAttribute(der, issuer, OID_ORGANIZATION);
  if (typeof issuerName !== 'string') return undefined;
  let names: string[] | undefined;
  if (san === undefined) {
    const cn = nameAttribute(der, subject, OID_COMMON_NAME);
    if (typeof cn !== 'string' || !HOST_TEXT.test(cn)) return undefined;
    names = [cn.toLowerCase()];
  } else {
    names = sanNames(der, san);
    if (names === undefined || names.length === 0) return undefined;
  }
  return { names: [...new Set(names)], notBefore, notAfter, issuer: issuerName, publicKey: spkiPublicKey(der, spki) };
}

/**
 * The public half of an unencrypted PEM private key (PKCS#8 `PRIVATE KEY`, PKCS#1
 * `RSA PRIVATE KEY`, SEC 1 `EC PRIVATE KEY` that embeds its public point), or undefined.
 */
export function privateKeyPublicFields(pem: string): PublicKeyFields | undefined {
  const pkcs8 = pemBody(pem, 'PRIVATE KEY');
  if (pkcs8 !== undefined && !pem.includes('ENCRYPTED')) {
    const top = childrenAt(pkcs8);
    if (top === undefined || top.length < 3 || top[0]!.tag !== 0x02 || top[1]!.tag !== 0x30 || top[2]!.tag !== 0x04) return undefined;
    const algorithm = childrenOf(pkcs8, top[1]!);
    if (algorithm === undefined || algorithm[0]?.tag !== 0x06) return undefined;
    const oid = hex(pkcs8, algorithm[0]);
    const inner = pkcs8.subarray(top[2]!.start, top[2]!.end);
    if (oid === OID_RSA) return rsaPrivateKey(inner);
    if (oid === OID_EC && algorithm[1]?.tag === 0x06) return ecPrivateKey(inner, pkcs8.subarray(algorithm[1].start, algorithm[1].end));
    return undefined;
  }
  const rsa = pemBody(pem, 'RSA PRIVATE KEY');
  if (rsa !== undefined) return pem.includes('Proc-Type') ? undefined : rsaPrivateKey(rsa);
  const ec = pemBody(pem, 'EC PRIVATE KEY');
  if (ec !== undefined) return pem.includes('Proc-Type') ? undefined : ecPrivateKey(ec, undefined);
  return undefined;
}

/** Whether two public keys are the same key (what OpenSSL's `X509_check_private_key` compares). */
export function samePublicKey(a: PublicKeyFields, b: PublicKeyFields): boolean {
  if (a.type === 'rsa' && b.type === 'rsa') return a.n.equals(b.n) && a.e.equals(b.e);
  if (a.type === 'ec' && b.type === 'ec') return a.curve.equals(b.curve) && a.point.equals(b.point);
  return false;
}

// --- internals ---

/** Host names and wildcards in the plain form Node prints unquoted. */
const HOST_TEXT = /^[A-Za-z0-9*_.-]+$/;
/** Issuer/subject text Node prints as is (no RFC 2253 escaping, no control or non-ASCII characters). */
const PLAIN_TEXT = /^[A-Za-z0-9'()*./:@_-](?:[A-Za-z0-9 '()*./:@_-]*[A-Za-z0-9'()*./:@_-])?$/;

function certificateParts(der: Buffer): Tlv[] | undefined {
  const top = readTlv(der, 0, der.length);
  if (top === undefined || top.tag !== 0x30 || top.end !== der.length) return undefined;
  const parts = childrenOf(der, top);
  if (parts?.length !== 3 || parts[0]!.tag !== 0x30 || parts[1]!.tag !== 0x30 || parts[2]!.tag !== 0x03) return undefined;
  return parts;
}

function readTlv(der: Buffer, offset: number, limit: number): Tlv | undefined {
  if (offset + 2 > limit) return undefined;
  const tag = der[offset]!;
  if ((tag & 0x1f) === 0x1f) return undefined; // multi-byte tags: not in certificates we read
  let length = der[offset + 1]!;
  let start = offset + 2;
  if (length & 0x80) {
    const bytes = length & 0x7f;
    if (bytes === 0 || bytes > 3 || start + bytes > limit) return undefined;
    length = 0;
    for (let i = 0; i < bytes; i++) length = length * 256 + der[start + i]!;
    start += bytes;
  }
  const end = start + length;
  return end > limit ? undefined : { tag, start, end };
}

function childrenOf(der: Buffer, parent: Tlv): Tlv[] | undefined {
  const children: Tlv[] = [];
  for (let offset = parent.start; offset < parent.end;) {
    const child = readTlv(der, offset, parent.end);
    if (child === undefined) return undefined;
    children.push(child);
    offset = child.end;
  }
  return children;
}

/** The children of the SEQUENCE that is the whole of `der`. */
function childrenAt(der: Buffer): Tlv[] | undefined {
  const top = readTlv(der, 0, der.length);
  return top?.tag === 0x30 && top.end === der.length ? childrenOf(der, top) : undefined;
}

function hex(der: Buffer, tlv: Tlv): string {
  return der.toString('hex', tlv.start, tlv.end);
}

/** UTCTime `YYMMDDHHMMSSZ` or GeneralizedTime `YYYYMMDDHHMMSSZ` (RFC 5280 §4.1.2.5); other forms: undefined. */
function timeOf(der: Buffer, tlv: Tlv): Date | undefined {
  const text = der.toString('latin1', tlv.start, tlv.end);
  let match: RegExpExecArray | null;
  let year: number;
  if (tlv.tag === 0x17 && (match = /^(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)Z$/.exec(text))) {
    year = Number(match[1]);
    year += year < 50 ? 2000 : 1900;
  } else if (tlv.tag === 0x18 && (match = /^(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)Z$/.exec(text))) {
    year = Number(match[1]);
  } else {
    return undefined;
  }
  const [, , month, day, hour, minute, second] = match.map(Number);
  return new Date(Date.UTC(year, month! - 1, day!, hour!, minute!, second!));
}

/**
 * The one value of attribute `oid` in a Name, as plain text; undefined when absent; null when
 * the shortcut cannot say (several values, an unusual string type or characters Node escapes).
 */
function nameAttribute(der: Buffer, name: Tlv, oid: string): string | undefined | null {
  const rdns = childrenOf(der, name);
  if (rdns === undefined) return null;
  let found: string | undefined | null;
  for (const rdn of rdns) {
    const attributes = rdn.tag === 0x31 ? childrenOf(der, rdn) : undefined;
    if (attributes === undefined) return null;
    for (const attribute of attributes) {
      const pair = attribute.tag === 0x30 ? childrenOf(der, attribute) : undefined;
      if (pair?.length !== 2 || pair[0]!.tag !== 0x06) return null;
      if (hex(der, pair[0]!) !== oid) continue;
      if (found !== undefined) return null;
      const value = pair[1]!;
      // UTF8String, PrintableString, IA5String: ASCII text only (anything else goes to OpenSSL).
      if (value.tag !== 0x0c && value.tag !== 0x13 && value.tag !== 0x16) return null;
      const text = der.toString('latin1', value.start, value.end);
      found = PLAIN_TEXT.test(text) ? text : null;
    }
  }
  return found;
}

/** DNS names (lowercased) and IP addresses (canonical) of a subjectAltName extension value. */
function sanNames(der: Buffer, value: Tlv): string[] | undefined {
  const inner = readTlv(der, value.start, value.end);
  if (inner === undefined || inner.tag !== 0x30 || inner.end !== value.end) return undefined;
  const general = childrenOf(der, inner);
  if (general === undefined) return undefined;
  const names: string[] = [];
  for (const entry of general) {
    if (entry.tag === 0x82) {
      const text = der.toString('latin1', entry.start, entry.end);
      if (!HOST_TEXT.test(text)) return undefined;
      names.push(text.toLowerCase().replace(/\.$/, ''));
    } else if (entry.tag === 0x87) {
      const bytes = der.subarray(entry.start, entry.end);
      if (bytes.length === 4) names.push(bytes.join('.'));
      else if (bytes.length === 16) names.push(ipv6Text(bytes));
      else return undefined;
    }
  }
  return names;
}

/** RFC 5952 text of an IPv6 address (what `new URL` gives: lowercase, longest zero run as `::`). */
function ipv6Text(bytes: Buffer): string {
  const groups: number[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(bytes.readUInt16BE(i));
  let bestStart = -1;
  let bestLength = 1;
  for (let i = 0; i < 8;) {
    if (groups[i] !== 0) { i++; continue; }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLength) { bestStart = i; bestLength = j - i; }
    i = j;
  }
  const text = (part: number[]) => part.map((g) => g.toString(16)).join(':');
  if (bestStart < 0) return text(groups);
  return `${text(groups.slice(0, bestStart))}::${text(groups.slice(bestStart + bestLength))}`;
}

function spkiPublicKey(der: Buffer, spki: Tlv): PublicKeyFields | undefined {
  const parts = childrenOf(der, spki);
  if (parts?.length !== 2 || parts[0]!.tag !== 0x30 || parts[1]!.tag !== 0x03) return undefined;
  const algorithm = childrenOf(der, parts[0]!);
  if (algorithm === undefined || algorithm[0]?.tag !== 0x06) return undefined;
  const bits = parts[1]!;
  if (der[bits.start] !== 0) return undefined; // unused bits
  const key = der.subarray(bits.start + 1, bits.end);
  const oid = hex(der, algorithm[0]);
  if (oid === OID_RSA) {
    const fields = childrenAt(key);
    if (fields?.length !== 2 || fields[0]!.tag !== 0x02 || fields[1]!.tag !== 0x02) return undefined;
    return { type: 'rsa', n: key.subarray(fields[0]!.start, fields[0]!.end), e: key.subarray(fields[1]!.start, fields[1]!.end) };
  }
  if (oid === OID_EC && algorithm[1]?.tag === 0x06 && key[0] === 0x04) {
    return { type: 'ec', curve: der.subarray(algorithm[1].start, algorithm[1].end), point: key };
  }
  return undefined;
}

/** RSAPrivateKey (RFC 8017 A.1.2): version, n, e, … */
function rsaPrivateKey(der: Buffer): PublicKeyFields | undefined {
  const fields = childrenAt(der);
  if (fields === undefined || fields.length < 9 || fields.some((f) => f.tag !== 0x02)) return undefined;
  return { type: 'rsa', n: der.subarray(fields[1]!.start, fields[1]!.end), e: der.subarray(fields[2]!.start, fields[2]!.end) };
}

/** ECPrivateKey (RFC 5915): version 1, private key, [0] curve, [1] public point (required here, uncompressed). */
function ecPrivateKey(der: Buffer, curveFromAlgorithm: Buffer | undefined): PublicKeyFields | undefined {
  const fields = childrenAt(der);
  if (fields === undefined || fields[0]?.tag !== 0x02 || fields[1]?.tag !== 0x04) return undefined;
  let curve = curveFromAlgorithm;
  let point: Buffer | undefined;
  for (const field of fields.slice(2)) {
    const inner = readTlv(der, field.start, field.end);
    if (inner === undefined) return undefined;
    if (field.tag === 0xa0 && inner.tag === 0x06) {
      const own = der.subarray(inner.start, inner.end);
      if (curve !== undefined && !curve.equals(own)) return undefined;
      curve = own;
    } else if (field.tag === 0xa1 && inner.tag === 0x03 && der[inner.start] === 0) {
      point = der.subarray(inner.start + 1, inner.end);
    }
  }
  if (curve === undefined || point === undefined || point[0] !== 0x04) return undefined;
  return { type: 'ec', curve, point };
}
