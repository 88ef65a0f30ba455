"""Build the offline DVC plots template (.dvc/plots/offline.html) from the npm packages of vega.

DVC's ``dvc plots show`` page loads vega, vega-lite and vega-embed from a CDN, so it is blank
without a network. This script inlines the three libraries' browser builds into an HTML template
(DVC's own page layout; the ``{plot_divs}`` and ``{refresh_tag}`` placeholders, no ``{scripts}``
so DVC adds no CDN tags) and copies their BSD-3-Clause licences to third_party/vega/.

Run it only to change a version (the output is committed)::

    cd /tmp && npm pack vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0
    python scripts/vendor_vega.py /tmp

The tarballs must match the SHA-256 sums below (the versions DVC's templates are written for:
vega 5, vega-lite 5, vega-embed 6).
"""

from __future__ import annotations

import hashlib
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / ".dvc" / "plots" / "offline.html"
LICENCES = ROOT / "third_party" / "vega"

#: package → (version, SHA-256 of the npm tarball, browser build inside it)
PACKAGES = {
    "vega": ("5.33.1", "1b8504b6731c5311be3269c4d84ca996a5cc293bc772283293ede20c490e16c3", "build/vega.min.js"),
    "vega-lite": (
        "5.23.0",
        "e4cbfdd8f6f1abe381c59cd558fd6a559c12b1496bfdf2e0c3295263a40fe4da",
        "build/vega-lite.min.js",
    ),
    "vega-embed": (
        "6.29.0",
        "ecf1ee709c2bac9e0a4ead6908114b05b62c71493e10a8a4308109bb070f8eb1",
        "build/vega-embed.min.js",
    ),
}

HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
  {refresh_tag}
  <meta charset="utf-8">
  <title>bonefrac · DVC plots</title>
  <link rel="icon" href="data:,">
  <!-- bonefrac's offline DVC plots template (.dvc/config: plots.html_template), written by
       scripts/vendor_vega.py: DVC's page with vega, vega-lite and vega-embed inlined (their
       licences: third_party/vega/) instead of loaded from a CDN. DVC's scripts placeholder is
       left out on purpose, so DVC adds no CDN script tags. -->
  <style>
    body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; color: #1d2733;
      background: #fff; margin: 0; padding: 12px 20px; }
    table { border-spacing: 15px; }
  </style>
"""

TAIL = """</head>
<body>
  {plot_divs}
</body>
</html>
"""


def _read(tar_path: Path, version: str, sha256: str, member: str) -> tuple[str, bytes]:
    data = tar_path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise SystemExit(f"{tar_path.name}: SHA-256 {got} is not the pinned {sha256}")
    with tarfile.open(tar_path) as tar:
        js = tar.extractfile(f"package/{member}").read().decode("utf-8")  # type: ignore[union-attr]
        try:
            licence = tar.extractfile("package/LICENSE").read()  # type: ignore[union-attr]
        except KeyError:  # vega's tarball has none: its package.json says BSD-3-Clause, same text
            licence = b""
    return js, licence


def build(tarballs: Path) -> Path:
    parts = [HEAD]
    fallback = b""
    licences: dict[str, bytes] = {}
    for name, (version, sha256, member) in PACKAGES.items():
        js, licence = _read(tarballs / f"{name}-{version}.tgz", version, sha256, member)
        for bad in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
            if bad in js:
                raise SystemExit(f"{name} {version}: its build contains {bad!r}; cannot inline it")
        digest = hashlib.sha256(js.encode()).hexdigest()
        parts.append(f"  <!-- {name} {version} ({member}, sha256 {digest}), BSD-3-Clause -->\n")
        parts.append(f"  <script>{js}</script>\n")
        licences[name] = licence
        fallback = fallback or licence
    parts.append(TAIL)
    TEMPLATE.write_text("".join(parts), encoding="utf-8")
    LICENCES.mkdir(parents=True, exist_ok=True)
    for name, licence in licences.items():
        if not licence:
            licence = b"(The npm tarball of vega ships no LICENSE file; its package.json declares\n"
            licence += b"BSD-3-Clause, University of Washington Interactive Data Lab. The text, as in\n"
            licence += b"vega-lite and vega-embed:)\n\n" + fallback
        (LICENCES / f"LICENSE-{name}").write_bytes(licence)
    return TEMPLATE


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
