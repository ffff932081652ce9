"""Plugins that go wrong, for the discovery tests and ``mlxserve plugins list``."""

from __future__ import annotations

from pathlib import Path


def write_broken_plugin(root: Path) -> Path:
    """An installed distribution whose plugin module fails to import."""
    dist = root / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mlxserve.plugins]\nbroken = broken_plugin_mod\n")
    (root / "broken_plugin_mod.py").write_text(
        "raise ImportError('needs the library frobnicate, which is not installed')\n"
    )
    return root
