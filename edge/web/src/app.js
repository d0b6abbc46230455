// The page: loads the served variant (model/) and answers the form's prompt, greedily, on
// the device. Everything comes from this origin: the vendored onnxruntime-web and
// transformers.js (vendor/, copied by the build) and the bundle (fedlora-edge serve).
import * as ort from "./vendor/ort.wasm.min.mjs";
import { AutoTokenizer, env } from "./vendor/transformers.min.js";
import { BrowserModel } from "./runtime.js";

const MODEL_ID = "model"; // fedlora-edge serve puts the variant's folder at /model/
const $ = (id) => document.getElementById(id);

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

async function load() {
  // no hub, no CDN: the tokenizer files and the wasm runtime from this origin only
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.localModelPath = new URL("./", document.baseURI).pathname; // a path: a URL counts as remote
  env.useBrowserCache = false;
  env.useWasmCache = false;
  ort.env.wasm.wasmPaths = new URL("./vendor/", import.meta.url).href;
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.proxy = false;
  // which variant fedlora-edge serve serves (absent on another static host: the folder's name)
  const served = await fetch("fedlora-serve.json", { cache: "no-store" });
  const info = served.ok ? await served.json() : { variant: MODEL_ID, model: MODEL_ID };
  $("variant").textContent = `${info.variant} (${info.model})`;
  const base = new URL(`${MODEL_ID}/`, document.baseURI).href;
  return BrowserModel.load(ort, AutoTokenizer, base, MODEL_ID);
}

function stats(result) {
  const parts = [
    `${result.promptIds.length} prompt tokens`,
    `${result.tokens.length} new tokens`,
    `first token ${result.firstTokenSeconds.toFixed(3)} s`,
  ];
  if (result.decodeTokensPerSecond !== null) {
    parts.push(`decode ${result.decodeTokensPerSecond.toFixed(1)} tokens/s`);
  }
  parts.push(`overall ${result.tokensPerSecond.toFixed(1)} tokens/s`);
  return parts.join(" · ");
}

async function main() {
  let model;
  try {
    model = await load();
  } catch (error) {
    setStatus("error", `Could not load the model: ${error.message ?? error}`);
    throw error;
  }
  window.fedloraModel = model; // for benchmarks/bench_browser.py and the console
  setStatus("ready", "Ready.");
  $("ask").disabled = false;
  $("ask-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const maxNewTokens = Math.max(1, Number($("max-new-tokens").value) || 1);
    const messages = [{ role: "user", content: $("prompt").value }];
    $("ask").disabled = true;
    setStatus("running", "Answering…");
    try {
      const result = await model.generate(messages, maxNewTokens, (tokens) => {
        $("answer").textContent = model.decode(tokens);
      });
      $("answer").textContent = result.text;
      $("stats").textContent = stats(result);
      window.fedloraLast = result; // for the browser test: tokens, timings
      setStatus("done", "Done.");
    } catch (error) {
      setStatus("error", `Failed: ${error.message ?? error}`);
    } finally {
      $("ask").disabled = false;
    }
  });
}

main();
