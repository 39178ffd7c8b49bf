/**
 * The certificate plug point. A {@link CertificateSource} obtains certificates for names
 * (Caddy calls it an Issuer); the {@link Certificate} is what the SNI lookup serves.
 * `tls/certificates.ts` (the store and SNI callback), `tls/local-ca.ts` (internal issuer) and
 * `acme/` (ACME issuer) all speak these types; none of them knows about routing.
 */

/** A certificate chain and its private key, with what the SNI lookup needs to know. */
export interface Certificate {
  /** PEM chain, leaf first. */
  readonly cert: string;
  /** PEM private key of the leaf. */
  readonly key: string;
  /** Names the leaf covers (DNS SANs lowercased, `*.example.com` wildcards, IP SANs as text). */
  readonly names: readonly string[];
  readonly notBefore: Date;
  readonly notAfter: Date;
  /** Issuer's common name or organisation, for logs and /status. */
  readonly issuer: string;
  /** Which source produced it: `static`, `internal`, `acme`, or a plug-in's name. */
  readonly source: string;
}

/** Something that can produce a certificate for a name (an issuer). */
export interface CertificateSource {
  /** Registry name: `internal`, `acme`, ... */
  readonly name: string;
  /**
   * Produce a certificate covering `serverName`, or undefined when this source will not.
   * Called by the store when it has no usable certificate for the name. Concurrent calls for the
   * same name should share one piece of work. A rejection fails that handshake only.
   */
  obtain(serverName: string): Promise<Certificate | undefined>;
}
