#!/usr/bin/env node
// Drives the TypeScript daemon's *real* federation classes against
// trio-federation (fetched by fetch-daemon.mjs into ./daemon): its
// OrchestratorConnection (dist/federation/connection.js) and its coordinator
// OrchestratorFederation (dist/federation/coordinator.js). Nothing here
// re-implements the wire: the daemon's code writes and reads every frame.
//
//   node daemon-peer.cjs connection-server --id ts-orch [--count N]
//       listens on 127.0.0.1:0; wraps each accepted socket in an
//       OrchestratorConnection constructed as the daemon does (id = the
//       remote's id, from X-Federation-Id or ?id=)
//   node daemon-peer.cjs connection-client --url URL --id ts-orch --remote py-node [--count N]
//       dials URL?id=ts-orch and wraps the socket likewise (id = --remote)
//     Both answer every delegation with acceptDelegation(), a progress and a
//     completed callback (from = this.id, as the daemon's acceptance), and
//     delegate N tasks of their own (from alternately this.id and our id);
//     "done" once all N completed.
//   node daemon-peer.cjs coordinator --url URL --id ts-coord --remote py-node
//       registers a socket to URL?id=ts-coord in an OrchestratorFederation as
//       --remote, and runs the scenario of test_interop_daemon.py.
// stdout: one JSON object per line ({"event": ...}); the daemon's own logging
// goes to stderr.
'use strict';
const path = require('node:path');
const { EventEmitter } = require('node:events');
const { WebSocket, WebSocketServer } = require('ws');

// The daemon's Logger writes with console.info/debug/warn/error: keep stdout ours.
for (const level of ['log', 'info', 'debug', 'warn', 'error']) {
  console[level] = (...args) => process.stderr.write(args.map(String).join(' ') + '\n');
}
const daemon = path.join(__dirname, 'daemon', 'dist');
const { OrchestratorConnection } = require(path.join(daemon, 'federation', 'connection.js'));
const { OrchestratorFederation } = require(path.join(daemon, 'federation', 'coordinator.js'));

const out = obj => process.stdout.write(JSON.stringify(obj) + '\n');
const fail = err => {
  out({ event: 'error', error: String(err?.stack ?? err) });
  process.exit(1);
};
process.on('unhandledRejection', fail);

function parseArgs(argv) {
  const args = { mode: argv[0] };
  for (let i = 1; i < argv.length; i += 2) args[argv[i].replace(/^--/, '')] = argv[i + 1];
  return args;
}

function task(id, description = 'interop task from the daemon', type = 'code') {
  const now = new Date();
  return { id, type, description, priority: 'medium', status: 'pending', createdAt: now, updatedAt: now };
}

// One daemon OrchestratorConnection: execute what it is given, delegate `count` tasks.
function serveConnection(conn, selfId, count) {
  const counts = { accepted: 0, progress: 0, completed: 0, failed: 0, delegations: 0, errors: 0 };
  let done = false;
  conn.on('error', err => { counts.errors++; out({ event: 'conn-error', error: err.message }); });
  conn.on('close', (code, reason) => out({ event: 'closed', code, reason, counts }));
  conn.on('delegation', async request => {
    counts.delegations++;
    const response = await conn.acceptDelegation(request);
    if (!response.accepted) return out({ event: 'not-accepted', response });
    const callback = (payload) => conn.sendMessage({
      type: 'callback', payload, from: conn.id, to: request.fromOrchestratorId,
      timestamp: new Date(), correlationId: request.task.id,
    });
    await callback({ taskId: request.task.id, status: 'progress', progress: 50 });
    await callback({ taskId: request.task.id, status: 'completed', result: { by: selfId } });
  });
  conn.on('callback', payload => {
    if (payload.accepted === true) counts.accepted++;
    else if (payload.status === 'progress') counts.progress++;
    else if (payload.status === 'completed') counts.completed++;
    else if (payload.status === 'failed') counts.failed++;
    if (!done && counts.completed + counts.failed === count) {
      done = true;
      out({ event: 'done', counts: { ...counts }, status: conn.getStatus() });
    }
  });
  for (let i = 0; i < count; i++) {
    const id = `ts-task-${i}`;
    conn.sendMessage({
      type: 'delegation',
      payload: { fromOrchestratorId: selfId, toOrchestratorId: conn.id, task: task(id), priority: 'medium' },
      // The daemon's own convention (this.id) on every other one.
      from: i % 2 ? conn.id : selfId, to: conn.id, timestamp: new Date(), correlationId: id,
    }).catch(fail);
  }
  return counts;
}

