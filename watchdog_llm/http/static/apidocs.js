// The admin API's reference, read from its own /openapi.json (no Swagger UI: that loads from a CDN).
"use strict";

(async () => {
  const main = document.getElementById("api");
  const el = (tag, text) => {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  let spec;
  try {
    const r = await fetch("/openapi.json", { credentials: "same-origin" });
    spec = await r.json();
  } catch (e) {
    main.append(el("p", `Could not read /openapi.json: ${e.message}`));
    return;
  }
  const ref = (s) => (s && s.$ref ? s.$ref.split("/").pop() : s && s.type ? s.type : "");
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const sec = el("section");
      sec.append(el("h2", `${method.toUpperCase()} ${path}`));
      if (op.summary) sec.append(el("p", op.summary));
      const params = (op.parameters || []).map((p) => `${p.name} (${p.in}${p.required ? ", required" : ""})`);
      if (params.length) sec.append(el("p", `parameters: ${params.join(", ")}`));
      const body = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
      if (body) sec.append(el("p", `body: ${ref(body.schema)}`));
      const codes = Object.entries(op.responses || {}).map(([c, r]) => `${c} ${r.description || ""}`.trim());
      sec.append(el("p", `answers: ${codes.join("; ")}`));
      main.append(sec);
    }
  }
  const schemas = (spec.components && spec.components.schemas) || {};
  const sec = el("section");
  sec.append(el("h2", "Schemas"));
  sec.append(el("pre", JSON.stringify(schemas, null, 2)));
  main.append(sec);
})();
