// Token colouring and the token tooltip. Values arrive in each token's title
// ("hook value" per line); we keep them in a dataset and show our own tooltip
// on hover and on keyboard focus.
(function () {
  "use strict";
  var HOOKS = ["hook_post", "hook_pre_linear", "hook_pre", "act"];
  var POS = [214, 39, 40], NEG = [31, 119, 180];

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
  document.addEventListener("htmx:load", function (e) { init(e.target); });
  document.addEventListener("DOMContentLoaded", function () { init(document); });
})();
