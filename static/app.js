// downloader page: lists the files by folder and downloads them with progress, cancel and
// resume.
//
// Sections: 1. Settings  2. Header values (pure)  3. Files, names, folders (pure)
// 4. Formatting (pure)  5. SHA-256 (pure)  6. Transfer with resume  7. Sinks
// 8. Download state (pure)  9. File rows: view and controller
// 10. Folders, filter, listing and start-up.
// The pure functions and DownloadState are exported so tests/test_page.py can check them
// in the real browser.
//
// Settings, read once by main():
//   <meta name="downloader-blob-limit">  bytes; the server writes its configured value.
//   <meta name="downloader-zip">         the server writes "on" when it serves /zip: each
//                                        folder then gets a ZIP link. Anything else: off.
//   ?retry-delays=500,1000,2000          a query parameter for tests: the waits (ms) before
//                                        retry 1, 2, ... after a network error, instead of
//                                        RETRY_DELAYS_MS. Bad values are ignored.
//
// Names, one rule (fileEntry, saveAs): a file is shown and saved under its listing entry's
// name, as its listing entry's content_type. The response's Content-Disposition (RFC 6266,
// 8187) and Content-Type, then the URL, only stand in for what an entry lacks. Rows show
// names; the folder a row sits in shows the rest of its path.
//
// How a file is saved (chooseSaveMethod):
//   "blob"   size known and at most the blob limit: fetch + reader, chunks in memory, one
//            Blob, an a[download] click. No dialog, whatever the browser offers.
//   "fs"     larger (or size unknown) and showSaveFilePicker exists (Chrome, Edge): the user
//            picks a file and the chunks stream straight into it.
//   "native" larger and no picker: a plain <a href download>; the browser's own downloader
//            writes to disk and shows its own progress.
// "fs" and "blob" share transfer(), which continues after a dropped connection with
// Range: bytes=N- and If-Range (RFC 9110 §14.2, §13.1.5), so the saved file stays exact.
// A folder's ZIP is always a plain link: the server builds it while it sends it.
//
// Verifying: "fs" and "blob" hash the bytes as they arrive (Sha256: WebCrypto has no
// incremental digest, and a whole-file digest would need the whole file in memory). The
// state survives a resume, so a resumed file is verified whole. The expected digest is the
// response's Repr-Digest (RFC 9530), which belongs to the very version sent (If-Range keeps
// a resume on it); never the listing's, which may be of an older version. A mismatch saves
// nothing. "native" can't see the bytes: the row shows the digest to compare instead.

// ===========================================================================
// 1. Settings
// ===========================================================================

export const DEFAULT_BLOB_LIMIT = 200 * 1024 * 1024;
// Waits before retry 1..5 after a network error; after the fifth failure in a row we give up.
export const RETRY_DELAYS_MS = [500, 1000, 2000, 4000, 8000];
const MAX_RETRY_DELAY_MS = 60_000; // ?retry-delays: longest wait accepted
const MAX_RETRIES = 10; // ?retry-delays: most waits accepted
const LISTING_PAGE_SIZE = 200;
const LISTING_MAX_PAGES = 10_000; // a server that never ends the cursor chain
const UI_INTERVAL_MS = 100; // progress text redraws at most this often
const SPEED_WINDOW_MS = 3000; // speed = bytes over the last few seconds
const REVOKE_DELAY_MS = 10_000; // keep the blob URL until the browser has taken it
const MAX_DETAIL_CHARS = 300; // of a server's error detail shown in a row

/** The blob limit from <meta name="downloader-blob-limit">, or DEFAULT_BLOB_LIMIT. */
export function readBlobLimit(doc = document) {
  const raw = doc.querySelector('meta[name="downloader-blob-limit"]')?.content?.trim() ?? "";
  const n = Number(raw);
  return /^\d+$/.test(raw) && Number.isSafeInteger(n) ? n : DEFAULT_BLOB_LIMIT;
}

/** Whether the server serves /zip: <meta name="downloader-zip" content="on">, exactly. */
export function readZipEnabled(doc = document) {
  return doc.querySelector('meta[name="downloader-zip"]')?.getAttribute("content") === "on";
}

/** The retry waits from a query string's retry-delays=ms,ms,...; RETRY_DELAYS_MS when it
 *  is absent or not 1 to MAX_RETRIES whole numbers of at most MAX_RETRY_DELAY_MS. */
export function parseRetryDelays(search) {
  const raw = new URLSearchParams(search).get("retry-delays");
  if (raw === null) return RETRY_DELAYS_MS;
  const parts = raw.split(",");
  const valid = parts.length <= MAX_RETRIES && parts.every((p) => /^\d{1,5}$/.test(p) && Number(p) <= MAX_RETRY_DELAY_MS);
  return valid ? parts.map(Number) : RETRY_DELAYS_MS;
}

// ===========================================================================
// 2. Header values (pure): Content-Disposition, Content-Range, If-Range, Repr-Digest
// ===========================================================================

/** Parse a Content-Disposition value (RFC 6266 §4.1) into {type, params}.
 *  Parameter names are lower-cased; the first of a repeated name wins; quoted-string
 *  values are unescaped (RFC 9110 §5.6.4). Never throws. */
export function parseContentDisposition(value) {
  const s = String(value ?? "");
  const params = new Map();
  let i = s.indexOf(";");
  const type = (i < 0 ? s : s.slice(0, i)).trim().toLowerCase();
  if (i < 0) return { type, params };
  while (i < s.length) {
    i++; // past ';'
    const eq = s.indexOf("=", i);
    const semi = s.indexOf(";", i);
    if (eq < 0 || (semi >= 0 && semi < eq)) { // a name without "=": skip it
      i = semi < 0 ? s.length : semi;
      continue;
    }
    const name = s.slice(i, eq).trim().toLowerCase();
    i = eq + 1;
    while (s[i] === " " || s[i] === "\t") i++;
    let val;
    if (s[i] === '"') {
      val = "";
      for (i++; i < s.length && s[i] !== '"'; i++) {
        if (s[i] === "\\" && i + 1 < s.length) i++; // quoted-pair
        val += s[i];
      }
      const next = s.indexOf(";", i);
      i = next < 0 ? s.length : next;
    } else {
      const next = s.indexOf(";", i);
      val = (next < 0 ? s.slice(i) : s.slice(i, next)).trim();
      i = next < 0 ? s.length : next;
    }
    if (name && !params.has(name)) params.set(name, val);
  }
  return { type, params };
}

