// The page's wiring: settings, the API key, polling /health and /metrics, the models.

import { apiFetch, apiKey, describe, getHealth, getJson, getText, onUnauthorized } from "./api.js";
import { RateChart } from "./chart.js";
import { Chat } from "./chat.js";
import { GAUGES, renderCluster, strategyText } from "./cluster.js";
import { byId, el, formatRate } from "./dom.js";
import { renderModels } from "./models.js";
import { byModel, parseMetrics, total } from "./prometheus.js";

const POLL_MS = 1000;
const SETTINGS = "mlxserve.settings";
const FIELDS = ["model", "system", "temperature", "top_p", "max_tokens"];

const state = {
  registry: null, // /v1/models' cards, once the key (if any) lets us read them
  defaultModel: null,
  loaded: [],
  pending: {},
  errors: {},
};
const fields = {
  model: byId("model"),
  system: byId("system-prompt"),
  temperature: byId("temperature"),
  top_p: byId("top-p"),
  max_tokens: byId("max-tokens"),
};
const chart = new RateChart(byId("tps-chart"));

// ---- settings, kept in localStorage ----------------------------------------------------

function number(input) {
  return input.value === "" || !input.checkValidity() ? null : Number(input.value);
}

function settings() {
  return {
    model: fields.model.value,
    system: fields.system.value.trim(),
    temperature: number(fields.temperature),
    top_p: number(fields.top_p),
    max_tokens: number(fields.max_tokens),
  };
}

function restoreSettings() {
  const saved = JSON.parse(localStorage.getItem(SETTINGS) || "{}");
  for (const name of FIELDS) {
    if (name !== "model" && saved[name] !== undefined) fields[name].value = saved[name];
  }
  state.chosen = saved.model || null;
}

function saveSettings() {
  const saved = Object.fromEntries(FIELDS.map((name) => [name, fields[name].value]));
  localStorage.setItem(SETTINGS, JSON.stringify(saved));
}

// ---- the API key -----------------------------------------------------------------------

function showAuth(show) {
  const banner = byId("auth-banner");
  const wasHidden = banner.hidden;
  banner.hidden = !show;
  byId("api-key").classList.toggle("needs-key", show);
  if (show) {
    byId("auth-text").textContent = apiKey.get()
      ? "The server refused this API key (401). Enter the right key above."
      : "This server needs an API key (401). Enter it above to chat and manage models.";
    if (wasHidden) byId("api-key").focus();
  }
}

function setupKey() {
  const input = byId("api-key");
  input.value = apiKey.get();
  byId("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey.set(input.value.trim());
    byId("key-state").textContent = apiKey.get() ? "saved" : "";
    state.errors = {};
    refreshRegistry();
  });
  byId("key-clear").addEventListener("click", () => {
    input.value = "";
    apiKey.set("");
    byId("key-state").textContent = "";
    refreshRegistry();
  });
  byId("key-state").textContent = apiKey.get() ? "saved" : "";
  onUnauthorized(() => showAuth(true));
}

// ---- models: the picker and the list ---------------------------------------------------

function modelIds() {
  return state.registry ? state.registry.map((m) => m.id) : state.loaded.slice();
}

function renderPicker() {
  const picker = fields.model;
  const ids = modelIds();
  const wanted = state.chosen || state.defaultModel || state.loaded[0];
  picker.replaceChildren(
    ...ids.map((id) =>
      el("option", { value: id }, state.loaded.includes(id) ? `${id}  (loaded)` : id),
    ),
  );
  picker.value = ids.includes(wanted) ? wanted : ids[0] || "";
  picker.disabled = !ids.length;
  const card = (state.registry || []).find((m) => m.id === picker.value);
  const note = card && card.random_weights ? "random weights: expect gibberish" : "";
  byId("model-note").textContent = note;
}

function renderModelList() {
  renderModels(byId("models"), state, act);
  renderPicker();
}

async function refreshRegistry() {
  let note = "";
  try {
    const [models, root] = await Promise.all([getJson("v1/models"), getJson(".")]);
    state.registry = models.data;
    state.defaultModel = root.default_model;
    showAuth(false);
  } catch (error) {
    state.registry = null;
    note =
      error.status === 401
        ? "Enter the API key to see every model of the registry."
        : `could not list the models: ${error.message}`;
  }
  byId("models-note").textContent = note;
  renderModelList();
}

async function act(action, model) {
  state.pending[model] = true;
  delete state.errors[model];
  renderModelList();
  try {
    await apiFetch(`admin/models/${encodeURIComponent(model)}/${action}`, { method: "POST" });
  } catch (error) {
    state.errors[model] = `${action} failed, ${describe(error)}`;
  }
  delete state.pending[model];
  await refresh();
  renderModelList();
}

// ---- polling /health and /metrics -------------------------------------------------------

function setStatus(kind, text) {
  byId("status").dataset.state = kind;
  byId("status-text").textContent = text;
}

async function poll() {
  try {
    await refresh();
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

async function refresh() {
  const [health, metrics] = await Promise.allSettled([getHealth(), getText("metrics")]);
  if (health.status === "fulfilled") {
    const body = health.value.body;
    if (body.status === "ok") setStatus("ok", `serving · ${strategyText(body)}`);
    else setStatus("down", `unavailable: ${body.error || body.status}`);
    const samples = metrics.status === "fulfilled" ? parseMetrics(metrics.value) : [];
    if (metrics.status === "fulfilled") {
      chart.add(Date.now(), total(samples, "mlxserve_generation_tokens_total"));
      byId("tps-now").textContent = formatRate(chart.now);
      byId("tps-peak").textContent = formatRate(chart.peak);
    }
    renderCluster(byId("ranks"), byId("load"), body, byModel(samples, GAUGES));
    byId("queued").textContent = String(body.queued_requests ?? 0);
    const loaded = body.loaded_models || [];
    if (loaded.join("\n") !== state.loaded.join("\n")) {
      state.loaded = loaded;
      renderModelList();
    }
  } else {
    setStatus("offline", "cannot reach the server");
  }
}

// ---- start -------------------------------------------------------------------------------

restoreSettings();
setupKey();
for (const input of Object.values(fields)) input.addEventListener("change", saveSettings);
fields.model.addEventListener("change", () => {
  state.chosen = fields.model.value;
  renderPicker();
});
const chat = new Chat({
  list: byId("messages"),
  form: byId("composer"),
  input: byId("prompt"),
  send: byId("send"),
  stop: byId("stop"),
  settings,
});
byId("new-chat").addEventListener("click", () => chat.clear());
chat.clear();
refreshRegistry();
poll();
