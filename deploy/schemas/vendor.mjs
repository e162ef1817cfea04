// Refreshes crds/: copies, unchanged, every _schemas/ file of the vendored packages that the kinds
// in kinds.mjs need (their closure over relative and cross-package imports), with each package's
// package.json and LICENSE. Run by hand when updating a version, from a directory where the
// packages are installed:
//   mkdir /tmp/crd-src && cd /tmp/crd-src && npm install --ignore-scripts \
//     @kubernetes-models/envoy-gateway@2.0.0 @kubernetes-models/gateway-api@2.0.0 @kubernetes-models/istio@3.0.1
//   node <repo>/deploy/schemas/vendor.mjs /tmp/crd-src/node_modules
// then update README.md here and run `cargo test --test deploy`.
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { KINDS, VENDORED } from "./kinds.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const source = path.resolve(process.argv[2] ?? "node_modules");
const target = path.join(here, "crds");

const withJs = (spec) => (spec.endsWith(".js") ? spec : spec + ".js");
const vendoredPackage = (spec) =>
  Object.keys(VENDORED).find((p) => spec === p || spec.startsWith(p + "/"));

const seen = new Set();
const queue = Object.values(KINDS).filter(vendoredPackage).map(withJs);
while (queue.length) {
  const spec = queue.pop();
  if (seen.has(spec)) continue;
  seen.add(spec);
  const file = path.join(source, spec);
  const text = fs.readFileSync(file, "utf8");
  for (const [, imported] of text.matchAll(/from"([^"]+)"/g)) {
    if (imported.startsWith("./")) {
      queue.push(withJs(path.posix.join(path.posix.dirname(spec), imported)));
    } else if (vendoredPackage(imported)) {
      queue.push(withJs(imported));
    }
  }
}

fs.rmSync(target, { recursive: true, force: true });
for (const [pkg, version] of Object.entries(VENDORED)) {
  const meta = JSON.parse(fs.readFileSync(path.join(source, pkg, "package.json"), "utf8"));
  if (meta.version !== version) throw new Error(`${pkg} is ${meta.version}, kinds.mjs wants ${version}`);
  fs.mkdirSync(path.join(target, pkg, "_schemas"), { recursive: true });
  for (const f of ["package.json", "LICENSE"]) {
    fs.copyFileSync(path.join(source, pkg, f), path.join(target, pkg, f));
  }
}
const lines = [];
for (const spec of [...seen].sort()) {
  fs.copyFileSync(path.join(source, spec), path.join(target, spec));
  const sum = createHash("sha256").update(fs.readFileSync(path.join(target, spec))).digest("hex");
  lines.push(`${sum}  ${spec}`);
}
fs.writeFileSync(path.join(target, "SHA256SUMS"), lines.join("\n") + "\n");
console.log(`vendored ${lines.length} schema files into ${path.relative(process.cwd(), target)}`);
