"""
The offline wheelhouse (C{make wheelhouse}): every wheel mcpgw needs, installable into a fresh
venv with C{pip install --no-index --find-links} and no network.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

from twisted.trial.unittest import TestCase

import mcpgw
from tests.packagingsupport import ROOT, BuildError, offlineEnv, wheelhouse


class WheelhouseTests(TestCase):
    def setUp(self) -> None:
        try:
            self.built = wheelhouse()
        except BuildError as e:
            self.fail(str(e))
        self.dir = self.built.path

    def test_contents(self) -> None:
        """mcpgw and its dependencies as wheels for cp311 manylinux (glibc <= 2.28), all pinned."""
        wheels = sorted(f for f in os.listdir(self.dir) if f.endswith(".whl"))
        names = {re.sub(r"[-_.]+", "-", w.split("-")[0]).lower() for w in wheels}
        for required in (
            "rivano-mcpgw",
            "twisted",
            "pyopenssl",
            "cryptography",
            "service-identity",
            "attrs",
            "zope-interface",
            "pyyaml",
            "httptools",
            "orjson",
            "argon2-cffi",
            "pyjwt",
            "hiredis",
            # the sinks extra (WHEEL_EXTRAS default)
            "boto3",
            "google-cloud-storage",
            "confluent-kafka",
            "treq",
        ):
            self.assertIn(required, names)
        self.assertIn(f"rivano_mcpgw-{mcpgw.__version__}-py3-none-any.whl", wheels)
        for w in wheels:
            platform = w[:-4].split("-")[-1]
            self.assertTrue(platform == "any" or "manylinux" in platform, w)
            glibcs = [(int(a), int(b)) for a, b in re.findall(r"manylinux_(\d+)_(\d+)", platform)]
            legacy = re.findall(r"manylinux(1|2010|2014)_", platform)
            if glibcs and not legacy:
                self.assertLessEqual(min(glibcs), (2, 28), w)
        with open(os.path.join(self.dir, "requirements.txt")) as f:
            pins = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        self.assertEqual(len(pins), len(wheels))
        self.assertIn(f"rivano-mcpgw=={mcpgw.__version__}", pins)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "README.txt")))

    def test_installsOffline(self) -> None:
        """A fresh venv installs it with --no-index; mcpgw --version, config check, the plugin."""
        venv = os.path.join(tempfile.mkdtemp(prefix="mcpgw-offline-"), "venv")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, capture_output=True)
        bindir = os.path.join(venv, "bin")
        env = offlineEnv()
        install = subprocess.run(
            [
                os.path.join(bindir, "pip"),
                "install",
                "-q",
                "--no-index",
                "--find-links",
                self.dir,
                "-r",
                os.path.join(self.dir, "requirements.txt"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        self.assertEqual(install.returncode, 0, install.stdout + install.stderr)
        version = subprocess.run(
            [os.path.join(bindir, "mcpgw"), "--version"], capture_output=True, text=True, env=env
        )
        self.assertEqual(version.stdout.strip(), f"mcpgw {mcpgw.__version__}", version.stderr)
        for config in ("mcpgw.example.yaml", "mcpgw.rpm.yaml"):
            check = subprocess.run(
                [
                    os.path.join(bindir, "mcpgw"),
                    "config",
                    "check",
                    os.path.join(ROOT, "etc", config),
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            self.assertEqual(check.returncode, 0, check.stderr)
            self.assertIn("OK", check.stdout)
        plugins = subprocess.run(
            [os.path.join(bindir, "twistd"), "--help"], capture_output=True, text=True, env=env
        )
        self.assertIn("Model Context Protocol gateway", plugins.stdout)
        # the installed package, not this checkout
        where = subprocess.run(
            [os.path.join(bindir, "python"), "-I", "-c", "import mcpgw; print(mcpgw.__file__)"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tempfile.gettempdir(),
        )
        self.assertTrue(where.stdout.startswith(venv), where.stdout)
