/**
 * Reading certificates: PEM chains, the names a leaf covers, its validity and issuer, and whether a
 * private key belongs to it. Parsing uses node:crypto's `X509Certificate` (OpenSSL underneath: fast,
 * and it reads every key type), never a JavaScript ASN.1 parser on the hot path.
 */
import { X509Certificate, createPrivateKey, type KeyObject } from 'node:crypto';
import { isIP } from 'node:net';
import type { Certificate } from './source.js';

/** Error codes of {@link CertificateError}; callers branch on these, never on message text. */
export type CertificateErrorCode =
  | 'GH_TLS_FILE_UNREADABLE'
  | 'GH_TLS_CERT_INVALID'
  | 'GH_TLS_KEY_INVALID'
  | 'GH_TLS_KEY_MISMATCH'
  | 'GH_TLS_NO_NAMES';

/** A certificate or key the user gave cannot be used. The message names the file and what to do. */
export class CertificateError extends Error {
  readonly code: CertificateErrorCode;
  /** The file at fault, when the certificate came from a file. */
  readonly file: string | undefined;

  constructor(code: CertificateErrorCode, message: string, options: { file?: string; cause?: unknown } = {}) {
    super(`${code}: ${message}`, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'CertificateError';
    this.code = code;
    this.file = options.file;
  }
}

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

/** The `CERTIFICATE` blocks of a PEM text, in order (leaf first in a served chain). */
export function splitPemChain(pem: string): string[] {
  return pem.match(PEM_CERTIFICATE) ?? [];
}

/** Where the PEM inputs came from, for error messages. */
export interface PemOrigin {
  /** Path of the certificate file (named in errors). */
  readonly certFile?: string;
  /** Path of the key file (named in errors). */
  readonly keyFile?: string;
}

/**
 * Build a {@link Certificate} from a PEM chain (leaf first) and the leaf's PEM private key.
 *
 * Names come from the leaf's subjectAltName (RFC 5280 §4.2.1.6): DNS names lowercased, IP addresses
 * in canonical text form. The subject CN is used only when the leaf has no SAN at all (legacy
 * certificates; browsers ignore CN since RFC 6125).
 * @param source which source produced it (`static`, `internal`, `acme`, ...).
 * @throws {CertificateError} `GH_TLS_CERT_INVALID` when no certificate can be parsed,
 *   `GH_TLS_KEY_INVALID` when the key cannot be parsed (encrypted keys are not supported),
 *   `GH_TLS_KEY_MISMATCH` when the key does not belong to the leaf, `GH_TLS_NO_NAMES` when the
 *   leaf names nothing.
 */
export function certificateFromPem(certPem: string, keyPem: string, source: string, origin: PemOrigin = {}): Certificate {
  return freezeCertificate(splitPemChain(certPem), keyPem, source, verifyPemPair(certPem, keyPem, origin));
}

/**
 * The checks of {@link certificateFromPem}, without building the {@link Certificate}: every
 * certificate block parsed by OpenSSL (`X509Certificate`), the key parsed (`createPrivateKey`),
 * `checkPrivateKey` against the leaf, and at least one name. Used by the static certificate loader,
 * also in worker threads (`tls/verify-worker.ts`).
 * @param parsedChain chain blocks (exact PEM text) already parsed by OpenSSL without error, e.g.
 *   the intermediate shared by thousands of files: not parsed again (same text, same result). The
 *   blocks this call parses are added. Default: none, every block is parsed.
 * @returns what was read from the leaf.
 * @throws {CertificateError} with the codes of {@link certificateFromPem}, naming the file.
 */
export function verifyPemPair(certPem: string, keyPem: string, origin: PemOrigin = {}, parsedChain?: Set<string>): LeafFacts {
  const certFile = origin.certFile ?? 'certificate';
  const keyFile = origin.keyFile ?? 'key';
  const blocks = splitPemChain(certPem);
  if (blocks.length === 0) {
    throw new CertificateError('GH_TLS_CERT_INVALID', `${certFile}: no "BEGIN CERTIFICATE" block found; expected a PEM chain, leaf first`, { file: origin.certFile });
  }
  let leaf: X509Certificate;
  try {
    leaf = new X509Certificate(blocks[0]!);
    for (let i = 1; i < blocks.length; i++) {
      if (parsedChain?.has(blocks[i]!)) continue;
      new X509Certificate(blocks[i]!);
      parsedChain?.add(blocks[i]!);
    }
  } catch (error) {
    throw new CertificateError('GH_TLS_CERT_INVALID', `${certFile}: cannot parse the certificate (${(error as Error).message})`, { file: origin.certFile, cause: error });
  }
  let key: KeyObject;
  try {
    key = createPrivateKey(keyPem);
  } catch (error) {
    throw new CertificateError('GH_TLS_KEY_INVALID', `${keyFile}: cannot parse the private key (${(error as Error).message}); expected an unencrypted PEM key`, { file: origin.keyFile, cause: error });
  }
  if (!leaf.checkPrivateKey(key)) {
    throw new CertificateError('GH_TLS_KEY_MISMATCH', `${keyFile} is not the private key of ${certFile} (the first certificate in the file must be the leaf)`, { file: origin.keyFile });
  }
  const names = namesOf(leaf);
  if (names.length === 0) {
    throw new CertificateError('GH_TLS_NO_NAMES', `${certFile}: the certificate names no host (no subjectAltName and no CN)`, { file: origin.certFile });
  }
  return { names, notBefore: new Date(leaf.validFrom), notAfter: new Date(leaf.validTo), issuer: issuerNameOf(leaf) };
}

/** What {@link certificateFromPem} reads from the leaf with OpenSSL, besides the PEM texts. */
export interface LeafFacts {
  readonly names: readonly string[];
  readonly notBefore: Date;
  readonly notAfter: Date;
  readonly issuer: string;
}

/**
 * Build a {@link Certificate} from a pair that {@link certificateFromPem} already accepted, with
 * the {@link LeafFacts} it read then, without OpenSSL: no parsing, no key check. Only for texts
 * byte for byte equal to the ones that were verified (the static certificate cache in
 * `tls/certificates.ts` matches them by a SHA-256 of the files). The chain is laid out as
 * {@link certificateFromPem} lays it out.
 * @returns undefined when `certPem` holds no certificate block (it was not a verified text).
 */
export function certificateFromVerifiedPem(certPem: string, keyPem: string, source: string, facts: LeafFacts): Certificate | undefined {
  const blocks = splitPemChain(certPem);
  if (blocks.length === 0) return undefined;
  return freezeCertificate(blocks, keyPem, source, facts);
}

/** The one place a {@link Certificate} is assembled, so verified and cached pairs look the same. */
function freezeCertificate(blocks: readonly string[], keyPem: string, source: string, facts: LeafFacts): Certificate {
  return Object.freeze({
    cert: blocks.join('\n') + '\n',
    key: keyPem,
    names: Object.freeze([...facts.names]),
    notBefore: new Date(facts.notBefore.getTime()),
    notAfter: new Date(facts.notAfter.getTime()),
    issuer: facts.issuer,
    source,
  });
}

/**
 * Names a certificate covers: DNS SANs lowercased (wildcards kept as `*.example.com`), IP SANs in
 * canonical text (`127.0.0.1`, `::1`). Falls back to the subject CN when there is no SAN.
 */
export function namesOf(certificate: X509Certificate): string[] {
  const names: string[] = [];
  const san = certificate.subjectAltName;
  if (san) {
    for (const part of splitSubjectAltName(san)) {
      if (part.startsWith('DNS:')) names.push(normalizeHostName(unquote(part.slice(4))));
      else if (part.startsWith('IP Address:')) names.push(canonicalIp(unquote(part.slice(11))));
    }
  } else {
    const cn = /^CN=(.*)$/m.exec(certificate.subject ?? '')?.[1];
    if (cn) names.push(normalizeHostName(cn));
  }
  return [...new Set(names)];
}

/** The issuer's common name, else its organisation, else the whole issuer text. */
export function issuerNameOf(certificate: X509Certificate): string {
  const issuer = certificate.issuer ?? ''; // undefined for an empty Name
  if (issuer === '') return '(no issuer name)';
  return /^CN=(.*)$/m.exec(issuer)?.[1] ?? /^O=(.*)$/m.exec(issuer)?.[1] ?? issuer.replace(/\n/g, ', ');
}

/**
 * Normalise a host or SNI server name for lookup: lowercase, no trailing dot, IPv6 without brackets
 * and in canonical (compressed) form.
 */
export function normalizeHostName(name: string): string {
  let host = name.toLowerCase();
  if (host.endsWith('.')) host = host.slice(0, -1);
  if (host.includes(':')) host = canonicalIp(host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host);
  return host;
}

/** Canonical text of an IP address (`0:0:0:0:0:0:0:1` → `::1`); other input is returned lowercased. */
export function canonicalIp(ip: string): string {
  const text = ip.trim().toLowerCase();
  const version = isIP(text);
  if (version === 6) return new URL(`http://[${text}]/`).hostname.slice(1, -1);
  return text;
}

/** Node ≥17.3 quotes SAN entries with special characters as JSON strings; split on the real commas. */
function splitSubjectAltName(san: string): string[] {
  const parts: string[] = [];
  let start = 0;
  let quoted = false;
  for (let i = 0; i < san.length; i++) {
    const c = san[i];
    if (c === '"' && san[i - 1] !== '\\') quoted = !quoted;
    else if (c === ',' && !quoted) {
      parts.push(san.slice(start, i).trim());
      start = i + 1;
    }
  }
  parts.push(san.slice(start).trim());
  return parts;
}

function unquote(value: string): string {
  if (value.startsWith('"') && value.endsWith('"')) {
    try {
      return JSON.parse(value) as string;
    } catch {
      return value.slice(1, -1);
    }
  }
  return value;
}
