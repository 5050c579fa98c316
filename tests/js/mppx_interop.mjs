// Drives `micropay serve` (sandbox backend) with mppx 0.11.0, the MPP reference SDK for
// TypeScript, as tests/payment/test_mpp_interop.py asks:
//
//   node mppx_interop.mjs validate <base url>      mppx's own server validator (its CLI)
//   node mppx_interop.mjs charge <base url> <payment-only path> <dual-scheme path>
//   node mppx_interop.mjs session <base url> <session path>
//
// mppx has no Lightning method, so this script registers one (lightning/charge) with
// mppx's Method API and pays with the sidecar's sandbox wallet; everything else is mppx's:
// its client fetch (challenge selection, credential attachment), its parsers and schemas
// (Challenge.fromResponseList, Credential.serialize/deserialize, Receipt.deserialize/from,
// Expires.assert) and its validator (`mppx validate`). Every response is recorded and
// checked; the script prints one JSON object {checks, failures} and exits 0 unless it
// crashes. A check's `source` says who decides it: "mppx" (mppx threw or its validator
// reported `fail`) or "draft" (a MUST of the Payment drafts that mppx's own server keeps,
// checked here on what mppx parsed).
import { Challenge, Credential, Expires, Method, Receipt, z } from 'mppx'
import { Mppx } from 'mppx/client'
import { execFile } from 'node:child_process'
import { fileURLToPath } from 'node:url'

const [, , scenario, base, ...args] = process.argv
const WALLET = `${base}/sandbox/wallets/mppx`
const checks = []

function record(exchange, check, source, ok, detail) {
  checks.push({ exchange, check, source, ok: Boolean(ok), ...(detail !== undefined && { detail: String(detail) }) })
  return Boolean(ok)
}

// mppx throws: record the message as a failure of that SDK step, keep going.
function sdk(exchange, check, fn) {
  try {
    const value = fn()
    record(exchange, check, 'mppx', true)
    return value
  } catch (error) {
    record(exchange, check, 'mppx', false, `${error.name}: ${error.message}`)
    return undefined
  }
}

async function post(url, body) {
  const r = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })
  const doc = await r.json()
  if (r.status !== 200) throw new Error(`${url}: ${r.status} ${JSON.stringify(doc)}`)
  return doc
}
const pay = async (bolt11) => (await post(`${WALLET}/pay`, { bolt11 })).preimage
const returnInvoice = async () => (await post(`${WALLET}/invoice`, { description: 'mppx refund' })).bolt11

// -- what every response is checked for ---------------------------------------------------

const offered = new Map()      // challenge id -> exchange that offered it first
const hashes = new Map()       // invoice payment hash -> exchange that offered it first
const consumed = new Set()     // challenge ids a credential was sent for (and accepted)

// A 402: mppx parses every Payment challenge; each must be new (never offered, never consumed).
function check402(exchange, response, { intent } = {}) {
  record(exchange, 'status 402', 'draft', response.status === 402, `got ${response.status}`)
  const cc = response.headers.get('cache-control') ?? ''
  record(exchange, 'Cache-Control: no-store on a 402', 'draft', /(^|,)\s*no-store\s*(,|$)/i.test(cc), cc || 'absent')
  const challenges = sdk(exchange, 'Challenge.fromResponseList', () => Challenge.fromResponseList(response)) ?? []
  for (const ch of challenges) {
    sdk(exchange, `Expires.assert(${ch.id})`, () => Expires.assert(ch.expires, ch.id))
    if (intent !== undefined)
      record(exchange, 'offers the expected intent', 'draft', ch.intent === intent && ch.method === 'lightning',
             `${ch.method}/${ch.intent}`)
    const hash = ch.request?.methodDetails?.paymentHash ?? ch.request?.paymentHash
    const seenAt = offered.get(ch.id)
    // core draft: challenges MUST NOT be cached or reused; session draft: a fresh invoice
    // for every unauthenticated request; error responses carry a fresh challenge.
    record(exchange, 'challenge id is fresh (never offered before)', 'draft', seenAt === undefined,
           seenAt === undefined ? ch.id : `${ch.id} was already offered at "${seenAt}"`)
    record(exchange, 'challenge was never consumed', 'draft', !consumed.has(ch.id),
           consumed.has(ch.id) ? `${ch.id} was consumed by an accepted credential` : ch.id)
    if (hash !== undefined) {
      const hashAt = hashes.get(hash)
      record(exchange, 'invoice is fresh (payment hash never offered before)', 'draft', hashAt === undefined,
             hashAt === undefined ? hash : `${hash} was already offered at "${hashAt}"`)
      if (hashAt === undefined) hashes.set(hash, exchange)
    }
    if (seenAt === undefined) offered.set(ch.id, exchange)
  }
  return challenges
}

