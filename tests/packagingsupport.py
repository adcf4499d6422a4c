"""
Builds shared by the packaging tests, made once per test run: the offline wheelhouse
(C{packaging/build-wheelhouse}, the network is PyPI, needed only here) and the RPMs
(C{packaging/build-rpm}, no network).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import attr

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: The interpreter the RPM's venv is made with (the target hosts' python3.11).
RPM_PYTHON = os.environ.get("RPM_PYTHON", "/usr/bin/python3.11")


@attr.frozen
class Built:
    path: str
    seconds: float
    output: str


class BuildError(Exception):
    pass


def _run(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.monotonic()
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed ({out.returncode}):\n{text}")
    return time.monotonic() - started, text


@functools.cache
def wheelhouse() -> Built:
    """The wheelhouse, built from this checkout into a temporary directory."""
    out = os.path.join(tempfile.mkdtemp(prefix="mcpgw-wheelhouse-"), "wheelhouse")
    env = dict(os.environ, PYTHON=sys.executable)
    seconds, text = _run([os.path.join(ROOT, "packaging", "build-wheelhouse"), out], env)
    return Built(out, seconds, text)


def rpmUnavailable() -> str | None:
    """Why the RPM cannot be built here, or C{None}."""
    if shutil.which("rpmbuild") is None or shutil.which("rpm") is None:
        return "rpmbuild is not installed (Debian: apt-get install rpm; .ci/run installs it)"
    if not os.access(RPM_PYTHON, os.X_OK):
        return f"{RPM_PYTHON} (the RPM's target interpreter) is not installed"
    return None


@functools.cache
def rpm(release: str = "1") -> Built:
    """The RPM of this checkout with release C{release}."""
    base = tempfile.mkdtemp(prefix=f"mcpgw-rpm-{release}-")
    env = dict(os.environ, RPM_RELEASE=release, RPM_PYTHON=RPM_PYTHON)
    # relative output paths, as make rpm passes them (rpmbuild itself needs an absolute topdir)
    rel = os.path.relpath(base, ROOT)
    seconds, text = _run(
        [
            "packaging/build-rpm",
            os.path.relpath(wheelhouse().path, ROOT),
            os.path.join(rel, "out"),
            os.path.join(rel, "top"),
        ],
        env,
    )
    (name,) = os.listdir(os.path.join(base, "out"))
    return Built(os.path.join(base, "out", name), seconds, text)


def rpmVersion(version: str) -> str:
    """A PEP 440 version as build-rpm spells it for RPM (pre-releases with C{~})."""
    return re.sub(r"\.?(a|b|rc|dev)(\d*)", r"~\1\2", version).replace(".post", "^post")


def offlineEnv(**extra: str) -> dict[str, str]:
    """The environment minus pip's configuration, with every proxy pointing nowhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    nowhere = "http://127.0.0.1:9"
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_NO_INDEX="1",
        http_proxy=nowhere,
        https_proxy=nowhere,
        HTTP_PROXY=nowhere,
        HTTPS_PROXY=nowhere,
        no_proxy="",
        **extra,
    )
    return env
