// scout serve driven by the official `openai` SDK for Node (v4), as a vLLM user's client would:
// every field of the SDK Scout implements, streamed and not, with API keys; the fields it does not
// implement must come back as 400s naming them. Usage: node sdk_test.mjs BASE_URL KEY
import OpenAI from "openai";

const [base, key] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: key, maxRetries: 0 });
let failures = 0;
function check(ok, what, detail) {
  if (!ok) {
    failures++;
    console.log(`FAIL: ${what}${detail !== undefined ? ": " + JSON.stringify(detail).slice(0, 400) : ""}`);
  }
}
async function expectStatus(status, param, fn, what) {
  try {
    await fn();
    check(false, `${what}: no error`);
  } catch (e) {
    check(e instanceof OpenAI.APIError && e.status === status, `${what}: status ${e.status}, want ${status}`, e.message);
    if (param) check(e.param === param || (e.error && e.error.param === param), `${what}: param`, e.error);
  }
}

const models = await client.models.list();
const model = models.data[0].id;
check(models.data.length === 1 && model === "scout-tiny-target", "models.list", models.data);

// Completions: text, token ids, a batch, n, logprobs, seeds, stop, usage.
const c1 = await client.completions.create({ model, prompt: "def f(x):", max_tokens: 8, temperature: 0 });
check(c1.choices.length === 1 && c1.choices[0].text.length > 0 && c1.usage.completion_tokens <= 8, "completion", c1);
const ids = await client.completions.create({ model, prompt: [256, 100, 101, 102, 32, 102, 40, 120, 41, 58], max_tokens: 8, temperature: 0 });
check(ids.choices[0].text === c1.choices[0].text, "token-id prompt equals its text", [ids.choices[0].text, c1.choices[0].text]);
const batch = await client.completions.create({ model, prompt: ["def f(x):", "import"], max_tokens: 4, temperature: 0, n: 2 });
check(batch.choices.length === 4 && batch.choices.map((c) => c.index).join() === "0,1,2,3", "batch x n", batch.choices);
check(batch.choices[0].text === batch.choices[1].text, "greedy n choices agree", batch.choices);
const lp = await client.completions.create({ model, prompt: "def f(x):", max_tokens: 5, temperature: 0, logprobs: 2, ignore_eos: true });
check(lp.choices[0].logprobs.tokens.length === 5 && lp.choices[0].logprobs.token_logprobs.every((v) => v <= 0), "completion logprobs", lp.choices[0].logprobs);
const s1 = await client.completions.create({ model, prompt: "import", max_tokens: 16, temperature: 1, seed: 11 });
const s2 = await client.completions.create({ model, prompt: "import", max_tokens: 16, temperature: 1, seed: 11 });
check(s1.choices[0].text === s2.choices[0].text, "seeded completions repeat", [s1.choices[0].text, s2.choices[0].text]);
const stop = await client.completions.create({ model, prompt: "def f(x):\n", max_tokens: 40, temperature: 0, stop: ["\n"] });
check(!stop.choices[0].text.includes("\n"), "stop string", stop.choices[0].text);

// Completions streamed, with the usage chunk.
let streamed = "", usage = null, finishes = 0;
for await (const chunk of await client.completions.create({ model, prompt: "def f(x):", max_tokens: 8, temperature: 0, stream: true, stream_options: { include_usage: true } })) {
  if (chunk.choices.length > 0) {
    streamed += chunk.choices[0].text;
    if (chunk.choices[0].finish_reason) finishes++;
  }
  if (chunk.usage) usage = chunk.usage;
}
check(streamed === c1.choices[0].text && finishes === 1, "streamed completion", [streamed, finishes]);
check(usage !== null && usage.completion_tokens === c1.usage.completion_tokens, "stream usage", usage);

// Chat: content parts, max_completion_tokens, n, logprobs, streaming.
const messages = [{ role: "system", content: "You write Python." }, { role: "user", content: [{ type: "text", text: "def add" }, { type: "text", text: "(a, b):" }] }];
const ch = await client.chat.completions.create({ model, messages, max_completion_tokens: 3, temperature: 0, ignore_eos: true });
check(ch.choices[0].message.role === "assistant" && ch.usage.completion_tokens === 3, "chat with max_completion_tokens", ch);
const chn = await client.chat.completions.create({ model, messages, max_tokens: 4, n: 3, temperature: 1, seed: 2, logprobs: true, top_logprobs: 2 });
check(chn.choices.length === 3 && chn.choices.every((c) => c.logprobs.content.length > 0 && c.logprobs.content.every((t) => t.top_logprobs.length === 2)), "chat n=3 with logprobs", chn.choices);
let chatText = "", chatUsage = null;
const stream = await client.chat.completions.create({ model, messages, max_tokens: 6, temperature: 0, stream: true, stream_options: { include_usage: true } });
for await (const chunk of stream) {
  if (chunk.choices.length > 0 && chunk.choices[0].delta.content) chatText += chunk.choices[0].delta.content;
  if (chunk.usage) chatUsage = chunk.usage;
}
const chatPlain = await client.chat.completions.create({ model, messages, max_tokens: 6, temperature: 0 });
check(chatText === chatPlain.choices[0].message.content, "streamed chat equals plain chat", [chatText, chatPlain.choices[0].message.content]);
check(chatUsage !== null && chatUsage.prompt_tokens === chatPlain.usage.prompt_tokens, "streamed chat usage", chatUsage);

// Agent sessions (Scout's field, passed through the SDK's body): the second turn is served from
// the kept KV.
const t1 = await client.completions.create({ model, prompt: "def add(a, b):\n", max_tokens: 6, temperature: 0, session_id: "sdk-1" });
const t2 = await client.completions.create({ model, prompt: "\ndef sub(a, b):\n", max_tokens: 6, temperature: 0, session_id: "sdk-1" });
check(t2.usage.prompt_tokens_details.cached_tokens > 0, "session turn served from the kept KV", t2.usage);

// Errors the SDK raises as its own classes, with the field named.
const pen = await client.completions.create({ model, prompt: "def f(x):\n    return x\n", max_tokens: 24, temperature: 0, frequency_penalty: 2, presence_penalty: 1, ignore_eos: true });
const unpen = await client.completions.create({ model, prompt: "def f(x):\n    return x\n", max_tokens: 24, temperature: 0, ignore_eos: true });
check(pen.choices[0].text !== unpen.choices[0].text, "penalties change the greedy text", [pen.choices[0].text, unpen.choices[0].text]);
await expectStatus(400, "presence_penalty", () => client.completions.create({ model, prompt: "x", presence_penalty: 3 }), "presence_penalty 3");
await expectStatus(400, "best_of", () => client.completions.create({ model, prompt: "x", best_of: 3 }), "best_of");
await expectStatus(400, "n", () => client.completions.create({ model, prompt: "x", n: 0 }), "n 0");
await expectStatus(404, null, () => client.completions.create({ model: "nope", prompt: "x" }), "unknown model");
await expectStatus(400, null, () => client.chat.completions.create({ model, messages: [] }), "empty messages");
const nokey = new OpenAI({ baseURL: `${base}/v1`, apiKey: "wrong", maxRetries: 0 });
await expectStatus(401, null, () => nokey.models.list(), "wrong key");

if (failures > 0) {
  console.log(`${failures} check(s) failed`);
  process.exit(1);
}
console.log("openai sdk test: ok");
