// Live token view under the P2P and FateZero Controllers' prompts: how both prompts tokenise with
// the connected CLIP's own kind of tokenizer (SD1.x / SD2.x / SDXL, via POST /vp2p/tokenize, told
// by the loader feeding the controller's clip input), their emphasis weights ('(word:1.2)'), which
// target words are kept / swapped / added / changed, re-weighted or blended, and warnings for edits
// that cannot run — shown as you type. Queueing a graph with such an error is refused by the
// server itself (the controllers' validate_inputs), and the frontend marks the node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// node type -> { request field: widget name }
const NODES = {
  VP2P_P2PController: {
    source: "source_prompt", target: "target_prompt", edit: "edit", reweight: "reweight", blend_source_words: "blend_source_words",
    blend_target_words: "blend_target_words", cross_replace_words: "cross_replace_words",
  },
  VP2P_FateZeroController: {
    source: "source_prompt", target: "target_prompt", edit: "edit", reweight: "reweight", blend_source_words: "blend_words",
    blend_target_words: "latent_blend_target_words",
  },
};
const COLORS = { kept: "#9aa4b1", swapped: "#f0b429", added: "#3ecf8e", changed: "#61b0ff" };
const LOADER_WIDGETS = ["ckpt_name", "clip_name", "clip_name1", "clip_name2", "type"];

const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);

function linkOf(id) {
  return id == null ? null : app.graph.links[id] ?? app.graph.links.get?.(id);
}

// A widget's value, or the value at the other end of its link (e.g. a shared source prompt).
function inputValue(node, name) {
  const inp = (node.inputs || []).find((i) => i.widget?.name === name);
  if (inp && inp.link != null) {
    const link = linkOf(inp.link);
    const origin = link && app.graph.getNodeById(link.origin_id);
    const w = origin?.widgets?.[0];
    if (w) return w.value;
  }
  return node.widgets?.find((w) => w.name === name)?.value ?? "";
}

// The loader the controller's clip comes from ({class_type, inputs} of a node with a ckpt_name /
// clip_name / type widget), followed through CLIP pass-through nodes (LoRA, CLIP Set Last Layer,
// reroutes); null when none is found (the server then assumes SD1.x and says so).
function clipSource(node) {
  let current = node;
  let input = (node.inputs || []).find((i) => i.name === "clip");
  for (let depth = 0; depth < 32 && input?.link != null; depth++) {
    const link = linkOf(input.link);
    const origin = link && app.graph.getNodeById(link.origin_id);
    if (!origin || origin === current) return null;
    const widgets = (origin.widgets || []).filter((w) => LOADER_WIDGETS.includes(w.name));
    if (widgets.some((w) => w.name !== "type")) {
      return { class_type: origin.comfyClass || origin.type, inputs: Object.fromEntries(widgets.map((w) => [w.name, w.value])) };
    }
    current = origin;
    const linked = (origin.inputs || []).filter((i) => i.link != null);
    input = linked.find((i) => i.type === "CLIP") || linked.find((i) => i.name === "clip") || (linked.length === 1 ? linked[0] : null);
  }
  return null;
}

function words(list, withStatus) {
  return (list || []).map((v) => {
    const color = withStatus ? COLORS[v.status] || COLORS.kept : COLORS.kept;
    const marks = [v.weight !== undefined ? `(${v.weight})` : "", v.reweight !== undefined ? `×${v.reweight}` : "",
      v.blend ? "blend" : ""].filter(Boolean).join(" ");
    const title = `${v.word}: tokens ${v.tokens.join(" · ")} at ${v.positions.join(", ")}${v.status ? " — " + v.status : ""}`;
    return `<span title="${esc(title)}" data-status="${esc(v.status || "")}" style="display:inline-block;margin:1px 3px;` +
      `padding:0 3px;border-radius:3px;border:1px solid ${color};color:${color}${v.blend ? ";text-decoration:underline" : ""}">` +
      `${esc(v.tokens.join("·"))}${marks ? `<sup>${esc(marks)}</sup>` : ""}</span>`;
  }).join("");
}

function render(view) {
  const parts = [];
  if (view.source) parts.push(`<div><b>source</b> ${words(view.source, false)}</div>`);
  if (view.target) parts.push(`<div><b>target</b> ${words(view.target, true)}</div>`);
  if (view.kind) {
    const n = view.token_count;
    parts.push(`<div style="opacity:.8">edit: <b class="vp2p-kind">${esc(view.kind)}</b> · tokens ${n.source}/${n.limit} → ${n.target}/${n.limit}` +
      (view.tokenizer ? ` · <span class="vp2p-tokenizer">${esc(view.tokenizer)}</span>` : "") + `</div>`);
  }
  for (const note of view.notes || []) parts.push(`<div class="vp2p-note" style="opacity:.7">ℹ ${esc(note)}</div>`);
  for (const w of view.warnings || []) parts.push(`<div class="vp2p-warning" style="color:#ff6b6b">⚠ ${esc(w)}</div>`);
  return parts.join("");
}

async function refresh(node) {
  const fields = NODES[node.comfyClass || node.type] || NODES.VP2P_P2PController;
  const body = Object.fromEntries(Object.entries(fields).map(([field, widget]) => [field, inputValue(node, widget)]));
  body.clip = clipSource(node);
  node.vp2pRequest = body;
  try {
    const res = await api.fetchApi("/vp2p/tokenize", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const view = await res.json();
    node.vp2pView = view;
    if (node.vp2pElement) node.vp2pElement.innerHTML = render(view);
    return view;
  } catch (e) {
    if (node.vp2pElement) node.vp2pElement.textContent = "token view unavailable: " + e;
    return null;
  }
}

function schedule(node) {
  clearTimeout(node.vp2pTimer);
  node.vp2pTimer = setTimeout(() => refresh(node), 250);
}

app.registerExtension({
  name: "VideoP2P.TokenView",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const fields = NODES[nodeData.name];
    if (!fields) return;
    const watch = Object.values(fields);
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      const el = document.createElement("div");
      el.className = "vp2p-token-view";
      el.style.cssText = "font:11px monospace;line-height:1.5;overflow:auto;padding:2px 4px;color:#ddd";
      this.vp2pElement = el;
      const widget = this.addDOMWidget("token_view", "vp2p_token_view", el, { serialize: false, getMinHeight: () => 60 });
      widget.serialize = false; // a view, not a value: never in widgets_values (shared workflows stay unchanged)
      for (const w of this.widgets || []) {
        if (!watch.includes(w.name)) continue;
        const cb = w.callback;
        w.callback = (...args) => { const out = cb?.apply(w, args); schedule(this); return out; };
      }
      schedule(this);
      return r;
    };
    const configured = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = configured?.apply(this, arguments);
      schedule(this);
      return r;
    };
    const connections = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function () {
      const r = connections?.apply(this, arguments);
      schedule(this);
      return r;
    };
  }
});