/** Decode an RFC 8187 ext-value such as UTF-8''r%C3%A9sum%C3%A9.bin; null if invalid
 *  (bad percent escape, bytes that are not UTF-8, unknown charset). Lenient about raw
 *  characters, read by code point: one up to U+00FF is a byte, as a header read through
 *  fetch (a ByteString) carries raw UTF-8; a larger one (only from a script) stands for
 *  itself, so 😀 and %F0%9F%98%80 are the same. */
export function decodeExtValue(value) {
  const m = /^([^']*)'[^']*'(.*)$/s.exec(String(value ?? ""));
  if (!m) return null;
  const charset = m[1].trim().toLowerCase();
  if (charset !== "utf-8" && charset !== "iso-8859-1") return null;
  const bytes = [];
  const enc = new TextEncoder();
  const chars = [...m[2]]; // code points, so a surrogate pair stays one character
  for (let i = 0; i < chars.length; i++) {
    const c = chars[i];
    if (c === "%") {
      const hex = (chars[i + 1] ?? "") + (chars[i + 2] ?? "");
      if (!/^[0-9a-fA-F]{2}$/.test(hex)) return null;
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else if (c.codePointAt(0) <= 0xff) {
      bytes.push(c.codePointAt(0));
    } else if (charset === "utf-8") {
      bytes.push(...enc.encode(c));
    } else {
      return null; // not an ISO-8859-1 character
    }
  }
  const u8 = Uint8Array.from(bytes);
  if (charset === "iso-8859-1") return latin1(u8);
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(u8);
  } catch {
    return null;
  }
}

/** Bytes as ISO-8859-1 text (TextDecoder's "iso-8859-1" is windows-1252, which is not). */
function latin1(u8) {
  let s = "";
  for (const b of u8) s += String.fromCharCode(b);
  return s;
}

/** A header read through fetch is a ByteString: a server that put raw UTF-8 into
 *  filename="..." shows up as Latin-1 mojibake. Decode it back when it is valid UTF-8,
 *  as browsers do for their own downloads. */
function undoLatin1Mojibake(s) {
  if (!/[\x80-\xff]/.test(s) || /[^\x00-\xff]/.test(s)) return s;
  try {
    const bytes = Uint8Array.from(s, (c) => c.charCodeAt(0));
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    return s;
  }
}

/** Make a name safe to save: no path separators or control characters, not empty,
 *  not "." or "..". Returns null when nothing usable is left. */
export function safeFilename(name) {
  if (typeof name !== "string") return null;
  const cleaned = name.replace(/[\/\\\x00-\x1f\x7f]/g, "_").trim();
  return cleaned && cleaned !== "." && cleaned !== ".." ? cleaned : null;
}

/** The file name a Content-Disposition value asks for: filename* (RFC 8187) first,
 *  then filename="..." (quoted-string unescaped), else null. */
export function filenameFromContentDisposition(value) {
  if (!value) return null;
  const { params } = parseContentDisposition(value);
  if (params.has("filename*")) {
    const decoded = safeFilename(decodeExtValue(params.get("filename*")));
    if (decoded) return decoded;
  }
  if (params.has("filename")) return safeFilename(undoLatin1Mojibake(params.get("filename")));
  return null;
}

/** The last path segment of a URL, percent-decoded; null when there is none. */
export function filenameFromUrl(url, baseURI = document.baseURI) {
  let segment;
  try {
    segment = new URL(url, baseURI).pathname.split("/").pop();
  } catch {
    return null;
  }
  try {
    return safeFilename(decodeURIComponent(segment));
  } catch {
    return safeFilename(segment);
  }
}

/** "text/plain; charset=utf-8" -> "text/plain"; "" when it is not a media type. */
export function mediaType(value) {
  const type = String(value ?? "").split(";")[0].trim().toLowerCase();
  return /^[\w!#$&^.+-]+\/[\w!#$&^.+-]+$/.test(type) ? type : "";
}

/** Content-Range "bytes 0-4/10" -> {start: 0, end: 4, size: 10}; size null for "*";
 *  null when the value is missing or malformed (RFC 9110 §14.4). */
export function parseContentRange(value) {
  const m = /^\s*bytes\s+(\d+)-(\d+)\/(\d+|\*)\s*$/i.exec(String(value ?? ""));
  if (!m) return null;
  const start = Number(m[1]);
  const end = Number(m[2]);
  const size = m[3] === "*" ? null : Number(m[3]);
  if (end < start || (size !== null && end >= size)) return null;
  return { start, end, size };
}

/** The sha-256 of a Repr-Digest field (RFC 9530: a Structured Fields Dictionary, the
 *  digest a Byte Sequence, `sha-256=:<base64>:`) as lower-case hex; null when absent or
 *  not 32 bytes (the last sha-256 member counts). Other algorithms and parameters are
 *  ignored. */
export function parseReprDigest(value) {
  let found = null; // a key given twice: the last wins (RFC 8941 §3.2)
  for (const member of String(value ?? "").split(",")) {
    const m = /^\s*sha-256=:([A-Za-z0-9+/]*={0,2}):(;.*)?\s*$/.exec(member);
    if (m) found = m[1];
    else if (/^\s*sha-256\s*(=|;|$)/.test(member)) found = null;
  }
  if (found === null) return null;
  let bytes;
  try {
    bytes = atob(found);
  } catch {
    return null;
  }
  if (bytes.length !== 32) return null;
  return [...bytes].map((c) => c.charCodeAt(0).toString(16).padStart(2, "0")).join("");
}

/** The If-Range validator for resuming: a strong ETag, else Last-Modified, else null.
 *  RFC 9110 §13.1.5: a weak entity-tag must not be used in If-Range. */
export function ifRangeValidator(etag, lastModified) {
  if (etag && !etag.startsWith("W/")) return etag;
  return lastModified || null;
}

// ===========================================================================
// 3. Files, names, folders (pure)
// ===========================================================================

/** An item of GET api/files as the page uses it: {path, folder, name, type, size,
 *  modified, url}. name and type are the item's own (see "Names" at the top); a missing
 *  name falls back to the URL's last segment, then the path's, else null. */
export function fileEntry(item, baseURI = document.baseURI) {
  const path = String(item?.path ?? "");
  const cut = path.lastIndexOf("/");
  const fallback = `download/${path.split("/").map(encodeURIComponent).join("/")}`;
  const url = new URL(item?.url ?? fallback, baseURI).href;
  const size = Number.isSafeInteger(item?.size) && item.size >= 0 ? item.size : null;
  return {
    path,
    folder: cut < 0 ? "" : path.slice(0, cut),
    name: safeFilename(item?.name) ?? filenameFromUrl(url, baseURI) ?? safeFilename(path.slice(cut + 1)),
    type: mediaType(item?.content_type),
    size,
    modified: item?.modified ?? null,
    url,
  };
}

/** The name and type to save a finished download as: the entry's, else what the response
 *  said (job.filename from Content-Disposition or the URL, job.contentType). */
export function saveAs(entry, job) {
  return {
    name: entry.name ?? job.filename ?? "download",
    type: entry.type || mediaType(job.contentType) || "application/octet-stream",
  };
}

/** Decide how to save: "blob", "fs" or "native" (see the top of this file). */
export function chooseSaveMethod({ size, blobLimit, hasFilePicker }) {
  const known = typeof size === "number";
  if (known && size <= blobLimit) return "blob";
  if (hasFilePicker) return "fs";
  return known ? "native" : "blob";
}

/** Whether a path matches the filter box: every word of the query, case-insensitively,
 *  somewhere in the path (which ends with the name). An empty query matches everything. */
export function matchesFilter(path, query) {
  const fold = (s) => String(s).normalize("NFC").toLowerCase();
  const haystack = fold(path);
  return fold(query).split(/\s+/).filter(Boolean).every((word) => haystack.includes(word));
}

/** The URL of a folder's ZIP, relative to the page: "zip/" for the root, "zip/a/b" for
 *  the folder a/b, each segment percent-encoded. */
export function zipUrl(folder) {
  return folder ? `zip/${folder.split("/").map(encodeURIComponent).join("/")}` : "zip/";
}

// ===========================================================================
// 4. Formatting (pure)
// ===========================================================================

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

/** 1536 -> "1.5 KiB"; exact bytes below 1 KiB. */
export function formatBytes(n) {
  if (!Number.isFinite(n) || n < 0) return "?";
  let u = 0;
  while (n >= 1024 && u < UNITS.length - 1) {
    n /= 1024;
    u++;
  }
  return u === 0 ? `${n} B` : `${n < 10 ? n.toFixed(1) : Math.round(n)} ${UNITS[u]}`;
}

/** Seconds -> "0.5 s", "8 s", "3 min 5 s", "2 h 10 min". Rounded up: to a tenth below
 *  10 s, else to a second, so a wait is never shown shorter than it is. */
export function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "?";
  if (seconds < 10) {
    const tenths = Math.max(0, Math.ceil(seconds * 10 - 1e-9) / 10); // 0.3 * 10 is 3.0000000000000004
    if (tenths < 10) return `${tenths} s`;
  }
  const s = Math.ceil(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function formatDate(iso) {
  const d = new Date(iso);
  if (iso === null || Number.isNaN(d.getTime())) return "";
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function countFiles(n) {
  return `${n} ${n === 1 ? "file" : "files"}`;
}

// ===========================================================================
// 5. SHA-256 (pure): FIPS 180-4, fed in pieces
// ===========================================================================

const K256 = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

/** SHA-256 of bytes given in pieces: update(Uint8Array) as they arrive, then hex() once. */
export class Sha256 {
  state = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  words = new Uint32Array(64);
  block = new Uint8Array(64); // the bytes of a block not yet full
  filled = 0;
  length = 0; // bytes fed in all
  result = null; // hex(), once asked

  update(bytes) {
    let i = 0;
    this.length += bytes.length;
    if (this.filled > 0) {
      i = Math.min(64 - this.filled, bytes.length);
      this.block.set(bytes.subarray(0, i), this.filled);
      this.filled += i;
      if (this.filled < 64) return this;
      this.compress(this.block, 0);
      this.filled = 0;
    }
    for (; i + 64 <= bytes.length; i += 64) this.compress(bytes, i);
    this.block.set(bytes.subarray(i));
    this.filled = bytes.length - i;
    return this;
  }

  /** One 64-byte block of `bytes` at `at` into the state. */
  compress(bytes, at) {
    const w = this.words;
    for (let t = 0; t < 16; t++, at += 4) w[t] = (bytes[at] << 24) | (bytes[at + 1] << 16) | (bytes[at + 2] << 8) | bytes[at + 3];
    for (let t = 16; t < 64; t++) {
      const x = w[t - 15], y = w[t - 2];
      const s0 = ((x >>> 7) | (x << 25)) ^ ((x >>> 18) | (x << 14)) ^ (x >>> 3);
      const s1 = ((y >>> 17) | (y << 15)) ^ ((y >>> 19) | (y << 13)) ^ (y >>> 10);
      w[t] = (w[t - 16] + s0 + w[t - 7] + s1) | 0;
    }
    const s = this.state;
    let a = s[0], b = s[1], c = s[2], d = s[3], e = s[4], f = s[5], g = s[6], h = s[7];
    for (let t = 0; t < 64; t++) {
      const t1 = (h + (((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7))) + ((e & f) ^ (~e & g)) + K256[t] + w[t]) | 0;
      const t2 = ((((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10))) + ((a & b) ^ (a & c) ^ (b & c))) | 0;
      h = g; g = f; f = e; e = (d + t1) | 0; d = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    s[0] += a; s[1] += b; s[2] += c; s[3] += d; s[4] += e; s[5] += f; s[6] += g; s[7] += h;
  }

  /** The digest of all bytes fed, as lower-case hex. Ends the hash: no update after it. */
  hex() {
    if (this.result) return this.result;
    const bits = this.length * 8;
    const tail = new Uint8Array(this.filled < 56 ? 64 : 128);
    tail.set(this.block.subarray(0, this.filled));
    tail[this.filled] = 0x80;
    const view = new DataView(tail.buffer);
    view.setUint32(tail.length - 8, Math.floor(bits / 2 ** 32));
    view.setUint32(tail.length - 4, bits >>> 0);
    for (let at = 0; at < tail.length; at += 64) this.compress(tail, at);
    this.result = [...this.state].map((n) => n.toString(16).padStart(8, "0")).join("");
    return this.result;
  }
}

// ===========================================================================
// 6. Transfer with resume
// ===========================================================================

export class HttpError extends Error {
  constructor(status, detail) {
    super(detail ? `${status}: ${detail}` : `HTTP ${status}`);
    this.name = "HttpError";
    this.status = status;
    this.detail = detail;
  }
}

/** A failed fetch() or reader.read(): the connection could not be made or dropped. */
class NetworkError extends Error {
  constructor(cause) {
    super(cause?.message || "network error", { cause });
    this.name = "NetworkError";
  }
}

/** The body ended before Content-Length, or a 206 did not start where we asked. Both are
 *  retried like a dropped connection. */
class IncompleteError extends Error {
  constructor(message) {
    super(message);
    this.name = "IncompleteError";
  }
}

/** Await a fetch() or reader.read(). They reject with a TypeError on a network failure,
 *  which becomes a NetworkError; an AbortError (Cancel) passes through. Wrapping only
 *  these calls keeps a TypeError from a bug in this file from being retried. */
async function overNetwork(promise) {
  try {
    return await promise;
  } catch (err) {
    throw err?.name === "AbortError" ? err : new NetworkError(err);
  }
}

/** Network failures and short bodies are retried; Cancel and HTTP errors are not. */
export function isRetryable(err) {
  return err instanceof NetworkError || err instanceof IncompleteError;
}

function abortError() {
  return new DOMException("The download was cancelled.", "AbortError");
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(abortError());
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    function onAbort() {
      clearTimeout(timer);
      reject(abortError());
    }
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

/** The "detail" of a JSON error body ({"detail": "..."}); "" when the body is not that. */
async function errorDetail(response) {
  try {
    const body = await response.json();
    return typeof body?.detail === "string" ? body.detail.trim().slice(0, MAX_DETAIL_CHARS) : "";
  } catch {
    return "";
  }
}

function contentLength(response) {
  // With a Content-Encoding the length counts encoded bytes, but the reader yields
  // decoded ones, so the total is unknown.
  const encoding = (response.headers.get("Content-Encoding") || "identity").toLowerCase();
  const raw = response.headers.get("Content-Length");
  return encoding === "identity" && raw && /^\d+$/.test(raw) ? Number(raw) : null;
}

/** The bytes saved do not have the SHA-256 the server announced (Repr-Digest). */
export class DigestMismatch extends Error {
  constructor(expected, actual) {
    super(`SHA-256 ${actual}, expected ${expected}`);
    this.name = "DigestMismatch";
    this.expected = expected;
    this.actual = actual;
  }
}

/** A download in progress: what transfer() needs to continue it. hash: a Sha256 of the
 *  bytes received; expected: the response's Repr-Digest (hex), null while unknown. */
export function newJob(url) {
  return { url, received: 0, total: null, validator: null, filename: null, contentType: "", hash: new Sha256(), expected: null };
}

/** After transfer(): true when the bytes have the announced digest, false when the server
 *  announced none; throws DigestMismatch when they differ. */
export function verify(job) {
  if (job.expected === null) return false;
  const actual = job.hash.hex();
  if (actual !== job.expected) throw new DigestMismatch(job.expected, actual);
  return true;
}

/** The byte the next request of `job` starts from: what it holds, when there is a
 *  validator to send in If-Range; else 0, since resuming could splice two versions. */
export function resumeOffset(job) {
  return job.validator ? job.received : 0;
}

/** One request: from resumeOffset(job) to the end, into sink. Updates job as bytes arrive. */
async function fetchOnce(job, sink, signal, onProgress) {
  if (job.received > 0 && resumeOffset(job) === 0) {
    await sink.reset();
    job.received = 0;
  }
  const resuming = job.received > 0;
  if (resuming && job.total !== null && job.received >= job.total) return;
  const headers = new Headers();
  if (resuming) {
    headers.set("Range", `bytes=${job.received}-`);
    headers.set("If-Range", job.validator);
  }
  const response = await overNetwork(fetch(job.url, { headers, signal, cache: "no-store" }));
  if (response.status === 206 && resuming) {
    const range = parseContentRange(response.headers.get("Content-Range"));
    const sizeOk = range && (range.size === null || job.total === null || range.size === job.total);
    if (!range || range.start !== job.received || !sizeOk) {
      response.body?.cancel();
      await sink.reset(); // we cannot trust what we have; start over
      job.received = 0;
      throw new IncompleteError("The server resumed at the wrong byte.");
    }
    if (range.size !== null) job.total = range.size;
    job.expected ??= parseReprDigest(response.headers.get("Repr-Digest")); // the same version: If-Range
  } else if (response.status === 200) {
    // A fresh start, or If-Range did not match (the file changed): drop what we have.
    if (resuming) await sink.reset();
    job.received = 0;
    job.total = contentLength(response);
    job.validator = ifRangeValidator(response.headers.get("ETag"), response.headers.get("Last-Modified"));
    job.filename =
      filenameFromContentDisposition(response.headers.get("Content-Disposition")) ??
      filenameFromUrl(response.url || job.url);
    job.contentType = response.headers.get("Content-Type") || "";
    job.hash = new Sha256();
    job.expected = parseReprDigest(response.headers.get("Repr-Digest"));
  } else {
    throw new HttpError(response.status, await errorDetail(response));
  }
  onProgress(job, true);
  const reader = response.body.getReader();
  for (;;) {
    const { done, value } = await overNetwork(reader.read());
    if (done) break;
    await sink.write(value);
    job.hash.update(value);
    job.received += value.byteLength;
    onProgress(job, false);
  }
  if (job.total !== null && job.received < job.total) {
    throw new IncompleteError(`The body ended at byte ${job.received} of ${job.total}.`);
  }
}

/** Fetch job.url into sink until it holds the whole body, resuming after network errors.
 *  Up to delays.length retries in a row, waiting delays[i] ms before retry i + 1; bytes
 *  received since the last failure start a new count, since that connection was working.
 *  job is updated in place, so a later call continues where this one stopped. Rejects
 *  with an AbortError when signal aborts, an HttpError for an error status, or the last
 *  network error. onRetry gets {attempt, of, delayMs, from, error}: from is the byte the
 *  retry will ask for. */
export async function transfer(job, sink, { signal, onProgress = () => {}, onRetry = () => {}, delays = RETRY_DELAYS_MS }) {
  let failures = 0;
  for (;;) {
    const before = job.received;
    try {
      await fetchOnce(job, sink, signal, onProgress);
      return job;
    } catch (err) {
      if (signal.aborted) throw abortError();
      if (!isRetryable(err)) throw err;
      if (job.received > before) failures = 0;
      if (failures >= delays.length) throw err;
      const delayMs = delays[failures++];
      onRetry({ attempt: failures, of: delays.length, delayMs, from: resumeOffset(job), error: err });
      await sleep(delayMs, signal);
    }
  }
}

/** Above the blob limit the browser downloads the file itself, and an error would only
 *  show in its download list. So a HEAD first; when that is refused, a GET for the JSON
 *  detail a HEAD cannot carry, aborted at once should the file be there after all.
 *  Returns the file's SHA-256 (hex) when the HEAD announces it, else null. */
async function checkDownloadable(url) {
  const head = await overNetwork(fetch(url, { method: "HEAD", cache: "no-store" }));
  if (head.ok) return parseReprDigest(head.headers.get("Repr-Digest"));
  const controller = new AbortController();
  const response = await fetch(url, { cache: "no-store", signal: controller.signal }).catch(() => null);
  const refused = response !== null && !response.ok;
  const detail = refused ? await errorDetail(response) : "";
  controller.abort();
  throw new HttpError(refused ? response.status : head.status, detail);
}

// ===========================================================================
// 7. Sinks: where the bytes go (write, reset to empty, finish, abort)
// ===========================================================================

/** Chunks in memory; finish({name, type}) saves them through a Blob and an a[download]. */
class MemorySink {
  chunks = [];
  write(chunk) {
    this.chunks.push(chunk);
  }
  reset() {
    this.chunks = [];
  }
  finish({ name, type }) {
    const blob = new Blob(this.chunks, { type });
    this.chunks = [];
    const href = URL.createObjectURL(blob);
    clickLink(href, name);
    setTimeout(() => URL.revokeObjectURL(href), REVOKE_DELAY_MS);
  }
  abort() {
    this.chunks = [];
  }
}

/** A FileSystemWritableFileStream from showSaveFilePicker: bytes go straight to disk. */
class FileSink {
  constructor(writable, name) {
    this.writable = writable;
    this.name = name; // what the user chose in the picker
  }
  write(chunk) {
    return this.writable.write(chunk);
  }
  async reset() {
    await this.writable.truncate(0);
    await this.writable.seek(0);
  }
  finish() {
    return this.writable.close();
  }
  abort() {
    return this.writable.abort().catch(() => {});
  }
}

function clickLink(href, filename) {
  const a = document.createElement("a");
  a.href = href;
  a.download = filename ?? "";
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
}

// ===========================================================================
// 8. Download state (pure)
// ===========================================================================

/** "Not allowed" and "gone" say what the server said, when it said it in JSON. */
export function httpMessage(status, detail) {
  const said = detail ? detail.replace(/[.\s]+$/, "") : "";
  switch (status) {
    case 404:
      return "File not found (404): it may have been moved or deleted.";
    case 403:
      return `${said || "Not allowed to download this file"} (403).`;
    case 410:
      return `${said || "This download link no longer works"} (410).`;
    case 416:
      return "The server could not resume this file (416). Retry starts over.";
    default:
      return `The server answered ${status}${said ? `: ${said}` : ""}.`;
  }
}

/** One row's download as plain data: its status, bytes, retries and errors. No DOM and
 *  no network: FileRow moves it on with the methods below, FileRowView draws it through
 *  statusMessage and progressFigures, and the tests drive it directly.
 *  status: idle | downloading | retrying | done | error | cancelled. */
export class DownloadState {
  status = "idle";
  received = 0;
  from = 0; // the byte the current request started at
  event = { kind: "idle" }; // what the status line reports: see statusMessage
  samples = []; // [ms, bytes] over the last SPEED_WINDOW_MS, for the speed
  kept = false; // after an error: Retry continues the bytes held

  constructor(total = null) {
    this.total = total; // bytes; null: unknown
  }

  /** A request goes out for the bytes from `from` on. */
  started(from) {
    Object.assign(this, { status: "downloading", received: from, from, samples: [], kept: false });
    this.event = from > 0 ? { kind: "resuming", from } : { kind: "downloading" };
  }

  /** Bytes arrived; `fresh` on the first call of each response. A response that asked
   *  for a later byte but starts at 0 means the file changed (If-Range). */
  progressed(received, total, now, fresh) {
    if (fresh) {
      const resumed = this.from > 0 && received > 0;
      this.event = this.from === 0 ? { kind: "downloading" } : resumed ? { kind: "resumed", at: received } : { kind: "restarted" };
      Object.assign(this, { status: "downloading", from: received, samples: [] });
    }
    this.received = received;
    if (total !== null) this.total = total;
    this.samples.push([now, received]);
    while (this.samples.length > 2 && now - this.samples[0][0] > SPEED_WINDOW_MS) this.samples.shift();
  }

  /** The connection failed; a retry from byte `from` follows after delayMs. */
  retrying({ attempt, of, delayMs, from }) {
    Object.assign(this, { status: "retrying", from, samples: [] });
    this.event = { kind: "retrying", attempt, of, delayMs, from };
  }

  /** Saved; `verified`: its SHA-256 matched the server's (false: the server knew none). */
  finished(savedAs, verified = false) {
    Object.assign(this, { status: "done", total: this.received, kept: false });
    this.event = { kind: "saved", name: savedAs, verified };
  }

  /** The browser's downloader took it; `sha256`: the digest to compare by hand, or null. */
  handedOver(sha256 = null) {
    Object.assign(this, { status: "done", kept: false });
    this.event = { kind: "handed", sha256 };
  }

  /** The save dialog was dismissed: nothing started. */
  notStarted() {
    Object.assign(this, { status: "idle", kept: false });
    this.event = { kind: "not-started" };
  }

  /** It stopped; `failure` comes from failureOf. */
  failed(failure) {
    const kept = failure.kind === "network" && failure.from !== null;
    Object.assign(this, { status: failure.kind === "cancelled" ? "cancelled" : "error", kept, samples: [] });
    this.event = failure;
  }

  get showsProgress() {
    const busy = this.status === "downloading" || this.status === "retrying";
    return busy || (this.status === "done" && this.event.kind === "saved") || (this.status === "error" && this.kept);
  }
}

/** Why a download stopped, as data for DownloadState.failed: {kind: "cancelled"} |
 *  {kind: "http", status, detail} | {kind: "mismatch", expected, actual} (hex digests) |
 *  {kind: "network", retries, from} (from: the byte
 *  Retry continues at, null when nothing is kept) | {kind: "failed", message}. */
export function failureOf(err, keptJob, retries) {
  if (err?.name === "AbortError") return { kind: "cancelled" };
  if (err instanceof HttpError) return { kind: "http", status: err.status, detail: err.detail };
  if (err instanceof DigestMismatch) return { kind: "mismatch", expected: err.expected, actual: err.actual };
  if (isRetryable(err)) return { kind: "network", retries, from: keptJob ? resumeOffset(keptJob) : null };
  return { kind: "failed", message: err?.message || String(err) };
}

/** The status line for a DownloadState's event. */
export function statusMessage(event) {
  switch (event.kind) {
    case "downloading":
      return "Downloading…";
    case "resuming":
      return `Resuming from ${formatBytes(event.from)}…`;
    case "resumed":
      return `Resumed at ${formatBytes(event.at)}.`;
    case "restarted":
      return "The file changed on the server: downloading it again from 0 B.";
    case "retrying": {
      const { delayMs, from, attempt, of } = event;
      return `Connection lost. Retrying in ${formatDuration(delayMs / 1000)}, continuing from ${formatBytes(from)} (attempt ${attempt} of ${of})…`;
    }
    case "saved":
      return `Downloaded “${event.name}”. ${event.verified ? "SHA-256 verified." : "Not verified: the server sent no SHA-256 for it."}`;
    case "handed": {
      const check = event.sha256 ? `The page can’t verify it there: compare its SHA-256 with ${event.sha256}.` : "The page can’t verify it there, and the server sent no SHA-256 for it.";
      return `Handed to your browser’s downloader: its download list shows the progress. ${check}`;
    }
    case "mismatch":
      return `Corrupt download: its SHA-256 is ${event.actual}, the server’s is ${event.expected}. Nothing was saved; Retry downloads it again.`;
    case "not-started":
      return "Download not started: no file was chosen.";
    case "cancelled":
      return "Download cancelled.";
    case "http":
      return httpMessage(event.status, event.detail);
    case "network": {
      const { retries, from } = event;
      if (from === null) return "Network error: could not reach the server.";
      return `Network error: the download failed after ${retries} ${retries === 1 ? "retry" : "retries"}. Retry continues from ${formatBytes(from)}.`;
    }
    case "failed":
      return `Download failed: ${event.message}`;
    default:
      return "";
  }
}

/** A DownloadState's progress: {percent (null: unknown), text}, the text being percent,
 *  bytes done of total, speed and time left, as far as they are known. */
export function progressFigures(state) {
  const { status, received, total, samples } = state;
  if (status === "done") return { percent: 100, text: `100% · ${formatBytes(received)}` };
  const parts = [];
  let percent = null;
  if (typeof total === "number" && total > 0) {
    percent = Math.min(100, (received / total) * 100);
    parts.push(`${Math.floor(percent)}%`, `${formatBytes(received)} of ${formatBytes(total)}`);
  } else if (total === 0) {
    percent = 0;
  } else {
    parts.push(formatBytes(received));
  }
  if (status === "downloading" && samples.length >= 2) {
    const [t0, b0] = samples[0];
    const [t1, b1] = samples[samples.length - 1];
    const rate = t1 > t0 ? ((b1 - b0) * 1000) / (t1 - t0) : 0;
    if (rate > 0) {
      parts.push(`${formatBytes(rate)}/s`);
      if (typeof total === "number") parts.push(`${formatDuration((total - received) / rate)} left`);
    }
  }
  return { percent, text: parts.join(" · ") };
}

// ===========================================================================
// 9. File rows: view and controller
// ===========================================================================

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("aria-") || k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  node.append(...children);
  return node;
}

/** The <li> of one file: name, size and date, the buttons, progress and status. It draws
 *  a DownloadState and reports clicks; it holds no download. */
class FileRowView {
  lastDraw = -Infinity;

  constructor(entry, { onDownload, onCancel }) {
    const name = entry.name ?? entry.path;
    const meta = [formatBytes(entry.size ?? NaN), formatDate(entry.modified)].filter(Boolean).join(" · ");
    const button = (cls, text, label) => el("button", { type: "button", class: cls, "aria-label": label, textContent: text });
    this.downloadButton = button("download", "Download", `Download ${name}`);
    this.cancelButton = button("cancel", "Cancel", `Cancel download of ${name}`);
    this.retryButton = button("retry", "Retry", `Retry download of ${name}`);
    this.progress = el("progress", { class: "progress", max: 100, value: 0, "aria-label": `Download progress of ${name}` });
    this.progressText = el("span", { class: "progress-text" });
    this.progressBox = el("div", { class: "file-progress" }, [this.progress, this.progressText]);
    this.status = el("p", { class: "status", role: "status" });
    this.node = el("li", { class: "file", "data-path": entry.path }, [
      el("div", { class: "file-info" }, [
        el("span", { class: "file-name", textContent: name, title: entry.path }),
        el("span", { class: "file-meta", textContent: meta }),
      ]),
      el("div", { class: "file-actions" }, [this.downloadButton, this.cancelButton, this.retryButton]),
      this.progressBox,
      this.status,
    ]);
    this.downloadButton.addEventListener("click", onDownload);
    this.retryButton.addEventListener("click", onDownload);
    this.cancelButton.addEventListener("click", onCancel);
  }

  /** Draw `state`: all of it, or (full false) only the progress, and that at most every
   *  UI_INTERVAL_MS. Keeps keyboard focus on a visible button when the focused one goes. */
  render(state, now, full = true) {
    if (!full && now - this.lastDraw < UI_INTERVAL_MS) return;
    this.lastDraw = now;
    if (full) {
      const focused = this.node.contains(document.activeElement) ? document.activeElement : null;
      const busy = state.status === "downloading" || state.status === "retrying";
      const failed = state.status === "error" || state.status === "cancelled";
      this.node.dataset.state = state.status;
      this.downloadButton.hidden = busy || failed;
      this.cancelButton.hidden = !busy;
      this.retryButton.hidden = !failed;
      this.progressBox.hidden = !state.showsProgress;
      this.status.textContent = statusMessage(state.event);
      if (focused?.hidden) {
        [this.cancelButton, this.retryButton, this.downloadButton].find((b) => !b.hidden)?.focus();
      }
    }
    const { percent, text } = progressFigures(state);
    if (percent === null) this.progress.removeAttribute("value"); // indeterminate
    else this.progress.value = percent;
    this.progressText.textContent = text;
  }
}

/** One file: its entry, its DownloadState and view, and the download it runs. */
class FileRow {
  job = null; // transfer()'s data; kept after a network failure so Retry continues
  sink = null;
  controller = null; // aborts the transfer: Cancel
  active = false; // a click is being handled

  constructor(item, config) {
    this.entry = fileEntry(item);
    this.config = config;
    this.state = new DownloadState(this.entry.size);
    this.view = new FileRowView(this.entry, { onDownload: () => this.start(), onCancel: () => this.controller?.abort() });
    this.node = this.view.node;
    this.draw();
  }

  draw(full = true) {
    this.view.render(this.state, performance.now(), full);
  }

  /** Download, or Retry: continues a kept job (network failure) or starts a new one.
   *  A second click while the picker, the HEAD or the transfer is under way does nothing. */
  async start() {
    if (this.active) return;
    this.active = true;
    try {
      await this.run();
    } finally {
      this.active = false;
    }
  }

  async run() {
    if (!this.job) {
      const hasFilePicker = typeof window.showSaveFilePicker === "function";
      const method = chooseSaveMethod({ size: this.entry.size, blobLimit: this.config.blobLimit, hasFilePicker });
      if (method === "native") return await this.handToBrowser();
      this.sink = method === "fs" ? await this.pickFile() : new MemorySink();
      if (!this.sink) return;
      this.job = newJob(this.entry.url);
    }
    this.controller = new AbortController();
    this.state.started(resumeOffset(this.job));
    this.draw();
    try {
      await transfer(this.job, this.sink, {
        signal: this.controller.signal,
        delays: this.config.delays,
        onProgress: (job, fresh) => {
          this.state.progressed(job.received, job.total, performance.now(), fresh);
          this.draw(fresh);
        },
        onRetry: (retry) => {
          this.state.retrying(retry);
          this.draw();
        },
      });
      const target = saveAs(this.entry, this.job);
      const verified = verify(this.job);
      await this.sink.finish(target);
      this.state.finished(this.sink.name ?? target.name, verified);
      this.forget();
    } catch (err) {
      await this.fail(err);
    } finally {
      this.controller = null;
      this.draw();
    }
  }

  /** showSaveFilePicker needs the click's user activation, so it runs before any fetch.
   *  Returns a FileSink, or null when the user dismissed the picker. */
  async pickFile() {
    try {
      const handle = await window.showSaveFilePicker({ suggestedName: this.entry.name ?? "download" });
      return new FileSink(await handle.createWritable(), handle.name);
    } catch (err) {
      if (err?.name === "AbortError") {
        this.state.notStarted();
        this.draw();
        return null;
      }
      // The picker is refused (policy, no activation): fall back to the other methods.
      if (this.entry.size !== null && this.entry.size > this.config.blobLimit) {
        await this.handToBrowser();
        return null;
      }
      return new MemorySink();
    }
  }

  /** Above the blob limit: check the file can be had, so an error shows here rather than
   *  as a failed entry in the browser's list, then a plain link the browser downloads. */
  async handToBrowser() {
    let sha256;
    try {
      sha256 = await checkDownloadable(this.entry.url);
    } catch (err) {
      return this.fail(err);
    }
    clickLink(this.entry.url, this.entry.name); // the server's Content-Disposition wins
    this.state.handedOver(sha256);
    this.draw();
  }

  forget() {
    this.job = null;
    this.sink = null;
  }

  async fail(err) {
    const kept = isRetryable(err) && this.job !== null; // a network failure: Retry continues
    if (!kept) {
      await this.sink?.abort();
      this.forget();
    }
    this.state.failed(failureOf(err, this.job, this.config.delays.length));
    this.draw();
  }
}

// ===========================================================================
// 10. Folders, filter, listing and start-up
// ===========================================================================

let folderIds = 0;

/** One folder of the tree: a toggle button (aria-expanded) with the folder's name, its
 *  file count and size, an optional ZIP link, then its subfolders and its files. The
 *  root has no heading: its lists go straight into #files. */
class Folder {
  children = new Map(); // name -> Folder
  rows = [];
  count = 0; // files here and below
  bytes = 0;
  matches = 0; // of them, those the filter shows

  constructor(path, config) {
    this.path = path;
    this.folders = el("ul", { class: "folders" });
    this.files = el("ul", { class: "files" });
    if (path === "") {
      this.node = el("div", { class: "folder-body" }, [this.folders, this.files]);
      return;
    }
    const id = `folder-${++folderIds}`;
    this.toggle = el("button", { type: "button", class: "folder-toggle", "aria-expanded": "true", "aria-controls": id, "aria-label": `Folder ${path}` }, [
      el("span", { class: "folder-name", textContent: path.slice(path.lastIndexOf("/") + 1), title: path }),
    ]);
    this.meta = el("span", { class: "folder-meta" });
    const head = el("div", { class: "folder-head" }, [this.toggle, this.meta]);
    if (config.zip) {
      head.append(el("a", { class: "zip", href: zipUrl(path), download: "", textContent: "Download ZIP", "aria-label": `Download ZIP of folder ${path}` }));
    }
    this.body = el("div", { class: "folder-body", id }, [this.folders, this.files]);
    this.node = el("li", { class: "folder", "data-folder": path }, [head, this.body]);
    this.toggle.addEventListener("click", () => this.setExpanded(!this.expanded));
  }

  get expanded() {
    return this.toggle?.getAttribute("aria-expanded") !== "false";
  }

  setExpanded(open) {
    if (!this.toggle) return;
    this.toggle.setAttribute("aria-expanded", String(open));
    this.body.hidden = !open;
  }

  drawMeta() {
    if (this.meta) this.meta.textContent = `${countFiles(this.count)} · ${formatBytes(this.bytes)}`;
  }
}

/** The tree of folders and rows in #files, the filter box, the summary and the ZIP link
 *  of the root. Files arrive in path order; each goes into its folder, made on demand. */
class Listing {
  constructor(config) {
    this.config = config;
    this.container = document.getElementById("files");
    this.summary = document.getElementById("summary");
    this.filterBox = document.getElementById("filter");
    this.zipAll = document.getElementById("zip-all");
    this.filterBox?.addEventListener("input", () => this.applyFilter());
    this.clear();
  }

  clear() {
    this.root = new Folder("", this.config);
    this.container.replaceChildren(this.root.node);
    this.loading = true;
    if (this.zipAll) this.zipAll.hidden = true;
    this.summary.textContent = "Loading files…";
  }

  get query() {
    return this.filterBox?.value.trim() ?? "";
  }

  /** The folder at `path`, and every one above it, made when missing. */
  folder(path) {
    let folder = this.root;
    if (path === "") return folder;
    for (const name of path.split("/")) {
      let child = folder.children.get(name);
      if (!child) {
        child = new Folder(folder.path ? `${folder.path}/${name}` : name, this.config);
        folder.children.set(name, child);
        folder.folders.append(child.node);
      }
      folder = child;
    }
    return folder;
  }

  /** The folder and those above it, innermost first. */
  lineage(folder) {
    const chain = [this.root];
    let node = this.root;
    for (const name of folder.path ? folder.path.split("/") : []) {
      node = node.children.get(name);
      chain.push(node);
    }
    return chain.reverse();
  }

  add(item) {
    const row = new FileRow(item, this.config);
    const folder = this.folder(row.entry.folder);
    folder.rows.push(row);
    folder.files.append(row.node);
    const shown = matchesFilter(row.entry.path, this.query);
    row.node.hidden = !shown;
    for (const f of this.lineage(folder)) {
      f.count++;
      f.bytes += row.entry.size ?? 0;
      if (shown) f.matches++;
      f.drawMeta();
      this.showFolder(f);
    }
    if (this.query) this.drawSummary();
  }

  /** Hide a folder with no match; open one with matches while a filter is typed. */
  showFolder(folder) {
    if (folder === this.root) return;
    folder.node.hidden = folder.matches === 0;
    if (this.query && folder.matches > 0) folder.setExpanded(true);
  }

  applyFilter() {
    const query = this.query;
    const visit = (folder) => {
      folder.matches = 0;
      for (const row of folder.rows) {
        row.node.hidden = !matchesFilter(row.entry.path, query);
        if (!row.node.hidden) folder.matches++;
      }
      for (const child of folder.children.values()) folder.matches += visit(child);
      this.showFolder(folder);
      return folder.matches;
    };
    visit(this.root);
    this.drawSummary();
  }

  drawSummary() {
    const { count, bytes, matches } = this.root;
    const query = this.query;
    if (query) {
      this.summary.textContent = matches ? `${matches} of ${countFiles(count)} match “${query}”.` : `No file matches “${query}”.`;
    } else if (this.loading) {
      this.summary.textContent = "Loading files…";
    } else {
      this.summary.textContent = count === 0 ? "No files to download." : `${countFiles(count)}, ${formatBytes(bytes)} in all.`;
    }
  }

  async load() {
    const errorBox = document.getElementById("listing-error");
    this.clear();
    errorBox.hidden = true;
    try {
      for await (const item of listFiles()) this.add(item);
      this.loading = false;
      this.drawSummary();
      if (this.zipAll) this.zipAll.hidden = !(this.config.zip && this.root.count > 0);
      document.body.dataset.listing = "ready";
    } catch (err) {
      this.loading = false;
      const count = this.root.count;
      this.summary.textContent = count ? `${countFiles(count)} loaded before an error.` : "";
      errorBox.querySelector(".listing-error-text").textContent = `Could not load the file list: ${err.message || err}`;
      errorBox.hidden = false;
      document.body.dataset.listing = "error";
    }
  }
}

/** Yield every file of GET api/files, following next_cursor until it is null. */
export async function* listFiles(baseURI = document.baseURI) {
  const seen = new Set();
  let cursor = null;
  for (let page = 0; page < LISTING_MAX_PAGES; page++) {
    const url = new URL("api/files", baseURI);
    url.searchParams.set("limit", String(LISTING_PAGE_SIZE));
    if (cursor !== null) url.searchParams.set("cursor", cursor);
    const response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
    if (!response.ok) throw new HttpError(response.status, await errorDetail(response));
    const body = await response.json();
    yield* body.files ?? [];
    cursor = body.next_cursor ?? null;
    if (cursor === null || seen.has(cursor)) return;
    seen.add(cursor);
  }
}

function main() {
  const config = { blobLimit: readBlobLimit(), zip: readZipEnabled(), delays: parseRetryDelays(location.search) };
  const listing = new Listing(config);
  document.querySelector(".retry-listing")?.addEventListener("click", () => listing.load());
  listing.load();
}

if (typeof document !== "undefined" && document.getElementById("files")) main();
