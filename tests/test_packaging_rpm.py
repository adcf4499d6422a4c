"""
The RPM (C{make rpm}): built with rpmbuild from the wheelhouse, its metadata, file list,
scriptlets and systemd unit; installed into an empty scratch root with C{rpm --root} (no
network), where the venv's packages import and twistd finds the mcpgw plugin; and installed,
run, rotated, upgraded and erased on a throwaway overlay copy of this machine, scriptlets
included (root only).
"""

from __future__ import annotations

import configparser
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import TestCase

import mcpgw
from tests.packagingsupport import ROOT, BuildError, rpm, rpmUnavailable, rpmVersion
from tests.support import freePort

VENV = "/opt/mcpgw/venv"
SITE = f"{VENV}/lib/python3.11/site-packages"
UNIT = "/usr/lib/systemd/system/mcpgw.service"
EXEC_START = (
    "/opt/mcpgw/venv/bin/twistd -n --pidfile= --logger=mcpgw.logging.observerFactory "
    "mcpgw --config /etc/mcpgw/mcpgw.yaml"
)

#: Imported by the installed venv's python: every runtime dependency.
DEPENDENCIES = (
    "twisted.web.server",
    "twisted.internet.ssl",
    "OpenSSL.SSL",
    "cryptography.x509",
    "service_identity",
    "attr",
    "zope.interface",
    "yaml",
    "httptools",
    "orjson",
    "argon2",
    "jwt",
    "jwt.algorithms",
    "hiredis",
)

IMPORT_ALL = """
import importlib, pkgutil, sys
import mcpgw
from twisted.plugin import IPlugin, getPlugins
# the demo extra (the official MCP SDK) is not part of the package; __main__ would run the CLI
skip = {"mcpgw.demo", "mcpgw.__main__"}
names = sorted(m.name for m in pkgutil.walk_packages(mcpgw.__path__, "mcpgw.")
               if not any(m.name == s or m.name.startswith(s + ".") for s in skip))
for name in names + sys.argv[1:]:
    importlib.import_module(name)
makers = {getattr(p, "tapname", None): p for p in getPlugins(IPlugin)}
print(len(names), makers["mcpgw"].module, mcpgw.__file__)
"""


