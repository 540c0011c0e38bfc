#!/usr/bin/env bash
# The browser client's tests: unit tests of the pure reconnect logic and of the client against a fake WebSocket
# (Node's test runner), then the end-to-end tests in Debian's Chromium against `tabhub demo` (playwright-core,
# no downloaded browser). Called by .ci/test after cargo test; needs /usr/bin/chromium (.ci/packages).
set -euo pipefail
cd "$(dirname "$0")"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

echo "== cargo build (the e2e tests run target/debug/tabhub and the fixture GitLab's target/debug/tabhub-fixtures)"
(cd .. && cargo build --quiet -p tabhub -p tabhub-fixtures)

echo "== npm ci (client/package-lock.json: playwright-core only)"
npm ci --no-audit --no-fund --loglevel=error

echo "== node --test test/"
node --test test/

echo "== node e2e/demo.e2e.mjs"
node e2e/demo.e2e.mjs
