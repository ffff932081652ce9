// The registry's models, each with a load or unload button (the admin calls).

import { el } from "./dom.js";

function row(model, { loaded, pending, error }, act) {
  const action = loaded ? "unload" : "load";
  const label = pending ? (loaded ? "Unloading…" : "Loading…") : loaded ? "Unload" : "Load";
  return el(
    "li",
    { class: "model-row", data: { model: model.id, loaded: String(loaded) } },
    el(
      "div",
      { class: "model-info" },
      el("span", { class: "model-name" }, model.id),
      model.family ? el("span", { class: "tag" }, model.family) : null,
      model.random_weights ? el("span", { class: "tag warn" }, "random weights") : null,
      model.aliases && model.aliases.length
        ? el("div", { class: "note" }, `aliases: ${model.aliases.join(", ")}`)
        : null,
      error ? el("div", { class: "row-error", role: "alert" }, error) : null,
    ),
    el("span", { class: `state ${loaded ? "on" : ""}` }, loaded ? "loaded" : "not loaded"),
    el(
      "button",
      {
        type: "button",
        class: loaded ? "secondary" : "",
        data: { action },
        disabled: Boolean(pending),
        onclick: () => act(action, model.id),
      },
      label,
    ),
  );
}

// `registry`: /v1/models' cards, or null when they could not be read (no key yet): then the
// loaded models from /health stand in.
export function renderModels(box, { registry, loaded, pending, errors }, act) {
  const models = registry || loaded.map((id) => ({ id }));
  if (!models.length) {
    box.replaceChildren(el("li", { class: "note" }, "no models"));
    return;
  }
  box.replaceChildren(
    ...models.map((model) =>
      row(
        model,
        { loaded: loaded.includes(model.id), pending: pending[model.id], error: errors[model.id] },
        act,
      ),
    ),
  );
}
