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
  // Window/level acts on the image's stored values (12–16-bit DICOM, 8/16-bit PNG), sent at full
  // resolution by /explain. The service lists presets in stored units: the DICOM's own VOI
  // window(s) first, then "Auto" (0.5–99.5 percentiles), then the full range; these are added,
  // relative to the Auto window (fractions of its width, measured from its lower end):
  const RELATIVE_PRESETS = [
    { name: "Bone", at: 0.645, width: 0.547 },
    { name: "Soft", at: 0.332, width: 0.586 },
    { name: "Contrast", at: 0.5, width: 0.39 },
  ];
  let PRESETS = [];
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
    codes: null,              // Uint8Array | Uint16Array (w*h): stored value = vOff + vScale * code
    vOff: 0, vScale: 1,       // code → stored units
    range: [0, 255],          // nominal value range (stored units)
    wlUnit: 1,                // stored units per screen pixel of a W/L drag
    reduction: 1,             // 1: native pixels; r: one pixel per r×r block of the original
    baseCanvas: null,         // W/L-applied image, image resolution
    heatCanvas: null,         // heatmap RGBA, image resolution
    contours: [],             // line segments [x1, y1, x2, y2] in image pixels
    scale: 1, tx: 0, ty: 0,   // image → canvas CSS px: x' = scale * x + tx
    fitScale: 1,
    win: 256, lev: 128, invert: false,
    defaultWindow: null,
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
      // Which check fired: the image statistics, the model's own features (embedding), or both.
      const names = {image: "image statistics", embedding: "the model's internal features"};
      const fired = Array.isArray(o.fired) && o.fired.length ? o.fired : (o.group ? [o.group] : []);
      box.textContent = "Unusual image for this model" +
        (fired.length ? " (" + fired.map((g) => names[g] || g).join(" and ") + ")" : "") + ": " +
        (o.reason || "it differs from the training images") +
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

  // /explain's "pixels": row-differenced integer codes, zlib'd, base64 (see bonefrac.explain.display).
  async function decodePixels(px) {
    const packed = await (await fetch("data:application/octet-stream;base64," + px.data)).blob();
    const buf = await new Response(packed.stream().pipeThrough(new DecompressionStream("deflate"))).arrayBuffer();
    const n = px.width * px.height;
    let codes;
    if (px.dtype === "uint8") {
      codes = new Uint8Array(buf, 0, n);
    } else if (new Uint8Array(new Uint16Array([1]).buffer)[0] === 1) {
      codes = new Uint16Array(buf, 0, n); // little-endian machine: the wire order
    } else {
      const dv = new DataView(buf);
      codes = new Uint16Array(n);
      for (let i = 0; i < n; i++) codes[i] = dv.getUint16(2 * i, true);
    }
    if (buf.byteLength < n * codes.BYTES_PER_ELEMENT) throw new Error("pixel data too short");
    for (let y = 0, i = 0; y < px.height; y++) { // running sum along each row (wraps like the encoder)
      i = y * px.width + 1;
      for (let x = 1; x < px.width; x++, i++) codes[i] = codes[i] + codes[i - 1];
    }
    return codes;
  }

  function buildPresets(windows) {
    const auto = windows.find((w) => w.source === "percentiles") || windows[0];
    const lo = auto.center - auto.width / 2;
    const list = windows.map((w) => ({ name: w.name, w: w.width, l: w.center, source: w.source }));
    for (const r of RELATIVE_PRESETS) list.push({ name: r.name, w: r.width * auto.width, l: lo + r.at * auto.width, source: "relative" });
    PRESETS = list.slice(0, 9).map((p, i) => ({ ...p, key: String(i + 1) }));
    const pbox = $("wl-presets");
    pbox.innerHTML = "";
    for (const p of PRESETS) {
      const b = document.createElement("button");
      b.type = "button"; b.className = "ghost"; b.dataset.key = p.key; b.dataset.source = p.source;
      b.textContent = p.name + " ";
      const kb = document.createElement("kbd"); kb.textContent = p.key; b.appendChild(kb);
      b.title = "window " + fmtUnits(p.w) + ", level " + fmtUnits(p.l);
      b.addEventListener("click", () => usePreset(p));
      pbox.appendChild(b);
    }
    view.wlUnit = Math.max(auto.width / 256, 1e-6);
    view.defaultWindow = PRESETS[0];
  }

  function fmtUnits(v) { return Math.abs(v) >= 100 ? String(Math.round(v)) : v.toFixed(1); }

  async function loadImages(ex, im) {
    view.loaded = false;
    const [okBase, okHeat] = await Promise.all([loadImg($("base-image"), ex.image_png), loadImg($("heatmap"), ex.heatmap_png)]);
    const px = ex.pixels;
    let codes = null;
    if (px && px.data) {
      try { codes = await decodePixels(px); } catch (e) { codes = null; }
    }
    if (codes) {
      view.w = px.width; view.h = px.height;
      view.codes = codes; view.vOff = px.offset; view.vScale = px.scale;
      view.range = px.value_range; view.reduction = px.reduction || 1;
      buildPresets(px.windows);
    } else if (okBase) { // no full-resolution values (a volume's slice): the 8-bit display copy
      const img = $("base-image");
      view.w = img.naturalWidth; view.h = img.naturalHeight;
      const c = document.createElement("canvas");
      c.width = view.w; c.height = view.h;
      const cx = c.getContext("2d");
      cx.drawImage(img, 0, 0);
      const data = cx.getImageData(0, 0, view.w, view.h).data;
      view.codes = new Uint8Array(view.w * view.h);
      for (let i = 0, j = 0; i < view.codes.length; i++, j += 4) view.codes[i] = data[j];
      view.vOff = 0; view.vScale = 1; view.range = [0, 255]; view.reduction = 0;
      buildPresets([{ name: "Display", center: 128, width: 256, source: "display" }]);
    } else {
      $("view-status").textContent = "image not available"; return;
    }
    const c = document.createElement("canvas");
    c.width = view.w; c.height = view.h;
    view.baseCanvas = c;
    view.heatCanvas = null;
    view.contours = [];
    if (okHeat) {
      const h = $("heatmap");
      const hc = document.createElement("canvas"); // the heatmap at its own (capped) size, stretched when drawn
      hc.width = h.naturalWidth; hc.height = h.naturalHeight;
      hc.getContext("2d").drawImage(h, 0, 0);
      view.heatCanvas = hc;
    }
    if (Array.isArray(ex.heatmap) && ex.heatmap.length) view.contours = contourSegments(ex.heatmap, view.w, view.h, CONTOUR_LEVEL);
    const note = $("res-note");
    const bits = im && im.bit_depth ? im.bit_depth + "-bit values" : "stored values";
    if (view.reduction === 1) {
      note.textContent = "Shown at full resolution (" + view.w + "×" + view.h + ", " + bits + "; window/level in stored units).";
    } else if (view.reduction > 1) {
      note.textContent = "Shown at 1/" + view.reduction + " resolution (" + view.w + "×" + view.h + "; original " +
        im.width + "×" + im.height + ", over the viewer's pixel budget), " + bits + ".";
    } else {
      note.textContent = "Shown at " + view.w + "×" + view.h + " from an 8-bit display copy (original " + im.width + "×" + im.height + ").";
    }
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

  // Linear window on stored values: gray = 255 · (v − (L − W/2)) / W, clipped; one LUT entry per code.
  function applyWindow() {
    if (!view.codes) return;
    const cx = view.baseCanvas.getContext("2d");
    const out = cx.createImageData(view.w, view.h);
    const nCodes = view.codes instanceof Uint8Array ? 256 : 65536;
    const lut = new Uint8ClampedArray(nCodes);
    const lo = view.lev - view.win / 2, win = Math.max(view.win, 1e-9);
    for (let u = 0; u < nCodes; u++) {
      const g = Math.round(((view.vOff + view.vScale * u - lo) / win) * 255);
      const c = g < 0 ? 0 : g > 255 ? 255 : g;
      lut[u] = view.invert ? 255 - c : c;
    }
    const d32 = new Uint32Array(out.data.buffer), codes = view.codes;
    for (let i = 0; i < codes.length; i++) {
      const g = lut[codes[i]];
      d32[i] = 0xff000000 | (g << 16) | (g << 8) | g; // RGBA bytes on a little-endian machine
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
      cx.imageSmoothingEnabled = true; // the heatmap is coarse: always smooth
      cx.drawImage(view.heatCanvas, 0, 0, view.w, view.h);
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
      " · W " + fmtUnits(view.win) + " L " + fmtUnits(view.lev) + (view.invert ? " · inverted" : "") +
      " · " + view.w + "×" + view.h + " px";
    const st = $("stage");
    st.dataset.scale = view.scale.toFixed(4);
    st.dataset.window = String(Math.round(view.win));
    st.dataset.level = String(Math.round(view.lev));
    st.dataset.pixels = view.w + "x" + view.h;
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
    view.win = view.defaultWindow.w; view.lev = view.defaultWindow.l; view.invert = false;
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
    const span = Math.max(view.range[1] - view.range[0], view.wlUnit);
    view.win = Math.max(view.wlUnit, Math.min(2 * span, win));
    view.lev = Math.max(view.range[0] - span, Math.min(view.range[1] + span, lev));
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
      if (drag.wl) { markPreset(null); setWindow(drag.win + dx * view.wlUnit, drag.lev - dy * view.wlUnit); } else {
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
  window.bonefracViewer = {
    view, applyMetadata, redraw: draw, contourSegments, zoomAt,
    setWindow: (win, lev) => { markPreset(null); setWindow(win, lev); },
  };
  document.addEventListener("DOMContentLoaded", init);
})();
