// VibeVoice Offload: the offload plan on the Offload Config node, the last run on Generate Dialog.
//
// Offload Config shows only the widgets of its mode and draws what the planner predicts for
// it (POST /vibevoice_offload/plan, nodes/routes.py: no model is loaded): decoder layers
// resident against streamed, estimated VRAM against the card's, ms per frame and RTF.
// Generate Dialog draws the statistics of its last run (the `vibevoice_stats` ui payload).
//
// State for tests and other extensions: node.vibevoicePlan on Offload Config
// ({status: "idle"|"loading"|"ok"|"error"|"unavailable", plan, error, request, updates,
// requests}), node.vibevoiceStats on Generate Dialog (the last run's stats object).
// A slow or failing route only ever shows "plan unavailable": nothing throws, nothing logs an error.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const CONFIG = "VibeVoiceOffloadConfig";
const LOADER = "VibeVoiceOffloadLoader";
const GENERATE = "VibeVoiceGenerateDialog";
const ROUTE = "/vibevoice_offload/plan";

// Widgets that only one mode reads (nodes/offload_config.py); the others are always shown.
const MODE_WIDGETS = { auto: ["target_utilisation"], preset: ["preset"], manual: ["resident_layers"] };
const MODE_ONLY = new Set(Object.values(MODE_WIDGETS).flat());
const PLAN_INPUTS = ["mode", "preset", "resident_layers", "stream_dtype", "prefetch_depth", "pinned", "target_utilisation"];

const DEBOUNCE_MS = 250;
const RETRY_MS = [5000, 15000, 45000]; // after "plan unavailable" (a busy or restarting server); globalThis.VIBEVOICE_PLAN_RETRY_MS overrides (tests)
const TIMEOUT_MS = 10000; // globalThis.VIBEVOICE_PLAN_TIMEOUT_MS overrides it (tests)
const PLAN_HEIGHT = 118;
const STATS_HEIGHT = 84;
const GB = 1e9;

const colors = {
  text: () => globalThis.LiteGraph?.WIDGET_TEXT_COLOR ?? "#ddd",
  dim: () => globalThis.LiteGraph?.WIDGET_SECONDARY_TEXT_COLOR ?? "#999",
  bg: () => globalThis.LiteGraph?.WIDGET_BGCOLOR ?? "#222",
  outline: () => globalThis.LiteGraph?.WIDGET_OUTLINE_COLOR ?? "#666",
  resident: "#3f9d63",
  streamed: "#4a74b8",
  vram: "#c9a227",
  over: "#d0523f",
  error: "#ff7b6b",
};

// ---- small helpers -------------------------------------------------------------------

const widgetOf = (node, name) => node.widgets?.find((w) => w.name === name);
const valueOf = (node, name) => widgetOf(node, name)?.value;
const gb = (bytes) => (bytes == null || !Number.isFinite(bytes) ? "n/a" : `${(bytes / GB).toFixed(bytes < 10 * GB ? 2 : 1)} GB`);
const num = (value, digits) => (Number.isFinite(value) ? value.toFixed(digits) : "n/a");

function fit(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText(text.slice(0, mid) + "…").width <= width) lo = mid;
    else hi = mid - 1;
  }
  return text.slice(0, lo) + "…";
}

function wrap(ctx, text, width, maxLines) {
  const words = String(text).split(/\s+/);
  const lines = [];
  let line = "";
  for (let i = 0; i < words.length; i++) {
    const next = line ? `${line} ${words[i]}` : words[i];
    if (ctx.measureText(next).width <= width || !line) {
      line = next;
      continue;
    }
    lines.push(line);
    line = words[i];
    if (lines.length === maxLines - 1) {
      line = words.slice(i).join(" ");
      break;
    }
  }
  if (line) lines.push(line);
  return lines.slice(0, maxLines).map((l) => fit(ctx, l, width));
}

function redraw(node) {
  node.setDirtyCanvas?.(true, true);
  node.graph?.setDirtyCanvas?.(true, true);
}

function fitHeight(node) {
  const size = node.computeSize?.();
  if (!size) return;
  node.setSize([Math.max(node.size[0], size[0]), size[1]]);
  redraw(node);
}

