// The official `openai` npm package against flux-adapters serve (tests/test_gateway_node.py).
// argv: <base URL> <gateway key> <png file>; prints one JSON document.
import { readFileSync } from "node:fs";
import OpenAI, { toFile } from "openai";

const [baseURL, apiKey, png] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });

const generated = await client.images
  .generate({ model: "flux-2-pro", prompt: "a robot from node", seed: 11, width: 512, height: 512 })
  .withResponse();
const bytes = readFileSync(png);
const edited = await client.images.edit({
  model: "flux-2-pro",
  prompt: "image 1 in image 2",
  image: [
    await toFile(bytes, "one.png", { type: "image/png" }),
    await toFile(bytes, "two.png", { type: "image/png" }),
  ],
  response_format: "b64_json",
});
let refused = null;
try {
  await client.images.generate({ model: "flux-2-pro", prompt: "x", quality: "hd" });
} catch (error) {
  refused = { status: error.status, code: error.code, type: error.type };
}
console.log(
  JSON.stringify({
    url: generated.data.data[0].url,
    provider: generated.response.headers.get("x-flux-provider"),
    attempts: generated.response.headers.get("x-flux-attempts"),
    edited_b64_length: edited.data[0].b64_json.length,
    refused,
  }),
);
