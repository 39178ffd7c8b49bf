/**
 * The DER shortcut of certificate loading (src/tls/der.ts) must give what OpenSSL gives: same names,
 * validity and issuer, same verdict on whether a key belongs to the certificate.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { X509Certificate, generateKeyPairSync } from 'node:crypto';
import { leafFields, pemBody, privateKeyPublicFields, samePublicKey } from '../src/tls/der.js';
import { certificateFromPem, issuerNameOf, namesOf, CertificateError } from '../src/tls/pem.js';
import { makeCA, makeCertificate } from './helpers/certs.js';

function openSslView(cert: string) {
  const x509 = new X509Certificate(cert);
  return { names: namesOf(x509), notBefore: new Date(x509.validFrom), notAfter: new Date(x509.validTo), issuer: issuerNameOf(x509) };
}

test('leaf fields read from DER equal those OpenSSL reads (EC and RSA, DNS and IP SANs, CN only, CA-issued)', () => {
  const ca = makeCA({ name: "Let's Test CA (E1)" });
  const cases = [
    makeCertificate({ names: ['Site.Test', '*.site.test', '127.0.0.1', '::1', '2001:db8::42', 'fe80:0:0:1::'] }),
    makeCertificate({ names: ['rsa.test'], keyType: 'rsa' }),
    makeCertificate({ names: ['issued.test', '10.0.0.1'], issuer: ca }),
    makeCertificate({ names: [], commonName: 'cn-only.test' }),
    makeCertificate({ names: ['dup.test', 'DUP.test'], notAfter: new Date(Date.UTC(2061, 0, 2, 3, 4, 5)) }),
  ];
  for (const { cert, key } of cases) {
    const fields = leafFields(pemBody(cert, 'CERTIFICATE')!);
    assert.ok(fields, cert);
    const { publicKey, ...rest } = fields;
    assert.deepEqual(rest, openSslView(cert));
    assert.ok(publicKey && samePublicKey(publicKey, privateKeyPublicFields(key)!));
    assert.deepEqual(certificateFromPem(cert, key, 'static'), { ...openSslView(cert), cert: cert.trim() + '\n', key, source: 'static', names: openSslView(cert).names });
  }
});

test('a key of another certificate, of another type or in other encodings: same verdict as OpenSSL', () => {
  const ec = makeCertificate({ names: ['a.test'] });
  const ec2 = makeCertificate({ names: ['b.test'] });
  const rsa = makeCertificate({ names: ['c.test'], keyType: 'rsa' });
  for (const [cert, key] of [[ec.cert, ec2.key], [ec.cert, rsa.key], [rsa.cert, ec.key]] as const) {
    assert.throws(() => certificateFromPem(cert, key, 'static', { certFile: 'x.crt', keyFile: 'y.key' }), (error: unknown) => {
      assert.ok(error instanceof CertificateError);
      assert.equal(error.code, 'GH_TLS_KEY_MISMATCH');
      assert.match(error.message, /y\.key is not the private key of x\.crt/);
      return true;
    });
  }
  // SEC 1 and PKCS#1 encodings of the same keys are read too.
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-384' });
  const sec1 = privateKey.export({ type: 'sec1', format: 'pem' }) as string;
  const fromSec1 = privateKeyPublicFields(sec1);
  const pkcs8 = privateKeyPublicFields(privateKey.export({ type: 'pkcs8', format: 'pem' }) as string);
  assert.ok(fromSec1 && pkcs8 && samePublicKey(fromSec1, pkcs8));
  assert.ok(publicKey);
  const rsaKey = generateKeyPairSync('rsa', { modulusLength: 1024 }).privateKey;
  const pkcs1 = privateKeyPublicFields(rsaKey.export({ type: 'pkcs1', format: 'pem' }) as string);
  const rsa8 = privateKeyPublicFields(rsaKey.export({ type: 'pkcs8', format: 'pem' }) as string);
  assert.ok(pkcs1 && rsa8 && samePublicKey(pkcs1, rsa8));
  // Keys the shortcut does not read (Ed25519) answer undefined: OpenSSL decides.
  assert.equal(privateKeyPublicFields(generateKeyPairSync('ed25519').privateKey.export({ type: 'pkcs8', format: 'pem' }) as string), undefined);
});

test('damaged input goes to OpenSSL and keeps its error codes', () => {
  const site = makeCertificate({ names: ['d.test'] });
  const truncated = site.cert.replace(/-----END CERTIFICATE-----/, '').slice(0, -40) + '\n-----END CERTIFICATE-----\n';
  assert.throws(() => certificateFromPem(truncated, site.key, 'static'), { code: 'GH_TLS_CERT_INVALID' });
  assert.throws(() => certificateFromPem(site.cert, '-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n', 'static'), { code: 'GH_TLS_KEY_INVALID' });
  assert.throws(() => certificateFromPem(site.cert + '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n', site.key, 'static'), { code: 'GH_TLS_CERT_INVALID' });
  assert.equal(leafFields(Buffer.from('3003020100', 'hex')), undefined);
});