// Chain a widget callback without losing the original (ComfyUI's own callbacks included).
function onWidgetChange(widget, handler) {
  if (!widget || widget.__vibevoiceHooked) return;
  widget.__vibevoiceHooked = true;
  const original = widget.callback;
  widget.callback = function (...args) {
    const result = original?.apply(this, args);
    try {
      handler(widget.value);
    } catch (err) {
      console.warn("VibeVoice Offload:", err);
    }
    return result;
  };
}

function linkedNodes(node, slot) {
  const graph = node.graph;
  const links = node.outputs?.[slot]?.links ?? [];
  const out = [];
  for (const id of links) {
    const link = graph?.links?.get ? graph.links.get(id) : graph?.links?.[id];
    const target = link && graph.getNodeById(link.target_id);
    if (target) out.push(target);
  }
  return out;
}

// ---- Offload Config: mode widgets --------------------------------------------------------

function widgetIsLinked(node, widget) {
  return node.inputs?.some((input) => input.widget?.name === widget.name && input.link != null) ?? false;
}

// Frontend 1.32: `hidden` keeps a widget out of drawing, clicks and LGraphNode.computeSize,
// but the widget layout pass (LGraphNode.arrange) still gives it computeSize()[1] + 4 pixels
// (NODE_WIDGET_HEIGHT + 4 without computeSize): a computeSize of [0, -4] makes that 0.
// options.hidden is what the Vue node renderer ("Nodes 2.0") reads.
const ZERO_SIZE = () => [0, -4];

function setHidden(widget, hidden) {
  if (hidden && widget.computeSize !== ZERO_SIZE) {
    widget.__vibevoiceComputeSize = Object.prototype.hasOwnProperty.call(widget, "computeSize") ? widget.computeSize : null;
    widget.computeSize = ZERO_SIZE;
  } else if (!hidden && widget.computeSize === ZERO_SIZE) {
    if (widget.__vibevoiceComputeSize) widget.computeSize = widget.__vibevoiceComputeSize;
    else delete widget.computeSize;
  }
  widget.hidden = hidden;
  widget.options ??= {};
  widget.options.hidden = hidden;
}

function applyModeVisibility(node) {
  const mode = valueOf(node, "mode");
  const shown = new Set(MODE_WIDGETS[mode] ?? []);
  let changed = false;
  for (const widget of node.widgets ?? []) {
    if (!MODE_ONLY.has(widget.name)) continue;
    const hidden = !shown.has(widget.name) && !widgetIsLinked(node, widget);
    if (!!widget.hidden !== hidden) changed = true;
    setHidden(widget, hidden);
  }
  if (changed) fitHeight(node);
}

// ---- Offload Config: the plan -------------------------------------------------------------

function sizeFromName(name) {
  if (typeof name !== "string") return null;
  if (/large|7b/i.test(name)) return "Large";
  if (/1[._]5b/i.test(name)) return "1.5B";
  return null;
}

function planRequest(node) {
  const body = {};
  for (const name of PLAN_INPUTS) {
    const value = valueOf(node, name);
    if (value !== undefined) body[name] = value;
  }
  // The connected loader says which model and dtype; a Generate Dialog after it, how long.
  const loader = linkedNodes(node, 0).find((n) => n.type === LOADER || n.comfyClass === LOADER);
  if (loader) {
    const model = valueOf(loader, "model");
    if (typeof model === "string" && model) body.model = model;
    const dtype = valueOf(loader, "dtype");
    if (typeof dtype === "string") body.dtype = dtype;
    const generate = linkedNodes(loader, 0).find((n) => n.type === GENERATE || n.comfyClass === GENERATE);
    const seconds = generate && Number(valueOf(generate, "max_seconds"));
    if (seconds > 0) body.minutes = seconds / 60;
  }
  body.size = sizeFromName(body.model) ?? "Large";
  return body;
}

function schedulePlan(node, delay = DEBOUNCE_MS, retry = false) {
  const state = node.vibevoicePlan;
  if (!state) return;
  if (!retry) state.retries = 0; // a change by the user starts the retries afresh
  clearTimeout(state.timer);
  state.timer = setTimeout(() => fetchPlan(node), delay);
}

