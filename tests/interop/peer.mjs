#!/usr/bin/env node
// Interop peer for trio-federation's tests: speaks wire format v1 exactly like
// the TypeScript daemon @wundr.io/orchestrator-daemon (federation/connection.ts).
// Its serializer mirrors the daemon's, which is literally
//   JSON.stringify({type, payload: JSON.stringify(payload), from, to,
//                   timestamp: date.toISOString(), correlationId})
// (correlationId dropped by JSON.stringify when undefined), and its
// deserializer is JSON.parse(data) then JSON.parse(payload) (an object payload
// is accepted too). Like the daemon's server it sends no identification
// headers in its upgrade response. ws answers pings by itself.
//
//   node peer.mjs --mode server --port 0 --id js-peer [--delegate-on-connect] [--echo]
//                 (--echo: send every message back, from and to swapped, twice:
//                  as one frame, then in three fragments with a ping between)
//   node peer.mjs --mode client --url ws://127.0.0.1:PORT/federation --id js-peer
//                 [--capabilities testing,research] [--to py-listener]
//                 [--expect-delegation] [--expect-result] [--timeout 10]
//                 (--expect-result: stay until our delegation's final callback,
//                  completed or failed, arrived; not just its acceptance)
//                 [--secret S]  (prove our id as docs/protocol.rst "Authentication"
//                                says, in ?auth=, and check the listener's proof)
//   both: [--ping-interval MS]  (send WebSocket pings like the daemon does)
// stdout: one JSON object per line ({"event": ...}).
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { WebSocket, WebSocketServer } from 'ws';

// Authentication, written from the protocol page alone.
const b64url = buf => buf.toString('base64url');
const hmac = (secret, lines) => createHmac('sha256', secret).update(lines.join('\n')).digest();
function makeProof(secret, peerId, audience) {
  const ts = String(Date.now());
  const nonce = b64url(randomBytes(16));
  const mac = b64url(hmac(secret, ['trio-federation-auth-v1', peerId, audience, ts, nonce]));
  return { nonce, proof: `v1;ts=${ts};nonce=${nonce};aud=${encodeURIComponent(audience)};mac=${mac}` };
}
function listenerProofOk(answer, secret, listenerId, peerId, nonce) {
  const expected = Buffer.from('v1;mac=' + b64url(
    hmac(secret, ['trio-federation-auth-v1-listener', listenerId, peerId, nonce])));
  const got = Buffer.from(String(answer ?? ''));
  return got.length === expected.length && timingSafeEqual(got, expected);
}

const FLAGS = new Set(['delegate-on-connect', 'expect-delegation', 'expect-result', 'echo']);
function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i++) {
    const m = /^--([^=]+)(?:=(.*))?$/.exec(argv[i]);
    if (!m) throw new Error(`unexpected argument: ${argv[i]}`);
    if (m[2] !== undefined) args[m[1]] = m[2];
    else if (FLAGS.has(m[1])) args[m[1]] = true;
    else if (i + 1 < argv.length) args[m[1]] = argv[++i];
    else throw new Error(`missing value for --${m[1]}`);
  }
  return args;
}

const out = obj => process.stdout.write(JSON.stringify(obj) + '\n');
const fail = err => {
  out({ event: 'error', error: String(err?.message ?? err) });
  process.exit(1);
};

// The daemon's _serializeMessage / _deserializeMessage.
const serialize = (type, payload, from, to, correlationId) =>
  JSON.stringify({ type, payload: JSON.stringify(payload), from, to,
    timestamp: new Date().toISOString(), correlationId });
function deserialize(data) {
  const m = JSON.parse(data.toString());
  return { ...m, payload: typeof m.payload === 'string' ? JSON.parse(m.payload) : m.payload };
}

function delegation(from, to, taskId) {
  const now = new Date().toISOString();
  const task = { id: taskId, type: 'code', description: 'interop task from js peer',
    priority: 'high', status: 'pending', createdAt: now, updatedAt: now };
  return serialize('delegation', { fromOrchestratorId: from, toOrchestratorId: to, task,
    priority: 'high' }, from, to, taskId);
}

// Accept a delegation the way OrchestratorConnection.acceptDelegation does, then
// report the task completed with a TaskCallback. The daemon constructs its
// OrchestratorConnection with id = the *remote* orchestrator's id and sends
// the acceptance `from: this.id`: so its `from` is the delegator's own id
// (remoteId here), and `to` the delegator's (fromOrchestratorId).
function answerDelegation(ws, selfId, remoteId, request) {
  const taskId = request.task.id;
  ws.send(serialize('callback', { taskId, accepted: true }, remoteId, request.fromOrchestratorId, taskId));
  ws.send(serialize('callback', { taskId, status: 'completed', result: { by: selfId } },
    selfId, request.fromOrchestratorId, taskId));
}

// Print every message; answer delegations. Returns the decoded message or null.
function onMessage(ws, selfId, remoteId, data) {
  let msg;
  try { msg = deserialize(data); } catch (err) {
    out({ event: 'malformed', error: err.message, data: data.toString() });
    return null;
  }
  out({ event: 'received', message: msg });
  if (msg.type === 'delegation') {
    try { answerDelegation(ws, selfId, remoteId, msg.payload); } catch (err) {
      out({ event: 'malformed', error: `cannot answer delegation: ${err.message}` });
    }
  }
  return msg;
}

