// Runs everyday operations with the real kubo-rpc-client against one RPC API and prints one JSON
// line per operation: {"op", "ok": true, "result"} or {"op", "ok": false, "error"}. The Python
// test runs it against the gateway and against Kubo directly and compares the lines.
//
// Input (JSON on stdin): {"api", "authorization" (or null), "blob", "block" (base64),
// "files": [{"path", "content" (base64)}], "root" (the directory's path), "object" (plain JSON)}.
// An operation that fails does not stop the others; one that needs a failed one's result fails.
import { create } from 'kubo-rpc-client'
import { CID } from 'multiformats/cid'

const spec = JSON.parse(await readStdin())
const client = create({
  url: spec.api,
  timeout: '60s',
  headers: spec.authorization ? { authorization: spec.authorization } : {}
})

const b64 = (bytes) => Buffer.from(bytes).toString('base64')
const fromB64 = (text) => new Uint8Array(Buffer.from(text, 'base64'))

async function readStdin () {
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  return Buffer.concat(chunks).toString('utf8')
}

async function collect (iterable) {
  const items = []
  for await (const item of iterable) items.push(item)
  return items
}

async function bytesOf (iterable) {
  return b64(Buffer.concat(await collect(iterable)))
}

// IPLD values as JSON: links as {"/": cid}, bytes as {"/": {"bytes": base64}} (dag-json's form).
function plain (value) {
  const asCid = CID.asCID(value)
  if (asCid != null) return { '/': asCid.toString() }
  if (value instanceof Uint8Array) return { '/': { bytes: b64(value) } }
  if (Array.isArray(value)) return value.map(plain)
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]))
  }
  return value
}

const got = {}
const operations = [
  ['add-bytes', async () => {
    const added = await client.add(fromB64(spec.blob))
    got.blob = added.cid
    return { cid: added.cid.toString(), size: added.size }
  }],
  ['add-directory', async () => {
    const files = spec.files.map((f) => ({ path: f.path, content: fromB64(f.content) }))
    const entries = await collect(client.addAll(files))
    got.root = entries.find((e) => e.path === spec.root).cid
    return entries.map((e) => ({ path: e.path, cid: e.cid.toString(), size: e.size }))
  }],
  ['cat', async () => bytesOf(client.cat(got.blob))],
  ['cat-path-with-space', async () => bytesOf(client.cat(`/ipfs/${got.root}/lab report.txt`))],
  ['get', async () => bytesOf(client.get(got.root))],
  ['ls', async () => (await collect(client.ls(got.root))).map((e) => ({
    name: e.name, path: e.path, size: e.size, cid: e.cid.toString(), type: e.type
  }))],
  ['refs-recursive', async () => (await collect(client.refs(got.root, { recursive: true })))
    .map((r) => r.err ? { err: r.err } : r.ref)],
  ['dag-put-cbor', async () => {
    got.cbor = await client.dag.put({ ...spec.object, file: got.blob })
    return got.cbor.toString()
  }],
  ['dag-get-cbor', async () => plain((await client.dag.get(got.cbor)).value)],
  ['dag-get-cbor-path', async () => {
    const { value, remainderPath } = await client.dag.get(got.cbor, { path: 'nested/list/1' })
    return { value: plain(value), remainderPath }
  }],
  ['dag-put-json', async () => {
    got.json = await client.dag.put({ ...spec.object, file: got.blob }, { storeCodec: 'dag-json' })
    return got.json.toString()
  }],
  ['dag-get-json', async () => plain((await client.dag.get(got.json)).value)],
  ['block-put', async () => {
    got.block = await client.block.put(fromB64(spec.block))
    return got.block.toString()
  }],
  ['block-get', async () => b64(await client.block.get(got.block))],
  ['block-stat', async () => {
    const stat = await client.block.stat(got.block)
    return { cid: stat.cid.toString(), size: stat.size }
  }],
  ['pin-add', async () => (await client.pin.add(got.block)).toString()],
  ['pin-ls', async () => (await collect(client.pin.ls({ paths: got.block })))
    .map((p) => ({ cid: p.cid.toString(), type: p.type }))],
  ['pin-rm', async () => (await client.pin.rm(got.block)).toString()],
  ['pin-ls-after-rm', async () => (await collect(client.pin.ls({ paths: got.block })))
    .map((p) => ({ cid: p.cid.toString(), type: p.type }))],
  ['version', async () => client.version()],
  ['id', async () => {
    const id = await client.id()
    return { id: id.id.toString(), agentVersion: id.agentVersion, protocolVersion: id.protocolVersion }
  }],
  ['config-get', async () => client.config.get('Identity.PeerID')]
]

for (const [op, run] of operations) {
  let line
  try {
    line = { op, ok: true, result: await run() }
  } catch (err) {
    line = { op, ok: false, error: String(err?.message ?? err) }
  }
  process.stdout.write(JSON.stringify(line) + '\n')
}
