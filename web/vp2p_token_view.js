// Live token view under the P2P Controller's prompts: how both prompts tokenise (with the
// SD1.x CLIP tokenizer, via POST /vp2p/tokenize), which target words are kept / swapped /
// added / changed, re-weighted or blended, and warnings for edits that cannot run — shown
// as you type and again, as a toast, when the prompt is queued.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "VP2P_P2PController";
const WATCH = ["source_prompt", "target_prompt", "edit", "reweight", "blend_source_words", "blend_target_words"];
const COLORS = { kept: "#9aa4b1", swapped: "#f0b429", added: "#3ecf8e", changed: "#61b0ff" };

const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);

// A widget's value, or the value at the other end of its link (e.g. a shared source prompt).
function inputValue(node, name) {
  const inp = (node.inputs || []).find((i) => i.widget?.name === name);
  if (inp && inp.link != null) {
    const link = app.graph.links[inp.link] ?? app.graph.links.get?.(inp.link);
    const origin = link && app.graph.getNodeById(link.origin_id);
    const w = origin?.widgets?.[0];
    if (w) return w.value;
  }
  return node.widgets?.find((w) => w.name === name)?.value ?? "";
}

function words(list, withStatus) {
  return (list || []).map((v) => {
    const color = withStatus ? COLORS[v.status] || COLORS.kept : COLORS.kept;
    const marks = [v.reweight !== undefined ? `×${v.reweight}` : "", v.blend ? "blend" : ""].filter(Boolean).join(" ");
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
    parts.push(`<div style="opacity:.8">edit: <b class="vp2p-kind">${esc(view.kind)}</b> · tokens ${n.source}/${n.limit} → ${n.target}/${n.limit}</div>`);
  }
  for (const w of view.warnings || []) parts.push(`<div class="vp2p-warning" style="color:#ff6b6b">⚠ ${esc(w)}</div>`);
  return parts.join("");
}

async function refresh(node) {
  const body = {
    source: inputValue(node, "source_prompt"), target: inputValue(node, "target_prompt"), edit: inputValue(node, "edit"),
    reweight: inputValue(node, "reweight"), blend_source_words: inputValue(node, "blend_source_words"),
    blend_target_words: inputValue(node, "blend_target_words"),
  };
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
    if (nodeData.name !== NODE) return;
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
        if (!WATCH.includes(w.name)) continue;
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
  },
  async setup() {
    // Warn before queueing: replace that cannot apply, words that are not in their prompt, …
    const queue = app.queuePrompt.bind(app);
    app.queuePrompt = async function (...args) {
      const nodes = (app.graph?.nodes || []).filter((n) => n.comfyClass === NODE || n.type === NODE);
      for (const node of nodes) {
        const view = await refresh(node);
        const warnings = view?.warnings || [];
        if (warnings.length) {
          app.extensionManager?.toast?.add({ severity: "warn", summary: `P2P Controller #${node.id}`, detail: warnings.join("\n"), life: 10000 });
        }
      }
      return queue(...args);
    };
  },
});
