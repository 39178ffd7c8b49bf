/**
 * The ACME account and the issuer built from config: directory names, terms of service, external
 * account binding against a Pebble that requires it, one account key per directory.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { directoryFolder, resolveDirectoryUrl } from '../src/acme/account.js';
import { Http01Responder, TlsAlpnResponder } from '../src/acme/challenges.js';
import { AcmeError } from '../src/acme/errors.js';
import { AcmeIssuer } from '../src/acme/manager.js';
import { configSchema } from '../src/config/schema.js';
import { FileStorage } from '../src/tls/storage.js';
import { startChallengeListeners, verifyServes, type ChallengeListeners } from './helpers/acme.js';
import { startPebble, type Pebble } from './helpers/pebble.js';

const EAB_KID = 'kid-1';
const EAB_KEY = 'zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W';

let pebble: Pebble;
let listeners: ChallengeListeners;
let folder: string;
const http01 = new Http01Responder();
const tlsAlpn = new TlsAlpnResponder();
const issuers: AcmeIssuer[] = [];

before(async () => {
  listeners = await startChallengeListeners(0, 0, http01, tlsAlpn);
  const { httpPort, tlsPort } = listeners;
  folder = await mkdtemp(join(tmpdir(), 'gatehouse-acme-account-'));
  pebble = await startPebble({ httpPort, tlsPort, externalAccountMACKeys: { [EAB_KID]: EAB_KEY } });
});

after(async () => {
  await Promise.allSettled(issuers.map((issuer) => issuer.close()));
  await listeners?.close();
  await pebble?.close();
  if (folder) await rm(folder, { recursive: true, force: true });
});

/** The `tls` section as the config loader produces it. */
function tlsConfig(acme: Record<string, unknown>) {
  return configSchema.parse({ tls: { acme } }).tls;
}

describe('ACME account and configuration', () => {
  it('maps directory names, refuses plain http, names storage folders by host and port', () => {
    assert.equal(resolveDirectoryUrl('letsencrypt'), 'https://acme-v02.api.letsencrypt.org/directory');
    assert.equal(resolveDirectoryUrl('letsencrypt-staging'), 'https://acme-staging-v02.api.letsencrypt.org/directory');
    assert.throws(() => resolveDirectoryUrl('http://127.0.0.1:14000/dir'), (error: AcmeError) => error.code === 'GH_ACME_CONFIG');
    assert.throws(() => resolveDirectoryUrl('zerossl'), (error: AcmeError) => error.code === 'GH_ACME_CONFIG');
    assert.equal(directoryFolder('https://acme-v02.api.letsencrypt.org/directory'), 'acme-v02.api.letsencrypt.org');
    assert.equal(directoryFolder('https://127.0.0.1:14000/dir'), '127.0.0.1-14000');
    assert.equal(directoryFolder('https://[::1]:14000/dir'), '__1-14000');
  });

  it('refuses to start without agree_tos, and names an unreadable ca_bundle', async () => {
    const storage = new FileStorage(join(folder, 'refused'));
    await assert.rejects(AcmeIssuer.fromConfig(tlsConfig({ directory: pebble.directoryUrl }), { storage }),
      (error: AcmeError) => error.code === 'GH_ACME_TOS_NOT_AGREED' && /agree_tos/.test(error.message));
    await assert.rejects(AcmeIssuer.fromConfig(tlsConfig({ directory: pebble.directoryUrl, agree_tos: true, ca_bundle: join(folder, 'missing.pem') }), { storage }),
      (error: AcmeError) => error.code === 'GH_ACME_CONFIG' && /missing\.pem/.test(error.message));
  });

  it('a CA that requires external account binding refuses an account without it', async () => {
    const acme = await AcmeIssuer.fromConfig(tlsConfig({ directory: pebble.directoryUrl, agree_tos: true, ca_bundle: pebble.caFile, challenges: ['http-01'] }), {
      storage: new FileStorage(join(folder, 'no-eab')), http01, tlsAlpn,
    });
    issuers.push(acme);
    await acme.manage(['noeab.example.com']);
    await assert.rejects(acme.obtain('noeab.example.com'), (error: AcmeError) => error.code === 'GH_ACME_PROBLEM' && error.is('externalAccountRequired'));
    assert.equal(acme.orderCount, 0);
  });

  it('issues with EAB from config; a second instance reuses the account key and account', async () => {
    const config = tlsConfig({
      directory: pebble.directoryUrl, agree_tos: true, ca_bundle: pebble.caFile, email: 'ops@example.com',
      challenges: ['http-01'], eab: { kid: EAB_KID, hmac_key: EAB_KEY },
    });
    const storage = new FileStorage(join(folder, 'eab'));
    const acme = await AcmeIssuer.fromConfig(config, { storage, http01, tlsAlpn });
    issuers.push(acme);
    await acme.manage(['eab.example.com']);
    const cert = (await acme.obtain('eab.example.com'))!;
    await verifyServes(cert, await pebble.issuingRoot(), 'eab.example.com');

    const folderName = directoryFolder(pebble.directoryUrl);
    const key = await storage.load(`acme/${folderName}/account.key`);
    const account = JSON.parse((await storage.load(`acme/${folderName}/account.json`))!.toString());
    assert.match(account.url, /^https:\/\/127\.0\.0\.1:\d+\/my-account\//);
    assert.deepEqual(account.contact, ['mailto:ops@example.com']);

    const accountsBefore = (pebble.logs().match(/There are now \d+ accounts/g) ?? []).length;
    const again = await AcmeIssuer.fromConfig(config, { storage, http01, tlsAlpn });
    issuers.push(again);
    await again.manage(['eab2.example.com']);
    assert.ok(await again.obtain('eab2.example.com'));
    assert.deepEqual(await storage.load(`acme/${folderName}/account.key`), key, 'the account key is generated once');
    const accountAgain = JSON.parse((await storage.load(`acme/${folderName}/account.json`))!.toString());
    assert.equal(accountAgain.url, account.url, 'newAccount found the existing account');
    assert.equal((pebble.logs().match(/There are now \d+ accounts/g) ?? []).length, accountsBefore, 'no new account was created');
  });
});
