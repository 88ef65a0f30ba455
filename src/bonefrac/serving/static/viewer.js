// bonefrac viewer: upload an image, read it (zoom, pan, window/level), see the Grad-CAM heatmap and
// the outline of the model's evidence, the calibrated probability, the decision at both operating
// points and what is known about the model. Plain JS, no external libraries (works offline).
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
  // Window/level presets on the 0–255 display values the service sends (it has already mapped
  // the stored values to 8 bits with a 0.5–99.5 percentile window).
  const PRESETS = [
    { key: "1", name: "Full", w: 256, l: 128 },
    { key: "2", name: "Bone", w: 140, l: 165 },
    { key: "3", name: "Soft", w: 150, l: 85 },
    { key: "4", name: "Contrast", w: 100, l: 128 },
  ];
  const TYPE_F1_MIN = 0.5;
  const CONTOUR_LEVEL = 0.5; // fraction of the heatmap's maximum
  let apiKey = sessionStorage.getItem("bonefrac-api-key") || "";
  let lastFile = null;
  let metadata = null;
  let lastResult = null;

  // ------------------------------------------------------------------ viewer state
  const view = {
    loaded: false,
    w: 0, h: 0,               // display image size (pixels the service sent)
    gray: null,               // Uint8ClampedArray of the gray values (w*h)
    baseCanvas: null,         // W/L-applied image, image resolution
    heatCanvas: null,         // heatmap RGBA, image resolution
    contours: [],             // line segments [x1, y1, x2, y2] in image pixels
    scale: 1, tx: 0, ty: 0,   // image → canvas CSS px: x' = scale * x + tx
    fitScale: 1,
    win: 256, lev: 128, invert: false,
    heat: true, contour: true, opacity: 0.6,
  };

  function headers() {
    return apiKey ? { Authorization: "Bearer " + apiKey } : {};
  }
  function show(el, on) { el.classList.toggle("hidden", !on); }
  function pct(p, d) { return (100 * p).toFixed(d === undefined ? 1 : d) + " %"; }
  function opName(k) { return OP_LABELS[k] || k.replace(/_/g, "-"); }
  function isNum(x) { return typeof x === "number" && isFinite(x); }
  function announce(text) {
    const el = $("announce");
    el.textContent = "";
    // A fresh text node after a tick makes screen readers read it even when it repeats.
    setTimeout(() => { el.textContent = text; }, 30);
  }

  function showError(message) {
    const box = $("error");
    box.innerHTML = "";
    const strong = document.createElement("strong");
    strong.textContent = "Could not analyse this file: ";
    box.appendChild(strong);
    box.appendChild(document.createTextNode(message));
    show(box, true);
    show($("busy"), false);
    announce("Could not analyse this file: " + message);
  }

  // ------------------------------------------------------------------ model facts
  function modelLabel(m) {
    const name = m && m.name && m.name !== "model" ? m.name : "unnamed model";
    const parts = [name];
    if (m && m.version) parts.push("version " + m.version);
    if (m && m.arch) parts.push(m.arch);
    return parts.join(" · ");
  }

  function typeF1(meta) {
    const v = meta && meta.metrics ? meta.metrics.type_macro_f1 : undefined;
    return isNum(v) ? v : null;
  }

  function applyMetadata(m) {
    metadata = m;
    const model = m.model || {};
    $("model-info").textContent = modelLabel(model);
    if (m.input && m.input.formats) {
      $("accepted-formats").textContent = m.input.formats.map((f) => f.toUpperCase()).join(", ") +
        " · up to " + m.input.max_upload_mb + " MB";
    }
    renderTrust(m);
    if (lastResult) renderTypes(lastResult);
  }

  function ciText(met, key) {
    const v = met[key], lo = met[key + "_ci_low"], hi = met[key + "_ci_high"];
    if (!isNum(v)) return "not reported";
    return pct(v) + (isNum(lo) && isNum(hi) ? " (" + pct(lo, 0) + "–" + pct(hi, 0) + ")" : "");
  }

  function renderTrust(m) {
    const model = m.model || {};
    const met = m.metrics || {};
    const facts = [modelLabel(model)];
    if (model.trained_at) facts.push("trained " + String(model.trained_at).slice(0, 10));
    facts.push("training data " + (model.data_version ? "version " + String(model.data_version).slice(0, 12) : "version not recorded"));
    if (model.git_commit) facts.push("code " + String(model.git_commit).slice(0, 10));
    $("trust-model").textContent = facts.join(" · ");

    const ops = Object.keys(m.operating_points || {}).sort();
    const body = $("perf-body");
    body.innerHTML = "";
    let any = false;
    for (const op of ops) {
      const tr = document.createElement("tr");
      tr.dataset.op = op;
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = opName(op);
      tr.appendChild(th);
      for (const k of ["sensitivity", "specificity"]) {
        const td = document.createElement("td");
        td.textContent = ciText(met, op + "." + k);
        if (isNum(met[op + "." + k])) any = true;
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
    const n = met.n_test;
    $("perf-caption").textContent = "Test-set performance" + (isNum(n) ? " (n = " + n + (isNum(met.prevalence) ? ", " + pct(met.prevalence, 0) + " fractured" : "") + ")" : "") + ", 95 % CI";
    show($("perf"), any);
    const extra = [];
    if (isNum(met.auroc)) {
      extra.push("AUROC " + met.auroc.toFixed(3) + (isNum(met.auroc_ci_low) ? " (" + met.auroc_ci_low.toFixed(2) + "–" + met.auroc_ci_high.toFixed(2) + ")" : ""));
    }
    if (isNum(met.ece)) extra.push("calibration error (ECE) " + met.ece.toFixed(3));
    const f1 = typeF1(m);
    extra.push("fracture types: " + (f1 === null ? "no test macro-F1 recorded" : "macro-F1 " + f1.toFixed(2)));
    if (!any) extra.push("operating-point performance not recorded with this model: interpret decisions with care");
    $("trust-extra").textContent = extra.join(" · ");
  }

  async function loadMetadata() {
    try {
      const r = await fetch("/metadata", { headers: headers() });
      if (r.status === 401) { show($("auth"), true); $("model-info").textContent = "API key required"; return; }
      applyMetadata(await r.json());
    } catch (e) {
      $("model-info").textContent = "model information unavailable";
    }
  }

  // ------------------------------------------------------------------ results
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
    // Type scores are only shown openly when the model's test macro-F1 is known and at least 0.5.
    const f1 = typeF1(metadata);
    const unreliable = f1 === null || f1 < TYPE_F1_MIN;
    const cav = $("types-caveat");
    cav.textContent = unreliable
      ? "Types unreliable: " + (f1 === null ? "macro-F1 not reported" : "macro-F1 " + f1.toFixed(2)) +
        " on the test set (below " + TYPE_F1_MIN.toFixed(1) + "). Do not use them to classify the fracture."
      : "";
    show(cav, unreliable);
    card.classList.toggle("unreliable", unreliable);
    $("types-box").open = !unreliable;
    $("types-summary").textContent = unreliable ? "show the scores anyway" : "type scores";
    show(card, true);
  }

  function renderOOD(res) {
    // A per-image "unlike the training data" signal, when the service provides one.
    const o = res.ood || res.out_of_distribution;
    const box = $("ood");
    if (o && (o.flag === true || o.warning === true || o.in_distribution === false)) {
      box.textContent = "Unusual image for this model: " + (o.reason || "it differs from the training images") +
        (isNum(o.score) ? " (score " + o.score.toFixed(2) + (isNum(o.threshold) ? ", threshold " + o.threshold.toFixed(2) : "") + ")" : "") +
        ". The prediction may be unreliable.";
      show(box, true);
      return "Warning: unusual image for this model. ";
    }
    show(box, false);
    return "";
  }

  function render(res, file) {
    lastResult = res;
    const ex = res.explanation || {};
    $("file-name").textContent = file.name;
    // The model's own fracture map (dense archs: per-cell probability, trained on expert boxes) or Grad-CAM.
    $("map-method").textContent = ex.method === "evidence_map"
      ? "the model's own fracture map (per-region probability, learnt from radiologists' boxes; the score is pooled from it)"
      : "image regions that drove the fracture score (Grad-CAM)";
    $("probability").textContent = pct(res.probability);
    $("prob-fill").style.width = (100 * res.probability).toFixed(1) + "%";
    const th = res.thresholds || {};
    if (th.high_sensitivity !== undefined) $("tick-sens").style.left = (100 * th.high_sensitivity) + "%";
    if (th.high_specificity !== undefined) $("tick-spec").style.left = (100 * th.high_specificity) + "%";
    $("legend").textContent = "Markers: thresholds of the two operating points (" +
      Object.keys(th).sort().map((k) => opName(k) + " " + pct(th[k])).join(", ") + ")";
    renderDecisions(res);
    renderTypes(res);
    const oodText = renderOOD(res);
    const im = res.image || {};
    $("details").textContent = "Model " + modelLabel(res.model) +
      " · image " + im.width + "×" + im.height + " " + String(im.format || "").toUpperCase() +
      " " + im.bit_depth + "-bit · " + Math.round(res.timing_ms.total) + " ms";
    $("model-info").textContent = modelLabel(res.model);
    show($("placeholder"), false);
    show($("result"), true);
    show($("viewer"), true);
    show($("busy"), false);
    loadImages(ex, im).then(() => {
      const dec = Object.keys(res.decisions).sort().map((k) =>
        opName(k) + ": " + (res.decisions[k] ? "fracture suspected" : "no fracture detected")).join("; ");
      announce(oodText + "Analysis of " + file.name + " complete. Fracture probability " + pct(res.probability) + ". " + dec + ".");
    });
  }

  // ------------------------------------------------------------------ image reading
  function loadImg(img, b64) {
    return new Promise((resolve) => {
      if (!b64) { img.removeAttribute("src"); resolve(false); return; }
      img.onload = () => resolve(true);
      img.onerror = () => resolve(false);
      img.src = "data:image/png;base64," + b64;
    });
  }

  async function loadImages(ex, im) {
    view.loaded = false;
    const [okBase, okHeat] = await Promise.all([loadImg($("base-image"), ex.image_png), loadImg($("heatmap"), ex.heatmap_png)]);
    if (!okBase) { $("view-status").textContent = "image not available"; return; }
    const img = $("base-image");
    view.w = img.naturalWidth; view.h = img.naturalHeight;
    const c = document.createElement("canvas");
    c.width = view.w; c.height = view.h;
    const cx = c.getContext("2d");
    cx.drawImage(img, 0, 0);
    const data = cx.getImageData(0, 0, view.w, view.h).data;
    view.gray = new Uint8ClampedArray(view.w * view.h);
    for (let i = 0, j = 0; i < view.gray.length; i++, j += 4) view.gray[i] = data[j];
    view.baseCanvas = c;
    view.heatCanvas = null;
    view.contours = [];
    if (okHeat) {
      const hc = document.createElement("canvas");
      hc.width = view.w; hc.height = view.h;
      hc.getContext("2d").drawImage($("heatmap"), 0, 0, view.w, view.h);
      view.heatCanvas = hc;
    }
    if (Array.isArray(ex.heatmap) && ex.heatmap.length) view.contours = contourSegments(ex.heatmap, view.w, view.h, CONTOUR_LEVEL);
    const note = $("res-note");
    const full = im && im.width && im.height && (im.width !== view.w || im.height !== view.h);
    note.textContent = full
      ? "Shown at " + view.w + "×" + view.h + ": the service sends a copy with its longest side capped (original " + im.width + "×" + im.height + ")."
      : "Shown at full resolution (" + view.w + "×" + view.h + ").";
    view.loaded = true;
    resetView();
  }

  // Marching squares on the coarse CAM grid (cell centres), linear interpolation along edges.
  function contourSegments(grid, W, H, level) {
    const gh = grid.length, gw = grid[0].length;
    let mx = 0;
    for (const row of grid) for (const v of row) if (v > mx) mx = v;
    if (mx <= 0) return [];
    const t = level * mx;
    // Pad with a zero border so outlines close at the image edge.
    const g = (y, x) => (y < 0 || x < 0 || y >= gh || x >= gw ? 0 : grid[y][x]);
    const sx = W / gw, sy = H / gh;
    const px = (x) => Math.min(W, Math.max(0, (x + 0.5) * sx));
    const py = (y) => Math.min(H, Math.max(0, (y + 0.5) * sy));
    const segs = [];
    const lerp = (a, b) => (a === b ? 0.5 : (t - a) / (b - a));
    for (let y = -1; y < gh; y++) {
      for (let x = -1; x < gw; x++) {
        const a = g(y, x), b = g(y, x + 1), c = g(y + 1, x + 1), d = g(y + 1, x);
        const idx = (a >= t ? 8 : 0) | (b >= t ? 4 : 0) | (c >= t ? 2 : 0) | (d >= t ? 1 : 0);
        if (idx === 0 || idx === 15) continue;
        const top = [px(x + lerp(a, b)), py(y)];
        const right = [px(x + 1), py(y + lerp(b, c))];
        const bottom = [px(x + lerp(d, c)), py(y + 1)];
        const left = [px(x), py(y + lerp(a, d))];
        const pairs = {
          1: [[left, bottom]], 2: [[bottom, right]], 3: [[left, right]], 4: [[top, right]],
          5: [[left, top], [bottom, right]], 6: [[top, bottom]], 7: [[left, top]], 8: [[left, top]],
          9: [[top, bottom]], 10: [[left, bottom], [top, right]], 11: [[top, right]], 12: [[left, right]],
          13: [[bottom, right]], 14: [[left, bottom]],
        }[idx];
        for (const [p, q] of pairs) segs.push([p[0], p[1], q[0], q[1]]);
      }
    }
    return segs;
  }

  function applyWindow() {
    if (!view.gray) return;
    const cx = view.baseCanvas.getContext("2d");
    const out = cx.createImageData(view.w, view.h);
    const lut = new Uint8ClampedArray(256);
    const lo = view.lev - view.win / 2;
    for (let v = 0; v < 256; v++) {
      let g = ((v - lo) / Math.max(1, view.win)) * 255;
      g = Math.max(0, Math.min(255, g));
      lut[v] = view.invert ? 255 - g : g;
    }
    const d = out.data, gray = view.gray;
    for (let i = 0, j = 0; i < gray.length; i++, j += 4) {
      const g = lut[gray[i]];
      d[j] = g; d[j + 1] = g; d[j + 2] = g; d[j + 3] = 255;
    }
    cx.putImageData(out, 0, 0);
  }

  function canvasSize() {
    const cv = $("view-canvas");
    const r = $("stage").getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(r.width)), h = Math.max(1, Math.round(r.height));
    if (cv.width !== Math.round(w * dpr) || cv.height !== Math.round(h * dpr)) {
      cv.width = Math.round(w * dpr); cv.height = Math.round(h * dpr);
    }
    return { w, h, dpr };
  }

  function draw() {
    const cv = $("view-canvas");
    const { w, h, dpr } = canvasSize();
    const cx = cv.getContext("2d");
    cx.setTransform(1, 0, 0, 1, 0, 0);
    cx.fillStyle = "#000";
    cx.fillRect(0, 0, cv.width, cv.height);
    if (!view.loaded) return;
    cx.setTransform(dpr * view.scale, 0, 0, dpr * view.scale, dpr * view.tx, dpr * view.ty);
    cx.imageSmoothingEnabled = view.scale < 2; // past 2×, show the pixels as they are
    cx.drawImage(view.baseCanvas, 0, 0);
    if (view.heat && view.heatCanvas) {
      cx.globalAlpha = view.opacity;
      cx.drawImage(view.heatCanvas, 0, 0);
      cx.globalAlpha = 1;
    }
    if (view.contour && view.contours.length) {
      cx.setTransform(dpr, 0, 0, dpr, 0, 0); // lines in screen pixels: crisp at any zoom
      cx.beginPath();
      for (const [x1, y1, x2, y2] of view.contours) {
        cx.moveTo(view.scale * x1 + view.tx, view.scale * y1 + view.ty);
        cx.lineTo(view.scale * x2 + view.tx, view.scale * y2 + view.ty);
      }
      cx.lineCap = "round";
      cx.strokeStyle = "rgba(0,0,0,0.85)"; cx.lineWidth = 4; cx.stroke();
      cx.strokeStyle = "#39e6ff"; cx.lineWidth = 2; cx.stroke();
    }
    $("view-status").textContent = "Zoom " + Math.round(100 * view.scale) + " %" +
      (view.scale >= 1 ? " (" + view.scale.toFixed(1) + " screen px per image px)" : "") +
      " · W " + Math.round(view.win) + " L " + Math.round(view.lev) + (view.invert ? " · inverted" : "") +
      " · " + view.w + "×" + view.h + " px";
    const st = $("stage");
    st.dataset.scale = view.scale.toFixed(4);
    st.dataset.window = String(Math.round(view.win));
    st.dataset.level = String(Math.round(view.lev));
  }

  let pending = false;
  function redraw() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; draw(); });
  }

  function resetView() {
    const { w, h } = canvasSize();
    view.fitScale = Math.min(w / view.w, h / view.h) || 1;
    view.scale = view.fitScale;
    view.tx = (w - view.w * view.scale) / 2;
    view.ty = (h - view.h * view.scale) / 2;
    view.win = 256; view.lev = 128; view.invert = false;
    $("invert-toggle").checked = false;
    markPreset(PRESETS[0]);
    applyWindow();
    draw();
  }

  function zoomAt(factor, cx, cy) {
    const s = Math.min(40, Math.max(view.fitScale / 4, view.scale * factor));
    const f = s / view.scale;
    view.tx = cx - f * (cx - view.tx);
    view.ty = cy - f * (cy - view.ty);
    view.scale = s;
    redraw();
  }
  function zoomCentre(factor) {
    const { w, h } = canvasSize();
    zoomAt(factor, w / 2, h / 2);
  }

  function setWindow(win, lev) {
    view.win = Math.max(1, Math.min(512, win));
    view.lev = Math.max(-128, Math.min(383, lev));
    applyWindow();
    redraw();
  }
  function markPreset(p) {
    for (const b of $("wl-presets").querySelectorAll("button")) b.setAttribute("aria-pressed", String(b.dataset.key === (p && p.key)));
  }
  function usePreset(p) { markPreset(p); setWindow(p.w, p.l); }

  function bindStage() {
    const st = $("stage");
    st.addEventListener("wheel", (e) => {
      if (!view.loaded) return;
      e.preventDefault();
      const r = st.getBoundingClientRect();
      zoomAt(Math.exp(-e.deltaY * 0.0015), e.clientX - r.left, e.clientY - r.top);
    }, { passive: false });
    st.addEventListener("contextmenu", (e) => e.preventDefault());
    let drag = null;
    st.addEventListener("pointerdown", (e) => {
      if (!view.loaded) return;
      const wl = e.button === 2 || e.shiftKey;
      drag = { wl, x: e.clientX, y: e.clientY, tx: view.tx, ty: view.ty, win: view.win, lev: view.lev };
      st.setPointerCapture(e.pointerId);
      st.classList.add(wl ? "wl" : "panning");
    });
    st.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (drag.wl) { markPreset(null); setWindow(drag.win + dx, drag.lev - dy); } else {
        view.tx = drag.tx + dx; view.ty = drag.ty + dy; redraw();
      }
    });
    const end = () => { drag = null; st.classList.remove("wl", "panning"); };
    st.addEventListener("pointerup", end);
    st.addEventListener("pointercancel", end);
    st.addEventListener("dblclick", () => { if (view.loaded) resetView(); });
    window.addEventListener("resize", () => { if (view.loaded) redraw(); });
  }

  function setHeat(on) { view.heat = on; $("heat-toggle").checked = on; $("stage").dataset.heat = String(on); redraw(); }
  function setContour(on) { view.contour = on; $("contour-toggle").checked = on; redraw(); }
  function setInvert(on) { view.invert = on; $("invert-toggle").checked = on; applyWindow(); redraw(); }

  function onKey(e) {
    const t = e.target;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (t && (t.tagName === "INPUT" && t.type !== "checkbox" && t.type !== "range" && t.type !== "file" || t.tagName === "TEXTAREA")) return;
    if (!view.loaded) return;
    const k = e.key;
    const preset = PRESETS.find((p) => p.key === k);
    if (k === "+" || k === "=") zoomCentre(1.25);
    else if (k === "-" || k === "_") zoomCentre(0.8);
    else if (k === "0") resetView();
    else if (k === "h" || k === "H") setHeat(!view.heat);
    else if (k === "c" || k === "C") setContour(!view.contour);
    else if (k === "i" || k === "I") setInvert(!view.invert);
    else if (preset) usePreset(preset);
    else if (k.startsWith("Arrow") && t === $("stage")) {
      const step = 40;
      if (k === "ArrowLeft") view.tx += step; else if (k === "ArrowRight") view.tx -= step;
      else if (k === "ArrowUp") view.ty += step; else view.ty -= step;
      redraw();
    } else return;
    e.preventDefault();
  }

  // ------------------------------------------------------------------ upload
  async function analyse(file) {
    lastFile = file;
    show($("error"), false);
    show($("ood"), false);
    show($("result"), false);
    show($("viewer"), false);
    show($("placeholder"), true);
    show($("busy"), true);
    announce("Analysing " + file.name + "…");
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
    dz.addEventListener("click", (e) => { if (e.target === dz || e.target.classList.contains("dz-hint")) input.click(); });
    ["dragenter", "dragover"].forEach((ev) => dz.addEventListener(ev, (e) => { e.preventDefault(); dz.classList.add("over"); }));
    ["dragleave", "drop"].forEach((ev) => dz.addEventListener(ev, (e) => { e.preventDefault(); dz.classList.remove("over"); }));
    dz.addEventListener("drop", (e) => { const f = e.dataTransfer.files[0]; if (f) analyse(f); });
    $("heat-toggle").addEventListener("change", (e) => setHeat(e.target.checked));
    $("contour-toggle").addEventListener("change", (e) => setContour(e.target.checked));
    $("invert-toggle").addEventListener("change", (e) => setInvert(e.target.checked));
    $("heat-opacity").addEventListener("input", (e) => { view.opacity = e.target.value / 100; $("stage").dataset.opacity = String(view.opacity); redraw(); });
    view.opacity = $("heat-opacity").value / 100;
    const pbox = $("wl-presets");
    for (const p of PRESETS) {
      const b = document.createElement("button");
      b.type = "button"; b.className = "ghost"; b.dataset.key = p.key;
      b.textContent = p.name + " ";
      const kb = document.createElement("kbd"); kb.textContent = p.key; b.appendChild(kb);
      b.title = "window " + p.w + ", level " + p.l;
      b.addEventListener("click", () => usePreset(p));
      pbox.appendChild(b);
    }
    $("reset-view").addEventListener("click", () => { if (view.loaded) resetView(); });
    bindStage();
    document.addEventListener("keydown", onKey);
    $("api-key-save").addEventListener("click", () => {
      apiKey = $("api-key").value.trim();
      sessionStorage.setItem("bonefrac-api-key", apiKey);
      show($("auth"), false);
      loadMetadata();
      if (lastFile) analyse(lastFile);
    });
    loadMetadata();
  }
  // For tests and embedding: read-only access to what is drawn, and the metadata hook.
  window.bonefracViewer = { view, applyMetadata, redraw: draw, contourSegments };
  document.addEventListener("DOMContentLoaded", init);
})();
