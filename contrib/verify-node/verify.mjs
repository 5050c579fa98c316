// Verifying micropay webhooks and purchase receipts in Node.js (>= 16), with the
// standard library only. Usage:
//   node verify.mjs receipt <receipt> <sidecar receipt pubkey hex>
//   node verify.mjs webhook <body file> <Micropay-Signature header> <secret> [now]
// Prints the verified JSON and exits 0, or prints the reason and exits 1.
import { createHash, createHmac, createPublicKey, timingSafeEqual, verify } from "node:crypto";
import { readFileSync } from "node:fs";

// DER prefix of a SubjectPublicKeyInfo for a compressed secp256k1 point (33 bytes follow).
const SPKI_SECP256K1 = Buffer.from("3036301006072a8648ce3d020106052b8104000a032200", "hex");

function b64url(text) {
  return Buffer.from(text.replace(/-/g, "+").replace(/_/g, "/"), "base64");
}

function canonical(value) {
  // keys sorted, no spaces, non-ASCII escaped as \uXXXX: the form the sidecar signs
  if (Array.isArray(value)) return "[" + value.map(canonical).join(",") + "]";
  if (value !== null && typeof value === "object") {
    return "{" + Object.keys(value).sort().map((k) => canonical(k) + ":" + canonical(value[k])).join(",") + "}";
  }
  return JSON.stringify(value).replace(/[\u0080-\uffff]/g, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
}

// Receipts signed in a batch carry a third part: their path to the Merkle root that the
// signature covers (see docs/protocol.md, "Receipts").
const BATCH_TAG = Buffer.from("micropay-receipt-batch/v1\0", "latin1");
const sha256 = (...parts) => createHash("sha256").update(Buffer.concat(parts)).digest();

function batchRoot(data, proof) {
  if (proof.length === 0 || proof.length % 33 !== 0 || proof.length / 33 > 16) throw new Error("bad proof length");
  let node = sha256(Buffer.from([0]), data);
  for (let k = 0; k < proof.length; k += 33) {
    const side = proof[k], sibling = proof.subarray(k + 1, k + 33);
    if (side === 0) node = sha256(Buffer.from([1]), node, sibling);
    else if (side === 1) node = sha256(Buffer.from([1]), sibling, node);
    else throw new Error("bad proof direction byte");
  }
  return Buffer.concat([BATCH_TAG, node]);
}

export function verifyReceipt(receipt, pubkeyHex) {
  const parts = receipt.trim().split(".");
  if (parts.length !== 2 && parts.length !== 3) throw new Error("receipt must be <payload>.<signature>[.<proof>]");
  const data = b64url(parts[0]), sig = b64url(parts[1]);
  const signed = parts.length === 3 ? batchRoot(data, b64url(parts[2])) : data;
  const payload = JSON.parse(data.toString("utf8"));
  if (payload.pubkey !== pubkeyHex) throw new Error("receipt was signed by another key");
  if (canonical(payload) !== data.toString("utf8")) throw new Error("payload is not canonical JSON");
  if (sig.length !== 64) throw new Error("signature must be 64 bytes (r || s)");
  const key = createPublicKey({ key: Buffer.concat([SPKI_SECP256K1, Buffer.from(pubkeyHex, "hex")]),
                                format: "der", type: "spki" });
  if (!verify("sha256", signed, { key, dsaEncoding: "ieee-p1363" }, sig)) throw new Error("bad signature");
  return payload;
}

export function verifyWebhook(body, header, secrets, toleranceS = 300, now = Date.now() / 1000) {
  let t = null;
  const candidates = [];
  for (const part of (header || "").split(",")) {
    const [k, v] = part.trim().split("=", 2);
    if (k === "t" && /^[0-9]{1,12}$/.test(v)) t = Number(v);
    else if (k === "v1" && v) candidates.push(Buffer.from(v));
  }
  if (t === null || candidates.length === 0) throw new Error("malformed signature header");
  if (Math.abs(now - t) > toleranceS) throw new Error("timestamp outside the tolerance window");
  let ok = false;
  for (const secret of [].concat(secrets)) {
    const mac = createHmac("sha256", secret).update(`${t}.`).update(body).digest("hex");
    for (const c of candidates) ok = (c.length === mac.length && timingSafeEqual(c, Buffer.from(mac))) || ok;
  }
  if (!ok) throw new Error("no signature matches");
  return JSON.parse(body.toString("utf8"));
}

const [mode, ...args] = process.argv.slice(2);
try {
  if (mode === "receipt") {
    console.log(JSON.stringify(verifyReceipt(args[0], args[1])));
  } else if (mode === "webhook") {
    const now = args[3] ? Number(args[3]) : undefined;
    console.log(JSON.stringify(verifyWebhook(readFileSync(args[0]), args[1], args[2], 300, now)));
  } else {
    console.error("usage: node verify.mjs receipt|webhook ...");
    process.exit(2);
  }
} catch (e) {
  console.error(`invalid: ${e.message}`);
  process.exit(1);
}
