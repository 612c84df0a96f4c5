"""What the benchmark needs on the machine: Debian packages, the C tools, a test certificate.

``apt-get install`` runs only for what is missing and only for the targets selected; services that
a package would start are held back with a temporary ``policy-rc.d``.  The C load generator and echo
backend are compiled into ``bench/build/`` (git-ignored) when their sources are newer than the
binaries.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = [
    "BUILD_DIR",
    "build_tools",
    "cpu_model",
    "ensure_cert",
    "ensure_packages",
    "find_program",
    "versions",
]

BENCH_DIR = Path(__file__).resolve().parent
C_DIR = BENCH_DIR / "c"
BUILD_DIR = BENCH_DIR / "build"
CFLAGS = ["-O2", "-Wall", "-Wextra"]
LIBS = ["-lssl", "-lcrypto", "-lm"]
_POLICY_RC = Path("/usr/sbin/policy-rc.d")


def find_program(name: str) -> str | None:
    """A program on PATH or in the sbin directories (nginx and haproxy live in /usr/sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def _apt_install(packages: list[str], log) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    created_policy = False
    if not _POLICY_RC.exists():  # keep the packages' own services from starting on port 80
        _POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        _POLICY_RC.chmod(0o755)
        created_policy = True
    try:
        log(f"installing {' '.join(packages)} with apt-get")
        if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"apt-get install {' '.join(packages)} failed:\n{r.stderr}")
    finally:
        if created_policy:
            _POLICY_RC.unlink()


def ensure_packages(need: set[str], log) -> None:
    """Install what is missing of: gcc and libssl-dev (always), nginx, haproxy (when in ``need``)."""
    missing = []
    if not find_program("gcc"):
        missing += ["gcc", "libc6-dev"]
    if not Path("/usr/include/openssl/ssl.h").exists():
        missing.append("libssl-dev")
    if not find_program("openssl"):
        missing.append("openssl")
    for prog in ("nginx", "haproxy"):
        if prog in need and not find_program(prog):
            missing.append(prog)
    if missing:
        _apt_install(missing, log)


def build_tools(log) -> dict[str, Path]:
    """Compile wsecho and wsload into bench/build/ if a source is newer than the binary."""
    BUILD_DIR.mkdir(exist_ok=True)
    sources = list(C_DIR.glob("*.[ch]"))
    newest = max(p.stat().st_mtime for p in sources)
    out = {}
    for name in ("wsecho", "wsload"):
        binary = BUILD_DIR / name
        out[name] = binary
        if binary.exists() and binary.stat().st_mtime >= newest:
            continue
        log(f"compiling {name}")
        cmd = ["gcc", *CFLAGS, "-o", str(binary), str(C_DIR / f"{name}.c"), *LIBS]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0 or r.stderr.strip():
            binary.unlink(missing_ok=True)
            raise RuntimeError(f"gcc {name}.c failed or warned:\n{r.stderr}")
    return out


def ensure_cert() -> tuple[Path, Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1: (cert, key, cert+key in one PEM for HAProxy)."""
    cert, key, both = (BUILD_DIR / n for n in ("cert.pem", "key.pem", "cert+key.pem"))
    if not (cert.exists() and key.exists() and both.exists()):
        BUILD_DIR.mkdir(exist_ok=True)
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "365",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        both.write_text(cert.read_text() + key.read_text())
    return cert, key, both


def _first_line(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (r.stdout + r.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _autobahn_accel() -> str:
    """Which UTF-8 validator and XOR masker Autobahn really uses here."""
    try:
        from autobahn.websocket.utf8validator import Utf8Validator
        from autobahn.websocket.xormasker import create_xor_masker
    except ImportError:
        return "autobahn not importable"
    masker = type(create_xor_masker(b"abcd", 1 << 20))
    return f"utf8 {Utf8Validator.__module__}, masker {masker.__module__}.{masker.__name__}"


def versions(need: set[str]) -> dict[str, str]:
    """Versions of everything measured, for the results header."""
    out = {}
    if "nginx" in need:
        out["nginx"] = _first_line([find_program("nginx") or "nginx", "-v"]).replace(
            "nginx version: ", ""
        )
    if "haproxy" in need:
        out["haproxy"] = _first_line([find_program("haproxy") or "haproxy", "-v"]).split(" - ")[0]
    out["python"] = sys.version.split()[0] + f" ({platform.python_implementation()})"
    for dist in ("twisted", "autobahn", "txaio"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["autobahn accelerators"] = _autobahn_accel()
    out["openssl"] = _first_line(["openssl", "version"])
    out["gcc"] = _first_line(["gcc", "--version"])
    out["kernel"] = platform.release()
    return out