// A response carrying Payment-Receipt: mppx parses it; the core draft (Security
// Considerations, Caching) says it MUST carry Cache-Control: private, as mppx's own server
// does (server/Transport.js, respondReceipt: withPrivateCacheControl).
function checkReceipt(exchange, response, { reference } = {}) {
  const header = response.headers.get('payment-receipt')
  if (!record(exchange, 'Payment-Receipt present', 'draft', header !== null, header === null ? 'absent' : undefined))
    return undefined
  const receipt = sdk(exchange, 'Receipt.deserialize', () => Receipt.deserialize(header))
  const cc = response.headers.get('cache-control') ?? ''
  record(exchange, 'Cache-Control: private on a response with Payment-Receipt', 'draft',
         /(^|,)\s*private\s*(,|$)/i.test(cc), cc ? `Cache-Control: ${cc}` : 'no Cache-Control header')
  if (receipt && reference !== undefined)
    record(exchange, 'receipt reference is the payment hash', 'draft', receipt.reference === reference,
           `${receipt.reference} vs ${reference}`)
  return receipt
}

// -- the Lightning method, as an mppx client method ----------------------------------------

const lightningCharge = Method.from({
  name: 'lightning',
  intent: 'charge',
  schema: {
    credential: { payload: z.object({ preimage: z.string() }) },
    request: z.object({ amount: z.string(), currency: z.string(), methodDetails: z.object({ invoice: z.string(), paymentHash: z.string() }) }),
  },
})

function lightningChargeClient(paid) {
  return Method.toClient(lightningCharge, {
    async createCredential({ challenge }) {
      const preimage = await pay(challenge.request.methodDetails.invoice)
      paid.push({ id: challenge.id, hash: challenge.request.methodDetails.paymentHash })
      return Credential.serialize(Credential.from({ challenge, payload: { preimage } }))
    },
  })
}

// A fetch that records every exchange mppx makes, for the checks above.
function recordingFetch(label, log) {
  return async (input, init) => {
    const response = await fetch(input, init)
    const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined))
    log.push({ label, response: response.clone(), authorization: headers.get('authorization') })
    return response
  }
}

function checkCredentialRoundTrip(exchange, header) {
  const parsed = sdk(exchange, 'Credential.deserialize (our credential, as an mppx server reads it)',
                     () => Credential.deserialize(header))
  return parsed
}

// -- scenarios ---------------------------------------------------------------------------