async function fetchPlan(node) {
  const state = node.vibevoicePlan;
  if (!state || !node.graph) return;
  const request = planRequest(node);
  const key = JSON.stringify(request);
  if (key === state.key && state.status === "ok") return; // nothing changed
  const seq = ++state.seq;
  state.abort?.abort();
  const controller = new AbortController();
  state.abort = controller;
  state.status = "loading";
  state.request = request;
  state.requests += 1;
  redraw(node);
  const timer = setTimeout(() => controller.abort(), Number(globalThis.VIBEVOICE_PLAN_TIMEOUT_MS) || TIMEOUT_MS);
  let result;
  try {
    const response = await api.fetchApi(ROUTE, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: key,
      signal: controller.signal,
    });
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (data && typeof data === "object" && Number.isFinite(data.num_layers)) {
      result = { status: data.error ? "error" : "ok", plan: data, error: data.error ?? null };
    } else {
      const why = data?.error ?? `HTTP ${response.status}`;
      result = { status: "unavailable", plan: null, error: String(why) };
    }
  } catch (err) {
    result = { status: "unavailable", plan: null, error: err?.name === "AbortError" ? "no answer in time" : String(err?.message ?? err) };
  } finally {
    clearTimeout(timer);
  }
  if (seq !== state.seq) return; // a newer request owns the state
  Object.assign(state, result, { key: result.status === "unavailable" ? null : key, abort: null, updates: state.updates + 1 });
  if (result.status === "unavailable" && state.retries < RETRY_MS.length) {
    schedulePlan(node, Number(globalThis.VIBEVOICE_PLAN_RETRY_MS) || RETRY_MS[state.retries], true);
    state.retries += 1;
  }
  redraw(node);
}

function drawBar(ctx, x, y, w, h, parts, outline) {
  ctx.fillStyle = colors.bg();
  ctx.fillRect(x, y, w, h);
  for (const [from, to, color] of parts) {
    ctx.fillStyle = color;
    ctx.fillRect(x + from * w, y, Math.max(0, (to - from) * w), h);
  }
  ctx.strokeStyle = outline ?? colors.outline();
  ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
}

function drawPlan(ctx, node, width, y) {
  const state = node.vibevoicePlan;
  const margin = 15;
  const x = margin;
  const w = Math.max(40, width - 2 * margin);
  const plan = state?.plan;
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  ctx.fillStyle = colors.dim();
  const heading = plan ? `Plan for ${plan.model ?? plan.model_label}` : "Plan";
  const status = state?.status === "loading" ? " · updating…" : "";
  ctx.fillText(fit(ctx, heading + status, w), x, y + 8);

  if (!plan) {
    if (state) state.drawn = { resident: null, streamed: null, bar: null, status: state.status };
    ctx.fillStyle = state?.status === "unavailable" ? colors.error : colors.dim();
    const lines = state?.status === "unavailable" ? ["plan unavailable", ...wrap(ctx, state.error ?? "", w, 2)] : ["…"];
    lines.forEach((line, i) => ctx.fillText(line, x, y + 28 + i * 15));
    ctx.restore();
    return;
  }
  if (state.status === "loading") ctx.globalAlpha *= 0.6;

  // Decoder layers: one cell each, resident first.
  const n = plan.num_layers;
  const cell = w / Math.max(1, n);
  const barY = y + 18;
  // What was last drawn, in node coordinates (tests find the bar on screen with it).
  state.drawn = { resident: plan.resident_layers, streamed: plan.streamed_layers, bar: [x, barY, w, 12], status: state.status };
  ctx.fillStyle = colors.bg();
  ctx.fillRect(x, barY, w, 12);
  for (let i = 0; i < n; i++) {
    ctx.fillStyle = i < plan.resident_layers ? colors.resident : colors.streamed;
    ctx.fillRect(x + i * cell + (cell > 3 ? 0.5 : 0), barY, Math.max(1, cell - (cell > 3 ? 1 : 0)), 12);
  }
  ctx.fillStyle = colors.text();
  ctx.fillText(`${plan.resident_layers} resident`, x, barY + 21);
  ctx.textAlign = "right";
  ctx.fillText(`${plan.streamed_layers} streamed of ${n} layers`, x + w, barY + 21);
  ctx.textAlign = "left";

  // Estimated VRAM against the card (or against itself on a CPU-only ComfyUI).
  const vramY = y + 52;
  const est = plan.estimated_vram_bytes;
  const card = plan.card_vram_bytes;
  const scale = Math.max(est || 0, card || 0, 1);
  const over = plan.budget_bytes != null && est > plan.budget_bytes;
  drawBar(ctx, x, vramY, w, 10, [[0, Math.min(1, est / scale), over ? colors.over : colors.vram]]);
  if (plan.budget_bytes != null && card) {
    const bx = x + Math.min(1, plan.budget_bytes / scale) * w;
    ctx.fillStyle = colors.text();
    ctx.fillRect(bx - 1, vramY - 2, 2, 14);
  }
  ctx.fillStyle = colors.text();
  const budgetText = plan.budget_bytes != null ? ` · budget ${gb(plan.budget_bytes)}` : "";
  const vramText = card ? `VRAM ≈ ${gb(est)}${budgetText} · card ${gb(card)}` : `VRAM ≈ ${gb(est)} (no GPU: card n/a)`;
  ctx.fillText(fit(ctx, vramText, w), x, vramY + 19);

  // Speed.
  ctx.fillText(fit(ctx, `≈ ${num(plan.predicted_ms_per_frame, 1)} ms/frame · RTF ${num(plan.rtf, 2)} (planner estimate)`, w), x, y + 86);

  const message = plan.error ?? plan.note;
  if (message) {
    ctx.fillStyle = plan.error ? colors.error : colors.dim();
    wrap(ctx, message, w, 2).forEach((line, i) => ctx.fillText(line, x, y + 101 + i * 13));
  }
  ctx.restore();
}

