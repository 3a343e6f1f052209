// The scratchd dashboard: polls /v1/usage and /v1/events and redraws. Plain JS, no build step.
// Every value from the daemon goes into the page as text (textContent), never as markup:
// tenants, labels and event details are chosen by users.
// The page itself is public; the data is not. When the API answers 401 the page asks for a
// bearer token and keeps it in this tab's sessionStorage (gone when the tab closes).
"use strict";

// ?refresh=SECONDS: slower for a wall screen, faster for a test; never below a second.
const REFRESH_MS = 1000 * Math.max(1, Number(new URLSearchParams(location.search).get("refresh")) || 5);
const EVENTS_KEPT = 50;
const EVENTS_PAGE = 1000;
const TOKEN_KEY = "scratchd.token";
// What an HTTP header can carry; anything else would make fetch() throw before asking.
const TOKEN_FORM = /^[\x21-\x7e]+$/;

let seen;
let session = 0; // bumped on every sign in and out: answers to an earlier session are dropped
let timer = null;
const blankMain = document.querySelector("main").cloneNode(true);

// -- talking to the daemon --------------------------------------------------------------

class Unauthenticated extends Error {
  constructor(message, token) {
    super(message);
    this.token = token; // the token that was refused, or null if none was sent
  }
}

async function getJSON(path) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, { headers, cache: "no-store" });
  const body = await response.json().catch(() => null);
  const message = body?.error?.message ?? `${response.status} ${response.statusText}`;
  if (response.status === 401) throw new Unauthenticated(message, token);
  if (!response.ok) throw new Error(message);
  return body;
}

async function eventsAfter(since, limit) {
  return (await getJSON(`v1/events?since=${since}&limit=${limit}`)).events;
}

// /v1/events reads forwards from `since`. To open on the newest events without reading the
// whole history, find the last seq by galloping then bisecting: a few tiny requests, once.
async function newestEvents() {
  const first = await eventsAfter(0, EVENTS_PAGE);
  if (first.length < EVENTS_PAGE) return first;
  let low = first.at(-1).seq; // an event exists after `low`, none after `high`
  let high = low * 2;
  while ((await eventsAfter(high, 1)).length) [low, high] = [high, high * 2];
  while (high - low > 1) {
    const middle = Math.floor((low + high) / 2);
    if ((await eventsAfter(middle, 1)).length) low = middle;
    else high = middle;
  }
  return eventsAfter(Math.max(0, high - EVENTS_KEPT), EVENTS_PAGE);
}

function poll(delay) {
  clearTimeout(timer);
  timer = setTimeout(refresh, delay);
}

async function refresh() {
  const current = session;
  try {
    const [usage, events] = await Promise.all([
      getJSON("v1/usage"),
      seen.since === null ? newestEvents() : eventsAfter(seen.since, EVENTS_PAGE),
    ]);
    if (current !== session) return;
    if (events.length) {
      seen.since = events.at(-1).seq;
      seen.events = seen.events.concat(events).slice(-EVENTS_KEPT);
    } else if (seen.since === null) {
      seen.since = 0;
    }
    seen.lastOk = Date.now();
    draw(usage, seen.events);
    showProblem(null);
    poll(REFRESH_MS);
  } catch (error) {
    if (current !== session) return;
    if (error instanceof Unauthenticated) {
      // A refused token is wrong or was revoked by a reload: it is of no more use. Nothing
      // is polled until a token is given: every answer would be the same 401.
      if (error.token) sessionStorage.removeItem(TOKEN_KEY);
      askForToken(error.token ? `That token was refused: ${error.message}` : null);
      return;
    }
    showProblem(error);
    poll(REFRESH_MS);
  }
}

// -- the token --------------------------------------------------------------------------

