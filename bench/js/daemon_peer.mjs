// One peer process of a benchmark run, driving the TypeScript daemon's own
// OrchestratorConnection (dist/federation/connection.js of
// @wundr.io/orchestrator-daemon, which needs only `ws`). It speaks the same
// command line and JSON-line reports as `python -m bench.worker` (see there):
//
//   node daemon_peer.mjs serve|dial --mode throughput|roundtrip --count N
//        --warmup W [--port P] [--timeout S] --connection PATH --template JSON
//
// `--template` is the wire form of the benchmark's delegation (envelope with the
// payload as an object); message i gets task id and correlation id task-<i>.
// Throughput: every sendMessage() is awaited (ws's send callback). Round trips:
// delegation -> the listener's acceptDelegation() -> the dialer's 'callback'.
// `ws` and the daemon's `require("ws")` come from NODE_PATH.
//
// Idle connections (for `python -m bench.idle`, same reports as its peers):
//
//   node --expose-gc daemon_peer.mjs serve|dial --mode idle --connections N
//        --seconds S --settle S --heartbeat-timeout MS --concurrency C
//        --handshake-timeout S [--port P] [--timeout S] --connection PATH
//
// Every connection, on both sides, is an OrchestratorConnection with
// heartbeatTimeout MS: its own monitor then ws-pings every MS/2 (ws answers
// pings with pongs by itself; a pong is what the monitor checks). The listener
// reports its RSS after global.gc() when listening with no connection, and
// again --settle seconds after the last one arrived; then its CPU
// (process.cpuUsage) over --seconds. The dialer opens them, --concurrency
// handshakes at a time, reports `open`, and holds them until stdin closes.
import { createRequire } from "node:module";
import process from "node:process";

const require = createRequire(import.meta.url);
const WebSocket = require("ws");

function parse(argv) {
  const args = { warmup: 1, port: 0, timeout: 120 };
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i].startsWith("--")) {
      args[argv[i].slice(2)] = argv[i + 1];
      i += 1;
    } else {
      args.role = argv[i];
    }
  }
  for (const key of [
    "count", "warmup", "port", "timeout", "connections", "seconds", "settle",
    "heartbeat-timeout", "concurrency", "handshake-timeout",
  ]) args[key] = Number(args[key]);
  return args;
}

const args = parse(process.argv.slice(2));
const { OrchestratorConnection } = require(args.connection);
const template = args.template === undefined ? null : JSON.parse(args.template);
const HEARTBEAT_TIMEOUT_MS = 3600 * 1000; // as the Python peers: never during a run
const CAPABILITIES = ["code-generation", "testing"];

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
}

function fail(error) {
  emit("error", { error: String(error && error.stack ? error.stack : error) });
  process.exit(1);
}

class Stopwatch {
  constructor() { this.restart(); }
  restart() { this.wall = process.hrtime.bigint(); this.cpu = process.cpuUsage(); }
  read() {
    const cpu = process.cpuUsage(this.cpu);
    return {
      elapsed: Number(process.hrtime.bigint() - this.wall) / 1e9,
      cpu: (cpu.user + cpu.system) / 1e6,
    };
  }
}

function message(index) {
  const taskId = `task-${String(index).padStart(6, "0")}`;
  const payload = structuredClone(template.payload);
  payload.task.id = taskId;
  return {
    type: template.type,
    payload,
    from: template.from,
    to: template.to,
    timestamp: new Date(template.timestamp),
    correlationId: taskId,
  };
}

function connection(id, socket, heartbeatTimeout = HEARTBEAT_TIMEOUT_MS) {
  return new OrchestratorConnection({ id, socket, capabilities: CAPABILITIES, heartbeatTimeout });
}

function listen() {
  const server = new WebSocket.WebSocketServer({ host: "127.0.0.1", port: 0 });
  return new Promise((resolve, reject) => {
    server.once("listening", () => resolve(server)).once("error", reject);
  });
}

const sleep = (seconds) => new Promise((resolve) => { setTimeout(resolve, seconds * 1000); });

function rss() {
  globalThis.gc?.(); // a full collection, with --expose-gc
  return process.memoryUsage().rss;
}

