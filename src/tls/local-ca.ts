/**
 * The internal issuer (Caddy's `tls internal`, certmagic/caddypki): a root CA and an intermediate
 * kept in {@link Storage}, and short-lived leaf certificates issued on demand for local names
 * (localhost, *.localhost, IP literals, names under .test / .internal ...).
 *
 * Key type: ECDSA P-256 for the root, the intermediate and every leaf. Keys come from node:crypto
 * (P-256 key generation takes well under a millisecond, RSA-2048 tens to hundreds), and ECDSA
 * handshakes are cheaper for the server than RSA ones. node-forge can only sign with RSA keys, so
 * node-forge builds the X.509 structure (TBSCertificate, RFC 5280 §4.1) and node:crypto signs it;
 * the SubjectPublicKeyInfo and the issuer name are spliced in as DER. {@link signCertificate} does
 * this for any EC or RSA issuer key and is what the test helpers use too.
 *
 * Storage layout (keys relative to `tls.storage`):
 * - `ca/root.crt`, `ca/root.key` — the root users add to their trust store (10 years)
 * - `ca/intermediate.crt`, `ca/intermediate.key` — signs leaves; re-signed by the root when a third
 *   of its lifetime is left (default 30 days)
 * Leaf certificates are kept in memory only (default lifetime 7 days) and issued again after a
 * restart: issuing one takes about a millisecond.
 */
import { X509Certificate, createHash, createPrivateKey, createPublicKey, generateKeyPair, randomBytes, sign, type KeyObject } from 'node:crypto';
import { isIP } from 'node:net';
import { promisify } from 'node:util';
import forge from 'node-forge';
import { LRUCache } from 'lru-cache';
import type { Certificate, CertificateSource } from './source.js';
import type { Storage } from './storage.js';
import { canonicalIp, normalizeHostName } from './pem.js';

const generateKeyPairAsync = promisify(generateKeyPair);
const DAY = 24 * 60 * 60 * 1000;

/** Storage keys of the local CA, relative to the storage root. */
export const LOCAL_CA_KEYS = {
  rootCertificate: 'ca/root.crt',
  rootKey: 'ca/root.key',
  intermediateCertificate: 'ca/intermediate.crt',
  intermediateKey: 'ca/intermediate.key',
} as const;

/** Options of {@link LocalCA.load}. */
export interface LocalCAOptions {
  /** Name shown as the CA's organisation and in its common names. Default `Gatehouse Local Authority`. */
  readonly name?: string;
  /** Lifetime of issued leaf certificates (ms). Default 7 days: short, since nothing revokes them
   * (Caddy uses 12 hours), but long enough that a laptop asleep over a weekend still works. */
  readonly lifetime?: number;
  /** Lifetime of the intermediate (ms). Default 30 days; re-signed when a third is left, so it always
   * outlives a default leaf. */
  readonly intermediateLifetime?: number;
  /** Lifetime of a newly created root (ms). Default 10 years (as Caddy). */
  readonly rootLifetime?: number;
  /** Issued leaves are reused from memory until this fraction of their lifetime is left. Default 1/3. */
  readonly renewWindow?: number;
  /** How many leaves are kept in memory (LRU). Default 1000. */
  readonly cacheSize?: number;
}

/**
 * The local certificate authority, a {@link CertificateSource} named `internal`.
 * Create with {@link LocalCA.load}; issue with {@link LocalCA.obtain}.
 */
export class LocalCA implements CertificateSource {
  readonly name = 'internal';
  /** PEM of the root certificate: what a client must trust (`<storage>/ca/root.crt`). */
  readonly rootCertificatePem: string;

  readonly #storage: Storage;
  readonly #options: Required<LocalCAOptions>;
  readonly #root: Signer;
  #intermediate: Signer & { pem: string; renewAt: number };
  #intermediateRenewal: Promise<void> | undefined;
  readonly #cache: LRUCache<string, { certificate: Certificate; renewAt: number }>;
  readonly #inflight = new Map<string, Promise<Certificate | undefined>>();