// A token given in the address (/#token=…) is taken once and removed from it: a fragment is
// never sent to a server, but it would stay on screen, in the history and in bookmarks.
function tokenFromAddress() {
  const given = /^#token=(.*)$/s.exec(location.hash);
  if (given === null) return null;
  history.replaceState(history.state, "", location.pathname + location.search);
  try {
    return decodeURIComponent(given[1]);
  } catch {
    return given[1]; // not percent-encoded after all
  }
}

// Start over with the token this tab holds (if any): nothing shown so far is kept.
function start() {
  session += 1;
  seen = { since: null, events: [], lastOk: null };
  document.querySelector("main").replaceWith(blankMain.cloneNode(true));
  document.getElementById("sign-in").hidden = true;
  document.getElementById("sign-out").hidden = sessionStorage.getItem(TOKEN_KEY) === null;
  document.body.classList.remove("locked", "stale");
  document.getElementById("problem").hidden = true;
  document.getElementById("status-text").textContent = "Loading…";
  poll(0);
}

function useToken(token) {
  if (!TOKEN_FORM.test(token)) {
    askForToken("A token is printable ASCII without spaces; that one cannot be sent.");
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  start();
}

function askForToken(error) {
  session += 1;
  clearTimeout(timer);
  document.querySelector("main").replaceWith(blankMain.cloneNode(true)); // no data stays on screen
  document.body.classList.add("locked");
  document.body.classList.remove("stale");
  document.getElementById("problem").hidden = true;
  document.getElementById("sign-out").hidden = true;
  document.getElementById("status-text").textContent = "Not signed in";
  const message = document.getElementById("sign-in-error");
  message.textContent = error ?? "";
  message.hidden = error === null;
  const form = document.getElementById("sign-in");
  form.hidden = false;
  form.elements.token.value = "";
  form.elements.token.focus();
}

document.getElementById("sign-in").addEventListener("submit", (event) => {
  event.preventDefault(); // nothing is posted anywhere: the token stays in this tab
  useToken(event.target.elements.token.value.trim());
});

document.getElementById("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  start(); // asks for a token again where the daemon wants one; shows anonymous data where it does not
});

window.addEventListener("hashchange", () => {
  const token = tokenFromAddress();
  if (token !== null) useToken(token);
});

// -- formatting (as the CLI prints: binary units, two largest time units) ---------------

function size(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  let value = bytes;
  for (const unit of ["B", "K", "M", "G", "T"]) {
    if (Math.abs(value) < 1024 || unit === "T") {
      if (unit === "B") return `${Math.trunc(value)}B`;
      return Math.abs(value) < 10 ? `${value.toFixed(1)}${unit}` : `${Math.round(value)}${unit}`;
    }
    value /= 1024;
  }
}

function duration(seconds) {
  let left = Math.trunc(Math.abs(seconds));
  const parts = [];
  for (const [unit, length] of [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]]) {
    if (left >= length || (unit === "s" && !parts.length)) {
      parts.push(`${Math.floor(left / length)}${unit}`);
      left %= length;
    }
    if (parts.length === 2) break;
  }
  return parts.join("");
}

function relative(iso) {
  if (!iso) return "-";
  const seconds = (Date.parse(iso) - Date.now()) / 1000;
  return seconds >= 0 ? `in ${duration(seconds)}` : `${duration(seconds)} ago`;
}

function clock(iso) {
  return new Date(iso).toLocaleTimeString([], { hour12: false });
}

function percent(part, whole) {
  return whole > 0 ? Math.min(100, Math.max(0, (100 * part) / whole)) : 0;
}

// -- building the page --------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function row(cells) {
  return el("tr", {}, ...cells.map(([text, className, title]) => el("td", { class: className, title }, text)));
}

// Replace a container's content, or say plainly that there is nothing to show.
function fill(id, nodes, emptyText) {
  const target = document.getElementById(id);
  if (nodes.length) {
    target.replaceChildren(...nodes);
  } else if (target.tagName === "TBODY") {
    const columns = target.parentElement.tHead.rows[0].cells.length;
    target.replaceChildren(el("tr", {}, el("td", { class: "empty", colspan: columns }, emptyText)));
  } else {
    target.replaceChildren(el(target.tagName === "DIV" ? "p" : "li", { class: "empty" }, emptyText));
  }
}

