// The Prometheus text format, read into samples: {name, labels, value}.

function parseLabels(text, start) {
  const labels = {};
  let i = start;
  while (i < text.length && text[i] !== "}") {
    const eq = text.indexOf("=", i);
    const name = text.slice(i, eq).trim().replace(/^,/, "").trim();
    let value = "";
    i = eq + 2; // past ="
    while (i < text.length && text[i] !== '"') {
      if (text[i] === "\\") {
        const next = text[i + 1];
        value += next === "n" ? "\n" : next;
        i += 2;
      } else {
        value += text[i];
        i += 1;
      }
    }
    labels[name] = value;
    i += 1; // past the closing quote
    while (text[i] === "," || text[i] === " ") i += 1;
  }
  return { labels, end: i + 1 };
}

function parseValue(text) {
  if (text === "+Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text);
}

export function parseMetrics(text) {
  const samples = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const brace = line.indexOf("{");
    const space = line.indexOf(" ");
    let name;
    let labels = {};
    let rest;
    if (brace >= 0 && (space < 0 || brace < space)) {
      name = line.slice(0, brace);
      const parsed = parseLabels(line, brace + 1);
      labels = parsed.labels;
      rest = line.slice(parsed.end);
    } else {
      name = line.slice(0, space);
      rest = line.slice(space);
    }
    samples.push({ name, labels, value: parseValue(rest.trim().split(/\s+/)[0]) });
  }
  return samples;
}

// name -> model -> value, for the metrics labelled by model.
export function byModel(samples, names) {
  const table = Object.fromEntries(names.map((name) => [name, {}]));
  for (const { name, labels, value } of samples) {
    if (name in table && labels.model !== undefined) table[name][labels.model] = value;
  }
  return table;
}

export function total(samples, name) {
  return samples.filter((s) => s.name === name).reduce((sum, s) => sum + s.value, 0);
}