  private constructor(storage: Storage, options: Required<LocalCAOptions>, root: Signer & { pem: string }, intermediate: Signer & { pem: string; renewAt: number }) {
    this.#storage = storage;
    this.#options = options;
    this.#root = root;
    this.#intermediate = intermediate;
    this.rootCertificatePem = root.pem;
    this.#cache = new LRUCache({ max: options.cacheSize });
  }

  /**
   * Load the CA from storage, creating the root and the intermediate when absent.
   * Two processes (or two calls) creating at once end with one CA: keys and certificates are
   * created write-if-absent ({@link Storage.storeExclusive}) and the loser loads the winner's. A certificate written next to a key it does not match is replaced.
   * @throws storage errors (EACCES, ENOSPC, ...) and errors parsing stored PEM that is corrupt.
   */
  static async load(storage: Storage, options: LocalCAOptions = {}): Promise<LocalCA> {
    const resolved: Required<LocalCAOptions> = {
      name: options.name ?? 'Gatehouse Local Authority',
      lifetime: options.lifetime ?? 7 * DAY,
      intermediateLifetime: options.intermediateLifetime ?? 30 * DAY,
      rootLifetime: options.rootLifetime ?? 3650 * DAY,
      renewWindow: options.renewWindow ?? 1 / 3,
      cacheSize: options.cacheSize ?? 1000,
    };
    const rootKey = await loadOrCreateKey(storage, LOCAL_CA_KEYS.rootKey);
    const root = await loadOrCreateCertificate(storage, LOCAL_CA_KEYS.rootCertificate, rootKey, () => signCertificate({
      subject: { commonName: `${resolved.name} - ${new Date().getFullYear()} ECC Root`, organization: resolved.name },
      publicKey: createPublicKey(rootKey),
      notBefore: new Date(Date.now() - 60_000),
      notAfter: new Date(Date.now() + resolved.rootLifetime),
      ca: { pathLength: 1 },
    }, { privateKey: rootKey }));
    const rootSigner = { privateKey: rootKey, certificate: root, pem: root.toString() };

    const intermediateKey = await loadOrCreateKey(storage, LOCAL_CA_KEYS.intermediateKey);
    const makeIntermediate = () => issueIntermediate(resolved, intermediateKey, rootSigner);
    let intermediate = await loadOrCreateCertificate(storage, LOCAL_CA_KEYS.intermediateCertificate, intermediateKey, makeIntermediate);
    if (!intermediate.checkIssued(root) || !intermediate.verify(root.publicKey) || renewAtOf(intermediate, resolved.renewWindow) <= Date.now()) {
      intermediate = new X509Certificate(makeIntermediate());
      await storage.store(LOCAL_CA_KEYS.intermediateCertificate, intermediate.toString());
    }
    return new LocalCA(storage, resolved, rootSigner, {
      privateKey: intermediateKey,
      certificate: intermediate,
      pem: intermediate.toString(),
      renewAt: renewAtOf(intermediate, resolved.renewWindow),
    });
  }