function segment(className, width, title) {
  const node = el("span", { class: `segment ${className}`, title });
  node.style.width = `${width}%`;
  return node;
}

// The bar is the filesystem: lease data, kept caches, other data, space promised to leases, free.
// The reserve is drawn over the free end: when free space reaches it, the pool is full.
function poolBar(pool) {
  const cap = pool.capacity_bytes;
  const used = Math.max(0, cap - pool.free_bytes);
  const leased = Math.min(pool.leased_bytes, used);
  const cached = Math.min(pool.cache_bytes, used - leased);
  const reserved = Math.min(pool.reserved_bytes, pool.free_bytes);
  const reserve = pool.reserve_bytes > 0 ? segment("reserve", percent(pool.reserve_bytes, cap),
                                                   `reserve ${size(pool.reserve_bytes)} kept free`) : null;
  return el("div", { class: "bar", role: "img",
                     "aria-label": `${pool.name}: ${size(used)} of ${size(cap)} used, ${size(pool.free_bytes)} free` },
    segment("leased", percent(leased, cap), `leases ${size(pool.leased_bytes)}`),
    segment("cached", percent(cached, cap), `kept caches ${size(pool.cache_bytes)}`),
    segment("other", percent(used - leased - cached, cap), `other data ${size(used - leased - cached)}`),
    segment("reserved", percent(reserved, cap), `promised to leases ${size(pool.reserved_bytes)}`),
    reserve);
}

function stat(label, value, title) {
  return el("div", { title }, el("dt", {}, label), el("dd", {}, value));
}

function poolCard(pool) {
  const used = Math.max(0, pool.capacity_bytes - pool.free_bytes);
  const where = [pool.mount_point, pool.fstype, pool.device, pool.reflink ? "reflink" : null].filter(Boolean).join(" · ");
  // An unavailable pool's filesystem is not there: it has no space to show, only its leases.
  const known = pool.state !== "unavailable";
  return el("article", { class: `card state-${pool.state}` },
    el("div", { class: "card-head" },
      el("h3", {}, pool.name),
      el("span", { class: `badge ${pool.state}` }, pool.state.replace("_", " ")),
      el("span", { class: "fill" }, known ? `${percent(used, pool.capacity_bytes).toFixed(0)}% used` : "no filesystem")),
    pool.labels.length ? el("ul", { class: "chips pool-labels", "aria-label": "labels" },
      ...pool.labels.map((label) => el("li", {}, label))) : null,
    pool.reason ? el("p", { class: "reason" }, el("code", {}, pool.reason), " ", pool.message ?? "") : null,
    known ? poolBar(pool) : null,
    known ? el("ul", { class: "legend" },
      el("li", { class: "leased" }, "leases"), el("li", { class: "cached" }, "caches"),
      el("li", { class: "other" }, "other"),
      el("li", { class: "reserved" }, "promised"), el("li", { class: "reserve" }, "reserve")) : null,
    el("dl", { class: "stats" },
      known ? stat("capacity", size(pool.capacity_bytes)) : null,
      known ? stat("free", size(pool.free_bytes)) : null,
      known ? stat("reserve", size(pool.reserve_bytes), "free space kept back; below it the pool is full") : null,
      stat("promised", size(pool.reserved_bytes), "expected_bytes of active leases, not yet written"),
      stat("leased", size(pool.leased_bytes)),
      stat("leases", String(pool.active_leases)),
      stat("caches", `${pool.cache_entries} · ${size(pool.cache_bytes)}`,
           `warm caches kept here, at most ${size(pool.cache_max_bytes)} (cache_max)`),
      stat("hit rate", hitRate(pool.cache_hits_total, pool.cache_misses_total),
           "leases with a cache key placed here that started warm (exact or fallback)")),
    el("p", { class: "where", title: pool.path }, where ? `${pool.path} on ${where}` : pool.path));
}

