// Builds the console page into dist/console/web/: app.js (main.ts and
// everything it imports, the generated protobuf code and connect-web
// included, in one minified ES module with a linked source map), index.html
// and style.css. Run from anywhere: `node src/console/web/build.mjs`.
// The output folder belongs to the page alone: it is emptied first, so no
// stale file (an old chunk, a tsc or copy leftover) is ever served.
import { copyFile, mkdir, rm } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = fileURLToPath(new URL(".", import.meta.url));
const outdir = fileURLToPath(new URL("../../../dist/console/web/", import.meta.url));

try {
  await rm(outdir, { recursive: true, force: true });
  await mkdir(outdir, { recursive: true });
  await build({
    entryPoints: [`${here}main.ts`],
    outfile: `${outdir}app.js`,
    bundle: true,
    format: "esm",
    platform: "browser",
    target: "es2022",
    minify: true,
    sourcemap: "linked",
    // esbuild prints its own errors and warnings; the catch below only sets the exit code.
    logLevel: "warning",
  });
  await Promise.all(
    ["index.html", "style.css"].map((file) => copyFile(`${here}${file}`, `${outdir}${file}`)),
  );
} catch (error) {
  // A build failure has been printed by esbuild already; anything else has not.
  if (!(error instanceof Error && "errors" in error)) console.error(error);
  process.exitCode = 1;
}
