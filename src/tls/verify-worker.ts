/**
 * Worker process of the static certificate loader (`loadStaticCertificates` in tls/certificates.ts):
 * runs {@link verifyPemPair} (OpenSSL: `X509Certificate`, `createPrivateKey`, `checkPrivateKey`)
 * for batches of pairs, so a first start with thousands of certificates uses every core.
 *
 * A process, not a worker thread: with the OpenSSL 3.0 of Node 20, two threads parsing keys and
 * certificates in one process contend on OpenSSL's shared locks and finish *later* than one thread
 * alone (measured: 2 000 pairs, 1.2 s in one thread, 1.6 s in two worker threads, 0.61 s in two
 * processes).
 *
 * Protocol (IPC messages, `serialization: 'advanced'`): in, {@link VerifyBatch}; out, {@link VerifyBatchResult} with
 * one result per pair, in order. A failed check comes back as the {@link CertificateError}'s code,
 * message and file; the loader rebuilds the error, so it reads exactly as an in-thread check.
 */
import { CertificateError, verifyPemPair } from './pem.js';

/** One pair to check: the PEM texts and the files they were read from (named in errors). */
export interface VerifyJob {
  readonly certPem: string;
  readonly keyPem: string;
  readonly certFile: string;
  readonly keyFile: string;
}

/** A batch sent to a worker. */
export interface VerifyBatch {
  readonly id: number;
  readonly jobs: readonly VerifyJob[];
}

/** The result of one pair: the leaf's facts (dates in ms since the epoch), or the error. */
export type VerifyResult =
  | { readonly names: readonly string[]; readonly notBefore: number; readonly notAfter: number; readonly issuer: string }
  | { readonly error: { readonly code: string; readonly message: string; readonly file: string | undefined } };

/** A worker's answer to a {@link VerifyBatch}. */
export interface VerifyBatchResult {
  readonly id: number;
  readonly results: readonly VerifyResult[];
}

// The chain blocks this worker parsed already (an intermediate shared by many files is parsed once).
const parsedChain = new Set<string>();

process.on('disconnect', () => process.exit(0)); // the loader is done (or gone)
process.on('message', (batch: VerifyBatch) => {
  const results = batch.jobs.map((job): VerifyResult => {
    try {
      const facts = verifyPemPair(job.certPem, job.keyPem, { certFile: job.certFile, keyFile: job.keyFile }, parsedChain);
      return { names: facts.names, notBefore: facts.notBefore.getTime(), notAfter: facts.notAfter.getTime(), issuer: facts.issuer };
    } catch (error) {
      const failure = error instanceof CertificateError
        ? { code: error.code, message: error.message, file: error.file }
        : { code: 'GH_TLS_CERT_INVALID', message: `GH_TLS_CERT_INVALID: ${job.certFile}: ${(error as Error).message}`, file: job.certFile };
      return { error: failure };
    }
  });
  process.send!({ id: batch.id, results } satisfies VerifyBatchResult);
});
