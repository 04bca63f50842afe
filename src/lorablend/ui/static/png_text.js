// A PNG with a text chunk added: A1111 writes a generation's settings into a tEXt chunk named "parameters", and
// other tools (A1111's PNG Info, Forge, ComfyUI's loaders, exiftool) read them back from there.
"use strict";

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

// tEXt is Latin-1; text outside it goes into an iTXt chunk (UTF-8), which the same readers accept.
function textChunk(keyword, text) {
  const latin1 = /^[\x00-\xff]*$/.test(text);
  const enc = new TextEncoder();
  const key = Array.from(keyword, (ch) => ch.charCodeAt(0));
  const body = latin1
    ? [...key, 0, ...Array.from(text, (ch) => ch.charCodeAt(0))]
    : [...key, 0, 0, 0, 0, 0, ...enc.encode(text)];  // iTXt: no compression, no language, no translated keyword
  const type = Array.from(latin1 ? "tEXt" : "iTXt", (ch) => ch.charCodeAt(0));
  const data = new Uint8Array([...type, ...body]);
  const out = new Uint8Array(12 + body.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, body.length);
  out.set(data, 4);
  view.setUint32(8 + body.length, crc32(data));
  return out;
}

// The PNG bytes with the chunk placed right after IHDR (the first chunk: 8 signature bytes + 25 bytes of IHDR).
function pngWithText(pngBytes, keyword, text) {
  const png = new Uint8Array(pngBytes);
  const signature = [137, 80, 78, 71, 13, 10, 26, 10];
  if (png.length < 33 || signature.some((b, i) => png[i] !== b)) throw new Error("not a PNG");
  const chunk = textChunk(keyword, text);
  const out = new Uint8Array(png.length + chunk.length);
  out.set(png.subarray(0, 33), 0);
  out.set(chunk, 33);
  out.set(png.subarray(33), 33 + chunk.length);
  return out;
}

// A1111's "parameters" text: the prompt with its <lora:name:weight> tokens, the negative prompt, then the settings.
function a1111Parameters(s, width, height) {
  const tokens = Object.entries(s.loras).map(([name, w]) => ` <lora:${name}:${w}>`).join("");
  const lines = [s.prompt + tokens];
  if (s.negative_prompt) lines.push(`Negative prompt: ${s.negative_prompt}`);
  const fields = [`Steps: ${s.steps}`, `Seed: ${s.seed}`, `Size: ${width}x${height}`, "Model: lorablend"];
  lines.push(fields.join(", "));
  return lines.join("\n");
}

window.pngText = { crc32, pngWithText, a1111Parameters };
