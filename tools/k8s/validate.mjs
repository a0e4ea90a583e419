// Validates every object of a rendered Kubernetes manifest (YAML, many documents) against the
// Kubernetes JSON schemas of the `kubernetes-models` packages (Prometheus Operator objects: of
// `@kubernetes-models/prometheus-operator`); exits non-zero naming each object that fails or whose
// kind it has no schema for. The packages are ES modules: run this file from the folder where
// package.json's dependencies are installed (tests/k8s_test.sh copies it there).
//   node validate.mjs rendered.yaml
import fs from "node:fs";
import YAML from "yaml";

async function modelFor(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  const path =
    group === "monitoring.coreos.com"
      ? `@kubernetes-models/prometheus-operator/${group}/${version}`
      : `kubernetes-models/${group ? group + "/" : ""}${version}`;
  try {
    const mod = await import(path);
    return mod[kind] || null;
  } catch (e) {
    return null;
  }
}

const text = fs.readFileSync(process.argv[2], "utf8");
const docs = YAML.parseAllDocuments(text).map((d) => d.toJS()).filter((d) => d);
let failures = 0;
for (const obj of docs) {
  const name = `${obj.kind} ${obj.metadata && obj.metadata.name}`;
  const Model = await modelFor(obj.apiVersion || "", obj.kind || "");
  if (!Model) {
    console.error(`FAIL ${name}: no schema for ${obj.apiVersion} ${obj.kind}`);
    failures++;
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(`ok   ${name}`);
  } catch (e) {
    console.error(`FAIL ${name}: ${e.message}`);
    failures++;
  }
}
if (docs.length === 0) {
  console.error("FAIL: no objects");
  failures++;
}
process.exit(failures ? 1 : 0);
