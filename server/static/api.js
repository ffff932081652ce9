// Calls to this server: relative URLs (so it works behind a path prefix), with the API key
// the user entered, kept in localStorage.

const KEY = "mlxserve.apiKey";

export class ApiError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// What to tell the user about a failed call.
export function describe(error) {
  if (error.status === 401) return "401: the API key is missing or wrong (enter it above)";
  return `${error.status || "network error"}: ${error.message}`;
}

export const apiKey = {
  get: () => localStorage.getItem(KEY) || "",
  set(value) {
    if (value) localStorage.setItem(KEY, value);
    else localStorage.removeItem(KEY);
  },
};

const unauthorized = [];

// Called on every 401, so the page can ask for the key.
export function onUnauthorized(listener) {
  unauthorized.push(listener);
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    const error = body.error || {};
    message = error.message || body.detail || message;
    code = error.code || null;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message, code);
}

export async function apiFetch(path, { method = "GET", body, signal, accept } = {}) {
  const headers = { Accept: accept || "application/json" };
  const key = apiKey.get();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
  });
  if (response.status === 401) for (const listener of unauthorized) listener();
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJson(path) {
  return (await apiFetch(path)).json();
}

// /health answers 503 with a JSON body when the engine cannot serve: still worth showing.
export async function getHealth() {
  const response = await fetch("health", { cache: "no-store" });
  return { status: response.status, body: await response.json() };
}

export async function getText(path) {
  return (await apiFetch(path, { accept: "text/plain" })).text();
}