def query(path: str, *args: str) -> str:
    out = subprocess.run(["rpm", "-qp", *args, path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


class RPMTests(TestCase):
    """The package as built."""

    def setUp(self) -> None:
        reason = rpmUnavailable()
        if reason:
            self.skipTest(reason)
        try:
            self.rpm = rpm("1")
        except BuildError as e:
            self.fail(str(e))
        self.path = self.rpm.path

    def files(self) -> dict[str, dict[str, str]]:
        """Every file: mode, owner, group, flags (c config, n noreplace, g ghost, d doc), link."""
        fmt = "[%{FILEMODES:perms}\t%{FILEUSERNAME}\t%{FILEGROUPNAME}\t%{FILEFLAGS:fflags}\t%{FILELINKTOS}\t%{FILENAMES}\n]"
        out = {}
        for line in query(self.path, "--qf", fmt).splitlines():
            mode, user, group, flags, link, name = line.split("\t")
            out[name] = {"mode": mode, "user": user, "group": group, "flags": flags, "link": link}
        return out

    def test_metadata(self) -> None:
        """Name, version from the package, the machine's arch, explicit Requires, no auto-provides."""
        nvra = query(
            self.path, "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH} %{PAYLOADCOMPRESSOR}"
        )
        self.assertEqual(
            nvra.split(), ["mcpgw", rpmVersion(mcpgw.__version__), "1", platform.machine(), "xz"]
        )
        requires = query(self.path, "-R").splitlines()
        self.assertIn("/usr/bin/python3.11", requires)
        self.assertTrue(any(re.fullmatch(r"glibc >= 2\.(\d+)", r) for r in requires), requires)
        for tool in ("/usr/sbin/useradd", "/usr/sbin/groupadd", "/usr/bin/getent"):
            self.assertIn(tool, requires)
        self.assertFalse([r for r in requires if "python3.11dist" in r or ".so" in r], requires)
        provides = query(self.path, "--provides").split("\n")
        self.assertEqual(
            sorted(p for p in provides if p),
            sorted(
                [
                    f"mcpgw = {rpmVersion(mcpgw.__version__)}-1",
                    f"mcpgw({platform.machine().replace('_', '-')}) = "
                    f"{rpmVersion(mcpgw.__version__)}-1",
                ]
            ),
        )

    def test_fileList(self) -> None:
        """The venv, the command, config (noreplace), state and log dirs, unit, logrotate, docs."""
        files = self.files()
        config = files["/etc/mcpgw/mcpgw.yaml"]
        self.assertEqual(
            (config["mode"], config["user"], config["group"]), ("-rw-r-----", "root", "mcpgw")
        )
        self.assertIn("c", config["flags"])
        self.assertIn("n", config["flags"])
        self.assertEqual(files["/etc/mcpgw"]["mode"], "drwxr-x---")
        for d in ("/var/lib/mcpgw", "/var/log/mcpgw"):
            self.assertEqual(
                (files[d]["mode"], files[d]["user"], files[d]["group"]),
                ("drwxr-x---", "mcpgw", "mcpgw"),
            )
        self.assertIn("c", files["/etc/logrotate.d/mcpgw"]["flags"])
        self.assertIn("n", files["/etc/logrotate.d/mcpgw"]["flags"])
        self.assertEqual(files["/usr/bin/mcpgw"]["link"], "../../opt/mcpgw/venv/bin/mcpgw")
        self.assertIn(UNIT, files)
        self.assertIn("d", files["/usr/share/doc/mcpgw/install.md"]["flags"])
        self.assertIn("g", files[f"{SITE}/twisted/plugins/dropin.cache"]["flags"])
        self.assertEqual(files[f"{VENV}/bin/python3.11"]["link"], "/usr/bin/python3.11")
        for name in (
            f"{VENV}/bin/twistd",
            f"{VENV}/bin/mcpgw",
            f"{VENV}/pyvenv.cfg",
            f"{SITE}/twisted/plugins/mcpgw_plugin.py",
            f"{SITE}/mcpgw/_license_keys.py",
            f"{SITE}/mcpgw/__pycache__/license.cpython-311.pyc",
        ):
            self.assertIn(name, files)
        # a sealed runtime: no installer, and nothing outside these roots
        self.assertFalse([f for f in files if "/site-packages/pip/" in f or f.endswith("/bin/pip")])
        allowed = (
            "/opt/mcpgw",
            "/usr/bin/mcpgw",
            UNIT,
            "/etc/mcpgw",
            "/etc/logrotate.d/mcpgw",
            "/var/lib/mcpgw",
            "/var/log/mcpgw",
            "/usr/share/doc/mcpgw",
        )
        self.assertEqual([f for f in files if not f.startswith(allowed)], [])

    def test_scriptlets(self) -> None:
        """%pre adds the system user; %post/%postun regenerate Twisted's plugin cache."""
        scripts = query(self.path, "--scripts")
        parts = dict(
            re.findall(
                r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)",
                scripts,
                re.S | re.M,
            )
        )
        self.assertEqual(
            sorted(parts), ["postinstall", "postuninstall", "preinstall", "preuninstall"]
        )
        pre = parts["preinstall"]
        self.assertIn("getent group mcpgw >/dev/null || groupadd -r mcpgw", pre)
        self.assertIn("useradd -r -g mcpgw -d /var/lib/mcpgw -s /sbin/nologin", pre)
        regen = (
            f"{VENV}/bin/python -I -c 'from twisted.plugin import IPlugin, getPlugins; "
            "list(getPlugins(IPlugin))'"
        )
        self.assertIn(regen, parts["postinstall"])
        self.assertIn(regen, parts["postuninstall"])
        self.assertIn("if [ $1 -ge 1 ]", parts["postuninstall"])
        self.assertIn("systemctl try-restart mcpgw.service", parts["postuninstall"])
        self.assertIn("if [ $1 -eq 0 ]", parts["preuninstall"])
        self.assertIn("disable --now mcpgw.service", parts["preuninstall"])
        for name, body in parts.items():
            for line in body.splitlines():
                if "systemctl" in line and "[ -d /run/systemd/system ]" not in line:
                    self.assertIn("|| :", line, (name, line))

    def test_scratchRootInstall(self) -> None:
        """rpm --root into an empty directory; the installed venv imports everything, finds the
        plugin, runs mcpgw; no file names the build root."""
        root = tempfile.mkdtemp(prefix="mcpgw-scratch-")
        self.addCleanup(shutil.rmtree, root, True)
        # --noscripts: an empty root has no /bin/sh for the scriptlets (those run in
        # test_systemInstall); --nodeps: the host's rpm database is not the target's.
        out = subprocess.run(
            ["rpm", "--root", root, "--nodeps", "--noscripts", "-i", self.path],
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        python = os.path.join(root, VENV.lstrip("/"), "bin", "python")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        imports = subprocess.run(
            [python, "-I", "-c", IMPORT_ALL, *DEPENDENCIES],
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
            timeout=120,
        )
        self.assertEqual(imports.returncode, 0, imports.stderr)
        count, module, location = imports.stdout.split()
        self.assertGreater(int(count), 20)
        self.assertEqual(module, "mcpgw.tap")
        self.assertEqual(location, os.path.join(root, SITE.lstrip("/"), "mcpgw", "__init__.py"))

        def mcpgwCommand(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [python, "-I", "-m", "mcpgw", *args],
                capture_output=True,
                text=True,
                env=env,
                cwd=root,
                timeout=60,
            )

        self.assertEqual(mcpgwCommand("--version").stdout.strip(), f"mcpgw {mcpgw.__version__}")
        check = mcpgwCommand("config", "check", os.path.join(root, "etc/mcpgw/mcpgw.yaml"))
        self.assertEqual(check.returncode, 0, check.stderr)
        bad = os.path.join(root, "bad.jwt")
        with open(bad, "w") as f:
            f.write("x.y.z")
        self.assertEqual(mcpgwCommand("license", "show", bad).returncode, 1)
        twistd = subprocess.run(
            [python, "-I", os.path.join(root, VENV.lstrip("/"), "bin", "twistd"), "--help"],
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
            timeout=60,
        )
        self.assertIn("Model Context Protocol gateway", twistd.stdout)
        with open(os.path.join(root, VENV.lstrip("/"), "pyvenv.cfg")) as f:
            cfg = f.read()
        self.assertIn("home = /usr/bin\n", cfg)
        self.assertIn(f"command = /usr/bin/python3.11 -m venv {VENV}\n", cfg)
        with open(os.path.join(root, VENV.lstrip("/"), "bin", "twistd")) as f:
            self.assertEqual(f.readline(), f"#!{VENV}/bin/python\n")
        # nothing in the payload remembers where it was built
        leaks = subprocess.run(
            ["grep", "-rlF", "-e", "/BUILDROOT/", "-e", "mcpgw-rpm-", os.path.join(root, "opt")],
            capture_output=True,
            text=True,
        )
        self.assertEqual(leaks.stdout, "")
        # byte-compiled for the install path (tracebacks name /opt/mcpgw/...)
        code = subprocess.run(
            [
                python,
                "-I",
                "-c",
                # the path compiled into the .pyc (import would fix it up to the real path)
                "import marshal, sys; f = open(sys.argv[1], 'rb'); f.seek(16); "
                "print(marshal.loads(f.read()).co_filename)",
                os.path.join(root, SITE.lstrip("/"), "mcpgw/__pycache__/license.cpython-311.pyc"),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
        )
        self.assertEqual(code.stdout.strip(), f"{SITE}/mcpgw/license.py")

    def test_unit(self) -> None:
        """The packaged unit is etc/mcpgw.service: twistd in the foreground, reload by HUP,
        the mcpgw user, hardening, a restart policy; systemd-analyze rates it OK."""
        with open(os.path.join(ROOT, "etc", "mcpgw.service")) as f:
            text = f.read()
        unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
        unit.optionxform = str  # type: ignore[assignment,method-assign]
        unit.read_string(text)
        service = unit["Service"]
        self.assertEqual(service["ExecStart"], EXEC_START)
        self.assertEqual(service["ExecReload"], "/bin/kill -HUP $MAINPID")
        expected = {
            "Type": "simple",
            "User": "mcpgw",
            "Group": "mcpgw",
            "Restart": "on-failure",
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ReadWritePaths": "/var/lib/mcpgw /var/log/mcpgw",
            "PrivateTmp": "yes",
            "ProtectHome": "yes",
            "PrivateDevices": "yes",
            "ProtectKernelTunables": "yes",
            "ProtectKernelModules": "yes",
            "ProtectControlGroups": "yes",
            "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
            "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
            "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
            "SystemCallArchitectures": "native",
            "SuccessExitStatus": "143",
        }
        for key, value in expected.items():
            self.assertEqual(service.get(key), value, key)
        self.assertIn("SystemCallFilter=@system-service\n", text)
        self.assertIn("SystemCallFilter=~@privileged @resources\n", text)
        self.assertIn("StartLimitBurst", unit["Unit"])
        self.assertEqual(unit["Install"]["WantedBy"], "multi-user.target")
        # the packaged copy is this file
        root = tempfile.mkdtemp(prefix="mcpgw-unit-")
        self.addCleanup(shutil.rmtree, root, True)
        subprocess.run(
            [
                "rpm",
                "--root",
                root,
                "--nodeps",
                "--noscripts",
                "-i",
                "--excludepath",
                "/opt",
                self.path,
            ],
            check=True,
            capture_output=True,
        )
        with open(os.path.join(root, UNIT.lstrip("/"))) as f:
            self.assertEqual(f.read(), text)
        if shutil.which("systemd-analyze") is None:
            return
        security = subprocess.run(
            [
                "systemd-analyze",
                "security",
                "--offline=true",
                os.path.join(ROOT, "etc", "mcpgw.service"),
            ],
            capture_output=True,
            text=True,
        )
        score = re.search(
            r"Overall exposure level for mcpgw\.service: ([\d.]+) (\w+)", security.stdout
        )
        self.assertIsNotNone(score, security.stdout + security.stderr)
        assert score is not None
        self.assertLessEqual(float(score[1]), 2.0, security.stdout)
        self.assertEqual(score[2], "OK")

    def test_systemInstall(self) -> None:
        """On a throwaway overlay of this machine: install (user, owners, plugin cache),
        systemd-analyze verify, run as mcpgw with the unit's command, logrotate + HUP,
        upgrade (config kept, cache rebuilt), erase."""
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            self.skipTest("needs root and unshare(1) for a private mount namespace")
        probe = subprocess.run(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                "d=$(mktemp -d) && mount -t tmpfs tmpfs $d && mkdir $d/u $d/w $d/m && "
                "mount -t overlay overlay -o lowerdir=/,upperdir=$d/u,workdir=$d/w $d/m",
            ],
            capture_output=True,
            text=True,
        )
        if probe.returncode != 0:
            self.skipTest(f"cannot mount an overlay of / here: {probe.stderr.strip()}")
        try:
            upgrade = rpm("2")
        except BuildError as e:
            self.fail(str(e))
        port = freePort()
        out = subprocess.run(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                sys.executable,
                os.path.join(ROOT, "tests", "rpmsystem.py"),
                self.path,
                upgrade.path,
                str(port),
                str(freePort()),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(out.returncode, 0, out.stderr[-5000:])
        r = json.loads(out.stdout)
        self.assertEqual(r["install"]["rc"], 0, r["install"]["output"])
        self.assertNotIn("warning", r["install"]["output"].lower(), r["install"]["output"])
        self.assertIsNotNone(r["user"])
        self.assertEqual(r["user"]["home"], "/var/lib/mcpgw")
        self.assertTrue(r["user"]["shell"].endswith("nologin"))
        paths = r["paths"]
        self.assertEqual(paths["/etc/mcpgw"], {"mode": "0o750", "user": "root", "group": "mcpgw"})
        self.assertEqual(
            paths["/etc/mcpgw/mcpgw.yaml"], {"mode": "0o640", "user": "root", "group": "mcpgw"}
        )
        for d in ("/var/lib/mcpgw", "/var/log/mcpgw"):
            self.assertEqual(paths[d], {"mode": "0o750", "user": "mcpgw", "group": "mcpgw"})
        self.assertTrue(r["plugin_cache_has_mcpgw"], "%post did not write the plugin cache")
        self.assertEqual(r["rpm_verify"]["rc"], 0, r["rpm_verify"]["output"])
        self.assertEqual(r["version"], f"mcpgw {mcpgw.__version__}")
        self.assertEqual(r["config_check"]["rc"], 0, r["config_check"]["output"])
        if r["verify"] is not None:
            self.assertEqual((r["verify"]["rc"], r["verify"]["output"]), (0, ""))
        # the service, as systemd would run it
        self.assertEqual(r["healthz"], 200, r["log"])
        self.assertEqual(r["post"], 502, r["log"])  # the upstream is down: an audited 502
        self.assertEqual(r["audit_before_rotate"]["user"], "mcpgw")
        self.assertNotIn("plugin cache", r["log"])
        self.assertNotIn("Traceback", r["log"])
        self.assertIn('"msg":"evaluation mode', r["log"])
        self.assertIn("reloaded /etc/mcpgw/mcpgw.yaml", r["log"])
        self.assertEqual(r["post_after_reload"], 502)
        rotated = [n for n in r["log_dir"] if n != "audit.jsonl"]
        self.assertEqual(len(rotated), 1, r["log_dir"])
        if r["logrotate"] is not None:
            self.assertEqual(r["logrotate"]["rc"], 0, r["logrotate"]["output"])
            self.assertRegex(rotated[0], r"^audit\.jsonl-\d{8}-\d+$")
        self.assertEqual(r["audit_lines_after_reload"], 1)  # the new file has the new request
        self.assertEqual(r["log_dir"]["audit.jsonl"]["user"], "mcpgw")
        self.assertIn(r["exit"], (-15, 143), r["log"])
        # upgrade: %config(noreplace) keeps local edits; the cache is rebuilt
        self.assertEqual(r["upgrade"]["rc"], 0, r["upgrade"]["output"])
        self.assertTrue(r["upgrade_query"].endswith("-2." + platform.machine()), r["upgrade_query"])
        self.assertTrue(r["config_kept"])
        self.assertFalse(r["rpmnew"])
        self.assertTrue(r["plugin_cache_after_upgrade"])
        self.assertEqual(r["version_after_upgrade"], f"mcpgw {mcpgw.__version__}")
        # erase: the code goes; edited config and the audit trail stay; so does the user
        self.assertEqual(r["erase"]["rc"], 0, r["erase"]["output"])
        gone = r["after_erase"]
        for path in ("/opt/mcpgw", "/usr/bin/mcpgw", UNIT, "/etc/mcpgw/mcpgw.yaml"):
            self.assertFalse(gone[path], path)
        self.assertTrue(gone["/etc/mcpgw/mcpgw.yaml.rpmsave"])
        self.assertTrue(gone["/var/log/mcpgw"])
        self.assertTrue(r["user_after_erase"])
