"""Packaging: the wheel ships the twistd plugin drop-in and never shadows Twisted."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

from twisted.plugin import IPlugin, getPlugins
from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WheelTests(TestCase):
    def test_wheelContainsPluginButNoTwistedPackage(self) -> None:
        """The wheel has twisted/plugins/mcpgw_plugin.py and no twisted/__init__.py."""
        out = tempfile.mkdtemp()
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, ROOT],
            check=True,
            capture_output=True,
        )
        (wheel,) = [f for f in os.listdir(out) if f.endswith(".whl")]
        self.assertTrue(wheel.startswith("rivano_mcpgw-"), wheel)
        names = zipfile.ZipFile(os.path.join(out, wheel)).namelist()
        self.assertIn("twisted/plugins/mcpgw_plugin.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertIn("mcpgw/proxy/gateway.py", names)
        self.assertIn("mcpgw/py.typed", names)

    def test_pluginIsFound(self) -> None:
        """Twisted's plugin scan finds the mcpgw service maker, pointing at mcpgw.tap."""
        makers = {getattr(p, "tapname", None): p for p in getPlugins(IPlugin)}
        self.assertIn("mcpgw", makers)
        self.assertEqual(makers["mcpgw"].module, "mcpgw.tap")