  /**
   * A certificate for `serverName` (a DNS name or an IP literal), issued by the intermediate.
   * Issued leaves are reused until a third of their lifetime is left; concurrent calls for one name
   * share one issuance. Resolves undefined for names that are neither (empty, `*`, bad characters).
   */
  obtain(serverName: string): Promise<Certificate | undefined> {
    const name = normalizeHostName(serverName);
    if (!isIssuableName(name)) return Promise.resolve(undefined);
    const cached = this.#cache.get(name);
    if (cached !== undefined && cached.renewAt > Date.now()) return Promise.resolve(cached.certificate);
    let pending = this.#inflight.get(name);
    if (pending === undefined) {
      pending = this.issue([name]).then((certificate) => {
        this.#cache.set(name, { certificate, renewAt: renewAtOf(certificate, this.#options.renewWindow) });
        return certificate;
      }).finally(() => this.#inflight.delete(name));
      this.#inflight.set(name, pending);
    }
    return pending;
  }

  /**
   * Issue a new leaf covering all `names` (not cached). IP literals become IP SANs, other names DNS
   * SANs; `*.example.test` wildcards are allowed.
   * @throws {Error} when a name is neither a DNS name nor an IP literal.
   */
  async issue(names: readonly string[]): Promise<Certificate> {
    const normalized = [...new Set(names.map(normalizeHostName))];
    for (const name of normalized) if (!isIssuableName(name)) throw new Error(`local CA: cannot issue a certificate for ${JSON.stringify(name)}: not a DNS name or an IP address`);
    if (normalized.length === 0) throw new Error('local CA: a certificate needs at least one name');
    await this.#freshIntermediate();
    const intermediate = this.#intermediate;
    const { privateKey, publicKey } = await generateKeyPairAsync('ec', { namedCurve: 'P-256' });
    const now = Date.now();
    const notBefore = new Date(now - 5 * 60_000); // tolerate client clocks a little behind
    const notAfter = new Date(Math.min(now + this.#options.lifetime, intermediate.certificate ? Date.parse(intermediate.certificate.validTo) : Infinity));
    const leafPem = signCertificate({ subject: {}, names: normalized, publicKey, notBefore, notAfter }, intermediate);
    return Object.freeze({
      cert: leafPem + intermediate.pem,
      key: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string,
      names: Object.freeze(normalized.map((n) => (isIP(n) ? canonicalIp(n) : n))),
      notBefore,
      notAfter: new Date(Date.parse(new X509Certificate(leafPem).validTo)),
      issuer: `${this.#options.name} - ECC Intermediate`,
      source: this.name,
    });
  }

  /** Re-sign the intermediate when a third of its life is left (shared by concurrent issuers). */
  async #freshIntermediate(): Promise<void> {
    if (this.#intermediate.renewAt > Date.now()) return;
    this.#intermediateRenewal ??= (async () => {
      const pem = issueIntermediate(this.#options, this.#intermediate.privateKey, this.#root);
      await this.#storage.store(LOCAL_CA_KEYS.intermediateCertificate, pem);
      const certificate = new X509Certificate(pem);
      this.#intermediate = { ...this.#intermediate, certificate, pem: certificate.toString(), renewAt: renewAtOf(certificate, this.#options.renewWindow) };
    })().finally(() => {
      this.#intermediateRenewal = undefined;
    });
    await this.#intermediateRenewal;
  }
}

/** Who signs a certificate: a private key, and its certificate unless self-signing. */
export interface Signer {
  /** EC (P-256/P-384) or RSA private key. */
  readonly privateKey: KeyObject;
  /** The issuer's certificate; absent for a self-signed certificate. */
  readonly certificate?: X509Certificate;
}

/** What to put in a certificate. */
export interface CertificateTemplate {
  /** Subject distinguished name; leaves usually leave it empty (names are in the SAN). */
  readonly subject: { readonly commonName?: string; readonly organization?: string };
  /** subjectAltName entries: DNS names (wildcards allowed) and IP literals (become IP SANs). */
  readonly names?: readonly string[];
  /** Public key certified (any type node:crypto knows: EC, RSA, Ed25519). */
  readonly publicKey: KeyObject;
  readonly notBefore: Date;
  readonly notAfter: Date;
  /** Make a CA certificate (basicConstraints cA, keyCertSign) with this path length. Absent: a TLS server leaf. */
  readonly ca?: { readonly pathLength: number };
  /** Serial number as hex; default 16 random bytes (CA/B Forum asks for at least 64 random bits). */
  readonly serialNumber?: string;
}

/**
 * Build and sign an X.509 v3 certificate (RFC 5280); returns its PEM.
 * node-forge builds the TBSCertificate; the subject public key, the issuer name and the signature
 * algorithm are replaced by DER from node:crypto, which signs (ecdsa-with-SHA256/384 for EC issuer
 * keys, sha256WithRSAEncryption for RSA).
 * @throws {Error} for an issuer key type other than EC or RSA, or an invalid IP literal.
 */
export function signCertificate(template: CertificateTemplate, issuer: Signer): string {
  const asn1 = forge.asn1;
  const cert = forge.pki.createCertificate();
  // forge can only encode an RSA public key; a placeholder is swapped for the real SPKI below.
  cert.publicKey = forge.pki.setRsaPublicKey(new forge.jsbn.BigInteger('3'), new forge.jsbn.BigInteger('65537'));
  cert.serialNumber = template.serialNumber ?? randomSerial();
  cert.validity.notBefore = template.notBefore;
  cert.validity.notAfter = template.notAfter;
  const subject: forge.pki.CertificateField[] = [];
  if (template.subject.organization) subject.push({ name: 'organizationName', value: template.subject.organization, valueTagClass: UTF8_STRING });
  if (template.subject.commonName) subject.push({ name: 'commonName', value: template.subject.commonName, valueTagClass: UTF8_STRING });
  cert.setSubject(subject);
  cert.setIssuer(subject); // replaced by the issuer's DER subject when not self-signed

  const spkiDer = template.publicKey.export({ type: 'spki', format: 'der' });
  const spki = asn1.fromDer(spkiDer.toString('binary'));
  const subjectKeyId = keyIdentifier(spkiDer);
  const issuerSpkiDer = createPublicKey(issuer.privateKey).export({ type: 'spki', format: 'der' });
  const authorityKeyId = issuer.certificate ? subjectKeyIdentifierOf(issuer.certificate) ?? keyIdentifier(issuerSpkiDer) : subjectKeyId;

  const extensions: object[] = [];
  if (template.ca) {
    extensions.push({ name: 'basicConstraints', cA: true, pathLenConstraint: template.ca.pathLength, critical: true });
    extensions.push({ name: 'keyUsage', keyCertSign: true, cRLSign: true, digitalSignature: true, critical: true });
  } else {
    extensions.push({ name: 'basicConstraints', cA: false, critical: true });
    const rsa = template.publicKey.asymmetricKeyType === 'rsa';
    extensions.push({ name: 'keyUsage', digitalSignature: true, keyEncipherment: rsa, critical: true });
    extensions.push({ name: 'extKeyUsage', serverAuth: true, clientAuth: true });
  }
  extensions.push({ id: '2.5.29.14', value: asn1.create(asn1.Class.UNIVERSAL, asn1.Type.OCTETSTRING, false, subjectKeyId.toString('binary')) });
  if (issuer.certificate) extensions.push({ name: 'authorityKeyIdentifier', keyIdentifier: authorityKeyId.toString('binary') });
  if (template.names && template.names.length > 0) {
    const altNames = template.names.map((name) => {
      if (isIP(name)) return { type: 7, ip: canonicalIp(name) };
      return { type: 2, value: name };
    });
    // critical when the subject is empty (RFC 5280 §4.2.1.6)
    extensions.push({ name: 'subjectAltName', altNames, critical: subject.length === 0 });
  }
  cert.setExtensions(extensions);

  const { oid, hash } = signatureAlgorithmOf(issuer.privateKey);
  const algorithm = () => asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, [
    asn1.create(asn1.Class.UNIVERSAL, asn1.Type.OID, false, asn1.oidToDer(oid).getBytes()),
    // RSA PKCS#1 v1.5 signatures carry NULL parameters; ECDSA ones carry none (RFC 5758 §3.2).
    ...(issuer.privateKey.asymmetricKeyType === 'rsa' ? [asn1.create(asn1.Class.UNIVERSAL, asn1.Type.NULL, false, '')] : []),
  ]);
  cert.siginfo.algorithmOid = oid; // forge writes NULL parameters here; replaced below
  const tbs = (forge.pki as ForgePki).getTBSCertificate(cert);
  // TBSCertificate: [0] version, serial, signature, issuer, validity, subject, subjectPublicKeyInfo, [3] extensions
  const value = tbs.value as forge.asn1.Asn1[];
  value[2] = algorithm();
  if (issuer.certificate) value[3] = subjectNameOf(issuer.certificate);
  value[6] = spki;
  const tbsDer = Buffer.from(asn1.toDer(tbs).getBytes(), 'binary');
  const signature = sign(hash, tbsDer, issuer.privateKey);
  const certificate = asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, [
    tbs,
    algorithm(),
    asn1.create(asn1.Class.UNIVERSAL, asn1.Type.BITSTRING, false, '\0' + signature.toString('binary')),
  ]);
  const der = Buffer.from(asn1.toDer(certificate).getBytes(), 'binary');
  return `-----BEGIN CERTIFICATE-----\n${der.toString('base64').replace(/.{64}/g, '$&\n').replace(/\n?$/, '\n')}-----END CERTIFICATE-----\n`;
}

