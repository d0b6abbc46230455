// The browser counterpart of fedlora.export.runtime.EdgeModel: an exported bundle variant on
// onnxruntime-web (WebAssembly, CPU), its tokenizer and chat template on transformers.js, and
// greedy decoding on the KV cache.
//
// The graph's inputs are read from the session (session.inputNames): input_ids always,
// attention_mask, position_ids and past_key_values.N.key|value when the graph has them, so a
// fused graph with or without position_ids and a traced graph all run. Outputs: logits and
// present.N.key|value (fed back as the next step's past).

const PAST = /^past_key_values\.(\d+)\.(key|value)$/;

async function fetchJson(url, required) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) {
    if (required) throw new Error(`${url}: HTTP ${response.status}`);
    return {};
  }
  return response.json();
}

async function fetchText(url) {
  const response = await fetch(url, { cache: "no-store" });
  return response.ok ? response.text() : null;
}

function idList(value) {
  if (value === undefined || value === null) return [];
  return Array.isArray(value) ? value.map(Number) : [Number(value)];
}

// The index of the largest value (the first one on ties, as numpy's argmax).
export function argmax(values, start, end) {
  let best = start;
  for (let i = start + 1; i < end; i += 1) {
    if (values[i] > values[best]) best = i;
  }
  return best - start;
}

export class BrowserModel {
  // ort: the onnxruntime-web module; tokenizer: a transformers.js tokenizer; files: the
  // variant's JSON files and chat template (see BrowserModel.load)
  constructor(ort, session, tokenizer, files) {
    this.ort = ort;
    this.session = session;
    this.tokenizer = tokenizer;
    this.chatTemplate = files.chatTemplate;
    this.eosIds = BrowserModel.eosIds(files, tokenizer);
    this.inputs = new Set(session.inputNames);
    this.pastSpecs = BrowserModel.pastSpecs(session, files.config);
  }

  // base: the URL of the variant's folder (model.onnx, tokenizer.json, config.json, ...);
  // AutoTokenizer: transformers.js's class, its env pointed at base by the caller
  static async load(ort, AutoTokenizer, base, modelId) {
    const [config, generation, chatTemplate, tokenizer, session] = await Promise.all([
      fetchJson(`${base}config.json`, true),
      fetchJson(`${base}generation_config.json`, false),
      fetchText(`${base}chat_template.jinja`),
      AutoTokenizer.from_pretrained(modelId),
      ort.InferenceSession.create(`${base}model.onnx`, {
        executionProviders: ["wasm"],
        graphOptimizationLevel: "all",
      }),
    ]);
    return new BrowserModel(ort, session, tokenizer, { config, generation, chatTemplate });
  }

  // eos ids as EdgeModel reads them: generation_config.json, config.json, the tokenizer's eos
  static eosIds({ config, generation }, tokenizer) {
    let ids = idList(generation.eos_token_id);
    if (!ids.length) ids = idList(config.eos_token_id);
    if (!ids.length && tokenizer.eos_token_id !== undefined) ids = [tokenizer.eos_token_id];
    if (!ids.length) throw new Error("no eos_token_id in generation_config.json or config.json");
    return ids;
  }

  // [input name, output name, kv heads, head dim, dtype] per past_key_values input
  static pastSpecs(session, config) {
    const heads = Number(config.num_key_value_heads || config.num_attention_heads || 0);
    let headDim = Number(config.head_dim || 0);
    if (!headDim && config.num_attention_heads) {
      headDim = Number(config.hidden_size) / Number(config.num_attention_heads);
    }
    const metadata = new Map((session.inputMetadata || []).map((m) => [m.name, m]));
    const specs = [];
    for (const name of session.inputNames) {
      const match = PAST.exec(name);
      if (!match) continue;
      const meta = metadata.get(name);
      const shape = meta?.shape || [];
      const h = typeof shape[1] === "number" ? shape[1] : heads;
      const d = typeof shape[3] === "number" ? shape[3] : headDim;
      if (!h || !d) throw new Error(`cannot tell the KV-cache shape of ${name}`);
      const out = `present.${match[1]}.${match[2]}`;
      if (!session.outputNames.includes(out)) throw new Error(`input ${name} but no output ${out}`);
      specs.push([name, out, h, d, meta?.type || "float32"]);
    }
    return specs;
  }

