// Drives the TypeScript daemon's own FederationRegistry (dist/federation/registry.js of
// @wundr.io/orchestrator-daemon, fetched by `python -m tests.integration._daemon`).
//
//   node daemon_registry.mjs REGISTRY_JS CONFIG_JSON
//
// CONFIG_JSON is the registry's config ({redis: {host, port, db, keyPrefix},
// heartbeatTimeout, staleTimeout} in ms; its cleanup timer is left to the tests,
// which call cleanupStaleOrchestrators themselves). Then one command per stdin
// line, {"op": METHOD, "args": [...]}, answered by one stdout line:
// {"ok": true, "result": ..., "events": [[name, ...args], ...]} or
// {"ok": false, "error": message}. The first line is {"ok": true, "ready": true}
// once Redis is connected. Besides the registry's methods, "indexIds" returns
// the ids its capability and region readers start from (before GETting records).
import { createRequire } from 'node:module';
import readline from 'node:readline';

const require = createRequire(import.meta.url);
const [registryJs, configJson] = process.argv.slice(2);

// registry.js logs with console.log; stdout carries only our JSON lines.
console.log = (...args) => console.error(...args);
const { FederationRegistry } = require(registryJs);

const METHODS = new Set([
  'registerOrchestrator',
  'deregisterOrchestrator',
  'updateHeartbeat',
  'updateStatus',
  'updateMetrics',
  'cleanupStaleOrchestrators',
  'getOrchestratorMetadata',
  'getOrchestratorMetrics',
  'getOrchestratorsByCapability',
  'getOrchestratorsByRegion',
  'getAllOrchestrators',
  'getHealthyOrchestrators',
  'queryOrchestrators',
]);
const EVENTS = [
  'orchestrator:registered',
  'orchestrator:deregistered',
  'orchestrator:status_changed',
  'orchestrator:unhealthy',
  'orchestrator:stale',
  'heartbeat:received',
];

const config = JSON.parse(configJson);
const registry = new FederationRegistry({ cleanupInterval: 24 * 3600 * 1000, ...config });
let events = [];
for (const name of EVENTS) registry.on(name, (...args) => events.push([name, ...args]));

function reply(message) {
  process.stdout.write(`${JSON.stringify(message)}\n`);
}

async function run(op, args) {
  if (op === 'indexIds') {
    // What getOrchestratorsByCapability / ByRegion read before fetching records.
    const [{ capabilities, region }] = args;
    if (capabilities) {
      return (await registry.redis.sInter(capabilities.map(c => registry.getCapabilityIndexKey(c)))).sort();
    }
    return (await registry.redis.sMembers(registry.getRegionIndexKey(region))).sort();
  }
  if (!METHODS.has(op)) throw new Error(`unknown op ${op}`);
  if (op === 'registerOrchestrator' && args[0].registeredAt) {
    args[0].registeredAt = new Date(args[0].registeredAt);
  }
  return registry[op](...args);
}

const deadline = Date.now() + 10000;
while (!registry.connected) {
  if (Date.now() > deadline) {
    reply({ ok: false, error: 'the registry did not connect to Redis within 10 s' });
    process.exit(1);
  }
  await new Promise(resolve => setTimeout(resolve, 10));
}
reply({ ok: true, ready: true });

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  events = [];
  try {
    const { op, args = [] } = JSON.parse(line);
    const result = await run(op, args);
    reply({ ok: true, result: result === undefined ? null : result, events });
  } catch (error) {
    reply({ ok: false, error: String(error && error.message ? error.message : error) });
  }
}
await registry.disconnect();
