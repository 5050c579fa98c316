// Drives lsat-js (npm) against a micropay sidecar, as a boltwall-style client would.
//   node lsat_client.js pay <base url> <path>   -> {status, body, token, caveats}
//   node lsat_client.js expired <token>         -> {expired, validUntil}
// lsat-js parses the LSAT challenge, checks the preimage against the token's payment
// hash and formats the credential; the sandbox wallet pays. Its `expiration` caveat
// strings come from lsat-js's own Caveat class (the test appends them: the registry's
// macaroon 3.0.4, which lsat-js needs in place of its unpublished fork, cannot
// re-serialize a macaroon it has changed).
const { Lsat, Caveat } = require('lsat-js');

async function pay(base, path) {
  const first = await fetch(base + path);
  const header = first.headers.get('www-authenticate') || '';
  // fetch joins several WWW-Authenticate headers with ', ': lsat-js reads the LSAT one
  const lsat = Lsat.fromHeader(header.slice(header.indexOf('LSAT ')));
  const paid = await fetch(base + '/sandbox/wallets/lsat-js/pay', {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ bolt11: lsat.invoice }),
  });
  lsat.setPreimage((await paid.json()).preimage);
  const second = await fetch(base + path, { headers: { authorization: lsat.toToken() } });
  const now = Date.now();
  return {
    status: second.status, body: await second.text(), token: lsat.toToken(),
    caveats: { past: new Caveat({ condition: 'expiration', value: now - 60000 }).encode(),
               future: new Caveat({ condition: 'expiration', value: now + 600000 }).encode() },
  };
}

async function main() {
  const [mode, ...args] = process.argv.slice(2);
  let out;
  if (mode === 'pay') out = await pay(args[0], args[1]);
  else if (mode === 'expired') {
    const lsat = Lsat.fromToken(args[0]);
    out = { expired: lsat.isExpired(), validUntil: lsat.validUntil };
  } else throw new Error('usage: pay <base> <path> | expired <token>');
  process.stdout.write(JSON.stringify(out));
}
main().catch((e) => { console.error(e.stack || String(e)); process.exit(1); });