/** forge's typings omit `getTBSCertificate`, which it exports. */
type ForgePki = typeof forge.pki & { getTBSCertificate(cert: forge.pki.Certificate): forge.asn1.Asn1 };
/** DER tag of UTF8String: names are encoded as UTF8String (RFC 5280 §4.1.2.4), not forge's PrintableString. */
const UTF8_STRING = forge.asn1.Type.UTF8 as unknown as forge.asn1.Class;

/** True for a DNS name (optionally one leading `*.` label) or an IP literal. */
function isIssuableName(name: string): boolean {
  if (name.length === 0 || name.length > 253) return false;
  if (isIP(name) !== 0) return true;
  return /^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?$/.test(name);
}

function issueIntermediate(options: Required<LocalCAOptions>, key: KeyObject, root: Signer): string {
  return signCertificate({
    subject: { commonName: `${options.name} - ECC Intermediate`, organization: options.name },
    publicKey: createPublicKey(key),
    notBefore: new Date(Date.now() - 60_000),
    notAfter: new Date(Math.min(Date.now() + options.intermediateLifetime, root.certificate ? Date.parse(root.certificate.validTo) : Infinity)),
    ca: { pathLength: 0 },
  }, root);
}

function renewAtOf(certificate: X509Certificate | Certificate, renewWindow: number): number {
  const notBefore = certificate instanceof X509Certificate ? Date.parse(certificate.validFrom) : certificate.notBefore.getTime();
  const notAfter = certificate instanceof X509Certificate ? Date.parse(certificate.validTo) : certificate.notAfter.getTime();
  return notAfter - (notAfter - notBefore) * renewWindow;
}

