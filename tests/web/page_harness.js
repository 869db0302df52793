// Runs the web page's own script in Node against a live server, with just enough of a DOM for it:
// picks an image file, renders it, moves the slice slider to FRAME when given, asks a question, and prints
// what the page would show as JSON. With STOP_ANSWER=1 in the environment, the user presses the button
// again as soon as the answer's stream opens; with EXPLAIN=1, presses the answer's "Where did it look?".
// Usage: node page_harness.js PAGE_SCRIPT PAGE_URL IMAGE QUESTION [FRAME]  (PAGE_URL: where the page is served)
"use strict";
const fs = require("fs");
const [pageScript, server, imagePath, question, chosenFrame] = process.argv.slice(2);

class Node_ {
  constructor(id) { this.id = id; this.value = ""; this.textContent = ""; this.className = ""; this.children = [];
    this.style = {}; this.src = ""; this.scrollTop = 0; this.scrollHeight = 0; this.classList = { add() {}, remove() {} }; }
  appendChild(child) { if (child.parentNode) child.remove(); child.parentNode = this; this.children.push(child); }
  get isConnected() { return this.parentNode != null; }
  remove() {
    if (!this.parentNode) return;
    const siblings = this.parentNode.children; siblings.splice(siblings.indexOf(this), 1); this.parentNode = null;
  }
  replaceWith(other) {
    if (other.parentNode) other.remove();
    const parent = this.parentNode; parent.children[parent.children.indexOf(this)] = other;
    other.parentNode = parent; this.parentNode = null;
  }
  click() {}
  set innerHTML(html) { for (const child of this.children) child.parentNode = null; this.children = []; }
}
const nodes = {};
global.document = {
  getElementById: (id) => (nodes[id] = nodes[id] || new Node_(id)),
  createElement: () => new Node_(null),
};
class FileReader { readAsDataURL(blob) { blob.arrayBuffer().then((b) => {
  this.result = `data:${blob.type};base64,` + Buffer.from(b).toString("base64"); this.onload(); }); } }
global.FileReader = FileReader;
const realFetch = fetch;
const page = server.endsWith("/") ? server : server + "/";  // the page's own address: its URLs are relative
global.fetch = async (url, options) => {
  const response = await realFetch(new URL(url, page), options);
  if (process.env.STOP_ANSWER && url === "v1/chat/completions") {
    setImmediate(() => document.getElementById("ask").onsubmit({ preventDefault() {} }));
  }
  return response;
};

const test = `
(async () => {
  file = new Blob([fs.readFileSync(imagePath)]);
  document.getElementById("window").value = "soft_tissue";
  await render();
  const slider = document.getElementById("frame"), frames = document.getElementById("frames");
  const first = { hidden: frames.hidden, max: slider.max, value: slider.value };
  if (chosenFrame !== undefined) { slider.value = chosenFrame; await slider.onchange(); }
  const shownFrame = { value: slider.value, label: document.getElementById("frame-label").textContent };
  document.getElementById("question").value = question;
  await document.getElementById("ask").onsubmit({ preventDefault() {} });
  if (process.env.EXPLAIN) await document.getElementById("log").children.find((c) => c.className === "explain").onclick();
  const log = document.getElementById("log").children.map((c) => ({ cls: c.className, text: c.textContent,
    ...(c.src ? { src: c.src } : {}) }));
  console.log(JSON.stringify({ preview: document.getElementById("preview").src, image: imageUrl, log, history,
    first, shownFrame, button: document.getElementById("send").textContent }));
})().catch((err) => { console.error(err); process.exit(1); });
`;
new Function("fs", "imagePath", "question", "chosenFrame", fs.readFileSync(pageScript, "utf8") + test)(
  fs, imagePath, question, chosenFrame);
