// The labelling page. Model output is text, never markup: every string from the server is
// placed with textContent (no innerHTML anywhere), and the server's Content-Security-Policy
// allows no inline script besides.
"use strict";

const $ = (id) => document.getElementById(id);
const client = sessionStorage.getItem("labelClient") || (() => {
  const id = Array.from(crypto.getRandomValues(new Uint8Array(9)), (b) => b.toString(16).padStart(2, "0")).join("");
  sessionStorage.setItem("labelClient", id);
  return id;
})();

// the token arrived in the URL and now lives in an HttpOnly cookie: keep it out of history
if (new URLSearchParams(location.search).has("token")) history.replaceState(null, "", location.pathname);

const state = { mode: null, scale: 5, item: null, order: [], picked: 0, choice: null, busy: false };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function say(message, ok) {
  $("status").textContent = message || "";
  $("status").className = ok ? "ok" : "";
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ client, ...body }),
  };
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function showProgress(p) {
  if (!p) return;
  let text = `${p.labelled} / ${p.total} labelled`;
  if (p.skipped) text += ` · ${p.skipped} skipped`;
  if (p.failed) text += ` · ${p.failed} failed`;
  $("progress").textContent = text;
}

function pct(x) { return `${Math.round(100 * x)}%`; }

async function refreshStats() {
  const stats = await api("/api/stats");
  state.mode = stats.mode;
  state.scale = stats.scale;
  $("mode").textContent = `· ${stats.mode} mode`;
  const s = stats.settings || {};
  const parts = [`checkpoint ${s.checkpoint}`];
  if (s.checkpoint_b) parts.push(`vs ${s.checkpoint_b}`);
  parts.push(`temperature ${s.temperature}`, `top_k ${s.top_k}`, `top_p ${s.top_p}`,
             `max_new_tokens ${s.max_new_tokens}`, `seed ${s.seed}`);
  $("settings").textContent = parts.join(" · ");
  showProgress(stats.progress);
  if (stats.arena) {
    const a = stats.arena;
    const decided = a.a + a.b;
    $("arena").hidden = false;
    $("arena-text").textContent = decided === 0
      ? `No decisive comparisons yet (${a.ties} ties).`
      : `B wins ${pct(a.b_win_rate)} of ${decided} decisive comparisons ` +
        `(95% Wilson interval ${pct(a.b_win_rate_95[0])}–${pct(a.b_win_rate_95[1])}); ` +
        `A ${a.a}, B ${a.b}, ties ${a.ties}.`;
  }
}

// ---------------------------------------------------------------- rendering one item

function render(item) {
  state.item = item;
  state.order = item.responses.map((_, i) => i);
  state.picked = 0;
  state.choice = null;
  $("item").hidden = false;
  $("waiting").hidden = true;
  $("item-number").textContent = String(item.number);
  $("item-id").textContent = item.id;
  $("prompt").textContent = item.prompt;
  const instructions = {
    rank: "Order the responses best → worst: click them (or press their numbers) best first, or drag them into order. Enter submits.",
    rate: `Rate the response from 1 (worst) to ${state.scale} (best): click or press a number, then Enter.`,
    arena: "Which response is better? Click one or press 1 / 2; t (or 0) for a tie. Enter submits.",
  };
  $("instructions").textContent = instructions[state.mode];
  drawResponses();
  drawChoices();
}

function card(index, position) {
  const li = el("li", "card");
  li.dataset.index = String(index);
  const head = el("div", "card-head");
  head.append(el("span", "badge", state.mode === "arena" ? `Response ${index + 1}` : `#${index + 1}`));
  if (state.mode === "rank") {
    const complete = state.picked >= state.order.length - 1;
    if (position < state.picked || complete) {
      li.classList.add("ranked");
      head.append(el("span", "badge rank", `rank ${position + 1}`));
    }
    li.draggable = true;
  }
  if (state.mode === "arena" && state.choice !== null) {
    if (state.choice === "tie") li.classList.add("tied");
    else if ((state.choice === "left") === (index === 0)) li.classList.add("chosen");
  }
  li.append(head, el("pre", "text response", state.item.responses[index]));
  li.addEventListener("click", () => (state.mode === "arena" ? choose(index === 0 ? "left" : "right") : pick(index)));
  li.addEventListener("dragstart", (e) => { e.dataTransfer.setData("text/plain", String(index)); li.classList.add("dragging"); });
  li.addEventListener("dragend", () => li.classList.remove("dragging"));
  li.addEventListener("dragover", (e) => e.preventDefault());
  li.addEventListener("drop", (e) => { e.preventDefault(); dropOn(Number(e.dataTransfer.getData("text/plain")), index); });
  return li;
}

