// Build the browser page: copy src/ and the vendored runtime files (onnxruntime-web's
// WebAssembly build, transformers.js) from node_modules (npm ci) into one folder, so that the
// page fetches nothing but its own origin. `make edge-web` runs it after `npm ci`.
//
//     node build.mjs [OUT]     # OUT: ../../src/fedlora/export/web (what fedlora-edge serve reads)
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(process.argv[2] ?? join(here, "../../src/fedlora/export/web"));
const modules = join(here, "node_modules");

// package -> files of its dist/ the page loads
const VENDORED = {
  "onnxruntime-web": [
    "ort.wasm.min.mjs", // the WebAssembly (CPU) build only: no WebGPU, WebGL or WebNN
    "ort-wasm-simd-threaded.mjs",
    "ort-wasm-simd-threaded.wasm",
  ],
  "@huggingface/transformers": ["transformers.min.js"],
};

for (const name of readdirSync(out, { withFileTypes: true })) {
  if (name.name !== "README.md") rmSync(join(out, name.name), { recursive: true, force: true });
}
mkdirSync(join(out, "vendor"), { recursive: true });
for (const file of readdirSync(join(here, "src"))) {
  copyFileSync(join(here, "src", file), join(out, file));
}
const versions = {};
for (const [pkg, files] of Object.entries(VENDORED)) {
  const meta = JSON.parse(readFileSync(join(modules, pkg, "package.json"), "utf8"));
  versions[pkg] = { version: meta.version, license: meta.license, files };
  for (const file of files) copyFileSync(join(modules, pkg, "dist", file), join(out, "vendor", file));
}
copyFileSync(join(modules, "@huggingface/transformers/LICENSE"), join(out, "vendor", "LICENSE.transformers.js"));
writeFileSync(join(out, "vendor", "VERSIONS.json"), `${JSON.stringify(versions, null, 2)}\n`);
console.log(`built the browser page in ${out}`);