function connectionServer(args) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  wss.on('error', fail);
  wss.on('listening', () => out({ event: 'listening', port: wss.address().port }));
  wss.on('connection', (ws, req) => {
    const query = new URL(req.url, 'http://localhost').searchParams;
    const remote = req.headers['x-federation-id'] ?? query.get('id');
    out({ event: 'connection', id: remote });
    const conn = new OrchestratorConnection({ id: remote, socket: ws, capabilities: [] });
    serveConnection(conn, args.id, Number(args.count ?? 0));
  });
  process.on('SIGTERM', () => {
    for (const ws of wss.clients) ws.close(1001, 'Server shutting down');
    wss.close();
    setTimeout(() => process.exit(0), 100);
  });
}

function connectionClient(args) {
  const ws = new WebSocket(`${args.url}?id=${encodeURIComponent(args.id)}`);
  const conn = new OrchestratorConnection({ id: args.remote, socket: ws, capabilities: [] });
  ws.on('open', () => {
    out({ event: 'open' });
    serveConnection(conn, args.id, Number(args.count ?? 0));
  });
  ws.on('error', fail);
  process.on('SIGTERM', async () => {
    await conn.disconnect();
    process.exit(0);
  });
}

const CAPABILITIES = {
  maxSessions: 4,
  supportedTaskTypes: ['code', 'research', 'analysis', 'custom'],
  memoryTiers: ['scratchpad', 'episodic', 'semantic'],
  tokenBudget: { subscription: 'none', api: 'none', remaining: 0 },
  resourceLimits: { maxHeapMB: 512, maxContextTokens: 100000 },
  // Broad, so that the coordinator forwards, and the Python node decides.
  specializations: ['code-generation', 'testing', 'ml-training'],
};

async function coordinator(args) {
  const federation = new OrchestratorFederation({ heartbeatInterval: 60000 }, true);
  const remote = args.remote;
  const ended = new Map();
  const waiters = new Map();
  const onEnd = (kind) => event => {
    out({ event: kind, sessionId: event.sessionId, orchestratorId: event.orchestratorId, error: event.error });
    ended.set(event.sessionId, event);
    waiters.get(event.sessionId)?.(event);
  };
  const ending = sessionId => ended.has(sessionId)
    ? Promise.resolve(ended.get(sessionId))
    : new Promise(resolve => waiters.set(sessionId, resolve));
  federation.on('task:completed', onEnd('task:completed'));
  federation.on('task:failed', onEnd('task:failed'));
  let heartbeats = 0;
  federation.on('orchestrator:heartbeat', event => {
    if (event.orchestratorId === remote && heartbeats++ === 0) out({ event: 'heartbeat', orchestratorId: remote });
  });
  federation.on('orchestrator:status_changed', event => out({ event: 'status_changed', ...event }));

  const ws = new WebSocket(`${args.url}?id=${encodeURIComponent(args.id)}`);
  ws.on('error', fail);
  await new Promise(resolve => ws.on('open', resolve));
  federation.registerOrchestrator(remote, {
    socket: ws, capabilities: CAPABILITIES, status: 'connected', lastHeartbeat: new Date(), activeSessions: 0,
  });
  // The delegations' source: registered, never written to.
  const source = Object.assign(new EventEmitter(), { readyState: WebSocket.OPEN, send() {}, close() {} });
  federation.registerOrchestrator('ts-src', {
    socket: source, capabilities: CAPABILITIES, status: 'connected', lastHeartbeat: new Date(), activeSessions: 0,
  });
  out({ event: 'registered' });

  const delegate = async (id, options, description) => {
    const result = await federation.delegateTask('ts-src', remote, task(id, description), { timeout: 10000, ...options });
    out({ event: 'delegated', taskId: id, result });
    return result;
  };
  // 1. Accepted (the object form of requiredCapabilities), then completed.
  await delegate('coord-1', { requiredCapabilities: { supportedTaskTypes: ['code'], specializations: ['code-generation'] } });
  await ending('coord-1');
  // 2. One that holds the node's only slot, then one refused as overloaded.
  await delegate('coord-2', {}, 'block');
  await delegate('coord-3', {});
  await ending('coord-2');  // the test releases coord-2 once it saw coord-3 refused
  // 3. The node's own capability check (the coordinator's passed: it reads what we registered).
  await delegate('coord-4', { requiredCapabilities: { specializations: ['ml-training'] } });
  // 4. A broadcast, and the node's shared context.
  federation.broadcastToAll({ sourceId: 'ts-src', messageType: 'custom', payload: { hello: 'py' }, priority: 'high' });
  const context = await federation.getSharedContext(remote, 'ts-src');
  out({ event: 'context', context });
  out({ event: 'done', metrics: federation.getMetrics(), status: federation.getOrchestrator(remote).status });
  await federation.shutdown();
  setTimeout(() => process.exit(0), 100);
}

try {
  const args = parseArgs(process.argv.slice(2));
  if (args.mode === 'connection-server') connectionServer(args);
  else if (args.mode === 'connection-client') connectionClient(args);
  else if (args.mode === 'coordinator') coordinator(args).catch(fail);
  else throw new Error('mode must be connection-server, connection-client or coordinator');
} catch (err) {
  fail(err);
}