// A widget that only draws on the node: never a node input, so kept out of widgets_values
// and the API prompt; a drawing error is logged, never thrown into the canvas loop.
function addDrawingWidget(node, name, what, drawFn, height) {
  return node.addCustomWidget({
    name,
    type: name,
    value: null,
    serialize: false,
    options: { serialize: false },
    draw(ctx, n, width, y) {
      try {
        drawFn(ctx, n, width, y);
      } catch (err) {
        console.warn(`VibeVoice Offload: ${what} drawing failed`, err);
      }
    },
    computeSize(width) {
      return [width, height];
    },
  });
}

function setupConfigNode(node) {
  if (node.vibevoicePlan) return;
  node.vibevoicePlan = { status: "idle", plan: null, error: null, request: null, key: null, seq: 0, updates: 0, requests: 0, retries: 0, timer: null, abort: null };
  addDrawingWidget(node, "vibevoice_plan", "plan", drawPlan, PLAN_HEIGHT);
  for (const name of PLAN_INPUTS) {
    onWidgetChange(widgetOf(node, name), () => {
      if (name === "mode") applyModeVisibility(node);
      schedulePlan(node);
    });
  }
  applyModeVisibility(node);
  fitHeight(node);
}

// Loader and Generate Dialog widgets change the plan of the configs connected to them.
function refreshConfigsOf(node) {
  const graph = node.graph ?? app.graph;
  for (const other of graph?._nodes ?? graph?.nodes ?? []) {
    if (other.vibevoicePlan) schedulePlan(other);
  }
}

// ---- Generate Dialog: the last run ------------------------------------------------------

function statsLines(s) {
  const engine = s.engine && typeof s.engine === "object" ? s.engine : {};
  const streamed = engine.offload_bytes_streamed;
  const peak = s.peak_vram_bytes ?? s.vram_peak_bytes ?? engine.peak_vram_bytes ?? engine.offload_peak_vram_bytes;
  const vram = peak != null
    ? `peak VRAM ${gb(peak)}`
    : `peak VRAM n/a · weights on ${s.device ?? "device"} ${gb(s.weights_on_device_bytes)}`;
  return [
    `Last run: ${s.frames ?? "?"} frames, ${num(s.audio_seconds, 2)} s of audio in ${num(s.total_s, 2)} s`,
    `${num(s.ms_per_frame, 1)} ms per frame · RTF ${num(s.rtf, 2)}`,
    `streamed ${streamed == null ? "n/a" : gb(streamed)} · ${vram}`,
    `layers ${s.resident_layers ?? "?"}/${s.num_layers ?? "?"} resident · ${s.stream_dtype ?? "?"} stream`,
  ];
}

