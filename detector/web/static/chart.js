/* A small SVG line chart of spend rate per team over event time. No dependencies.
 *
 *   const chart = new SpendChart(document.getElementById("chart"), {onLegend: ...});
 *   chart.update(spend, markers);   // spend as /api/spend returns it; markers: [{at, severity, label}]
 *
 * Values arrive as US dollars per step; the chart draws dollars per hour. The last step is
 * still filling, so its segment is dashed rather than drawn as a drop.
 */
"use strict";

(function (global) {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#4f46e5", "#d97706", "#059669", "#db2777", "#0891b2", "#7c3aed", "#65a30d", "#ea580c"];
  const OTHER = "(other)";
  const OTHER_COLOUR = "#94a3b8";
  const SEVERITY = { critical: "#dc2626", warning: "#d97706", info: "#2563eb" };
  const TICKS = [300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
  const DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

  function svg(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function niceStep(span, count) {
    const raw = span / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
    return 10 * mag;
  }

  function money(v) {
    if (v === 0) return "$0";
    if (v >= 1000) return "$" + (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "k";
    if (v >= 10) return "$" + v.toFixed(0);
    if (v >= 1) return "$" + v.toFixed(1);
    return "$" + v.toPrecision(2);
  }

  function pad(n) { return String(n).padStart(2, "0"); }

  function hhmm(epoch, withDay) {
    const d = new Date(epoch * 1000);
    const t = pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes());
    return withDay ? DAYS[d.getUTCDay()] + " " + t : t;
  }

  class SpendChart {
    constructor(root, options) {
      this.root = root;
      this.options = options || {};
      this.hidden = new Set();
      this.colours = new Map();
      this.data = null;
      this.markers = [];
      this.tip = document.createElement("div");
      this.tip.className = "chart-tip";
      this.tip.hidden = true;
      root.appendChild(this.tip);
      if (global.ResizeObserver) {
        let width = 0;
        new ResizeObserver(() => {
          if (root.clientWidth !== width) { width = root.clientWidth; this.draw(); }
        }).observe(root);
      }
    }

    colour(team) {
      if (team === OTHER) return OTHER_COLOUR;
      if (!this.colours.has(team)) this.colours.set(team, PALETTE[this.colours.size % PALETTE.length]);
      return this.colours.get(team);
    }

    toggle(team) {
      if (this.hidden.has(team)) this.hidden.delete(team); else this.hidden.add(team);
      this.draw();
    }

    update(spend, markers) {
      this.data = spend;
      this.markers = markers || [];
      for (const s of (spend && spend.series) || []) this.colour(s.team);
      this.draw();
    }

    draw() {
      const root = this.root;
      const old = root.querySelector("svg");
      if (old) old.remove();
      const W = Math.max(320, root.clientWidth || 800);
      const H = Math.max(180, root.clientHeight || 290);
      const m = { l: 58, r: 14, t: 14, b: 30 };
      const pw = W - m.l - m.r;
      const ph = H - m.t - m.b;
      const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Spend rate by team" });
      root.insertBefore(g, this.tip);
      const data = this.data;
      if (!data || !data.points || !data.series || data.series.length === 0) {
        svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, g).textContent = "Waiting for events…";
        return;
      }
      const n = data.points;
      const step = data.step_seconds;
      const perHour = 3600 / step;
      const start = data.start_epoch;
      const end = start + n * step;
      const visible = data.series.filter((s) => !this.hidden.has(s.team));
      let ymax = 0;
      for (const s of visible) for (const v of s.values) ymax = Math.max(ymax, v * perHour);
      if (ymax <= 0) ymax = 1;
      const ystep = niceStep(ymax, 4);
      const ytop = Math.ceil((ymax * 1.05) / ystep) * ystep;
      const x = (i) => m.l + (n === 1 ? pw / 2 : ((i + 0.5) / n) * pw);
      const xt = (epoch) => m.l + ((epoch - start) / (end - start)) * pw;
      const y = (v) => m.t + ph - (v / ytop) * ph;

      const grid = svg("g", { class: "grid" }, g);
      const axis = svg("g", { class: "axis" }, g);
      for (let v = 0; v <= ytop + 1e-9; v += ystep) {
        svg("line", { x1: m.l, x2: W - m.r, y1: y(v), y2: y(v) }, grid);
        svg("text", { x: m.l - 8, y: y(v) + 4, "text-anchor": "end" }, axis).textContent = money(v);
      }
      const span = end - start;
      const tick = TICKS.find((t) => span / t <= Math.max(3, Math.floor(pw / 95))) || 86400;
      const multiDay = span > 20 * 3600;
      for (let t = Math.ceil(start / tick) * tick; t <= end; t += tick) {
        const tx = xt(t);
        svg("line", { x1: tx, x2: tx, y1: m.t, y2: m.t + ph, class: "vgrid" }, grid);
        const dayMark = multiDay && t % 86400 === 0;
        svg("text", { x: tx, y: H - 9, "text-anchor": "middle" }, axis).textContent = hhmm(t, dayMark);
      }

      for (const s of visible) {
        const colour = this.colour(s.team);
        const pts = s.values.map((v, i) => [x(i), y(v * perHour)]);
        const solid = n > 1 ? pts.slice(0, n - 1) : pts;
        if (solid.length > 0) {
          const d = "M" + solid.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join("L");
          svg("path", { d: d + `L${solid[solid.length - 1][0].toFixed(1)},${y(0)}L${solid[0][0].toFixed(1)},${y(0)}Z`, class: "area", fill: colour }, g);
          svg("path", { d, class: "series", stroke: colour, "data-team": s.team }, g);
        }
        if (n > 1) {
          const a = pts[n - 2], b = pts[n - 1];
          svg("path", { d: `M${a[0].toFixed(1)},${a[1].toFixed(1)}L${b[0].toFixed(1)},${b[1].toFixed(1)}`, class: "series partial", stroke: colour }, g);
        }
      }

      for (const mk of this.markers) {
        if (mk.at < start || mk.at > end) continue;
        const mx = xt(mk.at);
        const tri = svg("path", { d: `M${mx - 5},${m.t + ph + 1}L${mx + 5},${m.t + ph + 1}L${mx},${m.t + ph - 8}Z`, fill: SEVERITY[mk.severity] || SEVERITY.info, class: "marker" }, g);
        svg("title", {}, tri).textContent = mk.label;
      }

      const cursor = svg("line", { class: "cursor", y1: m.t, y2: m.t + ph, x1: -10, x2: -10 }, g);
      const overlay = svg("rect", { x: m.l, y: m.t, width: pw, height: ph, fill: "transparent" }, g);
      const hide = () => { this.tip.hidden = true; cursor.setAttribute("x1", -10); cursor.setAttribute("x2", -10); };
      overlay.addEventListener("mouseleave", hide);
      overlay.addEventListener("mousemove", (ev) => {
        const box = g.getBoundingClientRect();
        const px = ((ev.clientX - box.left) / box.width) * W;
        const i = Math.max(0, Math.min(n - 1, Math.round(((px - m.l) / pw) * n - 0.5)));
        cursor.setAttribute("x1", x(i));
        cursor.setAttribute("x2", x(i));
        this.showTip(i, visible, perHour, start + i * step, step, (x(i) / W) * box.width, box.width);
      });
    }

    showTip(i, visible, perHour, at, step, left, width) {
      const tip = this.tip;
      tip.textContent = "";
      const head = document.createElement("div");
      head.className = "t";
      head.textContent = `${hhmm(at, true)}–${hhmm(at + step)} UTC`;
      tip.appendChild(head);
      const rows = visible.map((s) => [s.team, s.values[i] * perHour]).sort((a, b) => b[1] - a[1]);
      let total = 0;
      for (const [team, v] of rows) {
        total += v;
        const row = document.createElement("div");
        row.className = "row";
        const name = document.createElement("span");
        const sw = document.createElement("span");
        sw.className = "sw";
        sw.style.background = this.colour(team);
        name.append(sw, team);
        const val = document.createElement("span");
        val.textContent = money(v) + "/h";
        row.append(name, val);
        tip.appendChild(row);
      }
      if (rows.length > 1) {
        const row = document.createElement("div");
        row.className = "row";
        const a = document.createElement("b");
        a.textContent = "all shown";
        const b = document.createElement("b");
        b.textContent = money(total) + "/h";
        row.append(a, b);
        tip.appendChild(row);
      }
      tip.hidden = false;
      const w = tip.offsetWidth || 180;
      tip.style.left = Math.min(Math.max(0, left + 14), width - w - 4) + "px";
      tip.style.top = "18px";
    }
  }

  global.SpendChart = SpendChart;
  global.SpendChart.money = money;
})(window);
