// outbound_heartbeat console: advances the heartbeat bars between updates and swaps in the
// server-rendered rows (already escaped by the server) from the event stream, or by polling
// when the stream does not work. No framework, no build step, nothing from the network.
(function () {
  "use strict";
  var body = document.body;
  var root = body.getAttribute("data-root") || "";
  var fragmentUrl = body.getAttribute("data-fragment");
  var base = performance.now();
  var polling = false;

  function paint() {
    var elapsed = (performance.now() - base) / 1000;
    var bars = document.querySelectorAll(".hb[data-age]");
    for (var i = 0; i < bars.length; i++) {
      var bar = bars[i];
      var age = parseFloat(bar.getAttribute("data-age")) + elapsed;
      var limit = parseFloat(bar.getAttribute("data-limit"));
      // A beat is missed from data-late on (the beat interval plus slack): amber at once,
      // not at half of stale_after; red from three quarters of it or once the database says
      // stale (render.bar_level is the same rule on the server).
      var late = parseFloat(bar.getAttribute("data-late"));
      var ratio = limit > 0 ? Math.min(age / limit, 1) : 1;
      var row = bar.closest("tr");
      var stale = row && row.getAttribute("data-stale") === "true";
      var level = stale || ratio >= 0.75 ? "red" : age >= late ? "warn" : "ok";
      bar.className = "hb hb-" + level;
      bar.firstElementChild.style.width = (ratio * 100).toFixed(1) + "%";
      var text = bar.parentNode.querySelector(".hb-age");
      if (text) { text.textContent = age.toFixed(1); }
    }
  }

  function setMode(mode) {
    var live = document.getElementById("live");
    if (!live) { return; }
    live.className = "live live-" + mode;
    live.textContent = live.getAttribute("data-" + mode) || mode;
  }

  function refreshFragment() {
    if (!fragmentUrl) { return; }
    fetch(fragmentUrl, { credentials: "same-origin" }).then(function (r) {
      return r.ok ? r.text() : null;
    }).then(function (html) {
      var target = document.getElementById("run-live");
      if (html !== null && target) { target.innerHTML = html; base = performance.now(); paint(); }
    }).catch(function () {});
  }

  function replaceRows(html) {
    var tbody = document.getElementById("runs-body");
    if (tbody) { tbody.innerHTML = html; }
    base = performance.now();
    paint();
    refreshFragment();
  }

  function poll() {
    polling = true;
    setMode("poll");
    fetch(root + "/runs.html", { credentials: "same-origin" }).then(function (r) {
      return r.ok ? r.text() : null;
    }).then(function (html) {
      if (html !== null) { replaceRows(html); }
    }).catch(function () {}).then(function () { setTimeout(poll, 2000); });
  }

  // Each event's data is one JSON value (the server escapes every CR and LF in it).
  function payload(e) {
    try { return JSON.parse(e.data); } catch (err) { return null; }
  }

  if (body.getAttribute("data-stream") === "1" && window.EventSource) {
    var failures = 0;
    var source = new EventSource(root + "/stream");
    source.addEventListener("runs", function (e) {
      var html = payload(e);
      if (typeof html === "string") { failures = 0; replaceRows(html); }
    });
    source.addEventListener("mode", function (e) {
      var mode = payload(e);
      if (typeof mode === "string") { setMode(mode); }
    });
    source.onerror = function () {
      failures += 1;
      // CLOSED: the server refused the stream (429: too many open) and the browser will not
      // retry; otherwise a proxy that buffers event streams fails it three times in a row.
      if ((source.readyState === EventSource.CLOSED || failures >= 3) && !polling) {
        source.close();
        poll();
      }
    };
  }
  paint();
  setInterval(paint, 200);
})();
