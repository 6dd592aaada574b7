// Drives the relay's /demo/ page in headless Chromium (Debian's /usr/bin/chromium, through
// playwright-core; no browser download): produce a message, receive it in pending mode, reply
// to it, and see the reply under the sent message. Leaves a screenshot in target/demo.png.
//
//   cargo build && (cd tests/browser && npm ci && node --test)
//
// The relay binary is $BURROW_BIN, else ../../target/debug/burrow next to this file; the test
// starts it on a free loopback port with the embedded store and stops it afterwards.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const BURROW_BIN = resolve(here, process.env.BURROW_BIN || '../../target/debug/burrow');
const CHROMIUM = '/usr/bin/chromium';
// The committed docs/demo.png is refreshed with BURROW_SCREENSHOT=docs/demo.png (from the repo root).
const SCREENSHOT = resolve(here, '../..', process.env.BURROW_SCREENSHOT || 'target/demo.png');
const WAIT_MS = 15_000; // every single wait is bounded by this

let relay; // { proc, base, output() }
let context; // the persistent browser context (launchPersistentContext owns the browser)
let userDataDir;

/** A free TCP port on 127.0.0.1 (bound, read, released). */
function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', fail);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

/** Starts `burrow serve` on a free port and resolves once /health answers 200. */
async function startRelay() {
  assert.ok(existsSync(BURROW_BIN), `relay binary not found at ${BURROW_BIN} (run cargo build, or set BURROW_BIN)`);
  const port = await freePort();
  const env = { ...process.env, BURROW_LISTEN: `127.0.0.1:${port}`, RUST_LOG: 'warn' };
  // Hermetic: the embedded store, no auth, no metrics listener, whatever the caller's env holds.
  for (const name of ['BURROW_STORE', 'REDIS_URL', 'REDIS_HOST', 'REDIS_PORT', 'REDIS_PASSWORD',
    'TUNNEL_ACCESS_TOKEN', 'TUNNEL_SIGNATURE_SECRET', 'TUNNEL_PUBLIC_IDS',
    'BURROW_METRICS_LISTEN', 'BURROW_CONF']) delete env[name];

  const proc = spawn(BURROW_BIN, ['serve'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  const keep = (chunk) => { log = (log + chunk).slice(-20_000); };
  proc.stdout.on('data', keep);
  proc.stderr.on('data', keep);
  let exited = null;
  proc.on('exit', (code, signal) => { exited = signal || `exit code ${code}`; });
  proc.on('error', (e) => { exited = e.message; });

  const base = `http://127.0.0.1:${port}`;
  relay = { proc, base, output: () => log };
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    if (exited) throw new Error(`relay stopped before it was healthy (${exited}):\n${log}`);
    try {
      const res = await fetch(`${base}/health`, { signal: AbortSignal.timeout(1000) });
      if (res.status === 200) return;
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) throw new Error(`relay not healthy within ${WAIT_MS} ms:\n${log}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** SIGTERM, then SIGKILL if the relay has not exited within 5 s. */
async function stopRelay() {
  const proc = relay?.proc;
  if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
  const gone = new Promise((r) => proc.once('exit', r));
  proc.kill('SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
  await gone;
  clearTimeout(timer);
}

before(async () => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium`);
  await startRelay();
  // Playwright refuses --user-data-dir in args; a persistent context with a fresh temp dir is
  // the same thing.
  userDataDir = await mkdtemp(join(tmpdir(), 'burrow-browser-'));
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
    viewport: { width: 1100, height: 800 },
    timeout: WAIT_MS, // to launch
  });
  context.setDefaultTimeout(WAIT_MS);
  context.setDefaultNavigationTimeout(WAIT_MS);
});

after(async () => {
  // Each step on its own, so one failing does not leave the others undone.
  await context?.close().catch((e) => console.error('closing the browser:', e));
  await stopRelay().catch((e) => console.error('stopping the relay:', e));
  if (userDataDir) await rm(userDataDir, { recursive: true, force: true }).catch(() => {});
});

