// Puts one record with the real kubo-rpc-client's dag.put, as an application would (its default
// input codec is dag-cbor), and prints {"ok": true, "cid"} or {"ok": false, "error"}.
// Input (JSON on stdin): {"api", "authorization", "record", "options"}.
import { create } from 'kubo-rpc-client'

const chunks = []
for await (const chunk of process.stdin) chunks.push(chunk)
const spec = JSON.parse(Buffer.concat(chunks).toString('utf8'))
const client = create({ url: spec.api, headers: { authorization: spec.authorization } })
try {
  const cid = await client.dag.put(spec.record, spec.options ?? {})
  console.log(JSON.stringify({ ok: true, cid: cid.toString() }))
} catch (err) {
  console.log(JSON.stringify({ ok: false, error: String(err.message ?? err) }))
}