// mppx's validator as its users run it: `mppx validate <url> --output-json` (the bundled CLI;
// the `mppx/validation` export imports the CLI package `incur`, which mppx 0.11.0 does not
// declare, so it cannot be imported from an ordinary install). Without --endpoint it reads
// /openapi.json and checks every priced route: the 402, the challenge, and the answer to a
// malformed credential.
async function scenarioValidate() {
  const bin = fileURLToPath(new URL('./node_modules/mppx/dist/bin.js', import.meta.url))
  const out = await new Promise((resolve) => {
    execFile(process.execPath, [bin, 'validate', base, '--output-json'], { timeout: 60_000, maxBuffer: 1 << 24 },
             (error, stdout, stderr) => resolve({ error, stdout, stderr }))
  })
  let result
  try {
    result = JSON.parse(out.stdout)
  } catch {
    record('mppx validate', 'prints its JSON report', 'mppx', false, `${out.error?.message ?? ''} ${out.stderr} ${out.stdout}`)
    return
  }
  const phases = [['discovery', result.discovery.checks]]
  for (const ep of result.endpoints)
    phases.push([`${ep.method} ${ep.path} challenge`, ep.challenge], [`${ep.method} ${ep.path} error handling`, ep.errorHandling],
                [`${ep.method} ${ep.path} payment`, ep.payment])
  for (const [phase, results] of phases)
    for (const r of results)
      record(`mppx validate: ${phase}`, r.label, 'mppx', r.severity !== 'fail',
             `${r.severity}${r.detail ? `: ${r.detail}` : ''}${r.hint && r.severity !== 'pass' ? ` (hint: ${r.hint})` : ''}`)
  record('mppx validate', 'summary: 0 failed', 'mppx', result.summary.failed === 0, JSON.stringify(result.summary))
  record('mppx validate', 'found the priced routes in /openapi.json', 'mppx', result.endpoints.length > 0,
         result.endpoints.map((ep) => `${ep.method} ${ep.path}`).join(', '))
}

async function chargeOnce(path, label, log, paid) {
  const mppx = Mppx.create({ methods: [lightningChargeClient(paid)], polyfill: false, fetch: recordingFetch(label, log) })
  const before = log.length
  let response
  try {
    response = await mppx.fetch(`${base}${path}`)
    record(label, 'mppx client fetch completes', 'mppx', true)
  } catch (error) {
    record(label, 'mppx client fetch completes', 'mppx', false, `${error.name}: ${error.message}`)
  }
  for (const entry of log.slice(before)) {
    const ex = `${label}: ${entry.authorization ? 'with credential' : 'no credential'} -> ${entry.response.status}`
    if (entry.response.status === 402) check402(ex, entry.response, { intent: 'charge' })
    if (entry.authorization) checkCredentialRoundTrip(ex, entry.authorization)
  }
  if (!response) return undefined
  const ex = `${label}: paid response`
  record(ex, 'status 200', 'draft', response.status === 200, `got ${response.status}: ${response.status === 200 ? '' : await response.clone().text()}`)
  const last = paid.at(-1)
  checkReceipt(ex, response, { reference: last?.hash })
  if (response.status === 200 && last) consumed.add(last.id)
  await response.text()
  return log.slice(before).find((e) => e.authorization)?.authorization
}

async function scenarioCharge(paymentPath, dualPath) {
  const log = []
  const paid = []
  // 1. two unauthenticated requests: two fresh challenges
  for (const i of [1, 2])
    check402(`charge ${paymentPath}: unauthenticated request ${i}`, await fetch(`${base}${paymentPath}`), { intent: 'charge' })
  // 2. mppx pays and is served
  const credential = await chargeOnce(paymentPath, `charge ${paymentPath} (mppx fetch #1)`, log, paid)
  // 3. the spent credential again: 402, fresh challenge
  if (credential) {
    const r = await fetch(`${base}${paymentPath}`, { headers: { authorization: credential } })
    const ex = `charge ${paymentPath}: the spent credential again`
    check402(ex, r, { intent: 'charge' })
    const ct = r.headers.get('content-type') ?? ''
    record(ex, 'problem+json body', 'draft', ct.startsWith('application/problem+json'), ct)
  }
  // 4. mppx pays again (a new 402, a new challenge)
  await chargeOnce(paymentPath, `charge ${paymentPath} (mppx fetch #2)`, log, paid)
  // 5. a route offering L402 and Payment: mppx picks the Payment challenge
  await chargeOnce(dualPath, `charge ${dualPath} (mppx fetch, L402 and Payment offered)`, log, paid)
  // 6. a credential mppx cannot parse gets a 402 with a fresh challenge
  const r = await fetch(`${base}${paymentPath}`, { headers: { authorization: 'Payment dGhpcyBpcyBnYXJiYWdl' } })
  check402(`charge ${paymentPath}: garbage credential`, r, { intent: 'charge' })
}