function drawResponses() {
  const list = $("responses");
  list.replaceChildren(...state.order.map((index, position) => card(index, position)));
  list.className = state.mode === "arena" ? "pair" : "";
  $("submit").disabled = !ready();
}

function drawChoices() {
  const box = $("choices");
  const buttons = [];
  if (state.mode === "rate") {
    for (let r = 1; r <= state.scale; r++) buttons.push([String(r), r, () => choose(r)]);
  } else if (state.mode === "arena") {
    buttons.push(["1 is better", "left", () => choose("left")], ["Tie (t)", "tie", () => choose("tie")],
                 ["2 is better", "right", () => choose("right")]);
  }
  box.replaceChildren(...buttons.map(([label, value, action]) => {
    const b = el("button", state.choice === value ? "selected" : "", label);
    b.type = "button";
    b.addEventListener("click", action);
    return b;
  }));
  $("submit").disabled = !ready();
}

// ---------------------------------------------------------------- choosing

function pick(index) {  // rank mode: the next best, or un-pick one already ranked
  const { order } = state;
  const position = order.indexOf(index);
  order.splice(position, 1);
  if (position < state.picked) {
    state.picked -= 1;
    order.splice(state.picked, 0, index);
  } else {
    order.splice(state.picked, 0, index);
    state.picked += 1;
  }
  drawResponses();
}

function dropOn(dragged, target) {  // rank mode: the list as arranged is the ranking
  if (dragged === target) return;
  const { order } = state;
  const to = order.indexOf(target);  // dragged down: lands after the target; up: before it
  order.splice(order.indexOf(dragged), 1);
  order.splice(to, 0, dragged);
  state.picked = order.length;
  drawResponses();
}

function choose(value) {
  state.choice = value;
  if (state.mode === "arena") drawResponses();
  drawChoices();
}

function ready() {
  if (!state.item) return false;
  if (state.mode === "rank") return state.picked >= state.order.length - 1;
  return state.choice !== null;
}

function label() {
  if (state.mode === "rank") {
    const ranking = new Array(state.order.length);
    state.order.forEach((index, rank) => { ranking[index] = rank; });
    return { ranking };
  }
  return state.mode === "rate" ? { rating: state.choice } : { choice: state.choice };
}

// ---------------------------------------------------------------- actions

async function act(work) {
  if (state.busy) return;
  state.busy = true;
  document.body.dataset.busy = "1";
  if (document.activeElement && document.activeElement.blur) document.activeElement.blur();
  try { await work(); } catch (error) { say(error.message); } finally {
    state.busy = false;
    document.body.dataset.busy = "0";
  }
}

async function loadNext() {
  const answer = await api("/api/next", {});
  showProgress(answer.progress);
  if (answer.item) { render(answer.item); return; }
  state.item = null;
  $("item").hidden = true;
  $("waiting").hidden = false;
  $("undo-waiting").hidden = false;
  $("waiting-text").textContent = answer.done ? "All done: every item is labelled. Thank you!" : "Generating the next item…";
  if (!answer.done) setTimeout(() => act(loadNext), 1000);
}

const submit = () => act(async () => {
  if (!ready()) { say(state.mode === "rank" ? "Rank every response first." : "Choose first."); return; }
  const id = state.item.id;
  await api("/api/submit", { id, ...label() });
  say(`Saved ${id}.`, true);
  await refreshStats();
  await loadNext();
});

const skip = () => act(async () => {
  if (!state.item) return;
  await api("/api/skip", { id: state.item.id });
  say(`Skipped ${state.item.id}.`, true);
  await loadNext();
});

const undo = () => act(async () => {
  const answer = await api("/api/undo", {});
  say(`Undid ${answer.undone}; label it again.`, true);
  await refreshStats();
  render(answer.item);
});

$("submit").addEventListener("click", submit);
$("skip").addEventListener("click", skip);
$("undo").addEventListener("click", undo);
$("undo-waiting").addEventListener("click", undo);

document.addEventListener("keydown", (e) => {
  // keys pressed while a request is in flight would land on the item being replaced
  if (state.busy || e.ctrlKey || e.metaKey || e.altKey || e.target.tagName === "INPUT") return;
  const key = e.key.toLowerCase();
  if (key === "u") return undo();
  if (!state.item) return;
  if (key === "enter") { e.preventDefault(); return submit(); }
  if (key === "s") return skip();
  const n = Number(e.key);
  if (state.mode === "arena") {
    if (key === "1") choose("left");
    else if (key === "2") choose("right");
    else if (key === "t" || key === "0" || key === "=") choose("tie");
  } else if (Number.isInteger(n) && n >= 1) {
    if (state.mode === "rank" && n <= state.order.length) pick(n - 1);
    if (state.mode === "rate" && n <= state.scale) choose(n);
  }
});

act(async () => { await refreshStats(); await loadNext(); });
