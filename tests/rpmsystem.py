"""
Install the mcpgw RPM on a throwaway copy of this machine, scriptlets and all, and report what
happened as one JSON object on stdout (tests/test_packaging_rpm.py asserts on it).

Run as root in a private mount namespace (C{unshare -m --propagation private python
tests/rpmsystem.py RPM UPGRADE_RPM PORT UPSTREAM_PORT}): the host's root is mounted as the
lower layer of an overlay whose upper layer is a tmpfs, so C{rpm --root} runs C{%pre}
(useradd), C{%post} (the plugin cache) and the rest in a chroot that looks like the host, and
every write vanishes with the namespace. Then the gateway runs there as the unit's C{ExecStart},
as the C{mcpgw} user; logrotate rotates its audit file; the package is upgraded and erased.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

PLUGIN_CACHE = "/opt/mcpgw/venv/lib/python3.11/site-packages/twisted/plugins/dropin.cache"
UNIT = "/usr/lib/systemd/system/mcpgw.service"


def sh(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


def mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True)


def stat(root: str, path: str) -> dict[str, Any] | None:
    full = root + path
    if not os.path.lexists(full):
        return None
    st = os.lstat(full)
    users = {p.pw_uid: p.pw_name for p in _passwd(root)}
    groups = {int(line.split(":")[2]): line.split(":")[0] for line in _lines(root, "/etc/group")}
    return {
        "mode": oct(st.st_mode & 0o7777),
        "user": users.get(st.st_uid, st.st_uid),
        "group": groups.get(st.st_gid, st.st_gid),
    }


def _lines(root: str, path: str) -> list[str]:
    with open(root + path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _passwd(root: str) -> list[pwd.struct_passwd]:
    out = []
    for line in _lines(root, "/etc/passwd"):
        f = line.split(":")
        out.append(pwd.struct_passwd((f[0], f[1], int(f[2]), int(f[3]), f[4], f[5], f[6])))
    return out


def cacheHasMcpgw(path: str) -> bool:
    """The plugin cache exists and lists the mcpgw drop-in."""
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        return b"mcpgw" in f.read()


def rpm(root: str, *argv: str) -> dict[str, Any]:
    # --nodeps: this host's rpm database knows nothing of python3.11, glibc, shadow-utils.
    out = sh("rpm", "--root", root, "--nodeps", *argv)
    noise = ("Alien", "assuming you know", "RPM should not be used")
    text = "\n".join(
        line for line in (out.stdout + out.stderr).splitlines() if not any(n in line for n in noise)
    )
    return {"rc": out.returncode, "output": text}


def get(port: int, path: str, body: bytes | None = None) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def execStart(root: str) -> list[str]:
    for line in _lines(root, UNIT):
        if line.startswith("ExecStart="):
            return shlex.split(line[len("ExecStart=") :])
    raise SystemExit("no ExecStart in the unit")


def serve(root: str, port: int, report: dict[str, Any]) -> None:
    """Run the unit's ExecStart as mcpgw; request, rotate, reload (HUP), request, stop."""
    argv = execStart(root)
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    proc = subprocess.Popen(
        ["chroot", "--userspec=mcpgw:mcpgw", root, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd="/",
    )
    try:
        deadline = time.monotonic() + 30
        healthy = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                healthy = get(port, "/healthz")
                break
            except OSError:
                time.sleep(0.1)
        report["healthz"] = healthy
        ping = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}'
        report["post"] = get(port, "/mcp", ping) if healthy else None
        audit = "/var/log/mcpgw/audit.jsonl"
        report["audit_before_rotate"] = stat(root, audit)
        if shutil.which("logrotate"):
            # The packaged rule, forced; its postrotate (systemctl reload) has no systemd here and
            # is a no-op, so send the SIGHUP it would have sent.
            state = "/tmp/logrotate.state"  # inside the chroot
            out = sh("chroot", root, "logrotate", "-f", "-s", state, "/etc/logrotate.d/mcpgw")
            report["logrotate"] = {"rc": out.returncode, "output": out.stdout + out.stderr}
        else:
            os.rename(root + audit, root + audit + "-rotated")
            report["logrotate"] = None
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        report["post_after_reload"] = get(port, "/mcp", ping) if healthy else None
        time.sleep(0.3)
        logs = sorted(os.listdir(root + "/var/log/mcpgw"))
        report["log_dir"] = {name: stat(root, "/var/log/mcpgw/" + name) for name in logs}
        with open(root + audit) as f:
            report["audit_lines_after_reload"] = len(f.readlines())
    finally:
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=60)
    report["exit"] = proc.returncode
    report["log"] = log


