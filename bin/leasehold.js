#!/usr/bin/env node
// Runs the compiled JavaScript in dist/ (`npm run build`; `npm ci` runs it as `prepare`).
import { existsSync } from "node:fs";

const entry = new URL("../dist/main.js", import.meta.url);
if (!existsSync(entry)) {
  process.stderr.write(
    "leasehold: dist/ is missing: run `npm run build` (or `npm ci`) in the package first\n",
  );
  process.exit(1);
}
const { main } = await import(entry.href);
await main(process.argv);
