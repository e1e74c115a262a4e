// The status page: polls GET v1/status (the agent's read-only status, on this same address)
// every second and renders it. Data goes into the DOM as text only (textContent), never as
// markup. Rates come from the difference between two samples.
"use strict";

const REFRESH_MS = 1000;
let previous = null; // { at: ms, listeners: { name: { packets, flows } } }
let samples = 0;
let lastGood = null;

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function row(cells, attrs) {
  const tr = el("tr", null, attrs);
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}

function num(n) {
  return el("td", n === null || n === undefined ? "–" : Number(n).toLocaleString("en"), { class: "num" });
}

function endpoint(address, port) {
  return address.includes(":") ? `[${address}]:${port}` : `${address}:${port}`;
}

// Per second, from two cumulative counters; null when not known (first sample, a counter that
// went backwards because the agent restarted, or no traffic figures).
function rate(now, before, seconds) {
  if (before === undefined || now === undefined || now === null || seconds <= 0) return null;
  if (now < before) return null;
  return (now - before) / seconds;
}

function rateCell(r, field) {
  const text = r === null ? "–" : r < 10 ? r.toFixed(1) : Math.round(r).toLocaleString("en");
  return el("td", text, { class: "num", "data-field": field });
}

function renderListeners(status, at) {
  const body = document.querySelector("#listeners tbody");
  const current = {};
  const seconds = previous ? (at - previous.at) / 1000 : 0;
  const rows = status.listeners.map((l) => {
    const t = l.traffic;
    const packets = t ? t.packets_in + t.packets_out : null;
    const flows = t ? t.new_flows : null;
    current[l.name] = { packets, flows };
    const before = previous && previous.listeners[l.name];
    return row(
      [
        el("th", l.name, { scope: "row" }),
        `${endpoint(l.address, l.port)} ${l.protocol}`,
        l.target_group,
        rateCell(before ? rate(packets, before.packets, seconds) : null, "packets-per-second"),
        rateCell(before ? rate(flows, before.flows, seconds) : null, "new-flows-per-second"),
        num(t && t.active_flows),
        num(t && t.packets_in),
        num(t && t.packets_out),
      ],
      { "data-listener": l.name },
    );
  });
  body.replaceChildren(...rows);
  previous = { at, listeners: current };
}

function stateBadge(state) {
  return el("span", state, { class: `state state-${state}`, "data-state": state });
}

function lastCheck(c) {
  if (!c) return "–";
  const latency = `${c.latency_ms.toFixed(1)} ms`;
  return c.detail ? `${c.result} in ${latency} (${c.detail})` : `${c.result} in ${latency}`;
}

/** What the traffic says of a target: refused and unanswered connections, and in a row. */
function passive(p) {
  if (!p) return "–";
  return `refused ${p.refused}, unanswered ${p.syns_unanswered}; ${p.failures_in_a_row} in a row`;
}

function renderGroups(status) {
  const groups = status.target_groups.map((g) => {
    const section = el("section", null, { class: "group", "data-group": g.name });
    const h = el("h3", g.name);
    if (g.fail_open) {
      h.appendChild(el("span", "fail-open: no healthy target, new flows go to all", { class: "badge warn" }));
    }
    if (g.zone_scope === "fallback") {
      h.appendChild(el("span", `zone fallback: no healthy target in zone ${status.zone}, new flows go to the other zones`, { class: "badge warn" }));
    } else if (g.zone_scope === "local") {
      h.appendChild(el("span", `zone ${status.zone} only`, { class: "badge" }));
    }
    section.appendChild(h);
    const hc = g.health_check;
    section.appendChild(
      el("p", `check: ${hc.protocol} every ${hc.interval}; healthy after ${hc.healthy_threshold}, unhealthy after ${hc.unhealthy_threshold}`, { class: "note" }),
    );
    const table = el("table");
    table.appendChild(el("caption", `Targets of ${g.name}`));
    const head = el("thead");
    head.appendChild(
      row(["Target", "State", "Reason", "Last check", "Weight", "Zone", "New flows", "Connections failed"].map((h) => el("th", h, { scope: "col" }))),
    );
    table.appendChild(head);
    const body = el("tbody");
    for (const t of g.targets) {
      body.appendChild(
        row(
          [
            el("th", t.target, { scope: "row" }),
            el("td").appendChild(stateBadge(t.state)).parentNode,
            t.reason || "–",
            lastCheck(t.last_check),
            num(t.weight),
            t.zone || "–",
            t.receives_new_flows ? "yes" : "no",
            passive(t.passive),
          ],
          { "data-target": t.target, "data-state": t.state },
        ),
      );
    }
    if (g.targets.length === 0) body.appendChild(row([el("td", "no targets", { colspan: "8" })]));
    table.appendChild(body);
    section.appendChild(table);
    return section;
  });
  document.getElementById("groups").replaceChildren(...groups);
}

