// Shared by the explorer and live pages (inlined where a template says COMMON in a comment).
const CLIP = 2;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return node;
}

function fmt(x, d = 2) { return x === null || x === undefined ? "-" : Number(x).toFixed(d); }
// Red for more of the trait, blue for less (a diverging scale, t in [-1, 1]).
function diverging(t) {
  t = Math.max(-1, Math.min(1, t));
  const a = Math.abs(t), hi = t > 0 ? [178, 24, 43] : [33, 102, 172];
  const c = [0, 1, 2].map(k => Math.round(247 + (hi[k] - 247) * a));
  return "rgb(" + c.join(",") + ")";
}
// The colour scale of report/monitor_view.py: +1 = the extraction's pos mean, -1 = its neg mean
// when the poles differ, else a z-score over the scores given.
function scale(resp, poles) {
  if (poles && Math.abs(poles.pos - poles.neg) > 1e-6) {
    const mid = (poles.pos + poles.neg) / 2, half = (poles.pos - poles.neg) / 2;
    return s => (s - mid) / half;
  }
  const n = resp.scores.length || 1, mu = resp.scores.reduce((a, b) => a + b, 0) / n;
  const sd = Math.sqrt(resp.scores.reduce((a, b) => a + (b - mu) ** 2, 0) / n) || 1;
  return s => (s - mu) / sd;
}
// A drawn tooltip showing the title of the element with a data-score under the mouse.
function tooltips() {
  const tip = document.getElementById("tip");
  document.addEventListener("mouseover", e => {
    const t = e.target.closest ? e.target.closest("[data-score]") : null;
    if (!t) { tip.style.display = "none"; return; }
    tip.textContent = t.getAttribute("title");
    tip.style.display = "block";
  });
  document.addEventListener("mousemove", e => { tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px"; });
}