/** Load the PEM key at `storageKey`, or create a P-256 key and store it write-if-absent (0600). */
async function loadOrCreateKey(storage: Storage, storageKey: string): Promise<KeyObject> {
  const existing = await storage.load(storageKey);
  if (existing !== undefined) return createPrivateKey(existing);
  const { privateKey } = await generateKeyPairAsync('ec', { namedCurve: 'P-256' });
  const pem = privateKey.export({ type: 'pkcs8', format: 'pem' }) as string;
  if (await storeIfAbsent(storage, storageKey, pem)) return privateKey;
  const winner = await storage.load(storageKey);
  if (winner === undefined) throw new Error(`local CA: ${storageKey} vanished while it was being created`);
  return createPrivateKey(winner);
}

/** Load the certificate at `storageKey` when it matches `key`, else make one and store it. */
async function loadOrCreateCertificate(storage: Storage, storageKey: string, key: KeyObject, make: () => string): Promise<X509Certificate> {
  const existing = await storage.load(storageKey);
  if (existing !== undefined) {
    const certificate = new X509Certificate(existing);
    if (certificate.checkPrivateKey(key)) return certificate;
  }
  // Written if absent, so processes racing here all load the winner's certificate. (Any
  // certificate made for this key would be equivalent anyway: same subject, same key.)
  if (existing === undefined && !(await storeIfAbsent(storage, storageKey, make(), 0o644))) {
    const winner = await storage.load(storageKey);
    const certificate = winner === undefined ? undefined : new X509Certificate(winner);
    if (certificate?.checkPrivateKey(key)) return certificate;
  }
  if (existing !== undefined) await storage.store(storageKey, make()); // stale: made for another key
  const stored = await storage.load(storageKey);
  const certificate = new X509Certificate(stored ?? make());
  if (!certificate.checkPrivateKey(key)) throw new Error(`local CA: ${storageKey} does not match its key; remove both files to create a new CA`);
  return certificate;
}

