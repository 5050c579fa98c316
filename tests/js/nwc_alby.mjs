// Drives an NWC wallet service with @getalby/sdk's NWCClient (a client that is not ours).
// Usage: node --experimental-websocket nwc_alby.mjs '<nostr+walletconnect URI>' '<JSON list of steps>'
// Each step is [method, params]; prints a JSON list of {result} or {error: {code, message}}.
// (Node 20 has a global WebSocket only with the flag; Node >= 22 needs none.)
import { NWCClient } from "@getalby/sdk/nwc";

const [uri, stepsJson] = process.argv.slice(2);
const client = new NWCClient({ nostrWalletConnectUrl: uri });
const out = [];
try {
  for (const [method, params] of JSON.parse(stepsJson)) {
    try {
      out.push({ result: await client[method](params ?? {}) });
    } catch (e) {
      out.push({ error: { code: e.code ?? e.constructor.name, message: String(e.message) } });
    }
  }
} finally {
  client.close();
}
console.log(JSON.stringify(out));
process.exit(0);
