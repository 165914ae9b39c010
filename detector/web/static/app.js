/* Stormwatch dashboard: live state over server-sent events, controls over the JSON API.
 * Plain DOM, no framework; every piece of data is set as text, never as HTML. */
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const BREAKER_TYPES = new Set(["team", "api_key", "agent", "session"]);
  const TEAM_SCOPED = new Set(["agent", "session"]);  // teams name their agents and sessions: a breaker per team
  const SCOPED = new Set(["user", "agent", "session"]);  // ... and their users: the dashboard shows each team's own
  const KIND = { cost_spike: "Cost spike", budget_burn: "Budget burn", retry_storm: "Retry storm", agent_loop: "Agent loop" };
  const ENTITY = { team: "team", api_key: "api key", user: "user", agent: "agent", session: "session", model: "model" };
  const LABEL = { real: "real", false_alarm: "false alarm", planned: "planned" };
  const TOKEN_KEY = "stormwatch.token";

  const ui = {
    range: Number(sessionStorage.getItem("stormwatch.range")) || 21600,
    incidentTab: "active",
    topTab: "api_key",
    data: null,
    seen: new Set(), // incident ids already rendered once (new ones flash)
    firstRendered: false,
    rendered: {}, // last JSON rendered per section, to skip unchanged sections
    source: null,
  };

  // -- small helpers ----------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) node.append(c);
    return node;
  }

  function usd(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "—";
    const a = Math.abs(v);
    if (a === 0) return "$0";
    if (digits === undefined) digits = a >= 100 ? 0 : a >= 1 ? 2 : a >= 0.01 ? 3 : 4;
    return "$" + v.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }
  const rate = (v) => usd(v) + "/h";
  const epoch = (iso) => (iso ? Date.parse(iso) / 1000 : null);

  function clock(iso, withDay) {
    if (!iso) return "—";
    const d = new Date(iso);
    const t = d.toISOString().slice(11, 19);
    if (!withDay) return t;
    return d.toLocaleDateString("en-GB", { weekday: "short", day: "numeric", month: "short", timeZone: "UTC" }) + " " + t;
  }

  function ago(iso) {
    const now = epoch(ui.data && ui.data.now);
    const t = epoch(iso);
    if (now === null || t === null) return "";
    const s = Math.max(0, now - t);
    if (s < 90) return Math.round(s) + "s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 172800) return (s / 3600).toFixed(1) + " h ago";
    return Math.round(s / 86400) + " days ago";
  }

  function duration(fromIso, toIso) {
    const a = epoch(fromIso), b = epoch(toIso);
    if (a === null || b === null) return "";
    const s = Math.max(0, b - a);
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  let toastTimer = null;
  function toast(message, bad) {
    const t = $("toast");
    t.textContent = message;
    t.className = "toast show" + (bad ? " bad" : "");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.className = "toast"; }, bad ? 6000 : 3500);
  }

  function changed(section, value) {
    const json = JSON.stringify(value);
    if (ui.rendered[section] === json) return false;
    ui.rendered[section] = json;
    return true;
  }

  function entityButton(entity, bare, team) {
    const [type, ...rest] = entity.split(":");
    const id = rest.join(":");
    return h("button", { class: "linkish inc-entity", type: "button", title: "Details of " + entity, onclick: () => openEntity(type, id, team) },
      bare ? id : (ENTITY[type] || type) + " " + id);
  }

  // -- token and API calls --------------------------------------------------------------------

  let pendingUnlock = null;

  function token() { return sessionStorage.getItem(TOKEN_KEY); }

  function askToken() {
    return new Promise((resolve) => {
      pendingUnlock = resolve;
      $("token-input").value = "";
      $("token-dialog").showModal();
      $("token-input").focus();
    });
  }

  function finishUnlock(ok) {
    const value = $("token-input").value.trim();
    $("token-dialog").close();
    const resolve = pendingUnlock;
    pendingUnlock = null;
    if (ok && value) {
      sessionStorage.setItem(TOKEN_KEY, value);
      renderLock();
    }
    if (resolve) resolve(ok && value ? value : null);
  }

  async function withToken() {
    return token() || (await askToken());
  }

  async function send(path, body) {
    const tok = await withToken();
    if (!tok) return null;
    let response;
    try {
      response = await fetch(path, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: "Bearer " + tok },
        body: JSON.stringify(body),
      });
    } catch (err) {
      toast("Could not reach Stormwatch: " + err, true);
      return null;
    }
    const payload = await response.json().catch(() => ({}));
    if (response.status === 401 || response.status === 403) {
      if (response.status === 401 || payload.error === "wrong token") {
        sessionStorage.removeItem(TOKEN_KEY);
        renderLock();
      }
      toast((payload.error || "Not allowed") + (response.status === 403 && payload.error === "wrong token" ? ": enter it again" : ""), true);
      return null;
    }
    if (!response.ok) {
      toast(payload.error || "Failed: HTTP " + response.status, true);
      return null;
    }
    return payload;
  }

  async function changeBreaker(entity, action, extra, button) {
    if (action === "open" && entity.startsWith("team:") &&
        !window.confirm("Open the breaker on the whole " + entity + "? Every request of the team will be refused.")) return;
    if (button) button.disabled = true;
    const ttl = $("breaker-ttl").value;
    const body = Object.assign({ entity, action }, extra || {});
    if (action === "open" && ttl === "inf") body.until_closed = true;
    else if (action === "open" && ttl) body.ttl_seconds = Number(ttl);
    const result = await send("api/breakers", body);
    if (button) button.disabled = false;
    if (!result) return;
    const state = result.breaker ? result.breaker.state : "closed";
    const team = result.breaker && TEAM_SCOPED.has(result.breaker.entity.type) ? " of team " + result.breaker.owner : "";
    toast("Breaker on " + entity + team + " is " + state.replace("_", "-"));
    if (result.breaker) applyBreaker(result.breaker);
  }

  function applyBreaker(change) {
    // Show the click at once; the live stream confirms it a moment later.
    if (!ui.data) return;
    const row = {
      key: breakerKey(change.entity.type, change.entity.id, change.owner),
      entity: change.entity.type + ":" + change.entity.id, entity_type: change.entity.type, entity_id: change.entity.id,
      owner: change.owner, state: change.state, previous_state: change.previous_state, version: change.version,
      changed_at: change.changed_at, expires_at: change.expires_at, reason: change.reason,
      incident_id: change.incident_id, actor: change.actor,
    };
    const rest = ui.data.breakers.filter((b) => b.key !== row.key);
    ui.data.breakers = [row, ...rest];
    renderBreakers(ui.data);
    renderIncidents(ui.data, true);
  }

  async function label(incident, value, button) {
    if (button) button.disabled = true;
    const result = await send("api/incidents/" + encodeURIComponent(incident.incident_id) + "/feedback", { label: value });
    if (button) button.disabled = false;
    if (result) toast("Labelled " + (LABEL[value] || value) + ": " + (KIND[incident.kind] || incident.kind) + " on " + incident.entity);
  }

  // -- live stream --------------------------------------------------------------------------

  function connect() {
    if (ui.source) ui.source.close();
    const conn = $("conn");
    conn.className = "conn conn-wait";
    conn.textContent = "connecting…";
    const source = new EventSource("api/stream?range=" + ui.range);
    ui.source = source;
    source.addEventListener("open", () => { conn.className = "conn conn-live"; conn.textContent = "live"; });
    source.addEventListener("error", () => {
      conn.className = "conn " + (source.readyState === EventSource.CLOSED ? "conn-down" : "conn-wait");
      conn.textContent = source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…";
    });
    source.addEventListener("state", (event) => {
      conn.className = "conn conn-live";
      conn.textContent = "live";
      render(JSON.parse(event.data));
    });
  }

  // -- rendering ----------------------------------------------------------------------------

  function render(data) {
    ui.data = data;
    document.body.dataset.version = data.version;
    $("clock").textContent = data.now ? "event time " + clock(data.now, true) + " UTC" : "no events yet";
    renderLock();
    renderKpis(data);
    renderChart(data);
    renderIncidents(data);
    renderBreakers(data);
    renderTop(data);
    renderRejects(data);
    ui.firstRendered = true; // from now on, incidents not seen before flash when they arrive
  }

  function renderLock() {
    const controls = (ui.data && ui.data.controls) || {};
    const button = $("unlock");
    button.hidden = controls.read_only !== false;
    const unlocked = !!token();
    button.textContent = unlocked ? "Controls unlocked · lock" : "Unlock controls";
    button.classList.toggle("unlocked", unlocked);
    $("breaker-form").hidden = !controls.breakers;
    $("breakers-hint").textContent = controls.read_only ? "read-only: no API token configured" :
      controls.breakers ? "" : "this shell has no breaker control";
  }

  function renderKpis(data) {
    const t = data.totals;
    if (!changed("kpis", t)) return;
    $("kpi-hour").textContent = usd(t.spend_last_window_usd);
    $("kpi-hour-sub").textContent = "≈ " + rate(t.spend_last_window_usd * 3600 / t.window_seconds) + " · " + usd(t.spend_usd) + " in all";
    const inc = $("kpi-incidents");
    inc.textContent = String(t.active_incidents);
    inc.className = "kpi-value" + (t.critical_incidents ? " bad" : t.active_incidents ? " warn" : "");
    $("kpi-incidents-sub").textContent = t.critical_incidents ? t.critical_incidents + " critical" : t.active_incidents ? "none critical" : "all quiet";
    $("kpi-rate").textContent = rate(t.active_cost_rate_usd_per_hour);
    $("kpi-rate").className = "kpi-value" + (t.active_cost_rate_usd_per_hour > 0 ? " warn" : "");
    $("kpi-excess").textContent = usd(t.active_excess_cost_usd);
    $("kpi-breakers").textContent = String(t.open_breakers);
    $("kpi-breakers").className = "kpi-value" + (t.open_breakers ? " bad" : "");
    $("kpi-breakers-sub").textContent = t.open_breakers ? "refusing traffic" : "all closed";
    $("kpi-events").textContent = t.events.toLocaleString("en-US");
    const errShare = t.events ? (100 * t.errors / t.events).toFixed(1) + "% failed" : "";
    $("kpi-events-sub").textContent = [errShare, t.rejected ? t.rejected.toLocaleString("en-US") + " rejected" : ""].filter(Boolean).join(" · ");
  }

  let chart = null;
  function renderChart(data) {
    const incidents = [...data.incidents.active, ...data.incidents.recent];
    const markers = incidents.map((i) => ({
      at: epoch(i.first_detected_at), severity: i.severity,
      label: (KIND[i.kind] || i.kind) + " · " + i.entity + " · " + clock(i.first_detected_at) + " UTC",
    }));
    if (!changed("chart", [data.spend, markers])) return;
    if (!chart) chart = new window.SpendChart($("chart"));
    chart.update(data.spend, markers);
    const legend = $("legend");
    legend.textContent = "";
    const perHour = 3600 / data.spend.step_seconds;
    for (const s of data.spend.series) {
      const last = s.values.length > 1 ? s.values[s.values.length - 2] * perHour : 0;
      const sw = h("span", { class: "sw" });
      sw.style.background = chart.colour(s.team);
      const button = h("button", { type: "button", class: chart.hidden.has(s.team) ? "off" : "", title: "Show or hide " + s.team },
        sw, s.team, h("span", { class: "v" }, usd(s.total_usd) + " · now " + rate(last)));
      button.addEventListener("click", () => { chart.toggle(s.team); button.classList.toggle("off"); });
      legend.append(button);
    }
  }

  function breakerKey(type, id, owner) {  // as detector.breakers.entity_key
    return TEAM_SCOPED.has(type) ? type + ":" + owner.replace(/%/g, "%25").replace(/\//g, "%2F") + "/" + id : type + ":" + id;
  }

  function breakerOf(type, id, owner) {
    const key = breakerKey(type, id, owner);
    return ((ui.data && ui.data.breakers) || []).find((b) => b.key === key);
  }

  function renderIncidents(data, force) {
    const list = ui.incidentTab === "active" ? data.incidents.active : data.incidents.recent;
    $("n-active").textContent = String(data.incidents.active.length);
    $("n-recent").textContent = String(data.incidents.recent.length);
    if (!changed("incidents", [ui.incidentTab, list, data.controls, data.breakers.map((b) => [b.key, b.state])]) && !force) return;
    const box = $("incidents");
    box.textContent = "";
    if (list.length === 0) {
      const recent = data.incidents.recent.length;
      box.append(h("div", { class: "empty-note" + (ui.incidentTab === "active" ? " good" : "") },
        ui.incidentTab === "active"
          ? "No active incidents." + (recent ? " " + recent + " resolved recently: see the other tab." : "")
          : "Nothing resolved recently."));
    }
    for (const inc of list) box.append(incidentCard(inc, data.controls));
    for (const inc of [...data.incidents.active, ...data.incidents.recent]) ui.seen.add(inc.incident_id);
  }

  function incidentCard(inc, controls) {
    const resolved = inc.status === "resolved";
    const fresh = ui.firstRendered && !ui.seen.has(inc.incident_id);
    const card = h("article", {
      class: `incident sev-${inc.severity}` + (resolved ? " resolved" : "") + (fresh ? " fresh" : ""),
      dataset: { testid: "incident", incidentId: inc.incident_id, kind: inc.kind, entity: inc.entity, status: inc.status },
    });
    card.append(
      h("div", { class: "inc-head" },
        h("span", { class: "pill " + inc.severity }, inc.severity),
        h("span", { class: "inc-kind" }, KIND[inc.kind] || inc.kind),
        entityButton(inc.entity, false, inc.owner),
        inc.entity === "team:" + inc.owner ? null : h("span", { class: "inc-owner" }, "team " + inc.owner),
        h("span", { class: "pill " + inc.status }, inc.status),
        inc.feedback ? h("span", { class: "pill label", title: inc.feedback.note || "" }, "labelled " + (LABEL[inc.feedback.label] || inc.feedback.label) + " by " + inc.feedback.actor) : null),
      h("div", { class: "inc-money" },
        h("div", { class: "rate", title: "Spend rate of the entity (peak " + rate(inc.peak_cost_rate_usd_per_hour) + ")" }, rate(inc.cost_rate_usd_per_hour)),
        h("div", { class: "excess", title: "Spend above normal since it started" }, usd(inc.excess_cost_usd) + " excess")),
      h("div", { class: "inc-summary" }, inc.summary),
    );
    const meta = resolved
      ? `started ${clock(inc.started_at)} · detected ${clock(inc.first_detected_at)} · resolved ${clock(inc.resolved_at)} after ${duration(inc.started_at, inc.resolved_at)}`
      : `started ${clock(inc.started_at)} (${ago(inc.started_at)}) · detected ${clock(inc.first_detected_at)}` +
        (inc.records > 1 ? ` · updated ${inc.records - 1}× , last ${clock(inc.detected_at)}` : "");
    const actions = h("div", { class: "inc-actions" });
    if (controls.breakers && BREAKER_TYPES.has(inc.entity_type) && !resolved) {
      const b = breakerOf(inc.entity_type, inc.entity_id, inc.owner);
      if (b && b.state !== "closed") {
        actions.append(h("span", { class: "pill " + b.state }, "breaker " + b.state.replace("_", "-")));
        actions.append(h("button", { type: "button", class: "btn btn-small btn-safe", dataset: { action: "close-breaker", entity: inc.entity },
          onclick: (e) => changeBreaker(inc.entity, "close", { reason: "closed from the dashboard", incident_id: inc.incident_id, owner: inc.owner }, e.currentTarget) }, "Close breaker"));
      } else {
        actions.append(h("button", { type: "button", class: "btn btn-small btn-danger", dataset: { action: "open-breaker", entity: inc.entity },
          title: inc.recommended_action,
          onclick: (e) => changeBreaker(inc.entity, "open", {
            reason: ((KIND[inc.kind] || inc.kind) + ": " + inc.summary).slice(0, 480), incident_id: inc.incident_id, owner: inc.owner,
          }, e.currentTarget) }, "Open breaker"));
      }
    }
    if (controls.feedback) {
      for (const value of ["real", "false_alarm", "planned"]) {
        actions.append(h("button", { type: "button", class: "btn btn-small", dataset: { action: "label-" + value },
          onclick: (e) => label(inc, value, e.currentTarget) }, LABEL[value]));
      }
    }
    card.append(h("div", { class: "inc-foot" }, h("span", { class: "inc-meta" }, meta), actions));
    return card;
  }

  function renderBreakers(data) {
    if (!changed("breakers", [data.breakers, data.controls, ui.data.now && Math.floor(epoch(ui.data.now) / 30)])) return;
    const box = $("breakers");
    box.textContent = "";
    if (data.breakers.length === 0) {
      box.append(h("div", { class: "empty-note" }, "No breakers yet. Open one from an incident, or by entity above."));
      return;
    }
    const rows = data.breakers.map((b) => {
      let act = null;
      if (data.controls.breakers) {
        act = b.state === "closed"
          ? h("button", { type: "button", class: "btn btn-small btn-danger", dataset: { action: "open-breaker", entity: b.entity },
            onclick: (e) => changeBreaker(b.entity, "open", { reason: "reopened from the dashboard", incident_id: b.incident_id, owner: b.owner }, e.currentTarget) }, "Open")
          : h("button", { type: "button", class: "btn btn-small btn-safe", dataset: { action: "close-breaker", entity: b.entity },
            onclick: (e) => changeBreaker(b.entity, "close", { reason: "closed from the dashboard", owner: b.owner }, e.currentTarget) }, "Close");
      }
      const expires = b.state === "open" ? (b.expires_at ? "until " + clock(b.expires_at) : "until closed") : "";
      return h("tr", { dataset: { testid: "breaker", entity: b.entity, state: b.state } },
        h("td", {}, h("span", { class: "pill " + b.state, dataset: { testid: "breaker-state" } }, b.state.replace("_", "-")), h("div", { class: "muted" }, expires)),
        h("td", {}, entityButton(b.entity, false, b.owner), h("div", { class: "muted" }, "team " + b.owner)),
        h("td", { class: "reason" }, b.reason, h("div", { class: "muted" }, "by " + b.actor + " · " + clock(b.changed_at) + " (" + ago(b.changed_at) + ")")),
        h("td", { class: "act" }, act));
    });
    box.append(h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "State"), h("th", {}, "Guards"), h("th", {}, "Why"), h("th", {}))), h("tbody", {}, rows)));
  }

  function renderTop(data) {
    const rows = data.top[ui.topTab] || [];
    if (!changed("top", [ui.topTab, rows])) return;
    const box = $("top");
    box.textContent = "";
    if (rows.length === 0) {
      box.append(h("div", { class: "empty-note" }, "No spend in the last hour."));
      return;
    }
    const max = rows[0].spend_usd || 1;
    const body = rows.map((r, i) => {
      const bar = h("div", { class: "bar" }, h("span"));
      bar.firstChild.style.width = Math.max(1, (100 * r.spend_usd) / max).toFixed(1) + "%";
      return h("tr", { dataset: { testid: "top-row", id: r.id } },
        h("td", { class: "muted num" }, String(i + 1)),
        h("td", {}, entityButton(ui.topTab + ":" + r.id, true, r.owner), bar),
        h("td", { class: "muted" }, r.owner ? "team " + r.owner : ""),
        h("td", { class: "usd" }, usd(r.spend_usd), h("div", { class: "muted" }, (100 * r.share).toFixed(1) + "%")));
    });
    box.append(h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, ENTITY[ui.topTab]), h("th", {}, "Owner"), h("th", { class: "usd" }, "Spend"))), h("tbody", {}, body)));
  }

  function renderRejects(data) {
    const r = data.rejects;
    if (!changed("rejects", r)) return;
    $("rejects-total").textContent = r.total ? r.total.toLocaleString("en-US") + " in all" : "";
    const box = $("rejects");
    box.textContent = "";
    if (!r.total) {
      box.append(h("div", { class: "empty-note good" }, "Every message so far was a valid event."));
      return;
    }
    box.append(h("div", { class: "rejects" }, Object.entries(r.by_reason).map(([k, v]) => h("span", { class: "pill label" }, k + " × " + v))));
    box.append(h("ul", { class: "recent-rejects" }, r.recent.slice(-5).reverse().map((line) => h("li", { class: "mono" }, line))));
  }

  // -- entity details -----------------------------------------------------------------------

  async function openEntity(type, id, team) {
    // Users, agents and sessions are per team (each team's "assistant" is its own): ask for this one's.
    team = SCOPED.has(type) ? team : undefined;
    const dialog = $("entity-dialog");
    $("entity-title").textContent = (ENTITY[type] || type) + " " + id + (team ? " · team " + team : "");
    const body = $("entity-body");
    body.textContent = "Loading…";
    if (!dialog.open) dialog.showModal();
    const query = team ? "?team=" + encodeURIComponent(team) : "";
    const response = await fetch("api/entities/" + encodeURIComponent(type) + "/" + encodeURIComponent(id) + query);
    const e = await response.json().catch(() => ({}));
    body.textContent = "";
    if (!response.ok) {
      body.append(h("p", {}, e.error || "Not found."));
      return;
    }
    const facts = h("div", { class: "facts" },
      h("div", {}, h("span", {}, "spend seen"), h("b", {}, usd(e.spend_usd))),
      e.spend_last_window_usd !== undefined ? h("div", {}, h("span", {}, "last hour"), h("b", {}, usd(e.spend_last_window_usd))) : null,
      h("div", {}, h("span", {}, "requests"), h("b", {}, (e.events || 0).toLocaleString("en-US"))),
      h("div", {}, h("span", {}, "failed"), h("b", {}, e.events ? (100 * e.errors / e.events).toFixed(1) + "%" : "—")),
      h("div", {}, h("span", {}, "retries"), h("b", {}, (e.retries || 0).toLocaleString("en-US"))));
    body.append(h("p", {}, (e.owner ? "Owned by team " + e.owner + ". " : "") + (e.first_seen ? "Seen " + clock(e.first_seen, true) + " to " + clock(e.last_seen, true) + " UTC." : "")), facts);
    const others = (e.teams || []).filter((t) => t !== e.owner);
    if (others.length) {
      body.append(h("p", { class: "muted", dataset: { testid: "other-teams" } }, "Other teams with " + (ENTITY[type] || type).toLowerCase() + " " + id + ": ",
        ...others.map((t) => h("button", { class: "linkish", type: "button", onclick: () => openEntity(type, id, t) }, t + " "))));
    }
    if (e.breakdown && e.breakdown.length) {
      body.append(h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "By " + e.breakdown_by), h("th", { class: "usd" }, "Spend"), h("th", { class: "usd" }, "Share"))),
        h("tbody", {}, e.breakdown.map((b) => h("tr", {}, h("td", {}, b.name), h("td", { class: "usd" }, usd(b.spend_usd)), h("td", { class: "usd" }, (100 * b.share).toFixed(1) + "%"))))));
    }
    if (e.incidents && e.incidents.length) {
      body.append(h("h3", {}, "Incidents"));
      for (const inc of e.incidents) body.append(h("p", {}, h("span", { class: "pill " + inc.severity }, inc.severity), " ", KIND[inc.kind] || inc.kind, " (" + inc.status + ", " + rate(inc.cost_rate_usd_per_hour) + "): ", inc.summary));
    }
    const controls = (ui.data && ui.data.controls) || {};
    if (BREAKER_TYPES.has(type)) {
      const state = e.breaker ? e.breaker.state : "closed";
      const row = h("p", {}, "Breaker: ", h("span", { class: "pill " + state }, state.replace("_", "-")), " ");
      if (controls.breakers) {
        const entity = type + ":" + id;
        const owner = e.breaker ? e.breaker.owner : e.owner;
        row.append(state === "closed"
          ? h("button", { type: "button", class: "btn btn-small btn-danger", onclick: async (ev) => { await changeBreaker(entity, "open", { reason: "opened from the dashboard", owner }, ev.currentTarget); openEntity(type, id, owner); } }, "Open breaker")
          : h("button", { type: "button", class: "btn btn-small btn-safe", onclick: async (ev) => { await changeBreaker(entity, "close", { reason: "closed from the dashboard", owner }, ev.currentTarget); openEntity(type, id, owner); } }, "Close breaker"));
      }
      body.append(row);
    }
  }

  // -- wiring -------------------------------------------------------------------------------

  function selectTabs(groupId, attr, value) {
    for (const b of $(groupId).querySelectorAll("button")) b.classList.toggle("on", b.dataset[attr] === String(value));
  }

  function init() {
    selectTabs("range", "range", ui.range);
    selectTabs("incident-tabs", "tab", ui.incidentTab);
    selectTabs("top-tabs", "top", ui.topTab);
    $("range").addEventListener("click", (e) => {
      const b = e.target.closest("button");
      if (!b) return;
      ui.range = Number(b.dataset.range);
      sessionStorage.setItem("stormwatch.range", String(ui.range));
      selectTabs("range", "range", ui.range);
      connect();
    });
    $("incident-tabs").addEventListener("click", (e) => {
      const b = e.target.closest("button");
      if (!b) return;
      ui.incidentTab = b.dataset.tab;
      selectTabs("incident-tabs", "tab", ui.incidentTab);
      if (ui.data) renderIncidents(ui.data, true);
    });
    $("top-tabs").addEventListener("click", (e) => {
      const b = e.target.closest("button");
      if (!b) return;
      ui.topTab = b.dataset.top;
      selectTabs("top-tabs", "top", ui.topTab);
      if (ui.data) renderTop(ui.data);
    });
    $("unlock").addEventListener("click", () => {
      if (token()) {
        sessionStorage.removeItem(TOKEN_KEY);
        renderLock();
        toast("Controls locked");
      } else {
        askToken();
      }
    });
    $("token-ok").addEventListener("click", () => finishUnlock(true));
    $("token-cancel").addEventListener("click", () => finishUnlock(false));
    $("token-input").addEventListener("keydown", (e) => { if (e.key === "Enter") finishUnlock(true); });
    $("token-dialog").addEventListener("cancel", () => finishUnlock(false));
    $("entity-close").addEventListener("click", () => $("entity-dialog").close());
    const openTyped = () => {
      const entity = $("breaker-entity").value.trim();
      const type = entity.split(":")[0];
      if (!BREAKER_TYPES.has(type) || entity.length <= type.length + 1) {
        toast("Name it as TYPE:ID, with TYPE one of team, api_key, agent, session", true);
        return;
      }
      changeBreaker(entity, "open", { reason: "opened from the dashboard" }, $("breaker-open"));
    };
    $("breaker-open").addEventListener("click", openTyped);
    $("breaker-entity").addEventListener("keydown", (e) => { if (e.key === "Enter") openTyped(); });
    connect();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
