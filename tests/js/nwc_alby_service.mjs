// A wallet service that is not ours: @getalby/sdk's NWCWalletService, backed by a sandbox
// wallet of a micropay sidecar in sandbox mode (its /sandbox/wallets/<name> HTTP API).
// Usage: node --experimental-websocket nwc_alby_service.mjs <relay ws url> <sandbox wallet url>
// Prints "URI <nostr+walletconnect://...>" once it listens, then serves until killed.
import { NWCWalletService, NWCWalletServiceKeyPair } from "@getalby/sdk/nwc";
import { generateSecretKey, getPublicKey } from "nostr-tools";

const [relay, walletUrl] = process.argv.slice(2);
const hex = (b) => Buffer.from(b).toString("hex");
const walletSecret = hex(generateSecretKey());
const clientSecret = hex(generateSecretKey());
const methods = ["get_info", "get_balance", "pay_invoice", "make_invoice"];

async function post(path, body) {
  const r = await fetch(walletUrl + path, { method: "POST", headers: { "Content-Type": "application/json" },
                                            body: JSON.stringify(body) });
  const json = await r.json();
  if (!r.ok) throw new Error(json.detail || `HTTP ${r.status}`);
  return json;
}
const failed = (code, e) => ({ result: undefined, error: { code, message: String(e.message || e) } });

const svc = new NWCWalletService({ relayUrls: [relay] });
await svc.publishWalletServiceInfoEvent(walletSecret, methods, []);
const keys = new NWCWalletServiceKeyPair(walletSecret, getPublicKey(Buffer.from(clientSecret, "hex")));
await svc.subscribe(keys, {
  getInfo: async () => ({ result: { alias: "alby sandbox", color: "#000000", pubkey: "", network: "regtest",
                                    block_height: 1, block_hash: "", methods }, error: undefined }),
  getBalance: async () => {
    const r = await fetch(walletUrl);
    return { result: { balance: (await r.json()).balance_msat }, error: undefined };
  },
  payInvoice: async (req) => {
    try {
      const p = await post("/pay", { bolt11: req.invoice });
      return { result: { preimage: p.preimage, fees_paid: p.fee_msat }, error: undefined };
    } catch (e) { return failed("PAYMENT_FAILED", e); }
  },
  makeInvoice: async (req) => {
    try {
      const body = { description: req.description || "alby sandbox" };
      if (req.amount) body.amount_msat = req.amount;
      const inv = await post("/invoice", body);
      return { result: { type: "incoming", state: "pending", invoice: inv.bolt11, payment_hash: inv.payment_hash,
                         amount: inv.amount_msat || 0, fees_paid: 0, created_at: Math.floor(Date.now() / 1000),
                         expires_at: inv.expires_at, description: body.description }, error: undefined };
    } catch (e) { return failed("OTHER", e); }
  },
});
console.log(`URI nostr+walletconnect://${keys.walletPubkey}?relay=${encodeURIComponent(relay)}&secret=${clientSecret}`);
