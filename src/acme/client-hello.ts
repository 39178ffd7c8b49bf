/**
 * Reading a TLS ClientHello from the first bytes of a TCP connection, before any TLS library sees
 * them: the server name (SNI, RFC 6066 §3) and the offered ALPN protocols (RFC 7301 §3.1). The
 * TLS-ALPN-01 responder needs the ALPN list to pick a certificate, and Node's SNICallback runs
 * before ALPN is known.
 *
 * The ClientHello may be split over several TLS records (RFC 8446 §5.1: handshake messages may be
 * fragmented across records) and over several TCP segments; {@link parseClientHello} reassembles
 * the handshake message from consecutive handshake records and says `incomplete` until it has it.
 */

/** What {@link parseClientHello} found. */
export type ClientHelloResult =
  /** More bytes are needed. */
  | { readonly status: 'incomplete' }
  /** Not a TLS ClientHello (plain HTTP, SSLv2, garbage, too large). */
  | { readonly status: 'invalid'; readonly reason: string }
  | {
    readonly status: 'complete';
    /** SNI host name, lowercased; undefined when absent. */
    readonly serverName: string | undefined;
    /** ALPN protocol names in the client's order; empty when the extension is absent. */
    readonly alpnProtocols: readonly string[];
  };

/** Largest ClientHello accepted (post-quantum key shares make them ~2 KiB; 64 KiB is generous). */
export const MAX_CLIENT_HELLO_BYTES = 64 * 1024;

const RECORD_HANDSHAKE = 22;
const HANDSHAKE_CLIENT_HELLO = 1;
const EXTENSION_SERVER_NAME = 0;
const EXTENSION_ALPN = 16;

/**
 * Parse the ClientHello at the start of `data` (raw bytes from the socket, possibly partial).
 * Never throws; bytes after the ClientHello are ignored.
 */
export function parseClientHello(data: Buffer): ClientHelloResult {
  // Reassemble the handshake layer from consecutive handshake records.
  const fragments: Buffer[] = [];
  let handshakeBytes = 0;
  let offset = 0;
  let needed = -1; // handshake message length incl. its 4-byte header, once known
  while (true) {
    if (data.length < offset + 5) return { status: 'incomplete' };
    const type = data[offset]!;
    const major = data[offset + 1]!;
    const length = data.readUInt16BE(offset + 3);
    if (type !== RECORD_HANDSHAKE) return { status: 'invalid', reason: offset === 0 ? 'not a TLS handshake record' : 'handshake interrupted by another record type' };
    if (major !== 3) return { status: 'invalid', reason: 'not TLS (record version)' };
    if (length === 0 || length > 16384 + 2048) return { status: 'invalid', reason: 'bad TLS record length' };
    if (data.length < offset + 5 + length) return { status: 'incomplete' };
    fragments.push(data.subarray(offset + 5, offset + 5 + length));
    handshakeBytes += length;
    offset += 5 + length;
    if (needed < 0 && handshakeBytes >= 4) {
      const head = fragments.length === 1 ? fragments[0]! : Buffer.concat(fragments);
      if (head[0] !== HANDSHAKE_CLIENT_HELLO) return { status: 'invalid', reason: 'first handshake message is not a ClientHello' };
      needed = 4 + head.readUIntBE(1, 3);
      if (needed > MAX_CLIENT_HELLO_BYTES) return { status: 'invalid', reason: 'ClientHello too large' };
    }
    if (needed >= 0 && handshakeBytes >= needed) break;
    if (offset > MAX_CLIENT_HELLO_BYTES + 5 * 8) return { status: 'invalid', reason: 'ClientHello too large' };
  }
  const message = (fragments.length === 1 ? fragments[0]! : Buffer.concat(fragments)).subarray(4, needed);
  return readClientHelloBody(message);
}

function readClientHelloBody(body: Buffer): ClientHelloResult {
  const invalid = (reason: string): ClientHelloResult => ({ status: 'invalid', reason });
  let p = 2 + 32; // legacy_version, random
  if (body.length < p + 1) return invalid('truncated ClientHello');
  p += 1 + body[p]!; // legacy_session_id
  if (body.length < p + 2) return invalid('truncated ClientHello');
  p += 2 + body.readUInt16BE(p); // cipher_suites
  if (body.length < p + 1) return invalid('truncated ClientHello');
  p += 1 + body[p]!; // legacy_compression_methods
  if (p > body.length) return invalid('truncated ClientHello');
  let serverName: string | undefined;
  let alpnProtocols: string[] = [];
  if (p === body.length) return { status: 'complete', serverName, alpnProtocols }; // no extensions
  if (body.length < p + 2) return invalid('truncated extensions');
  const end = p + 2 + body.readUInt16BE(p);
  if (end > body.length) return invalid('truncated extensions');
  p += 2;
  while (p + 4 <= end) {
    const type = body.readUInt16BE(p);
    const length = body.readUInt16BE(p + 2);
    const start = p + 4;
    p = start + length;
    if (p > end) return invalid('truncated extension');
    const extension = body.subarray(start, p);
    if (type === EXTENSION_SERVER_NAME) serverName = readServerName(extension);
    else if (type === EXTENSION_ALPN) alpnProtocols = readAlpn(extension);
  }
  return { status: 'complete', serverName, alpnProtocols };
}

/** server_name extension: ServerNameList of (name_type, opaque name); host_name is type 0. */
function readServerName(extension: Buffer): string | undefined {
  if (extension.length < 2) return undefined;
  const end = Math.min(extension.length, 2 + extension.readUInt16BE(0));
  let p = 2;
  while (p + 3 <= end) {
    const nameType = extension[p]!;
    const length = extension.readUInt16BE(p + 1);
    const start = p + 3;
    p = start + length;
    if (p > end) return undefined;
    if (nameType === 0) return extension.toString('ascii', start, p).toLowerCase();
  }
  return undefined;
}

/** application_layer_protocol_negotiation: ProtocolNameList of 1-byte-length names. */
function readAlpn(extension: Buffer): string[] {
  if (extension.length < 2) return [];
  const end = Math.min(extension.length, 2 + extension.readUInt16BE(0));
  const names: string[] = [];
  let p = 2;
  while (p + 1 <= end) {
    const length = extension[p]!;
    const start = p + 1;
    p = start + length;
    if (p > end || length === 0) break;
    names.push(extension.toString('latin1', start, p));
  }
  return names;
}
