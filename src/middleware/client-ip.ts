/**
 * The client's IP address: the TCP peer, or, when the peer is a trusted proxy (`trusted_proxies`),
 * the address its `X-Forwarded-For` names. The header is read right to left and trusted hops are
 * skipped, so a client cannot choose its address by sending its own `X-Forwarded-For`: only the
 * entries our own proxies appended are believed.
 */
import { BlockList, isIP } from 'node:net';
import type { ClientRequest } from '../proxy/forward.js';

/** Resolves client addresses for one `trusted_proxies` list. */
export class ClientAddress {
  readonly #trusted: BlockList | undefined;

  /** @param trustedProxies IPs or CIDR blocks (`10.0.0.0/8`, `::1`), validated by the config schema. */
  constructor(trustedProxies: readonly string[]) {
    if (trustedProxies.length === 0) {
      this.#trusted = undefined;
      return;
    }
    const list = new BlockList();
    for (const entry of trustedProxies) {
      const [address, bits] = entry.split('/') as [string, string | undefined];
      const type = isIP(address) === 6 ? 'ipv6' : 'ipv4';
      if (bits === undefined) list.addAddress(address, type);
      else list.addSubnet(address, Number(bits), type);
    }
    this.#trusted = list;
  }

  /** The client's address for `req` (IPv4-mapped IPv6 addresses are given as IPv4). */
  of(req: ClientRequest): string {
    const peer = unmapIPv4(req.socket?.remoteAddress ?? '');
    if (this.#trusted === undefined || !this.isTrusted(peer)) return peer;
    const header = req.headers['x-forwarded-for'];
    if (typeof header !== 'string' || header === '') return peer;
    let client = peer;
    const hops = header.split(',');
    for (let i = hops.length - 1; i >= 0; i--) {
      const hop = unmapIPv4(hops[i]!.trim());
      if (isIP(hop) === 0) break; // garbage: stop at the last address we could vouch for
      client = hop;
      if (!this.isTrusted(hop)) break;
    }
    return client;
  }

  /** Whether `address` is in `trusted_proxies`. */
  isTrusted(address: string): boolean {
    const trusted = this.#trusted;
    if (trusted === undefined) return false;
    const family = isIP(address);
    return family !== 0 && trusted.check(address, family === 6 ? 'ipv6' : 'ipv4');
  }
}

/** `::ffff:10.0.0.1` → `10.0.0.1` (what a dual-stack socket reports for IPv4 peers). */
export function unmapIPv4(address: string): string {
  return address.startsWith('::ffff:') && address.includes('.') ? address.slice(7) : address;
}