test('demo page: produce, receive in pending mode, reply, see the reply', { timeout: 120_000 }, async (t) => {
  const page = context.pages()[0] ?? await context.newPage();
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  // Failed requests are checked by URL below; the browser's own favicon probe may 404.
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) pageErrors.push(`console: ${m.text()}`);
  });
  page.on('response', (r) => {
    if (r.status() >= 400 && new URL(r.url()).pathname !== '/favicon.ico') pageErrors.push(`${r.status()} ${r.url()}`);
  });
  t.after(() => {
    if (relay && !t.passed && relay.output()) console.error(`relay output:\n${relay.output()}`);
  });

  const res = await page.goto(`${relay.base}/demo/`);
  assert.equal(res.status(), 200);
  assert.equal(await page.title(), 'Burrow demo');

  // The page picks a random tunnel; use our own unique one so the HTTP check below is exact.
  const tunnel = `browser-test-${randomBytes(6).toString('hex')}`;
  const message = 'Hello through the burrow!\nSecond line, kept as typed.';
  const replyText = 'Got it — thanks! ✓';
  await page.fill('#tunnel', tunnel);
  await page.check('#listen');
  await page.waitForFunction(
    (id) => document.querySelector('#listen-status').textContent.startsWith('Listening on ' + id),
    tunnel, { timeout: WAIT_MS });

  await page.fill('#message', message);
  await page.click('#send');

  // The sent item appears with the relay's message id, waiting for its reply.
  const sent = page.locator(`#sent .sent-item[data-tunnel="${tunnel}"]`);
  await sent.waitFor();
  const msgId = await sent.getAttribute('data-id');
  assert.match(msgId, /^\d+-\d+$/, 'X-Message-Id looks like a stream id');
  assert.equal(await sent.locator('.body').textContent(), message);
  assert.match(await page.locator('#send-status').textContent(), new RegExp(`^Sent ${msgId}`));

  // The listening loop receives it (pending mode) with the same id and body.
  const received = page.locator(`#received .received-item[data-tunnel="${tunnel}"][data-id="${msgId}"]`);
  await received.waitFor();
  assert.equal(await page.locator('#received .received-item').count(), 1);
  assert.equal(await received.locator('.body').textContent(), message);
  assert.match(await received.locator('.meta').textContent(), /text\/plain/);

  // Reply from the received item.
  await received.locator('.reply-text').fill(replyText);
  await received.locator('.reply-send').click();
  await page.waitForFunction(
    (el) => el.textContent === 'Replied.', await received.locator('.reply-status').elementHandle(),
    { timeout: WAIT_MS });
  assert.equal(await received.locator('.reply-send').isDisabled(), true);

  // The reply shows up under the sent item, exactly.
  const reply = sent.locator('.reply');
  await page.waitForFunction((el) => el.textContent !== '', await reply.elementHandle(), { timeout: WAIT_MS });
  assert.equal(await reply.textContent(), replyText);
  assert.match(await reply.getAttribute('data-content-type'), /^text\/plain/);
  assert.match(await sent.locator('.reply-status').textContent(), /^Reply \(text\/plain/);

  // Through plain HTTP: the reply acknowledged the message, so the tunnel is empty.
  const len = await fetch(`${relay.base}/t/${tunnel}/len`, { signal: AbortSignal.timeout(WAIT_MS) });
  assert.equal(len.status, 204); // len answers 204 with the size in X-Queue-Size
  assert.equal(len.headers.get('x-queue-size'), '0');
  // …and the reply was read once by the page, so nothing is left to read.
  const again = await fetch(`${relay.base}/t/${tunnel}/${msgId}/reply`, { signal: AbortSignal.timeout(WAIT_MS) });
  assert.equal(again.status, 204);

  // Settled: the consume loop is back to long-polling (not waiting on the answered message).
  await page.waitForFunction(
    (id) => document.querySelector('#listen-status').textContent.startsWith('Listening on ' + id),
    tunnel, { timeout: WAIT_MS });
  assert.deepEqual(pageErrors, []);

  await mkdir(dirname(SCREENSHOT), { recursive: true });
  await page.screenshot({ path: SCREENSHOT, fullPage: true, timeout: WAIT_MS });
});