// Send a message back to its sender, as one frame, then fragmented: three
// continuation-linked text frames cut at byte offsets (possibly inside a UTF-8
// character, which fragments may do) with a ping between the first two.
function echo(ws, data) {
  const m = JSON.parse(data.toString());
  [m.from, m.to] = [m.to, m.from];
  const text = Buffer.from(JSON.stringify(m));
  ws.send(text, { binary: false });
  const a = Math.floor(text.length / 3) + 1, b = Math.floor((2 * text.length) / 3) + 1;
  ws.send(text.subarray(0, a), { binary: false, fin: false });
  ws.ping('between fragments');
  ws.send(text.subarray(a, b), { binary: false, fin: false });
  ws.send(text.subarray(b), { binary: false, fin: true });
  out({ event: 'echoed', bytes: text.length });
}

function startPinging(ws, ms) {
  if (!ms) return;
  const timer = setInterval(() => ws.readyState === WebSocket.OPEN && ws.ping(), ms);
  ws.on('close', () => clearInterval(timer));
  ws.on('pong', () => out({ event: 'pong' }));
}

function runServer(args) {
  const selfId = args.id ?? 'js-peer';
  const wss = new WebSocketServer({ host: '127.0.0.1', port: Number(args.port ?? 0) });
  wss.on('error', fail);
  wss.on('listening', () => out({ event: 'listening', port: wss.address().port }));
  wss.on('connection', (ws, req) => {
    const query = new URL(req.url, 'http://localhost').searchParams;
    const clientId = req.headers['x-federation-id'] ?? query.get('id') ?? 'unknown';
    out({ event: 'connection', id: clientId, url: req.url, headers: req.headers });
    if (args.echo) ws.on('message', data => echo(ws, data));
    else ws.on('message', data => onMessage(ws, selfId, clientId, data));
    ws.on('error', err => out({ event: 'error', error: err.message }));
    ws.on('close', (code, reason) => out({ event: 'closed', code, reason: reason.toString() }));
    startPinging(ws, Number(args['ping-interval'] ?? 0));
    if (args['delegate-on-connect']) ws.send(delegation(selfId, clientId, 'js-task-1'));
  });
  process.on('SIGTERM', () => {
    for (const ws of wss.clients) ws.close(1001, 'Server shutting down');
    wss.close();
    setTimeout(() => process.exit(0), 200);
  });
}

function runClient(args) {
  const selfId = args.id ?? 'js-peer';
  if (!args.url) throw new Error('--url is required in client mode');
  const query = [`id=${encodeURIComponent(selfId)}`];
  if (args.capabilities) {
    query.push(`capabilities=${args.capabilities.split(',').map(encodeURIComponent).join(',')}`);
  }
  let auth = null;
  if (args.secret) {
    auth = makeProof(args.secret, selfId, '');
    query.push(`auth=${encodeURIComponent(auth.proof)}`);
  }
  const url = args.url + (args.url.includes('?') ? '&' : '?') + query.join('&');
  const timeout = setTimeout(() => fail(`timeout after ${args.timeout ?? 10} s`),
    Number(args.timeout ?? 10) * 1000);
  let accepted = false, answered = false, finished = false, closing = false;
  let upgradeHeaders = {};
  const ws = new WebSocket(url);
  ws.on('upgrade', res => { upgradeHeaders = res.headers; });
  ws.on('open', () => {
    out({ event: 'open', headers: upgradeHeaders });
    if (auth) {
      const ok = listenerProofOk(upgradeHeaders['x-federation-auth'], args.secret,
        upgradeHeaders['x-federation-id'], selfId, auth.nonce);
      out({ event: 'listener-proof', ok });
      if (!ok) { closing = true; ws.close(1008, 'unauthenticated'); return; }
    }
    startPinging(ws, Number(args['ping-interval'] ?? 0));
    ws.send(delegation(selfId, args.to ?? 'py-listener', 'js-task-1'));
  });
  ws.on('message', data => {
    const msg = onMessage(ws, selfId, args.to ?? 'py-listener', data);
    const p = msg?.payload;
    if (msg?.type === 'callback' && p?.taskId === 'js-task-1' && p.accepted !== undefined) accepted = true;
    if (msg?.type === 'callback' && p?.taskId === 'js-task-1' &&
        (p.status === 'completed' || p.status === 'failed')) finished = true;
    if (msg?.type === 'delegation') answered = true;
    if (accepted && (answered || !args['expect-delegation']) &&
        (finished || !args['expect-result']) && !closing) {
      closing = true;
      ws.close(1000, 'Graceful disconnect');
    }
  });
  ws.on('error', fail);
  ws.on('close', (code, reason) => {
    out({ event: 'closed', code, reason: reason.toString() });
    if (!closing) fail('connection closed by the remote side before the exchange finished');
    clearTimeout(timeout);
    process.exit(0);
  });
  process.on('SIGTERM', () => {
    closing = true;
    ws.close(1001, 'Client shutting down');
    setTimeout(() => process.exit(0), 200);
  });
}

try {
  const args = parseArgs(process.argv.slice(2));
  if (args.mode === 'server') runServer(args);
  else if (args.mode === 'client') runClient(args);
  else throw new Error('--mode must be server or client');
} catch (err) {
  fail(err);
}
