#!/usr/bin/env node
// Checks Kubernetes manifests without a cluster, the way `kubectl apply --validate=strict` would
// before admission webhooks and CEL rules: every document must be a kind listed in kinds.mjs and
// pass that kind's schema (types, required fields, enums, patterns, bounds), and carry no field the
// schema does not know (a misspelt field is an error, as kubectl's strict field validation makes
// it, instead of being dropped silently by the API server).
//
//   node deploy/schemas/check.mjs [--runtime DIR] [--json | --dump] FILE|- ...
//
// Exit 0 if every document is valid; 1 with one line per problem on stderr. --json prints the
// documents as one JSON array instead of a summary (for tests that compare manifests with
// configs); --dump prints any YAML file's documents that way without checking them. DIR is where
// `make k8s-schema-tool` installed package.json's dependencies (default target/k8s-schemas).
// The CRD schemas are the vendored ones in crds/ (README.md says where they come from).
import fs from "node:fs";
import path from "node:path";
import { register } from "node:module";
import { fileURLToPath } from "node:url";
import { KINDS } from "./kinds.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
let runtime = path.resolve(here, "../../target/k8s-schemas");
if (args[0] === "--runtime") {
  runtime = path.resolve(args[1]);
  args.splice(0, 2);
}
const mode = args[0] === "--json" || args[0] === "--dump" ? args.shift() : "summary";
if (!fs.existsSync(path.join(runtime, "node_modules", "yaml"))) {
  console.error(`check.mjs: ${runtime}/node_modules is missing: run \`make k8s-schema-tool\``);
  process.exit(2);
}
register("./resolve-hooks.mjs", import.meta.url, { data: { runtime } });
const YAML = await import("yaml");

/** Wraps `value` so that every property the validator reads is recorded. */
function tracked(value, records, proxies) {
  if (value === null || typeof value !== "object") return value;
  if (proxies.has(value)) return proxies.get(value);
  const record = { read: new Set(), enumerated: false };
  records.set(value, record);
  const proxy = new Proxy(value, {
    get(target, key) {
      if (typeof key === "string") record.read.add(key);
      return tracked(target[key], records, proxies);
    },
    has(target, key) {
      record.read.add(key);
      return key in target;
    },
    ownKeys(target) {
      record.enumerated = true;
      return Reflect.ownKeys(target);
    },
    getOwnPropertyDescriptor(target, key) {
      record.read.add(key);
      return Reflect.getOwnPropertyDescriptor(target, key);
    },
  });
  proxies.set(value, proxy);
  return proxy;
}

/** Fields of objects whose schema lists its properties (the validator read some of them, and
 * did not enumerate the object as a map does) that the schema does not know. Objects the validator
 * never looked into are free-form (x-kubernetes-preserve-unknown-fields, e.g. a plugin config). */
function unknownFields(value, where, records, out) {
  if (value === null || typeof value !== "object") return;
  const record = records.get(value);
  if (!record) return;
  if (Array.isArray(value)) {
    value.forEach((item, i) => unknownFields(item, `${where}/${i}`, records, out));
    return;
  }
  const free = record.enumerated || record.read.size === 0;
  for (const key of Object.keys(value)) {
    if (!free && !record.read.has(key)) out.push(`${where}/${key}: unknown field "${key}"`);
    else unknownFields(value[key], `${where}/${key}`, records, out);
  }
}

async function checkDocument(doc) {
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
    return ["not a Kubernetes object"];
  }
  const key = `${doc.apiVersion} ${doc.kind}`;
  const module = KINDS[key];
  if (!module) return [`no schema for apiVersion ${doc.apiVersion} kind ${doc.kind}`];
  const { validate } = await import(module);
  const records = new WeakMap();
  const valid = validate(tracked(doc, records, new WeakMap()));
  const problems = valid
    ? []
    : validate.errors.map(
        (e) => `${e.instancePath || "/"}: ${e.keyword} ${JSON.stringify(e.params)}`,
      );
  if (typeof doc.metadata?.name !== "string" || doc.metadata.name === "") {
    problems.push("/metadata/name: required");
  }
  unknownFields(doc, "", records, problems);
  return problems;
}

let failed = false;
const all = [];
for (const file of args) {
  const text = fs.readFileSync(file === "-" ? 0 : file, "utf8");
  const docs = YAML.parseAllDocuments(text, { version: "1.1", uniqueKeys: true });
  let count = 0;
  for (const [i, doc] of docs.entries()) {
    const label = `${file}: document ${i + 1}`;
    if (doc.errors.length) {
      for (const e of doc.errors) console.error(`${label}: YAML: ${e.message.split("\n")[0]}`);
      failed = true;
      continue;
    }
    const value = doc.toJS();
    if (value === null || value === undefined) continue;
    count += 1;
    all.push(value);
    if (mode === "--dump") continue;
    const name = `${value.kind ?? "?"} ${value.metadata?.name ?? "?"}`;
    for (const problem of await checkDocument(value)) {
      console.error(`${label} (${name}): ${problem}`);
      failed = true;
    }
  }
  if (count === 0) {
    console.error(`${file}: no documents`);
    failed = true;
  }
  if (mode === "summary") console.log(`${file}: ${count} object(s) checked`);
}
if (mode !== "summary") console.log(JSON.stringify(all));
process.exit(failed ? 1 : 0);