// Server-Sent Events from a fetch Response, one {event, data} at a time.
async function* sse(response) {
  const reader = response.body.getReader()
  const decoder = new TextDecoder()
  let buffer = ''
  for (;;) {
    const { value, done } = await reader.read()
    if (done) break
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n')
    let cut
    while ((cut = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, cut)
      buffer = buffer.slice(cut + 2)
      let event = 'message'
      const data = []
      for (const line of block.split('\n')) {
        if (line.startsWith(':')) continue
        const [field, ...rest] = line.split(':')
        const v = rest.join(':').replace(/^ /, '')
        if (field === 'event') event = v
        else if (field === 'data') data.push(v)
      }
      if (data.length || event !== 'message') yield { event, data: data.join('\n') }
    }
  }
}

function sessionCredential(challenge, payload) {
  return Credential.serialize(Credential.from({ challenge, payload }))
}

async function sessionAction(label, path, challenge, payload) {
  const header = sessionCredential(challenge, payload)
  checkCredentialRoundTrip(label, header)
  const response = await fetch(`${base}${path}`, { headers: { authorization: header } })
  if (response.status !== 402) consumed.add(challenge.id)
  return { response, header }
}

// Reads a session stream: data events, the payment-receipt event (mppx's receipt schema:
// it carries method, reference, status and timestamp), [DONE]. `onTopUp` runs when the
// server asks for a top-up.
async function readStream(label, response, sessionId, onTopUp) {
  const got = { data: [], receipts: [], topups: 0, done: false, other: [] }
  for await (const ev of sse(response)) {
    if (ev.event === 'message' && ev.data === '[DONE]') {
      got.done = true
      continue
    }
    if (ev.event === 'message') got.data.push(JSON.parse(ev.data).i)
    else if (ev.event === 'payment-receipt') {
      const receipt = sdk(`${label}: payment-receipt event`, 'Receipt.from (the event JSON)', () => Receipt.from(JSON.parse(ev.data)))
      if (receipt) {
        record(`${label}: payment-receipt event`, 'reference is the session id', 'draft', receipt.reference === sessionId,
               receipt.reference)
        record(`${label}: payment-receipt event`, 'spent and units are numbers', 'draft',
               typeof receipt.spent === 'number' && typeof receipt.units === 'number', ev.data)
        record(`${label}: payment-receipt event`, 'comes before [DONE]', 'draft', !got.done)
      }
      got.receipts.push(receipt)
    } else if (ev.event === 'payment-need-topup') {
      got.topups++
      await onTopUp(JSON.parse(ev.data))
    } else got.other.push(ev)
  }
  return got
}

