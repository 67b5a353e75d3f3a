"""The live web page (`nmoe fleet watch --web PORT`): a small HTTP server of its own, no dependency.

`GET /` is one self-contained page that polls `GET /state.json` (the `LiveFleet` snapshot) twice a
second and redraws: devices online and their model versions, one row per device (requests served,
latency percentiles of its last telemetry period, errors, queue, CPU, memory), the routing matrix
filling in, and the totals. Every number cell carries `data-device` / `data-field` attributes, so
tests read exactly what is shown.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

from toolkit.fleet.live_state import LiveFleet

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>nmoe fleet</title>
<style>
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.4em}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#eee}
td.l{text-align:left;white-space:nowrap}
.online{color:#080}.offline{color:#b00}.drained{color:#b60}.removed,.unknown{color:#888}
#conn.down{color:#b00}
</style></head>
<body>
<h1>nmoe fleet <small id="broker"></small></h1>
<p><span id="conn"></span> &middot; online <b id="online">0</b> of <b id="known">0</b>
&middot; models: <span id="models">-</span> &middot; updated <span id="updated">never</span></p>
<h2>Devices</h2>
<table id="devices"><thead><tr>
<th>device</th><th>expert</th><th>status</th><th>model</th><th>served infer</th><th>served expert</th><th>made</th>
<th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>errors</th><th>queue</th><th>CPU %</th><th>RSS MB</th>
<th>reconnects</th><th>on-device acc %</th></tr></thead><tbody></tbody></table>
<h2>Routing matrix <small>(inputs of each device combined with each expert)</small></h2>
<table id="routing"><thead></thead><tbody></tbody></table>
<h2>Totals</h2>
<table id="totals"><tbody></tbody></table>
<script>
"use strict";
const FIELDS = ["expert", "status", "model", "served_infer", "served_expert", "made", "p50", "p95", "p99",
                "errors_total", "queue", "cpu_pct", "rss_mb", "reconnects", "accuracy"];
let polls = 0;
function cell(tag, text, attrs) {
  const c = document.createElement(tag);
  c.textContent = text === null || text === undefined ? "-" : String(text);
  for (const [k, v] of Object.entries(attrs || {})) c.setAttribute(k, v);
  return c;
}
function draw(s) {
  document.getElementById("broker").textContent = s.broker;
  const conn = document.getElementById("conn");
  conn.textContent = s.connected ? "connected" : "disconnected";
  conn.className = s.connected ? "" : "down";
  document.getElementById("online").textContent = s.online;
  document.getElementById("known").textContent = s.devices_known;
  const models = Object.entries(s.models).map(([m, d]) => m.slice(0, 12) + " (" + d.length + ")");
  document.getElementById("models").textContent = models.length ? models.join("; ") : "-";
  const body = document.querySelector("#devices tbody");
  body.replaceChildren(...s.devices.map(r => {
    const tr = document.createElement("tr");
    tr.appendChild(cell("td", r.device, {"class": "l", "data-device": r.device, "data-field": "device"}));
    const row = Object.assign({}, r, {
      errors_total: r.errors_sent === null ? null : r.errors_sent + r.errors_received,
      model: r.model === null ? null : r.model.slice(0, 12)});
    for (const f of FIELDS) {
      const attrs = {"data-device": r.device, "data-field": f};
      if (f === "status" || f === "model") attrs["class"] = "l " + (f === "status" ? r.status : "");
      tr.appendChild(cell("td", row[f], attrs));
    }
    return tr;
  }));
  const head = document.querySelector("#routing thead");
  const hr = document.createElement("tr");
  hr.appendChild(cell("th", "device"));
  for (const e of s.routing.experts) hr.appendChild(cell("th", "expert " + e));
  head.replaceChildren(hr);
  const max = Math.max(1, ...Object.values(s.routing.matrix).flat());
  document.querySelector("#routing tbody").replaceChildren(...Object.entries(s.routing.matrix).map(([d, row]) => {
    const tr = document.createElement("tr");
    tr.appendChild(cell("td", d, {"class": "l"}));
    row.forEach((n, i) => {
      const c = cell("td", n, {"data-device": d, "data-expert": String(s.routing.experts[i])});
      c.style.background = "rgba(30,120,200," + (0.85 * n / max).toFixed(3) + ")";
      tr.appendChild(c);
    });
    return tr;
  }));
  document.querySelector("#totals tbody").replaceChildren(...Object.entries(s.totals).map(([k, v]) => {
    const tr = document.createElement("tr");
    tr.appendChild(cell("th", k.replace("_", " ")));
    tr.appendChild(cell("td", v, {"data-total": k}));
    return tr;
  }));
  polls += 1;
  const updated = document.getElementById("updated");
  updated.textContent = new Date().toLocaleTimeString() + " (#" + polls + ")";
  updated.setAttribute("data-version", String(s.version));
}
async function poll() {
  try {
    const r = await fetch("state.json", {cache: "no-store"});
    if (r.ok) draw(await r.json());
  } catch (e) {
    document.getElementById("conn").textContent = "the watch process is gone";
  }
  setTimeout(poll, 500);
}
poll();
</script></body></html>
"""


class LiveServer:
    """Serves the page and the snapshot of `fleet` on host:port (port 0: a free one) from a daemon thread."""

    def __init__(self, fleet: LiveFleet, host: str = "127.0.0.1", port: int = 0) -> None:
        page = PAGE.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path in ("/", "/index.html"):
                    self._send(page, "text/html; charset=utf-8")
                elif self.path == "/state.json":
                    self._send(json.dumps(fleet.snapshot()).encode(), "application/json")
                else:
                    self.send_error(404)

            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # no line per request on the terminal

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="live-web", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        assert isinstance(host, str)  # an AF_INET server's address
        return f"http://{host}:{port}/"

    def start(self) -> Self:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