function hitRate(hits, misses) {
  return hits + misses ? `${percent(hits, hits + misses).toFixed(0)}%` : "-";
}

function labels(lease) {
  return Object.entries(lease.labels).map(([key, value]) => `${key}=${value}`).join(" ");
}

function eventItem(event) {
  // cache_kept and cache_dropped name their cache's key in details.
  const what = [event.reason, event.details?.key, event.lease_id, event.tenant, event.pool].filter(Boolean);
  return el("li", { class: `event ${event.kind}` },
    el("time", { datetime: event.at, title: event.at }, clock(event.at)),
    el("span", { class: "kind" }, event.kind.replaceAll("_", " ")),
    el("span", { class: "what" }, what.join(" · ")));
}

function draw(usage, events) {
  fill("pool-list", usage.pools.map(poolCard), "No pools configured.");
  fill("lease-rows", usage.largest_leases.map((lease) => row([
    [lease.id, "id", lease.path],
    [lease.tenant],
    [lease.pool],
    [size(lease.usage.bytes), "num", lease.max_bytes ? `limit ${size(lease.max_bytes)}` : null],
    [String(lease.usage.files), "num wide"],
    [relative(lease.expires_at), "num", lease.expires_at],
    [labels(lease), "wide labels"],
  ])), "No active leases.");
  fill("tenant-rows", usage.tenants.map((tenant) => row([
    [tenant.tenant],
    [String(tenant.active_leases), "num"],
    [size(tenant.bytes), "num"],
    [size(tenant.reserved_bytes), "num"],
    [size(tenant.cache_bytes), "num"],
  ])), "No tenant holds a lease.");

  const caches = usage.caches;
  document.getElementById("cache-stats").replaceChildren(
    stat("kept", String(caches.entries), "released caches waiting for the next job of their key"),
    stat("size", size(caches.bytes)),
    stat("hit rate", hitRate(caches.hits_total, caches.misses_total),
         "leases with a cache key that started warm (exact or fallback)"),
    stat("hits", String(caches.hits_total)),
    stat("misses", String(caches.misses_total)),
    stat("dropped", String(caches.dropped_total)));
  const drops = Object.entries(caches.by_reason).sort((a, b) => b[1] - a[1]);
  fill("cache-reasons", drops.map(([reason, count]) => el("li", {}, `${reason.replaceAll("_", " ")} ${count}`)),
    "No cache has been dropped.");

  const reclaim = usage.reclaim;
  document.getElementById("reclaim-stats").replaceChildren(
    stat("waiting", String(reclaim.pending), "ended leases whose trees are still being deleted"),
    stat("waiting size", size(reclaim.pending_bytes)),
    stat("deleted", String(reclaim.reclaimed_total)),
    stat("freed", size(reclaim.reclaimed_bytes_total)));
  const reasons = Object.entries(reclaim.by_reason).sort((a, b) => b[1] - a[1]);
  fill("reclaim-reasons", reasons.map(([reason, count]) => el("li", {}, `${reason.replaceAll("_", " ")} ${count}`)),
    "No lease has ended yet.");
  fill("event-list", events.slice().reverse().map(eventItem), "No events yet.");
  document.getElementById("status-text").textContent = `Updated ${clock(usage.generated_at)}`;
}

function showProblem(error) {
  const problem = document.getElementById("problem");
  document.body.classList.toggle("stale", error !== null);
  problem.hidden = error === null;
  if (error === null) return;
  const since = seen.lastOk ? `; showing data from ${new Date(seen.lastOk).toLocaleTimeString([], { hour12: false })}` : "";
  problem.textContent = `Cannot reach scratchd: ${error.message}${since}. Retrying every ${REFRESH_MS / 1000}s.`;
  document.getElementById("status-text").textContent = "Disconnected";
}

document.getElementById("host").textContent = location.host;
const given = tokenFromAddress();
if (given === null) start();
else useToken(given);