def main() -> None:
    rpmPath, upgradePath, port, upstream = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    work = tempfile.mkdtemp(prefix="mcpgw-rpmroot-")
    mount("-t", "tmpfs", "tmpfs", work)
    for d in ("upper", "work", "root"):
        os.mkdir(os.path.join(work, d))
    root = os.path.join(work, "root")
    mount(
        "-t",
        "overlay",
        "overlay",
        "-o",
        f"lowerdir=/,upperdir={work}/upper,workdir={work}/work",
        root,
    )
    mount("--rbind", "/dev", root + "/dev")
    mount("-t", "proc", "proc", root + "/proc")
    for d in ("/tmp", "/run"):
        mount("-t", "tmpfs", "tmpfs", root + d)
    # A host that never had mcpgw.
    for path in ("/opt/mcpgw", "/etc/mcpgw", "/var/lib/mcpgw", "/var/log/mcpgw"):
        shutil.rmtree(root + path, ignore_errors=True)
    for path in ("/usr/bin/mcpgw", UNIT, "/etc/logrotate.d/mcpgw"):
        if os.path.lexists(root + path):
            os.unlink(root + path)

    report: dict[str, Any] = {"install": rpm(root, "-i", rpmPath)}
    user = [p for p in _passwd(root) if p.pw_name == "mcpgw"]
    report["user"] = (
        {"uid": user[0].pw_uid, "home": user[0].pw_dir, "shell": user[0].pw_shell} if user else None
    )
    report["paths"] = {
        p: stat(root, p)
        for p in (
            "/etc/mcpgw",
            "/etc/mcpgw/mcpgw.yaml",
            "/var/lib/mcpgw",
            "/var/log/mcpgw",
            "/usr/bin/mcpgw",
            PLUGIN_CACHE,
        )
    }
    cache = root + PLUGIN_CACHE
    out = sh("rpm", "--root", root, "-V", "--nodeps", "mcpgw")  # deps: see rpm()
    report["rpm_verify"] = {"rc": out.returncode, "output": out.stdout + out.stderr}
    report["plugin_cache_has_mcpgw"] = cacheHasMcpgw(cache)
    out = sh("chroot", root, "/usr/bin/mcpgw", "--version")
    report["version"] = (out.stdout + out.stderr).strip()
    out = sh("chroot", root, "/usr/bin/mcpgw", "config", "check", "/etc/mcpgw/mcpgw.yaml")
    report["config_check"] = {"rc": out.returncode, "output": out.stdout + out.stderr}
    if shutil.which("systemd-analyze"):
        out = sh("chroot", root, "systemd-analyze", "verify", UNIT)
        report["verify"] = {"rc": out.returncode, "output": out.stdout + out.stderr}
    else:
        report["verify"] = None

    # Local changes to the config: the port, and an upstream nothing listens on.
    config = root + "/etc/mcpgw/mcpgw.yaml"
    with open(config) as f:
        text = f.read()
    text = text.replace("port: 8080", f"port: {port}")
    text = text.replace("http://127.0.0.1:9000/mcp", f"http://127.0.0.1:{upstream}/mcp")
    with open(config, "w") as f:
        f.write(text)
    serve(root, port, report)

    os.unlink(cache)  # the upgrade's scriptlets must bring it back
    report["upgrade"] = rpm(root, "-U", upgradePath)
    report["upgrade_query"] = sh("rpm", "--root", root, "-q", "mcpgw").stdout.strip()
    with open(config) as f:
        report["config_kept"] = f"port: {port}" in f.read()
    report["rpmnew"] = os.path.exists(config + ".rpmnew")
    report["plugin_cache_after_upgrade"] = cacheHasMcpgw(cache)
    out = sh("chroot", root, "/usr/bin/mcpgw", "--version")
    report["version_after_upgrade"] = (out.stdout + out.stderr).strip()

    report["erase"] = rpm(root, "-e", "mcpgw")
    report["after_erase"] = {
        p: os.path.lexists(root + p)
        for p in (
            "/opt/mcpgw",
            "/usr/bin/mcpgw",
            UNIT,
            "/etc/mcpgw/mcpgw.yaml",
            "/etc/mcpgw/mcpgw.yaml.rpmsave",
            "/var/log/mcpgw",
            PLUGIN_CACHE,
        )
    }
    report["user_after_erase"] = any(p.pw_name == "mcpgw" for p in _passwd(root))
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
