// Token colouring and the token tooltip. On a page, values arrive in each
// token's title ("hook value" per line). In an htmx examples fragment they
// arrive compact: each snippet's data-v holds all four values of its tokens
// as float32, and expand() gives each token what the page's title and class
// say (render.compact_snippet on the server). Either way we keep them in a
// dataset and show our own tooltip on hover and on keyboard focus.
(function () {
  "use strict";
  // The names and codes the server uses (gluscope/schema.py), from base.html's <body>.
  var names = document.body.dataset;
  var HOOKS = JSON.parse(names.hooks), QUADRANTS = JSON.parse(names.quadrants);
  var SIGNS = JSON.parse(names.quadrantSigns);  // [sign of x_gate, sign of x_in] per quadrant code
  var X_GATE = HOOKS.indexOf("hook_pre"), X_IN = HOOKS.indexOf("hook_pre_linear");
  var POS = JSON.parse(names.posRgb), NEG = JSON.parse(names.negRgb);  // render.POS_RGB, NEG_RGB

  // Python's "%.4g", as render.format_many writes the page's titles, exactly:
  // toExponential(99) is the exact decimal expansion of any float32, and we
  // round it half to even as Python does (float16 inputs make exact ties common).
  function fmt(v) {
    if (v === null || !isFinite(v)) return "\u2014";
    if (v === 0) return "0";
    var s = Math.abs(v).toExponential(99), k = s.indexOf("e"), e = parseInt(s.slice(k + 1), 10);
    var digits = s.slice(0, 1) + s.slice(2, k), keep = parseInt(digits.slice(0, 4), 10), rest = digits.slice(4);
    var half = "5" + "0".repeat(rest.length - 1);
    if (rest > half || (rest === half && keep % 2 === 1)) keep += 1;
    if (keep === 10000) { keep = 1000; e += 1; }
    var m = String(keep), out;
    if (e < -4 || e >= 4) {
      var a = Math.abs(e);
      out = trim(m[0] + "." + m.slice(1)) + "e" + (e < 0 ? "-" : "+") + (a < 10 ? "0" : "") + a;
    } else if (e >= 0) {
      out = trim(m.slice(0, e + 1) + "." + m.slice(e + 1));
    } else {
      out = trim("0." + "0".repeat(-e - 1) + m);
    }
    return (v < 0 ? "-" : "") + out;
  }

  function trim(x) { return x.replace(/0+$/, "").replace(/\.$/, ""); }

  function quadrant(x_gate, x_in) {
    if (!x_gate || !x_in || !isFinite(x_gate) || !isFinite(x_in)) return "no quadrant";
    for (var q = 0; q < SIGNS.length; q++) {
      if (SIGNS[q][0] === Math.sign(x_gate) && SIGNS[q][1] === Math.sign(x_in)) return QUADRANTS[q];
    }
  }

  function expand(snippet) {
    var box = snippet.closest(".examples"), own = box ? box.dataset.quadrant : "";
    // An expert neuron's window has no values (NaN) at tokens not routed to its expert (render.snippet).
    var notRouted = box ? box.dataset.notRouted : "";
    var raw = atob(snippet.dataset.v), bytes = new Uint8Array(raw.length);
    for (var b = 0; b < raw.length; b++) bytes[b] = raw.charCodeAt(b);
    var view = new DataView(bytes.buffer), tokens = snippet.children, n = tokens.length;
    var start = +snippet.dataset.start, focus = +snippet.dataset.focus;
    for (var j = 0; j < n; j++) {
      var v = HOOKS.map(function (_, h) { return view.getFloat32(4 * (h * n + j), true); });
      var q = quadrant(v[X_GATE], v[X_IN]), t = tokens[j];
      var nr = notRouted && isNaN(v[X_GATE]) && isNaN(v[X_IN]);
      t.dataset.head = "position " + (start + j) + " \u00b7 " + (nr ? notRouted : q);
      t.dataset.v = v.map(fmt).join(",");
      if (nr) t.classList.add("nr");
      else if (q !== own) t.classList.add("oq");
      if (j === focus) t.classList.add("focus");
    }
    snippet.removeAttribute("data-v");
    return box;
  }

  function parseTitle(el) {
    if (el.dataset.v !== undefined) return;
    var lines = (el.getAttribute("title") || "").split("\n");
    el.dataset.head = lines[0] || "";
    el.dataset.v = lines.slice(1).map(function (l) { return l.slice(l.lastIndexOf(" ") + 1); }).join(",");
    el.removeAttribute("title");
  }

  function values(el) {
    parseTitle(el);
    return el.dataset.v.split(",").map(function (s) { return s === "—" ? null : parseFloat(s); });
  }

  // Same formula as render._styles on the server.
  function colour(v, scale) {
    if (v === null || !isFinite(v) || !(scale > 0) || v === 0) return "";
    var a = Math.min(Math.abs(v) / scale, 1) * 0.85, c = v > 0 ? POS : NEG;
    if (a < 0.005) return "";
    return "rgba(" + c[0] + "," + c[1] + "," + c[2] + "," + a.toFixed(3) + ")";
  }

  function recolour(box, hook) {
    var scales = JSON.parse(box.dataset.scales || "{}"), i = HOOKS.indexOf(hook), scale = scales[hook] || 0;
    box.querySelectorAll(".snippet .t").forEach(function (t) { t.style.background = colour(values(t)[i], scale); });
    box.querySelectorAll(".scale-max").forEach(function (s) { s.textContent = scale.toPrecision(3).replace(/\.?0+$/, ""); });
  }

  function init(root) {
    root.querySelectorAll(".snippet .t[title]").forEach(parseTitle);
    var boxes = [];
    root.querySelectorAll(".snippet[data-v]").forEach(function (s) {
      var box = expand(s);
      if (box && boxes.indexOf(box) < 0) boxes.push(box);
    });
    boxes.forEach(function (box) {
      var select = box.querySelector("select.colour-by");
      recolour(box, select ? select.value : HOOKS[0]);
    });
  }

  var tip = null;
  function show(t) {
    tip = tip || document.getElementById("tip");
    if (!tip) return;
    var v = values(t), lines = [];
    tip.textContent = "";
    var head = document.createElement("div");
    head.className = "tip-tok";
    head.textContent = t.textContent + "  (" + t.dataset.head + ")";
    tip.appendChild(head);
    HOOKS.forEach(function (h, i) {
      var row = document.createElement("div");
      row.className = "tip-row";
      row.dataset.hook = h;
      row.textContent = (h + "               ").slice(0, 16) + (v[i] === null ? "—" : v[i]);
      tip.appendChild(row);
    });
    tip.hidden = false;
    var r = t.getBoundingClientRect();
    tip.style.left = (window.scrollX + r.left) + "px";
    tip.style.top = (window.scrollY + r.bottom + 6) + "px";
  }
  function hide() { if (tip) tip.hidden = true; }

  function isToken(el) { return el && el.classList && el.classList.contains("t") && el.closest(".snippet"); }

  document.addEventListener("mouseover", function (e) { if (isToken(e.target)) show(e.target); });
  document.addEventListener("mouseout", function (e) { if (isToken(e.target)) hide(); });
  document.addEventListener("focusin", function (e) { if (isToken(e.target)) show(e.target); });
  document.addEventListener("focusout", function (e) { if (isToken(e.target)) hide(); });
  document.addEventListener("change", function (e) {
    if (e.target.classList.contains("colour-by")) {
      var box = e.target.closest(".examples");
      if (box) recolour(box, e.target.value);
    }
  });
  // An interval of a histogram is an SVG link, which works without JavaScript. htmx does not take over SVG
  // links, so load that interval's examples into the distributions' example box here.
  document.addEventListener("click", function (e) {
    var a = e.target.closest ? e.target.closest("svg a.interval") : null;
    var box = document.getElementById("dist-examples");
    if (!a || !box || !window.htmx || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
    e.preventDefault();
    a.closest(".dist").querySelectorAll("svg a.interval.on").forEach(function (o) { o.classList.remove("on"); });
    a.classList.add("on");
    window.htmx.ajax("GET", a.getAttribute("href"), {target: box, swap: "innerHTML"});
  });
  // A probe section shows its own errors (no probe, a bad text, a busy probe) where the answer would be;
  // htmx swaps only 2xx answers unless told.
  document.addEventListener("htmx:beforeSwap", function (e) {
    var t = e.detail.target;
    if (e.detail.xhr.status >= 400 && t && t.closest && t.closest("[data-swap-errors]")) {
      e.detail.shouldSwap = true;
      e.detail.isError = false;
    }
  });
  window.GLUScope = {fmt: fmt};  // for the browser tests
  document.addEventListener("htmx:load", function (e) { init(e.target); });
  document.addEventListener("DOMContentLoaded", function () { init(document); });
  // The filter form leaves its empty bounds out of the URL, so that a shared result reads as its query.
  document.addEventListener("submit", function (e) {
    if (!e.target.classList || !e.target.classList.contains("filter-form")) return;
    e.target.querySelectorAll("input").forEach(function (i) { if (i.value === "") i.disabled = true; });
  });
  window.addEventListener("pageshow", function () {  // back to a form whose inputs the submit disabled
    document.querySelectorAll("form.filter-form input:disabled").forEach(function (i) { i.disabled = false; });
  });
})();