function renderDrops(status) {
  const rows = status.datapath.drops.map((d) =>
    row([el("th", d.reason, { scope: "row" }), num(d.packets)], {
      "data-reason": d.reason,
      class: d.packets > 0 ? "nonzero" : "",
    }),
  );
  document.querySelector("#drops tbody").replaceChildren(...rows);
}

function renderInterfaces(status) {
  const rows = status.datapath.interfaces.map((i) =>
    row(
      [el("th", i.name, { scope: "row" }), i.mode, i.faces_targets ? "yes" : "no", i.role, num(i.reattachments)],
      { "data-interface": i.name, "data-mode": i.mode },
    ),
  );
  document.querySelector("#interfaces tbody").replaceChildren(...rows);
  const m = status.datapath.maps;
  const parts = [m.in_sync ? "maps in sync" : "maps being written"];
  if (m.entries_in_doubt) parts.push(`${m.entries_in_doubt} entries in doubt`);
  if (m.last_error) parts.push(`last error: ${m.last_error}`);
  parts.push(status.datapath.route_cache.enabled ? "next-hop cache on" : "next-hop cache off");
  document.getElementById("maps").textContent = parts.join(" · ");
}

// Scale-out: what BIRD announces for this node ([announce]); hidden without it.
function renderAnnounce(status) {
  const p = document.getElementById("announce");
  const a = status.announce;
  p.hidden = !a;
  if (!a) return;
  const parts = [a.bird_error ? `BIRD not reachable: ${a.bird_error}` : "BIRD answers"];
  if (a.draining) parts.push("DRAINING");
  for (const r of a.routes) {
    const said = r.announced === null ? "unknown" : r.announced ? "announced" : "withdrawn";
    parts.push(`${r.prefix} ${said} (${r.reason})`);
  }
  for (const s of a.sessions) parts.push(`${s.name} ${s.state} ${s.info}`.trim());
  p.textContent = parts.join(" · ");
}

function setConnection(state, text) {
  document.body.dataset.agent = state;
  document.getElementById("connection-text").textContent = text;
}

async function refresh() {
  try {
    const response = await fetch("v1/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const status = await response.json();
    const at = performance.now();
    renderListeners(status, at);
    renderGroups(status);
    renderDrops(status);
    renderInterfaces(status);
    renderAnnounce(status);
    samples += 1;
    lastGood = new Date();
    document.body.dataset.samples = String(samples);
    document.getElementById("unreachable").hidden = true;
    setConnection("up", `updated ${lastGood.toLocaleTimeString("en-GB")}`);
  } catch (e) {
    // Rates restart from the next good sample.
    previous = null;
    const since = lastGood ? ` (last answer at ${lastGood.toLocaleTimeString("en-GB")})` : "";
    const banner = document.getElementById("unreachable");
    banner.textContent = `The agent does not answer: ${e.message}${since}. Retrying every second.`;
    banner.hidden = false;
    setConnection("unreachable", "unreachable");
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