async function serve() {
  const server = await listen();
  server.once("connection", (socket) => {
    const conn = connection(template.to, socket);
    conn.on("error", fail);
    const clock = new Stopwatch();
    if (args.mode === "throughput") {
      const total = args.warmup + args.count;
      let received = 0;
      conn.on("delegation", () => {
        received += 1;
        if (received === args.warmup) clock.restart();
        if (received === total) {
          emit("result", { received, ...clock.read() });
          process.exit(0);
        }
      });
    } else {
      let answered = 0;
      conn.on("delegation", (request) => {
        conn.acceptDelegation(request).then(() => { answered += 1; }, fail);
      });
      conn.on("close", () => {
        emit("result", { answered, ...clock.read() });
        process.exit(0);
      });
    }
  });
  emit("ready", { port: server.address().port });
}

async function dial() {
  const socket = new WebSocket(`ws://127.0.0.1:${args.port}/federation`);
  const conn = connection(template.from, socket);
  conn.on("error", fail);
  await new Promise((resolve, reject) => socket.once("open", resolve).once("error", reject));
  const messages = [];
  for (let i = 0; i < args.warmup + args.count; i += 1) messages.push(message(i));
  const frame = conn._serializeMessage(messages[0]); // checked by the parent
  let report;
  if (args.mode === "throughput") {
    const clock = new Stopwatch();
    for (const m of messages) await conn.sendMessage(m);
    report = { sent: messages.length, frame, ...clock.read() };
  } else {
    let answer = null;
    conn.on("callback", (callback) => {
      const resolve = answer;
      answer = null;
      resolve(callback);
    });
    const latencies = [];
    let clock = new Stopwatch();
    for (let i = 0; i < messages.length; i += 1) {
      if (i === args.warmup) clock = new Stopwatch();
      const started = process.hrtime.bigint();
      const replied = new Promise((resolve) => { answer = resolve; });
      await conn.sendMessage(messages[i]);
      const reply = await replied;
      const elapsed = Number(process.hrtime.bigint() - started);
      if (!reply.accepted || reply.taskId !== messages[i].correlationId) {
        fail(`unexpected answer to ${messages[i].correlationId}: ${JSON.stringify(reply)}`);
      }
      if (i >= args.warmup) latencies.push(elapsed);
    }
    report = { latencies_ns: latencies, frame, ...clock.read() };
  }
  emit("result", report);
  socket.close(1000);
  process.exit(0);
}

async function serveIdle() {
  const server = await listen();
  let connected = 0;
  let errors = 0; // the monitor's "No heartbeat received" (or a socket error)
  let closed = 0;
  let allIn;
  const arrived = new Promise((resolve) => { allIn = resolve; });
  server.on("connection", (socket) => {
    const conn = connection("idle-listener", socket, args["heartbeat-timeout"]);
    conn.on("error", () => { errors += 1; });
    conn.on("close", () => { closed += 1; });
    connected += 1;
    if (connected === args.connections) allIn();
  });
  const before = rss();
  emit("ready", { port: server.address().port });
  await arrived;
  await sleep(args.settle);
  const after = rss();
  const clock = new Stopwatch();
  await sleep(args.seconds);
  emit("result", {
    rss_before: before, rss_after: after, connections: connected, errors, closed, ...clock.read(),
  });
  process.exit(0);
}

async function dialIdle() {
  let next = 0;
  let opened = 0;
  async function opener() { // one of --concurrency: only the handshakes are limited
    while (next < args.connections) {
      const index = next;
      next += 1;
      const socket = new WebSocket(`ws://127.0.0.1:${args.port}/federation`, {
        handshakeTimeout: args["handshake-timeout"] * 1000,
      });
      const conn = connection(`idle-${String(index).padStart(5, "0")}`, socket, args["heartbeat-timeout"]);
      const open = new Promise((resolve, reject) => { socket.once("open", resolve); conn.once("error", reject); });
      await open;
      conn.on("error", () => {}); // a late pong: the listener's count is the one reported
      opened += 1;
    }
  }
  await Promise.all(Array.from({ length: args.concurrency }, opener));
  emit("open", { connections: opened });
}

// Never outlive the benchmark: stop at the timeout, or when stdin closes.
setTimeout(() => fail(`${args.role} did not finish within ${args.timeout}s`), args.timeout * 1000).unref();
process.stdin.on("end", () => process.exit(args.mode === "idle" ? 0 : 1)); // idle: how the dialer stops
process.stdin.resume();
if (args.mode === "idle") (args.role === "serve" ? serveIdle() : dialIdle()).catch(fail);
else (args.role === "serve" ? serve() : dial()).catch(fail);