/**
 * Store a value only when the key is absent; true when this call wrote it. `mode` 0600 marks a
 * secret. Atomic across processes with {@link Storage.storeExclusive} (FileStorage has it); a
 * backend without it gets load-then-store, which two processes can race.
 */
async function storeIfAbsent(storage: Storage, storageKey: string, value: string, mode = 0o600): Promise<boolean> {
  const secret = mode === 0o600;
  if (storage.storeExclusive) return storage.storeExclusive(storageKey, value, { secret });
  if ((await storage.load(storageKey)) !== undefined) return false;
  await storage.store(storageKey, value, { secret });
  return true;
}

function randomSerial(): string {
  const bytes = randomBytes(16);
  bytes[0] = (bytes[0]! & 0x7f) | 0x01; // positive and no leading zero byte (DER INTEGER)
  return bytes.toString('hex');
}

/** RFC 5280 §4.2.1.2 method (1): SHA-1 of the subjectPublicKey BIT STRING. */
function keyIdentifier(spkiDer: Buffer): Buffer {
  const spki = forge.asn1.fromDer(spkiDer.toString('binary'));
  const bits = (spki.value as forge.asn1.Asn1[])[1]!.value as string;
  return createHash('sha1').update(Buffer.from(bits, 'binary').subarray(1)).digest();
}

function tbsOf(certificate: X509Certificate): forge.asn1.Asn1[] {
  const parsed = forge.asn1.fromDer(certificate.raw.toString('binary'));
  return ((parsed.value as forge.asn1.Asn1[])[0]!.value as forge.asn1.Asn1[]);
}

/** The subject Name of a certificate, as DER, to use byte-for-byte as a child's issuer. */
function subjectNameOf(certificate: X509Certificate): forge.asn1.Asn1 {
  const tbs = tbsOf(certificate);
  const offset = tbs[0]!.tagClass === forge.asn1.Class.CONTEXT_SPECIFIC ? 1 : 0;
  return tbs[4 + offset]!;
}

/** The subjectKeyIdentifier extension's value, when the certificate has one. */
function subjectKeyIdentifierOf(certificate: X509Certificate): Buffer | undefined {
  const tbs = tbsOf(certificate);
  const extensions = tbs.find((node) => node.tagClass === forge.asn1.Class.CONTEXT_SPECIFIC && node.type === 3);
  if (!extensions) return undefined;
  for (const extension of (extensions.value as forge.asn1.Asn1[])[0]!.value as forge.asn1.Asn1[]) {
    const parts = extension.value as forge.asn1.Asn1[];
    if (forge.asn1.derToOid(parts[0]!.value as string) !== '2.5.29.14') continue;
    const inner = forge.asn1.fromDer(parts[parts.length - 1]!.value as string);
    return Buffer.from(inner.value as string, 'binary');
  }
  return undefined;
}

function signatureAlgorithmOf(key: KeyObject): { oid: string; hash: string } {
  if (key.asymmetricKeyType === 'rsa') return { oid: '1.2.840.113549.1.1.11', hash: 'sha256' };
  if (key.asymmetricKeyType === 'ec') {
    const curve = key.asymmetricKeyDetails?.namedCurve;
    if (curve === 'secp384r1') return { oid: '1.2.840.10045.4.3.3', hash: 'sha384' };
    return { oid: '1.2.840.10045.4.3.2', hash: 'sha256' };
  }
  throw new Error(`cannot sign certificates with a ${key.asymmetricKeyType ?? 'unknown'} key; use EC or RSA`);
}
