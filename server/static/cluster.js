// The cluster view: every rank with its host and its share of each loaded model (from
// /health's placement), and each model's KV usage and requests (from /metrics).

import { el, formatBytes } from "./dom.js";

export const GAUGES = [
  "mlxserve_kv_cache_usage_ratio",
  "mlxserve_requests_running",
  "mlxserve_requests_waiting",
  "mlxserve_micro_batches",
];

function ranksOf(health) {
  const count = Math.max(health.ranks || 1, 1);
  const ranks = Array.from({ length: count }, (_, rank) => ({ rank, host: null, shares: [] }));
  const placement = health.placement || {};
  for (const [model, { strategy, stages }] of Object.entries(placement)) {
    for (const stage of stages) {
      const entry = ranks[stage.rank] || (ranks[stage.rank] = { rank: stage.rank, shares: [] });
      entry.host = stage.host;
      entry.shares.push({ model, strategy, layers: stage.layers, bytes: stage.bytes });
    }
  }
  if (count === 1) {
    for (const model of health.loaded_models || []) {
      if (!(model in placement)) ranks[0].shares.push({ model, strategy: null });
    }
  }
  return ranks;
}

function share({ model, strategy, layers, bytes }) {
  const where = layers
    ? `${strategy === "tensor" ? "shard of layers" : "layers"} ${layers[0]}–${layers[1]}`
    : "whole model";
  return el(
    "li",
    { class: "share", data: { model, layers: layers ? layers.join("-") : "all" } },
    el("span", { class: "share-model" }, model),
    el("span", { class: "share-layers" }, where),
    el("span", { class: "share-bytes" }, bytes === undefined ? "" : formatBytes(bytes)),
  );
}

function rankCard({ rank, host, shares }, single) {
  const where = host || (single ? location.hostname : "host unknown");
  return el(
    "div",
    { class: "rank", data: { rank: String(rank) } },
    el(
      "div",
      { class: "rank-head" },
      el("span", { class: "rank-name" }, `rank ${rank}`),
      rank === 0 ? el("span", { class: "badge", title: "serves the API, samples" }, "API") : null,
      el("span", { class: "rank-host" }, single ? `single machine · ${where}` : where),
    ),
    shares.length
      ? el("ul", { class: "shares" }, shares.map(share))
      : el("p", { class: "note" }, "no model loaded"),
  );
}

function percent(ratio) {
  return `${Math.round(Math.min(Math.max(ratio, 0), 1) * 100)}%`;
}

function modelLoad(model, gauges) {
  const value = (name) => gauges[name][model];
  const kv = value("mlxserve_kv_cache_usage_ratio");
  const bar = el("div", { class: "bar-fill" });
  bar.style.width = kv === undefined ? "0" : percent(kv);
  const stat = (label, name) => {
    const figure = el("b", { data: { stat: label } }, String(value(name) ?? "–"));
    return el("span", { class: "stat" }, figure, ` ${label}`);
  };
  return el(
    "div",
    { class: "load", data: { model } },
    el(
      "div",
      { class: "load-head" },
      el("span", { class: "load-model" }, model),
      el("span", { class: "kv-text" }, kv === undefined ? "KV –" : `KV ${percent(kv)}`),
    ),
    el("div", { class: "bar", title: "KV cache usage" }, bar),
    el(
      "div",
      { class: "stats" },
      stat("running", "mlxserve_requests_running"),
      stat("waiting", "mlxserve_requests_waiting"),
      stat("micro-batches", "mlxserve_micro_batches"),
    ),
  );
}

export function strategyText(health) {
  const strategies = new Set(Object.values(health.placement || {}).map((p) => p.strategy));
  const ranks = health.ranks || 1;
  if (ranks === 1) return "one machine";
  return `${[...strategies].join(" / ") || "no model placed"} · ${ranks} ranks`;
}

export function renderCluster(ranksBox, loadBox, health, gauges) {
  const single = (health.ranks || 1) === 1;
  ranksBox.replaceChildren(...ranksOf(health).map((r) => rankCard(r, single)));
  const loaded = health.loaded_models || [];
  loadBox.replaceChildren(
    ...(loaded.length
      ? loaded.map((model) => modelLoad(model, gauges))
      : [el("p", { class: "note" }, "no model loaded")]),
  );
}