async function scenarioSession(path) {
  const url = `${base}${path}`
  // 1. the challenge
  let r = await fetch(`${url}?n=2`)
  const [a] = check402('session: unauthenticated request 1', r, { intent: 'session' })
  r = await fetch(`${url}?n=2`)
  check402('session: unauthenticated request 2', r, { intent: 'session' })
  if (!a) return
  const unit = Number(a.request.amount)
  const depositUnits = Number(a.request.depositAmount) / unit
  record('session: challenge', 'depositAmount and amount are decimal strings', 'draft',
         /^\d+$/.test(a.request.amount) && /^\d+$/.test(a.request.depositAmount), JSON.stringify(a.request))
  const sessionId = a.request.paymentHash
  // 2. open (2 events), with a return invoice
  const preimage = await pay(a.request.depositInvoice)
  const opened = await sessionAction('session: open', `${path}?n=2`, a, { action: 'open', preimage, returnInvoice: await returnInvoice() })
  record('session: open', 'status 200', 'draft', opened.response.status === 200,
         `got ${opened.response.status} ${opened.response.status === 200 ? '' : await opened.response.clone().text()}`)
  checkReceipt('session: open', opened.response, { reference: sessionId })
  const first = opened.response.status === 200 ? await readStream('session: open stream', opened.response, sessionId, async () => {}) : undefined
  if (first) record('session: open stream', 'both events, one receipt, [DONE]', 'draft',
                    first.data.join() === '0,1' && first.receipts.length === 1 && first.done, JSON.stringify(first))
  // 3. bearer: a stream of depositUnits events: the balance runs out after depositUnits-2 of them,
  //    the server asks for a top-up, a fresh challenge is paid, the held stream goes on
  let latest = a
  const n = depositUnits
  const bearer = await sessionAction('session: bearer', `${path}?n=${n}`, latest, { action: 'bearer', sessionId, preimage })
  record('session: bearer', 'status 200', 'draft', bearer.response.status === 200,
         `got ${bearer.response.status} ${bearer.response.status === 200 ? '' : await bearer.response.clone().text()}`)
  checkReceipt('session: bearer', bearer.response, { reference: sessionId })
  let toppedUp = false
  const second = bearer.response.status === 200 ? await readStream('session: bearer stream', bearer.response, sessionId, async (need) => {
    record('session: payment-need-topup event', 'names the session', 'draft', need.sessionId === sessionId, JSON.stringify(need))
    const fresh = await fetch(`${url}?n=1`)
    const [b] = check402('session: challenge for the top-up', fresh, { intent: 'session' })
    if (!b) return
    const topUpPreimage = await pay(b.request.depositInvoice)
    const top = await sessionAction('session: topUp', path, b, { action: 'topUp', sessionId, topUpPreimage })
    const body = await top.response.clone().text()
    record('session: topUp', 'status 200 {"status":"ok"}', 'draft', top.response.status === 200 && JSON.parse(body).status === 'ok',
           `${top.response.status} ${body}`)
    checkReceipt('session: topUp', top.response, { reference: sessionId })
    await top.response.text()
    latest = b
    toppedUp = true
  }) : undefined
  if (second) record('session: bearer stream', `all ${n} events after one top-up, one receipt, [DONE]`, 'draft',
                     second.data.join() === [...Array(n).keys()].join() && second.topups === 1 && toppedUp &&
                     second.receipts.length === 1 && second.done, JSON.stringify(second))
  // 4. close: refund = deposits - spent
  const closed = await sessionAction('session: close', path, latest, { action: 'close', sessionId, preimage })
  const text = await closed.response.clone().text()
  record('session: close', 'status 200', 'draft', closed.response.status === 200, `${closed.response.status} ${text}`)
  const receipt = checkReceipt('session: close', closed.response, { reference: sessionId })
  if (closed.response.status === 200) {
    const body = JSON.parse(text)
    const spentUnits = 2 + n
    const expected = (2 * depositUnits - spentUnits) * unit
    record('session: close', `body {"status":"closed","refundSats":${expected},"refundStatus":"succeeded"}`, 'draft',
           body.status === 'closed' && body.refundSats === expected && body.refundStatus === 'succeeded', text)
    if (receipt) record('session: close', 'receipt carries refundSats and refundStatus', 'draft',
                        receipt.refundSats === body.refundSats && receipt.refundStatus === body.refundStatus, JSON.stringify(receipt))
  }
  await closed.response.text()
  // 5. after the close: the open credential again, and a new unauthenticated request
  const again = await fetch(`${url}?n=1`, { headers: { authorization: bearer.header } })
  const ex = 'session: bearer on the closed session'
  check402(ex, again, { intent: 'session' })
  const problem = await again.clone().json().catch(() => ({}))
  record(ex, 'problem type session-closed', 'draft', String(problem.type).endsWith('/session-closed'), problem.type)
  check402('session: unauthenticated request after the close', await fetch(`${url}?n=1`), { intent: 'session' })
}

try {
  if (scenario === 'validate') await scenarioValidate()
  else if (scenario === 'charge') await scenarioCharge(args[0], args[1])
  else if (scenario === 'session') await scenarioSession(args[0])
  else throw new Error(`unknown scenario ${scenario}`)
} catch (error) {
  record(`${scenario}: driver`, 'ran to the end', 'mppx', false, error.stack)
}
console.log(JSON.stringify({ scenario, checks, failures: checks.filter((c) => !c.ok) }, null, 1))
