// The chat: a conversation streamed from POST /v1/chat/completions (server-sent events read
// from fetch's body as they arrive), each reply shown as text only; a thinking model's
// reasoning (delta.reasoning_content) in a "Thinking" fold above its answer.

import { ApiError, apiFetch, describe } from "./api.js";
import { el, formatRate } from "./dom.js";

async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (data.length) yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
}

async function* chatChunks(body, signal) {
  const response = await apiFetch("v1/chat/completions", {
    method: "POST",
    body,
    signal,
    accept: "text/event-stream",
  });
  for await (const data of sseData(response)) {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(500, chunk.error.message, chunk.error.code);
    yield chunk;
  }
}

function summary(usage, timings, finish) {
  const parts = [];
  if (usage) parts.push(`${usage.completion_tokens} tokens`);
  if (timings && timings.tokens_per_s) parts.push(`${formatRate(timings.tokens_per_s)} tok/s`);
  if (timings && timings.ttft_s !== undefined) {
    parts.push(`first token ${(timings.ttft_s * 1000).toFixed(0)} ms`);
  }
  if (timings && timings.draft_tokens) {
    const rate = Math.round(timings.acceptance_rate * 100);
    parts.push(`drafts accepted ${rate}% (${timings.accepted_tokens}/${timings.draft_tokens})`);
  }
  if (finish) parts.push(`finish: ${finish}`);
  return parts.join(" · ");
}

export class Chat {
  // `settings()` gives {model, system, temperature, top_p, max_tokens} (empty: the default).
  constructor({ list, form, input, send, stop, settings }) {
    Object.assign(this, { list, input, send, stop, settings });
    this.history = [];
    this.controller = null;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.submit();
      }
    });
    stop.addEventListener("click", () => this.controller && this.controller.abort());
  }

  clear() {
    if (this.controller) this.controller.abort();
    this.history = [];
    this.list.replaceChildren(this.placeholder());
  }

  placeholder() {
    return el("div", { class: "empty" }, "Pick a model and say something.");
  }

  message(role, label, text = "") {
    const bubble = el("div", { class: "bubble" }, text);
    const meta = el("div", { class: "meta" });
    const head = el("div", { class: "role" }, label);
    const node = el("div", { class: `msg ${role}` }, head, bubble, meta);
    this.list.querySelector(".empty")?.remove();
    this.list.append(node);
    node.scrollIntoView({ block: "end" });
    return { node, bubble, meta };
  }

  // The reply's "Thinking" fold, made on its first reasoning; the text node it grows in.
  thought(reply, thinking) {
    if (!thinking.node) {
      thinking.text = document.createTextNode("");
      thinking.node = el(
        "details",
        { class: "thinking", open: true },
        el("summary", {}, "Thinking"),
        el("div", { class: "thought" }, thinking.text),
      );
      reply.bubble.prepend(thinking.node);
    }
    return thinking.text;
  }

  body(settings) {
    const messages = settings.system ? [{ role: "system", content: settings.system }] : [];
    const body = {
      model: settings.model,
      messages: messages.concat(this.history),
      stream: true,
      stream_options: { include_usage: true },
    };
    for (const name of ["temperature", "top_p", "max_tokens"]) {
      if (settings[name] !== null) body[name] = settings[name];
    }
    return body;
  }

  async submit() {
    const text = this.input.value.trim();
    if (!text || this.controller) return;
    const settings = this.settings();
    const history = this.history; // "New chat" while this streams starts another one
    this.input.value = "";
    this.message("user", "you", text);
    history.push({ role: "user", content: text });
    const reply = this.message("assistant", settings.model || "model");
    const output = document.createTextNode("");
    reply.bubble.append(output);
    const thinking = { node: null, text: null };
    reply.node.dataset.state = "streaming";
    this.controller = new AbortController();
    this.busy(true);
    let usage = null;
    let timings = null;
    let finish = null;
    try {
      for await (const chunk of chatChunks(this.body(settings), this.controller.signal)) {
        const choice = chunk.choices[0];
        const delta = (choice && choice.delta) || {};
        if (delta.reasoning_content || delta.content) {
          const list = this.list;
          const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
          if (delta.reasoning_content) {
            this.thought(reply, thinking).appendData(delta.reasoning_content);
          }
          if (delta.content) {
            if (thinking.node && !output.data) thinking.node.open = false; // the answer begins
            output.appendData(delta.content);
          }
          if (atBottom) list.scrollTop = list.scrollHeight;
        }
        if (choice && choice.finish_reason) finish = choice.finish_reason;
        if (chunk.usage) ({ usage, timings } = chunk);
      }
      reply.node.dataset.state = "done";
      reply.meta.textContent = summary(usage, timings, finish);
    } catch (error) {
      const stopped = error.name === "AbortError";
      reply.node.dataset.state = stopped ? "stopped" : "error";
      reply.meta.textContent = stopped ? "stopped" : `error ${describe(error)}`;
      if (!stopped && !output.data) this.input.value = this.input.value || text;
    } finally {
      // An unanswered question leaves the history, so user and assistant turns alternate.
      if (output.data) history.push({ role: "assistant", content: output.data });
      else history.pop();
      this.controller = null;
      this.busy(false);
    }
  }

  busy(on) {
    this.send.disabled = on;
    this.stop.hidden = !on;
    if (!on) this.input.focus();
  }
}
