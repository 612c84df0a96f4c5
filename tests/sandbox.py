"""
Runs a command inside the kernel-level sandbox a systemd unit describes, as systemd would set it
up before ``ExecStart``, for a test that cannot start systemd itself:
``python -m tests.sandbox UNIT_FILE [--set KEY=VALUE ...] -- COMMAND [ARGS...]`` (as root; each
``--set`` adds a setting to the unit's, e.g. to try one it leaves out).

What it applies, read from the unit's own lines (so the test follows the unit file):

- ``ProtectSystem=strict``: a private mount namespace whose root file system is read-only;
  ``PrivateTmp=yes``: fresh tmpfs on ``/tmp`` and ``/var/tmp``;
- ``NoNewPrivileges=yes``: ``PR_SET_NO_NEW_PRIVS``;
- ``MemoryDenyWriteExecute=yes``: ``PR_SET_MDWE`` (Linux 6.3+), the kernel's own form of the
  check (systemd 257+ uses it; older ones a seccomp filter refusing the same calls);
- ``SystemCallFilter=`` (allow list, then ``~`` removals; groups expanded by
  ``systemd-analyze syscall-filter``), ``SystemCallErrorNumber=``, ``SystemCallArchitectures=native``
  and ``RestrictAddressFamilies=`` (``socket()`` of other families refused): one seccomp filter
  loaded through libseccomp, as systemd does.

Not applied: ``User=``/``DynamicUser=`` and ``ProtectHome=`` (the test's Python may live under
/root), ``PrivateDevices=``, capabilities, cgroup settings.  Exits 125 when the sandbox cannot be
set up (no libseccomp, a kernel without ``PR_SET_MDWE``), with the reason on stderr.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import subprocess
import sys

__all__ = ["expand_filter", "unit_settings"]

_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_EQ = 4
# Always allowed by systemd whatever the filter says (systemd.exec(5), SystemCallFilter=).
_ALWAYS = ["execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"]


class SandboxError(Exception):
    pass


def unit_settings(path: str) -> dict[str, list[str]]:
    """``[Service]`` settings of a unit file: every value of each key, in order."""
    settings: dict[str, list[str]] = {}
    section = None
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
                continue
            if section == "[Service]":
                key, _, value = line.partition("=")
                settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _groups() -> dict[str, list[str]]:
    """Every syscall group systemd knows, as ``systemd-analyze syscall-filter`` lists them."""
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and current is not None:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                current.append(entry)
    return groups


def expand_filter(values: list[str]) -> set[str]:
    """The syscalls a unit's ``SystemCallFilter=`` lines allow (an allow list first, then ``~``)."""
    groups = _groups()

    def expand(names: list[str]) -> set[str]:
        out: set[str] = set()
        for name in names:
            out |= expand(groups[name]) if name.startswith("@") else {name}
        return out

    if not values or values[0].startswith("~"):
        raise SandboxError("the first SystemCallFilter= must be an allow list")
    allowed: set[str] = set()
    for value in values:
        if value.startswith("~"):
            allowed -= expand(value[1:].split())
        else:
            allowed |= expand(value.split())
    return allowed | set(_ALWAYS)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(code)}")


def _mounts(settings: dict[str, list[str]]) -> None:
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    # BindReadOnlyPaths=: kept visible (read-only) through the private /tmp, as systemd does;
    # the tests name the checkout, which CI may clone under /tmp.
    kept = [(path, os.open(path, os.O_PATH)) for path in settings.get("BindReadOnlyPaths", [])]
    if settings.get("PrivateTmp", ["no"])[-1] == "yes":
        for tmp in (b"/tmp", b"/var/tmp"):
            _check(
                libc.mount(b"tmpfs", tmp, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=1777"),
                f"tmpfs on {tmp.decode()}",
            )
    for path, fd in kept:
        os.makedirs(path, exist_ok=True)
        source = f"/proc/self/fd/{fd}".encode()
        _check(libc.mount(source, path.encode(), None, _MS_BIND | _MS_REC, None), f"bind {path}")
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        _check(libc.mount(None, path.encode(), None, flags, None), f"read-only {path}")
        os.close(fd)
    if settings.get("ProtectSystem", ["no"])[-1] == "strict":
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        _check(libc.mount(None, b"/", None, flags, None), "remount / read-only")


def _prctls(settings: dict[str, list[str]]) -> None:
    libc = _libc()
    if settings.get("NoNewPrivileges", ["no"])[-1] == "yes":
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    if settings.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        _check(libc.prctl(_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0), "PR_SET_MDWE")


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _seccomp(settings: dict[str, list[str]]) -> None:
    name = ctypes.util.find_library("seccomp")
    if name is None:
        raise SandboxError("libseccomp is not installed")
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    number = settings.get("SystemCallErrorNumber", ["EPERM"])[-1]
    refuse = 0x00050000 | getattr(errno, number)  # SCMP_ACT_ERRNO
    if settings.get("SystemCallArchitectures", ["native"])[-1] != "native":
        raise SandboxError("only SystemCallArchitectures=native is emulated")
    ctx = lib.seccomp_init(refuse)  # a new filter knows the native architecture only
    if not ctx:
        raise SandboxError("seccomp_init failed")
    families = settings.get("RestrictAddressFamilies")
    allowed = expand_filter(settings.get("SystemCallFilter", []))
    if families:
        allowed.discard("socket")
        for family in families[-1].split():
            cmp = _ArgCmp(0, _SCMP_CMP_EQ, int(getattr(socket, family)), 0)
            number_socket = lib.seccomp_syscall_resolve_name(b"socket")
            _check(
                lib.seccomp_rule_add_array(
                    ctx, _SCMP_ACT_ALLOW, number_socket, 1, ctypes.byref(cmp)
                ),
                f"allow socket({family})",
            )
    for call in sorted(allowed):
        nr = lib.seccomp_syscall_resolve_name(call.encode())
        if nr < 0:
            continue  # not a syscall of this architecture (e.g. the *32 ones)
        result = lib.seccomp_rule_add_array(ctx, _SCMP_ACT_ALLOW, nr, 0, None)
        if result != 0 and result != -errno.EEXIST:
            raise SandboxError(f"allow {call}: {os.strerror(-result)}")
    result = lib.seccomp_load(ctx)
    if result != 0:
        raise SandboxError(f"seccomp_load: {os.strerror(-result)}")


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == 0 or argv[-1] == "--":
        print(
            "usage: python -m tests.sandbox UNIT_FILE [--set KEY=VALUE ...] -- COMMAND [ARGS...]",
            file=sys.stderr,
        )
        return 2
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    settings = unit_settings(options[0])
    for i, option in enumerate(options[1:], 1):
        if options[i - 1] == "--set":
            key, _, value = option.partition("=")
            settings.setdefault(key, []).append(value)
    umask = settings.get("UMask")
    try:
        _mounts(settings)
        if umask:
            os.umask(int(umask[-1], 8))
        _prctls(settings)
        _seccomp(settings)
    except (SandboxError, OSError, subprocess.SubprocessError) as e:
        print(f"sandbox: {e}", file=sys.stderr)
        return 125
    os.execv(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
