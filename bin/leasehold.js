#!/usr/bin/env node
// Runs the compiled JavaScript in dist/ (`npm run build`; `npm ci` runs it as `prepare`).
let main;
try {
  ({ main } = await import("../dist/main.js"));
} catch (error) {
  if (error?.code !== "ERR_MODULE_NOT_FOUND" || !String(error.message).includes("dist/main.js")) throw error;
  process.stderr.write(
    "leasehold: dist/ is missing: run `npm run build` (or `npm ci`) in the package first\n",
  );
  process.exit(1);
}
await main(process.argv);
