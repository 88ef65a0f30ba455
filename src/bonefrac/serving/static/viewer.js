// bonefrac viewer: upload an image, show the Grad-CAM overlay, the calibrated probability and
// the decision at both operating points. Plain JS, no external libraries (works offline).
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const OP_LABELS = {
    high_sensitivity: "high-sensitivity",
    high_specificity: "high-specificity",
  };
  const OP_HELP = {
    high_sensitivity: "misses few fractures; more false alarms",
    high_specificity: "few false alarms; may miss subtle fractures",
  };
  let apiKey = sessionStorage.getItem("bonefrac-api-key") || "";
  let lastFile = null;

  function headers() {
    return apiKey ? { Authorization: "Bearer " + apiKey } : {};
  }
  function show(el, on) { el.classList.toggle("hidden", !on); }
  function pct(p) { return (100 * p).toFixed(1) + " %"; }
  function opName(k) { return OP_LABELS[k] || k.replace(/_/g, "-"); }

  function showError(message) {
    const box = $("error");
    box.innerHTML = "";
    const strong = document.createElement("strong");
    strong.textContent = "Could not analyse this file: ";
    box.appendChild(strong);
    box.appendChild(document.createTextNode(message));
    show(box, true);
    show($("busy"), false);
  }

  async function loadMetadata() {
    try {
      const r = await fetch("/metadata", { headers: headers() });
      if (r.status === 401) { show($("auth"), true); $("model-info").textContent = "API key required"; return; }
      const m = await r.json();
      $("model-info").textContent = "Model " + m.model.name + " · version " + m.model.version + " · " + m.model.arch;
      if (m.input && m.input.formats) {
        $("accepted-formats").textContent = m.input.formats.map((f) => f.toUpperCase()).join(", ") +
          " · up to " + m.input.max_upload_mb + " MB";
      }
    } catch (e) {
      $("model-info").textContent = "model information unavailable";
    }
  }

  function renderDecisions(res) {
    const ul = $("decisions");
    ul.innerHTML = "";
    const order = Object.keys(res.decisions).sort();
    for (const k of order) {
      const positive = !!res.decisions[k];
      const li = document.createElement("li");
      li.dataset.op = k;
      li.dataset.positive = String(positive);
      const badge = document.createElement("span");
      badge.className = "badge " + (positive ? "pos" : "neg");
      badge.textContent = positive ? "POSITIVE" : "NEGATIVE";
      const body = document.createElement("div");
      const text = document.createElement("div");
      text.className = "decision-text";
      text.textContent = (positive ? "Fracture suspected" : "No fracture detected") + " ";
      const opSpan = document.createElement("span");
      opSpan.className = "op";
      opSpan.textContent = "(" + opName(k) + ")";
      text.appendChild(opSpan);
      const sub = document.createElement("div");
      sub.className = "decision-sub";
      const thr = res.thresholds ? res.thresholds[k] : undefined;
      sub.textContent = (thr !== undefined ? "threshold " + pct(thr) + " · " : "") + (OP_HELP[k] || "");
      body.appendChild(text); body.appendChild(sub);
      li.appendChild(badge); li.appendChild(body);
      ul.appendChild(li);
    }
  }

  function renderTypes(res) {
    const probs = res.fracture_type_probabilities;
    const card = $("types-card");
    if (!probs || Object.keys(probs).length === 0) { show(card, false); return; }
    const ul = $("types");
    ul.innerHTML = "";
    Object.entries(probs).sort((a, b) => b[1] - a[1]).forEach(([name, p]) => {
      const li = document.createElement("li");
      li.innerHTML = '<span class="tname"></span><span class="tbar"><div></div></span><span class="tval"></span>';
      li.querySelector(".tname").textContent = name;
      li.querySelector(".tbar div").style.width = (100 * p).toFixed(1) + "%";
      li.querySelector(".tval").textContent = (100 * p).toFixed(0) + "%";
      ul.appendChild(li);
    });
    show(card, true);
  }

  function render(res, file) {
    const ex = res.explanation || {};
    $("base-image").src = "data:image/png;base64," + ex.image_png;
    $("heatmap").src = "data:image/png;base64," + ex.heatmap_png;
    $("file-name").textContent = file.name;
    $("probability").textContent = pct(res.probability);
    $("prob-fill").style.width = (100 * res.probability).toFixed(1) + "%";
    const th = res.thresholds || {};
    if (th.high_sensitivity !== undefined) $("tick-sens").style.left = (100 * th.high_sensitivity) + "%";
    if (th.high_specificity !== undefined) $("tick-spec").style.left = (100 * th.high_specificity) + "%";
    $("legend").textContent = "Markers: thresholds of the two operating points (" +
      Object.keys(th).sort().map((k) => opName(k) + " " + pct(th[k])).join(", ") + ")";
    renderDecisions(res);
    renderTypes(res);
    const im = res.image || {};
    $("details").textContent = "Model " + res.model.name + " v" + res.model.version +
      " · image " + im.width + "×" + im.height + " " + String(im.format || "").toUpperCase() +
      " " + im.bit_depth + "-bit · " + Math.round(res.timing_ms.total) + " ms";
    $("model-info").textContent = "Model " + res.model.name + " · version " + res.model.version + " · " + res.model.arch;
    show($("placeholder"), false);
    show($("result"), true);
    show($("viewer"), true);
    show($("busy"), false);
  }

  async function analyse(file) {
    lastFile = file;
    show($("error"), false);
    show($("result"), false);
    show($("viewer"), false);
    show($("placeholder"), true);
    show($("busy"), true);
    const fd = new FormData();
    fd.append("file", file, file.name);
    let r;
    try {
      r = await fetch("/explain", { method: "POST", body: fd, headers: headers() });
    } catch (e) {
      showError("the service did not answer (" + e + ")");
      return;
    }
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (r.status === 401) {
      show($("auth"), true);
      showError("an API key is required; enter it above and try again.");
      return;
    }
    if (!r.ok) {
      let msg = body && (body.error || (Array.isArray(body) && body[0] && body[0].error));
      showError((msg || ("HTTP " + r.status)) + " (HTTP " + r.status + ")");
      return;
    }
    render(body, file);
  }

  function init() {
    const input = $("file-input");
    input.addEventListener("change", () => { if (input.files && input.files[0]) analyse(input.files[0]); });
    const dz = $("dropzone");
    ["dragenter", "dragover"].forEach((ev) => dz.addEventListener(ev, (e) => { e.preventDefault(); dz.classList.add("over"); }));
    ["dragleave", "drop"].forEach((ev) => dz.addEventListener(ev, (e) => { e.preventDefault(); dz.classList.remove("over"); }));
    dz.addEventListener("drop", (e) => { const f = e.dataTransfer.files[0]; if (f) analyse(f); });
    $("heat-toggle").addEventListener("change", (e) => show($("heatmap"), e.target.checked));
    $("heat-opacity").addEventListener("input", (e) => { $("heatmap").style.opacity = e.target.value / 100; });
    $("heatmap").style.opacity = $("heat-opacity").value / 100;
    $("api-key-save").addEventListener("click", () => {
      apiKey = $("api-key").value.trim();
      sessionStorage.setItem("bonefrac-api-key", apiKey);
      show($("auth"), false);
      loadMetadata();
      if (lastFile) analyse(lastFile);
    });
    loadMetadata();
  }
  document.addEventListener("DOMContentLoaded", init);
})();
