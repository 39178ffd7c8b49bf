/**
 * HTTP field syntax (RFC 9110 §5.1, §5.5, §5.6.2) as regexes, in one place: the upstream response
 * parser (`upstream/response-parser.ts`) and the header translation (`proxy/headers.ts`) test
 * names and values with these, so what one accepts the other cannot refuse. Here, below both in
 * the import order (proxy → upstream).
 */

/** RFC 9110 §5.6.2 tchar, as a regex character class (without anchors). */
export const TCHAR = "[!#$%&'*+\\-.^_`|~0-9A-Za-z]";

/** The bytes a field value may hold: HTAB, SP, VCHAR and obs-text (0x80–0xFF), RFC 9110 §5.5. */
const FIELD_BYTES = '\\t\\x20-\\x7e\\x80-\\xff';

/** One byte of a field value (HTAB, SP, VCHAR or obs-text), as a regex character class (without anchors). */
export const FIELD_CHAR = `[${FIELD_BYTES}]`;

/** RFC 9110 §5.6.2 token: a valid field name. */
export const TOKEN = new RegExp(`^${TCHAR}+$`);

/**
 * A character no field value may hold: a control other than HTAB, or DEL. Node's http and http2
 * modules throw on these when a field is set, so a value that has one is never passed on.
 */
export const INVALID_VALUE_CHAR = new RegExp(`[^${FIELD_BYTES}]`);
