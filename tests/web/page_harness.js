// Runs the web page's own script in Node against a live server, with just enough of a DOM for it:
// picks a DICOM file, renders it, asks a question, and prints what the page would show as JSON.
// Usage: node page_harness.js PAGE_SCRIPT SERVER_URL IMAGE QUESTION
"use strict";
const fs = require("fs");
const [pageScript, server, imagePath, question] = process.argv.slice(2);

class Node_ {
  constructor(id) { this.id = id; this.value = ""; this.textContent = ""; this.className = ""; this.children = [];
    this.style = {}; this.src = ""; this.scrollTop = 0; this.scrollHeight = 0; this.classList = { add() {}, remove() {} }; }
  appendChild(child) { this.children.push(child); }
  click() {}
  set innerHTML(html) { this.children = []; }
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
global.fetch = (url, options) => realFetch(server + url, options);

const test = `
(async () => {
  file = new Blob([fs.readFileSync(imagePath)]);
  document.getElementById("window").value = "soft_tissue";
  await render();
  document.getElementById("question").value = question;
  await document.getElementById("ask").onsubmit({ preventDefault() {} });
  const log = document.getElementById("log").children.map((c) => ({ cls: c.className, text: c.textContent }));
  console.log(JSON.stringify({ preview: document.getElementById("preview").src, image: imageUrl.slice(0, 21), log, history }));
})().catch((err) => { console.error(err); process.exit(1); });
`;
new Function("fs", "imagePath", "question", fs.readFileSync(pageScript, "utf8") + test)(fs, imagePath, question);
