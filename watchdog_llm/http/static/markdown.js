// Markdown for untrusted model output, built with DOM calls only (createElement, textContent):
// no HTML is ever parsed, so a reply holding <img onerror=...> or <script> is shown as text.
// Links are made only for http(s) and mailto URLs. Covers what chat models write: paragraphs,
// headings, fenced code (with a copy button), inline code, bold, italic, links, lists, quotes,
// tables and rules. Anything else stays plain text.
"use strict";

(function () {
  const SAFE_URL = /^(https?:\/\/|mailto:)/i;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // Inline: `code`, **bold**, *italic* / _italic_, [text](url). Scanned left to right; whatever
  // does not close is text.
  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*]+?)\*\*|__([^_]+?)__|\*([^*\s][^*]*?)\*|\b_([^_\s][^_]*?)_\b|\[([^\]]+)\]\(([^()\s]+)\)/g;

  function inline(parent, text) {
    let last = 0;
    // matchAll scans with its own copy of the pattern: the recursion below cannot disturb it.
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      if (m[1]) parent.appendChild(el("code", null, m[2]));
      else if (m[3] || m[4]) inline(parent.appendChild(el("strong")), m[3] || m[4]);
      else if (m[5] || m[6]) inline(parent.appendChild(el("em")), m[5] || m[6]);
      else if (m[7]) parent.appendChild(link(m[7], m[8]));
      last = m.index + m[0].length;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  function link(text, url) {
    if (!SAFE_URL.test(url)) return document.createTextNode(`[${text}](${url})`);
    const a = el("a", null, text);
    a.href = url;
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    return a;
  }

  function codeBlock(lang, lines) {
    const wrap = el("div", "code");
    const bar = el("div", "code-bar");
    bar.appendChild(el("span", "code-lang", lang || "code"));
    const copy = el("button", "copy-code", "Copy code");
    copy.type = "button";
    const text = lines.join("\n");
    copy.addEventListener("click", () => window.wdCopy(text, copy));
    bar.appendChild(copy);
    wrap.appendChild(bar);
    const pre = el("pre");
    pre.appendChild(el("code", lang ? `language-${lang.replace(/[^\w-]/g, "")}` : null, text));
    wrap.appendChild(pre);
    return wrap;
  }

  const cells = (row) => row.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
  const TABLE_RULE = /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/;
  const LIST = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;

  function table(head, rows) {
    const t = el("table");
    const tr = t.appendChild(el("thead")).appendChild(el("tr"));
    for (const c of cells(head)) inline(tr.appendChild(el("th")), c);
    const body = t.appendChild(el("tbody"));
    for (const r of rows) {
      const row = body.appendChild(el("tr"));
      for (const c of cells(r)) inline(row.appendChild(el("td")), c);
    }
    const wrap = el("div", "table");
    wrap.appendChild(t);
    return wrap;
  }

  // Blocks. A fence still open at the end (a stream in progress) is shown as code so far.
  function render(src) {
    const out = document.createDocumentFragment();
    const lines = String(src).replace(/\r\n?/g, "\n").split("\n");
    let para = [];
    const flush = () => {
      if (para.length) inline(out.appendChild(el("p")), para.join("\n"));
      para = [];
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(```+|~~~+)\s*([\w+.#-]*)\s*$/);
      if (fence) {
        flush();
        const body = [];
        for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
        out.appendChild(codeBlock(fence[2], body));
        continue;
      }
      const h = line.match(/^(#{1,6})\s+(.*)$/);
      if (h) {
        flush();
        inline(out.appendChild(el(`h${Math.min(h[1].length + 2, 6)}`)), h[2]);
        continue;
      }
      if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
        flush();
        out.appendChild(el("hr"));
        continue;
      }
      if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])) {
        flush();
        const rows = [];
        for (i += 2; i < lines.length && lines[i].includes("|"); i++) rows.push(lines[i]);
        i--;
        out.appendChild(table(line, rows));
        continue;
      }
      if (LIST.test(line)) {
        flush();
        const ordered = /\d/.test(line.match(LIST)[2]);
        const list = out.appendChild(el(ordered ? "ol" : "ul"));
        for (; i < lines.length && LIST.test(lines[i]); i++) inline(list.appendChild(el("li")), lines[i].match(LIST)[3]);
        i--;
        continue;
      }
      if (/^\s*>/.test(line)) {
        flush();
        const quoted = [];
        for (; i < lines.length && /^\s*>/.test(lines[i]); i++) quoted.push(lines[i].replace(/^\s*>\s?/, ""));
        i--;
        out.appendChild(el("blockquote")).appendChild(render(quoted.join("\n")));
        continue;
      }
      if (!line.trim()) flush();
      else para.push(line);
    }
    flush();
    return out;
  }

  window.renderMarkdown = render;
})();
