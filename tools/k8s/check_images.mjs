// Every container image a rendered overlay names is built by a Dockerfile of this repository, and
// every Dockerfile parses: dockerfile-utils (the parser and validator behind VS Code's Dockerfile
// support, from the npm registry) reports no error in it. A Dockerfile says which image it builds
// in a first-lines comment "# image: NAME" (registry and repository, no tag).
//   node check_images.mjs SOURCE_DIR RENDERED.yaml...
import { readFileSync, readdirSync } from "fs";
import { join } from "path";
import { validate } from "dockerfile-utils";
import { parseAllDocuments } from "yaml";

const [src, ...rendered] = process.argv.slice(2);
let failed = false;
const fail = (msg) => {
  console.log(`FAIL: ${msg}`);
  failed = true;
};

const built = new Map();  // image name -> Dockerfile
const dockerfiles = readdirSync(src).filter((f) => f === "Dockerfile" || f.startsWith("Dockerfile."));
if (dockerfiles.length === 0) fail("no Dockerfile at the top of the repository");
for (const f of dockerfiles) {
  const text = readFileSync(join(src, f), "utf8");
  const errors = validate(text).filter((d) => d.severity === 1);
  for (const d of errors) fail(`${f}:${d.range.start.line + 1}: ${d.message}`);
  const m = text.match(/^# image: (\S+)\s*$/m);
  if (!m) {
    fail(`${f}: no "# image: NAME" line saying which image it builds`);
    continue;
  }
  built.set(m[1], f);
  console.log(`${f}: parses (${errors.length} errors), builds ${m[1]}`);
}

const images = (obj, out) => {
  if (Array.isArray(obj)) obj.forEach((x) => images(x, out));
  else if (obj && typeof obj === "object") {
    for (const [k, v] of Object.entries(obj)) {
      if ((k === "containers" || k === "initContainers") && Array.isArray(v)) v.forEach((c) => c.image && out.add(c.image));
      else images(v, out);
    }
  }
  return out;
};
for (const file of rendered) {
  const named = new Set();
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) images(doc.toJS(), named);
  for (const image of named) {
    const name = image.replace(/@.*$/, "").replace(/:[^:/]+$/, "");
    if (built.has(name)) console.log(`${file}: ${image} <- ${built.get(name)}`);
    else fail(`${file}: names ${image}, which no Dockerfile here builds`);
  }
}
process.exit(failed ? 1 : 0);