function drawStats(ctx, node, width, y) {
  const stats = node.vibevoiceStats;
  if (!stats) return;
  const x = 15;
  const w = Math.max(40, width - 30);
  ctx.save();
  ctx.fillStyle = colors.bg();
  ctx.strokeStyle = colors.outline();
  ctx.beginPath();
  ctx.roundRect ? ctx.roundRect(x - 5, y + 2, w + 10, STATS_HEIGHT - 6, 6) : ctx.rect(x - 5, y + 2, w + 10, STATS_HEIGHT - 6);
  ctx.fill();
  ctx.stroke();
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  const lines = statsLines(stats);
  node.vibevoiceStatsDrawn = lines; // what the node shows now (tests read it)
  lines.forEach((line, i) => {
    ctx.fillStyle = i === 0 ? colors.text() : colors.dim();
    ctx.fillText(fit(ctx, line, w), x, y + 14 + i * 18);
  });
  ctx.restore();
}

function setupGenerateNode(node) {
  if (node.vibevoiceStatsWidget) return;
  node.vibevoiceStats = null;
  const widget = addDrawingWidget(node, "vibevoice_stats", "stats", drawStats, STATS_HEIGHT);
  setHidden(widget, true); // until a run has finished
  node.vibevoiceStatsWidget = widget;
}

function showStats(node, stats) {
  setupGenerateNode(node);
  node.vibevoiceStats = stats;
  const widget = node.vibevoiceStatsWidget;
  if (widget) {
    if (widget.hidden) {
      // Grow by the panel: the script box keeps its size (fitHeight would shrink it).
      setHidden(widget, false);
      const min = node.computeSize?.() ?? node.size;
      node.setSize([Math.max(node.size[0], min[0]), Math.max(min[1], node.size[1] + STATS_HEIGHT + 4)]);
    }
  }
  redraw(node);
}

// ---- registration ---------------------------------------------------------------------------

function chain(proto, name, after) {
  const original = proto[name];
  proto[name] = function (...args) {
    const result = original?.apply(this, args);
    try {
      after.apply(this, args);
    } catch (err) {
      console.warn(`VibeVoice Offload: ${name}`, err);
    }
    return result;
  };
}

app.registerExtension({
  name: "VibeVoice.Offload",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    if (name === CONFIG) {
      chain(nodeType.prototype, "onNodeCreated", function () {
        setupConfigNode(this);
        schedulePlan(this, 0);
      });
      chain(nodeType.prototype, "onConfigure", function () {
        // widgets_values are restored by now: show the right widgets for the loaded mode
        setupConfigNode(this);
        applyModeVisibility(this);
        schedulePlan(this);
      });
      chain(nodeType.prototype, "onConnectionsChange", function () {
        if (this.vibevoicePlan) {
          applyModeVisibility(this);
          schedulePlan(this);
        }
      });
      chain(nodeType.prototype, "onRemoved", function () {
        const state = this.vibevoicePlan;
        if (state) {
          clearTimeout(state.timer);
          state.abort?.abort();
          state.seq += 1;
        }
      });
    } else if (name === LOADER || name === GENERATE) {
      const watched = name === LOADER ? ["model", "dtype"] : ["max_seconds"];
      chain(nodeType.prototype, "onNodeCreated", function () {
        for (const w of watched) onWidgetChange(widgetOf(this, w), () => refreshConfigsOf(this));
        if (name === GENERATE) setupGenerateNode(this);
      });
      chain(nodeType.prototype, "onConnectionsChange", function () {
        refreshConfigsOf(this);
      });
      if (name === GENERATE) {
        chain(nodeType.prototype, "onExecuted", function (message) {
          const stats = message?.vibevoice_stats?.[0];
          if (stats && typeof stats === "object") showStats(this, stats);
        });
      }
    }
  },
});
