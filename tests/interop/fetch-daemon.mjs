#!/usr/bin/env node
// Fetch the TypeScript daemon's federation code for the interop tests: the
// pinned version of @wundr.io/orchestrator-daemon (package.json, "daemon"),
// through `npm pack` (the registry's tarball, its integrity checked against
// the pin), of which only package.json, dist/federation and dist/utils are
// extracted into ./daemon. Its whole dependency tree is not installed: the
// classes under test need only `ws` and `eventemitter3`, which package.json
// lists (and `npm ci` installs). (npm install of the full package pulls in
// heavy dependencies, and 1.0.39's `@wundr.io/ai-integration@^1.0.39` does
// not even resolve on the registry.)
//
//   node fetch-daemon.mjs          fetch unless ./daemon holds the pinned version
//   node fetch-daemon.mjs --force  fetch again
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const pin = JSON.parse(readFileSync(join(here, 'package.json'), 'utf8')).daemon;
const target = join(here, 'daemon');

function installedVersion() {
  try {
    return JSON.parse(readFileSync(join(target, 'package.json'), 'utf8')).version;
  } catch {
    return null;
  }
}

if (!process.argv.includes('--force') && installedVersion() === pin.version) {
  console.log(`${pin.package}@${pin.version} already in ${target}`);
  process.exit(0);
}

const work = mkdtempSync(join(tmpdir(), 'trio-federation-daemon-'));
try {
  const packed = JSON.parse(execFileSync(
    'npm', ['pack', `${pin.package}@${pin.version}`, '--pack-destination', work, '--json', '--silent'],
    { encoding: 'utf8', shell: process.platform === 'win32' }));
  const tarball = join(work, packed[0].filename);
  const digest = 'sha512-' + createHash('sha512').update(readFileSync(tarball)).digest('base64');
  if (digest !== pin.integrity) {
    throw new Error(`integrity mismatch for ${pin.package}@${pin.version}: ${digest} != ${pin.integrity}`);
  }
  execFileSync('tar', ['-xzf', tarball, '-C', work, ...pin.files]);
  rmSync(target, { recursive: true, force: true });
  renameSync(join(work, 'package'), target);
  if (installedVersion() !== pin.version) throw new Error(`${target}/package.json is not ${pin.version}`);
  console.log(`${pin.package}@${pin.version} (${pin.files.join(', ')}) -> ${target}`);
} finally {
  rmSync(work, { recursive: true, force: true });
}
