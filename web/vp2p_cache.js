// The Video-P2P cache in ComfyUI's settings panel (Video-P2P › Cache): its size limit, read by
// the server from the saved setting before every cache write (least recently used entries are
// removed past it), and a "Clear Video-P2P cache" button that shows the cache's size and, after
// clearing, what it freed as a toast. The same action is a command in the menu
// (Extensions › Video-P2P) and the command palette. Routes: GET /vp2p/cache, POST /vp2p/cache/clear.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const LIMIT_ID = "VideoP2P.Cache.LimitGB";
const CLEAR_ID = "VideoP2P.Cache.Clear";
const CLEAR_COMMAND = "VideoP2P.ClearCache";

function toast(severity, summary, detail) {
  const t = app.extensionManager?.toast;
  if (t?.add) t.add({ severity, summary, detail, life: 8000 });
  else console.log(`[Video-P2P] ${summary}: ${detail}`);
}

async function cacheJson(path, options) {
  const res = await api.fetchApi(path, options);
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

// Clears the cache and toasts what was freed; returns the server's answer (undefined on failure).
async function clearCache() {
  try {
    const r = await cacheJson("/vp2p/cache/clear", { method: "POST" });
    const kept = r.skipped?.length ? ` (${r.skipped.length} entr${r.skipped.length === 1 ? "y" : "ies"} in use kept; removed once released)` : "";
    toast("success", "Video-P2P cache cleared", `Freed ${r.freed_text}${kept}.`);
    return r;
  } catch (e) {
    toast("error", "Video-P2P cache", `Clearing the cache failed: ${e.message}`);
  }
}

function usageText(r) {
  const source = r.limit_source === "env" ? `, set by ${r.env}` : "";
  return `${r.size_text} in ${r.entries} entr${r.entries === 1 ? "y" : "ies"} (limit ${r.limit_text}${source})`;
}

// The settings panel's custom renderer: the cache's size and a clear button.
function clearRow() {
  const row = document.createElement("div");
  row.className = "vp2p-cache-clear";
  row.style.cssText = "display:flex;align-items:center;gap:0.75rem";
  const info = document.createElement("span");
  info.className = "vp2p-cache-usage";
  info.style.opacity = "0.8";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "p-button p-component p-button-sm p-button-danger";
  button.textContent = "Clear Video-P2P cache";
  const refresh = async () => {
    try {
      const r = await cacheJson("/vp2p/cache");
      info.textContent = usageText(r);
      info.title = r.location;
    } catch (e) {
      info.textContent = `cache size unknown (${e.message})`;
    }
  };
  button.addEventListener("click", async () => {
    button.disabled = true;
    await clearCache();
    button.disabled = false;
    await refresh();
  });
  row.append(info, button);
  refresh();
  return row;
}

app.registerExtension({
  name: "VideoP2P.Cache",
  settings: [
    {
      id: LIMIT_ID,
      category: ["Video-P2P", "Cache", "Size limit"],
      name: "Cache size limit (GB)",
      tooltip:
        "Most disk space for models/vp2p/cache (tuned models, inversions, attention stores on disk). After each write the " +
        "least recently used entries are removed past it; a lowered limit applies at the next write. " +
        "The environment variable VP2P_CACHE_LIMIT_GB, when set, overrides it.",
      type: "number",
      defaultValue: 20,
      attrs: { min: 0, step: 1, maxFractionDigits: 1 },
    },
    {
      id: CLEAR_ID,
      category: ["Video-P2P", "Cache", "Clear"],
      name: "Clear the cache",
      tooltip: "Delete everything in models/vp2p/cache (safe: it is recomputed when needed). Saved tuned models and saved inversions stay.",
      type: () => clearRow(),
      defaultValue: "",
    },
  ],
  commands: [{ id: CLEAR_COMMAND, label: "Clear Video-P2P cache", icon: "pi pi-trash", function: clearCache }],
  menuCommands: [{ path: ["Extensions", "Video-P2P"], commands: [CLEAR_COMMAND] }],
});
