/**
 * Certificates for tests: self-signed leaves, test CAs and leaves they issue, in PEM.
 * ECDSA P-256 by default (key generation well under a millisecond); RSA-2048 on request (native
 * keygen, ~50 ms). Built by the same code as the local CA (`signCertificate`).
 *
 *   const site = makeCertificate({ names: ['a.test', '*.b.test', '127.0.0.1'] });
 *   https.createServer({ cert: site.cert, key: site.key }, ...);
 *   https.get({ ..., ca: site.cert });              // a self-signed leaf is its own trust anchor
 *
 *   const ca = makeCA();
 *   const leaf = makeCertificate({ names: ['x.test'], issuer: ca });   // trust ca.cert
 */
import { X509Certificate, createPrivateKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { signCertificate } from '../../src/tls/local-ca.js';
import { certificateFromPem } from '../../src/tls/pem.js';
import type { Certificate } from '../../src/tls/source.js';

const HOUR = 60 * 60 * 1000;

/** A test certificate authority. Pass it as `issuer`; clients trust `cert`. */
export interface TestCA {
  /** PEM of the CA certificate. */
  readonly cert: string;
  /** PEM (PKCS#8) of the CA key. */
  readonly key: string;
}

/** A certificate and its key, in PEM, plus the parsed {@link Certificate}. */
export interface TestCertificate {
  /** PEM of the leaf (self-signed, or issued by `issuer`; the CA is not appended). */
  readonly cert: string;
  /** PEM (PKCS#8) of the leaf's key. */
  readonly key: string;
  /** As the store sees it (`source` as given, default `static`). */
  readonly certificate: Certificate;
}

export interface MakeCertificateOptions {
  /** DNS names (wildcards allowed) and IP literals. */
  readonly names: readonly string[];
  /** Issuing CA; absent makes a self-signed certificate. */
  readonly issuer?: TestCA;
  /** `ec` (P-256, default) or `rsa` (2048 bits). */
  readonly keyType?: 'ec' | 'rsa';
  /** Default: one hour ago. */
  readonly notBefore?: Date;
  /** Default: 24 hours from now. */
  readonly notAfter?: Date;
  /** Subject common name; default the first name when self-signed, else none (names are in the SAN). */
  readonly commonName?: string;
  /** `source` of the returned {@link Certificate}. Default `static`. */
  readonly source?: string;
}

/** Make a leaf certificate for `names` (self-signed unless `issuer` is given). */
export function makeCertificate(options: MakeCertificateOptions): TestCertificate {
  const { privateKey, publicKey } = newKeyPair(options.keyType ?? 'ec');
  const issuer = options.issuer;
  const notBefore = options.notBefore ?? new Date(Date.now() - HOUR);
  const notAfter = options.notAfter ?? new Date(Date.now() + 24 * HOUR);
  // A self-signed certificate names itself as issuer, so it needs a non-empty subject.
  const commonName = options.commonName ?? (issuer === undefined ? options.names[0]?.slice(0, 64) : undefined);
  const subject = commonName === undefined ? {} : { commonName };
  const cert = signCertificate(
    { subject, names: options.names, publicKey, notBefore, notAfter },
    issuer === undefined ? { privateKey } : { privateKey: createPrivateKey(issuer.key), certificate: new X509Certificate(issuer.cert) },
  );
  const key = privateKey.export({ type: 'pkcs8', format: 'pem' }) as string;
  return { cert, key, certificate: certificateFromPem(cert, key, options.source ?? 'static') };
}

/** Make a self-signed CA (10-day lifetime). */
export function makeCA(options: { readonly name?: string; readonly keyType?: 'ec' | 'rsa' } = {}): TestCA {
  const { privateKey, publicKey } = newKeyPair(options.keyType ?? 'ec');
  const name = options.name ?? 'Gatehouse Test CA';
  const cert = signCertificate({
    subject: { commonName: name, organization: 'Gatehouse tests' },
    publicKey,
    notBefore: new Date(Date.now() - HOUR),
    notAfter: new Date(Date.now() + 240 * HOUR),
    ca: { pathLength: 1 },
  }, { privateKey });
  return { cert, key: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string };
}

/** Write `<folder>/<basename>.crt` and `.key` (0600); returns the paths, as `tls.certificates` lists them. */
export async function writeCertificateFiles(folder: string, pair: { cert: string; key: string }, basename = 'site'): Promise<{ cert: string; key: string }> {
  const cert = join(folder, `${basename}.crt`);
  const key = join(folder, `${basename}.key`);
  await writeFile(cert, pair.cert);
  await writeFile(key, pair.key, { mode: 0o600 });
  return { cert, key };
}

function newKeyPair(type: 'ec' | 'rsa'): { privateKey: KeyObject; publicKey: KeyObject } {
  return type === 'rsa'
    ? generateKeyPairSync('rsa', { modulusLength: 2048 })
    : generateKeyPairSync('ec', { namedCurve: 'P-256' });
}