  // The chat-templated prompt's token ids, as EdgeModel.encode(EdgeModel.render(messages)).
  promptIds(messages) {
    const options = { add_generation_prompt: true, tokenize: true, return_tensor: false };
    if (this.chatTemplate) options.chat_template = this.chatTemplate;
    const encoded = this.tokenizer.apply_chat_template(messages, options);
    return Array.from(encoded.input_ids ?? encoded, Number);
  }

  emptyPast() {
    const past = {};
    for (const [name, , heads, headDim, type] of this.pastSpecs) {
      const data = type === "float16" ? new Uint16Array(0) : new Float32Array(0);
      past[name] = new this.ort.Tensor(type, data, [1, heads, 0, headDim]);
    }
    return past;
  }

  int64(values, dims) {
    return new this.ort.Tensor("int64", BigInt64Array.from(values, BigInt), dims);
  }

  // One forward pass of `ids` after `pastLen` cached tokens: the next greedy token and the cache.
  async step(ids, past, pastLen) {
    const feed = { input_ids: this.int64(ids, [1, ids.length]), ...past };
    if (this.inputs.has("attention_mask")) {
      const total = pastLen + ids.length;
      feed.attention_mask = this.int64(new Array(total).fill(1), [1, total]);
    }
    if (this.inputs.has("position_ids")) {
      const positions = ids.map((_, i) => pastLen + i);
      feed.position_ids = this.int64(positions, [1, ids.length]);
    }
    const out = await this.session.run(feed);
    const logits = out.logits;
    const vocab = logits.dims[2];
    const last = (logits.dims[1] - 1) * vocab;
    const token = argmax(logits.data, last, last + vocab);
    const next = {};
    for (const [name, outName] of this.pastSpecs) next[name] = out[outName];
    return { token, past: next };
  }

  // Greedy decoding with the KV cache up to eos or maxNewTokens (EdgeModel.generate_ids);
  // returns the new ids (eos kept) and the timings. ignoreEos: always maxNewTokens tokens (for
  // timing, as EdgeModel.decode_speed).
  async generateIds(promptIds, maxNewTokens, onToken, ignoreEos = false) {
    const eos = new Set(this.eosIds);
    const tokens = [];
    let past = this.emptyPast();
    let ids = promptIds;
    let pastLen = 0;
    const start = performance.now();
    let firstAt = start;
    for (let i = 0; i < maxNewTokens; i += 1) {
      const result = await this.step(ids, past, pastLen);
      if (i === 0) firstAt = performance.now();
      pastLen += ids.length;
      past = result.past;
      tokens.push(result.token);
      if (onToken) onToken(tokens);
      if (eos.has(result.token) && !ignoreEos) break;
      ids = [result.token];
    }
    const end = performance.now();
    const decoded = tokens.length - 1; // the tokens after the first, each one cached step
    return {
      tokens,
      firstTokenSeconds: (firstAt - start) / 1000,
      decodeTokensPerSecond: decoded > 0 ? decoded / ((end - firstAt) / 1000) : null,
      tokensPerSecond: tokens.length / ((end - start) / 1000),
    };
  }

  decode(tokens) {
    return this.tokenizer.decode(tokens, { skip_special_tokens: true });
  }

  async generate(messages, maxNewTokens, onToken) {
    const promptIds = this.promptIds(messages);
    const result = await this.generateIds(promptIds, maxNewTokens, onToken);
    return { ...result, promptIds, text: this.decode(result.tokens) };
  }
}
