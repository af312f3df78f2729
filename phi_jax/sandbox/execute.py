"""Run untrusted Python (model-written code) and contain it.

Two backends, chosen by `backend=`:

* ``"bwrap"`` — bubblewrap (Debian package ``bubblewrap``), preferred whenever it works here.
  The program runs in new user, PID, network, IPC and UTS namespaces with a minimal read-only
  filesystem view (``/usr``, the interpreter's prefix, three files of ``/etc``; no ``/home``,
  ``/root``, ``/work``), a private size-limited ``/tmp``, a fresh ``/proc`` and ``/dev``, and the
  work dir bound read-write at ``/tmp/sandbox``; everything else is read-only.
  ``--die-with-parent`` plus the PID namespace mean every process of the run (double-forked,
  ``setsid``-ed or not) dies with it.
* ``"fallback"`` — no bubblewrap: new network, IPC and mount namespaces via ``unshare(2)`` where
  the kernel allows (as root, or through an unprivileged user namespace), private tmpfs copies of
  ``/tmp``, ``/var/tmp``, ``/dev/shm`` and ``/run/lock``; otherwise a Python audit hook that blocks
  sockets and process spawning (best effort, Python level only).

Both backends run the program from `_supervisor.py` (a single-threaded helper process, so nothing
forks this multi-threaded caller) which also: drops to a dedicated unprivileged uid when the caller
is root (one uid per concurrent run, so RLIMIT_NPROC is per run and "kill every process of this
uid" hits exactly this run), sets rlimits with soft == hard (CPU, address space, file size,
processes, open files, no core dumps) before the uid change, so they cannot be raised, clears the
environment, sets no_new_privs, and on exit or timeout kills the whole run three ways (the PID
namespace, every process of the uid, every descendant re-parented to it as a child subreaper).
The caller reads stdout/stderr with a byte cap and stops the run when the cap is exceeded.

A uid is leased through a lock file in one host-wide directory, so runs in different processes
never share one; the lease is given back only after the supervisor has exited and /proc shows no
process of the uid (the caller kills any it still finds), so a uid is never reused while anything
of an earlier run lives.

Not isolated (see the README "Evaluation" section): the kernel is shared (no seccomp filter, no
VM), CPU time is limited per process and by the wall clock but not shared fairly, total memory
is bounded only by processes x address-space limit (no cgroup), and disk use in the work dir by
the per-file size limit and the timeout. Without root, the run shares the caller's uid (no
kill-by-uid; with the fallback backend it can signal the caller's other processes).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings

__all__ = ["Limits", "Protections", "SandboxResult", "run_python", "default_backend"]

_SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_supervisor.py")
SANDBOX_DIR = "/tmp/sandbox"  # where the program sees its work dir (when a mount ns exists)
_UID_SLOTS = 4096
_UID_BASE_PREFERRED = 2_000_000_000
# One fixed place for every process on the host (never tempfile.gettempdir(), which TMPDIR changes):
# two lock dirs would hand the same uid to two runs.
_LOCK_DIR = ("/run" if os.access("/run", os.W_OK) else "/tmp") + "/phi_jax_sandbox_uids"
_CLEAR_LIMIT_S = 60.0  # how long SIGKILLed processes of a uid may take to vanish before retiring it
_AUDIT_BOOTSTRAP = r"""
import sys
_BLOCKED = ("socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
            "socket.getaddrinfo", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
            "subprocess.Popen", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata")
def _hook(event, args):
    if event in _BLOCKED:
        raise PermissionError(f"sandbox: {event} is blocked (no network namespace available)")
sys.addaudithook(_hook)
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one run. `cpu_s` defaults to the wall-clock timeout rounded up, plus 1."""

    timeout_s: float = 10.0
    cpu_s: int | None = None
    memory_bytes: int = 1 << 30  # RLIMIT_AS per process
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file the program may write
    processes: int = 16  # RLIMIT_NPROC for the dedicated uid (threads count too)
    open_files: int = 64  # RLIMIT_NOFILE
    output_bytes: int = 1 << 20  # stdout + stderr kept; more stops the run
    tmpfs_bytes: int = 64 << 20  # size of the private /tmp

    def rlimits(self) -> dict[str, int]:
        cpu = self.cpu_s if self.cpu_s is not None else int(self.timeout_s) + 2
        return {"cpu": cpu, "as": self.memory_bytes, "fsize": self.file_bytes,
                "nproc": self.processes, "nofile": self.open_files, "core": 0}


@dataclasses.dataclass(frozen=True)
class Protections:
    """Which protections were active for a run, in words a report can print."""

    backend: str  # "bwrap" | "fallback"
    uid: str  # "dedicated uid N" | "caller's uid (not root)"
    pid_namespace: bool
    network: str  # "namespace" | "audit-hook"
    filesystem: str
    rlimits: dict[str, int]
    cleanup: str

    def summary(self) -> str:
        return (f"backend={self.backend}; uid={self.uid}; pid_ns={self.pid_namespace}; "
                f"network={self.network}; fs={self.filesystem}; cleanup={self.cleanup}")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run.

    status: "passed" (exit status 0), "failed" (non-zero exit, killed by a signal or a limit,
    output limit), "timeout" (wall clock) or "error" (the sandbox itself could not run it).
    """

    status: str
    reason: str
    stdout: str
    stderr: str
    returncode: int | None
    wall_s: float
    output_truncated: bool
    protections: Protections | None


# ------------------------------------------------------------------------------ backend choice
@functools.lru_cache(maxsize=None)
def _bwrap_works() -> bool:
    """bwrap may be installed yet unusable (no unprivileged user namespaces): probe it once."""
    if shutil.which("bwrap") is None:
        return False
    res = run_python("print('ok')", backend="bwrap", limits=Limits(timeout_s=60.0))
    return res.status == "passed" and res.stdout.strip() == "ok"


def default_backend() -> str:
    """"bwrap" when bubblewrap is installed and works here, else "fallback"."""
    return "bwrap" if _bwrap_works() else "fallback"


def _world_reachable(path: str) -> bool:
    """Whether an unrelated uid can reach `path`: every ancestor o+x, the file itself o+r or o+x."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & (stat.S_IROTH | stat.S_IXOTH))


@functools.lru_cache(maxsize=None)
def default_python() -> str:
    """An interpreter the sandbox uid can execute: this one if world-reachable, else python3.

    A virtualenv or pyenv under /root is not reachable by an unprivileged uid; the program then
    gets the system interpreter (standard library only), which is all HumanEval needs.
    """
    candidates = [os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
                  "/usr/bin/python3", shutil.which("python3") or ""]
    for cand in candidates:
        if cand and os.path.exists(cand) and (os.geteuid() != 0 or _world_reachable(cand)):
            return os.path.realpath(cand)
    raise RuntimeError("no Python interpreter reachable by an unprivileged uid; install python3 "
                       "under /usr or pass python=PATH to run_python")


# ------------------------------------------------------------------------------ uid leases
def _uid_base() -> int:
    """A block of _UID_SLOTS uids that exist in this user namespace and are not system uids."""
    extents = []
    with open("/proc/self/uid_map") as f:
        for line in f:
            inside, _, count = (int(x) for x in line.split())
            extents.append((inside, inside + count))
    for lo, hi in extents:
        if lo <= _UID_BASE_PREFERRED and _UID_BASE_PREFERRED + _UID_SLOTS <= hi:
            return _UID_BASE_PREFERRED
    lo, hi = max(extents, key=lambda e: e[1])
    if hi - lo < 2 * _UID_SLOTS + 70000:
        raise RuntimeError(f"uid_map {extents} leaves no free uid block for the sandbox; run it "
                           "where more uids are mapped, or not as root")
    return hi - _UID_SLOTS - 2


class _UidLease:
    """Exclusive use of one dedicated uid: a flock'd slot file, so no two runs share a uid, whether
    they are threads of one process or separate processes (pytest-xdist workers, parallel evals).

    The lock is what keeps a uid from being reused, so it is dropped only once /proc shows no
    process of the uid at all (zombies included). A uid whose processes cannot be cleared within
    `_CLEAR_LIMIT_S` (stuck in the kernel) is retired: its lock stays held for the life of this
    process and a warning names it.
    """

    _retired: list[int] = []  # lock fds of retired slots, kept open on purpose

    def __init__(self):
        os.makedirs(_LOCK_DIR, mode=0o700, exist_ok=True)
        st = os.lstat(_LOCK_DIR)
        if st.st_uid != 0 or not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o077:
            raise RuntimeError(f"{_LOCK_DIR} must be a root-owned 0700 directory; remove it")
        base = _uid_base()
        for slot in range(_UID_SLOTS):  # lowest free slot: lock files stay few (peak parallelism)
            fd = os.open(os.path.join(_LOCK_DIR, str(slot)), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if not _clear_uid(base + slot):  # a crashed earlier run may have left something
                self._retire(fd, base + slot)
                continue
            self.fd, self.uid = fd, base + slot
            return
        raise RuntimeError(f"all {_UID_SLOTS} sandbox uids are in use; run fewer in parallel")

    def release(self):
        if _clear_uid(self.uid):
            os.close(self.fd)
        else:
            self._retire(self.fd, self.uid)

    @classmethod
    def _retire(cls, fd: int, uid: int) -> None:
        cls._retired.append(fd)
        warnings.warn(f"sandbox uid {uid} still has processes {_uid_pids(uid)} that SIGKILL did "
                      f"not remove within {_CLEAR_LIMIT_S:g} s (stuck in the kernel?); the uid "
                      "stays reserved until this process exits. Check them with `ps -u "
                      f"{uid}`.", RuntimeWarning, stacklevel=3)


def _uid_pids(uid: int) -> list[int]:
    """Processes (zombies included) whose effective uid is `uid`: the owner of /proc/PID.

    A sandboxed process cannot make its uids differ (no privileges, no_new_privs), so its
    effective uid is its real uid, the one RLIMIT_NPROC and kill permission go by.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except FileNotFoundError:
                pass
    return pids


def _clear_uid(uid: int, limit_s: float | None = None) -> bool:
    """SIGKILL every process of `uid` (caller is root) until none is left; False if some remain.

    Each process is signalled through a pidfd opened before its uid is re-checked, so a pid that
    is recycled meanwhile by an unrelated process is never signalled.
    """
    deadline = time.monotonic() + (_CLEAR_LIMIT_S if limit_s is None else limit_s)
    while True:
        pids = _uid_pids(uid)
        if not pids:
            return True
        if time.monotonic() > deadline:
            return False
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
            finally:
                os.close(pidfd)
        time.sleep(0.01)


# ------------------------------------------------------------------------------ bwrap argv
def _bwrap_argv(bwrap: str, python: str, workdir: str, limits: Limits) -> list[str]:
    argv = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--disable-userns", "--die-with-parent",
            "--new-session", "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    prefix = os.path.dirname(os.path.dirname(python))  # e.g. /opt/python3.11 for .../bin/python
    if not prefix.startswith("/usr"):
        argv += ["--ro-bind", prefix, prefix]
    for f in ("/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives"):
        argv += ["--ro-bind-try", f, f]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.tmpfs_bytes),
             "--tmpfs", "/tmp", "--bind", workdir, SANDBOX_DIR, "--chdir", SANDBOX_DIR,
             "--remount-ro", "/", "--clearenv"]  # the root tmpfs (/, /etc) read-only, last
    for k, v in _program_env().items():
        argv += ["--setenv", k, v]
    return argv + ["--", python, "-I", "main.py"]


def _program_env() -> dict[str, str]:
    """The whole environment the program sees: nothing inherited, so no secrets."""
    return {"PATH": "/usr/bin:/bin", "HOME": SANDBOX_DIR, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}


# ------------------------------------------------------------------------------ the run
def run_python(source: str, *, stdin: bytes = b"", files: dict[str, str | bytes] | None = None,
               limits: Limits = Limits(), backend: str = "auto", network: str = "auto",
               python: str | None = None) -> SandboxResult:
    """Run `source` as `main.py` in a fresh work dir under the sandbox and return the outcome.

    Args:
      source: Python source of the program.
      stdin: bytes fed to the program's stdin (then closed).
      files: extra files to create in the work dir, {relative name: content}.
      limits: resource limits, see `Limits`.
      backend: "auto" (bwrap if it works here, else fallback), "bwrap" or "fallback".
      network: fallback backend only: "auto" (namespace, else audit hook), "namespace" (required),
        or "audit" (skip the namespace; for testing the audit hook).
      python: interpreter to run; default `default_python()`.
    """
    if backend == "auto":
        backend = default_backend()
    if backend not in ("bwrap", "fallback"):
        raise ValueError(f"backend={backend!r}; use 'auto', 'bwrap' or 'fallback'")
    if backend == "bwrap" and shutil.which("bwrap") is None:
        raise RuntimeError("bubblewrap is not installed; `apt-get install -y bubblewrap` or pass "
                           "backend='fallback'")
    if network not in ("auto", "namespace", "audit"):
        raise ValueError(f"network={network!r}; use 'auto', 'namespace' or 'audit'")
    python = python or default_python()
    lease = workdir = None
    try:
        lease = _UidLease() if os.geteuid() == 0 else None
        workdir = tempfile.mkdtemp(prefix="phi_jax_sandbox_")
        _populate(workdir, source, files or {}, lease.uid if lease else None)
        cfg = {
            "backend": backend, "network": network, "workdir": workdir, "sandbox_dir": SANDBOX_DIR,
            "uid": lease.uid if lease else None, "rlimits": limits.rlimits(),
            "timeout_s": limits.timeout_s, "tmpfs_bytes": limits.tmpfs_bytes,
            "env": _program_env(),
            "argv": (_bwrap_argv(shutil.which("bwrap"), python, workdir, limits)
                     if backend == "bwrap" else [python, "-I", "main.py"]),
            "argv_audit": [python, "-I", "-c", _AUDIT_BOOTSTRAP, "main.py"],
        }
        return _supervise(cfg, stdin, limits, lease)
    finally:  # _supervise returns only once the supervisor is gone: nothing re-spawns under uid
        if lease is not None:
            lease.release()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _populate(workdir: str, source: str, files: dict[str, str | bytes], uid: int | None) -> None:
    for name, content in {"main.py": source, **files}.items():
        path = os.path.normpath(os.path.join(workdir, name))
        if not path.startswith(workdir + os.sep):
            raise ValueError(f"file name {name!r} leaves the work dir; use a relative path")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
    if uid is not None:
        for root, dirs, names in os.walk(workdir):
            for n in [root] + [os.path.join(root, d) for d in dirs + names]:
                os.chown(n, uid, uid)
    os.chmod(workdir, 0o700)


def _supervise(cfg: dict, stdin: bytes, limits: Limits, lease) -> SandboxResult:
    """Start the supervisor, collect output and its report; return only once it has exited.

    The uid lease is released right after this returns, so the supervisor must be gone by then
    whatever happens here (an exception, a KeyboardInterrupt): a supervisor still running could
    start the program under a uid already handed to the next run, or kill that run's processes.
    """
    status_r, status_w = os.pipe()
    cfg["status_fd"] = status_w
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", _SUPERVISOR, json.dumps(cfg)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=(status_w,), env={"PATH": "/usr/bin:/bin"}, start_new_session=True, cwd="/")
    os.close(status_w)
    status_file = os.fdopen(status_r, "rb", buffering=0)
    try:
        out, err, status_raw, truncated = _collect(proc, status_file, stdin, limits, lease)
        proc.wait()
    finally:
        if proc.returncode is None:  # interrupted: take the supervisor down before the lease goes
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr, status_file):
            f.close()
    report = json.loads(status_raw) if status_raw else None
    return _result(cfg, report, bytes(out), bytes(err), truncated, limits)


def _collect(proc, status_file, stdin: bytes, limits: Limits, lease):
    """Feed stdin, read stdout/stderr (capped) and the status pipe until all three reach EOF."""
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    out, err, status_raw, truncated, stopped = bytearray(), bytearray(), bytearray(), False, False
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    sel.register(status_file, selectors.EVENT_READ, status_raw)
    backstop = time.monotonic() + limits.timeout_s + 30.0
    try:
        while sel.get_map():
            left = backstop - time.monotonic()
            if left <= 0:  # the supervisor itself is stuck: take everything down from here
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                if lease is not None:
                    _clear_uid(lease.uid)
                break
            for key, _ in sel.select(timeout=min(left, 1.0)):
                chunk = os.read(key.fileobj.fileno(), 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = key.data
                if buf is status_raw:
                    buf += chunk
                elif len(out) + len(err) + len(chunk) <= limits.output_bytes:
                    buf += chunk
                else:
                    room = max(limits.output_bytes - len(out) - len(err), 0)
                    buf += chunk[:room]
                    truncated = True
                    if not stopped:  # ask the supervisor to kill the run; drain until EOF
                        stopped = True
                        try:
                            proc.send_signal(signal.SIGTERM)
                        except ProcessLookupError:
                            pass
    finally:
        sel.close()
    return out, err, status_raw, truncated


def _protections(cfg: dict, report: dict | None) -> Protections:
    ns = (report or {}).get("namespaces") or {}
    if cfg["backend"] == "bwrap":
        network, pid_ns = "namespace", True
        fs = ("bwrap: read-only /usr (+ interpreter), private /tmp, /proc, /dev; "
              f"work dir read-write at {SANDBOX_DIR}; nothing else of the host")
    else:
        network, pid_ns = ns.get("network", "unknown"), False
        fs = ("host filesystem with the run's uid permissions; private tmpfs over /tmp, "
              f"/var/tmp, /dev/shm, /run/lock; work dir at {SANDBOX_DIR}"
              if ns.get("mount") else
              "host filesystem with the caller's permissions (no mount namespace)")
    uid = f"dedicated uid {cfg['uid']}" if cfg["uid"] is not None else "caller's uid (not root)"
    cleanup = ("pid namespace + " if pid_ns else "") + \
              ("kill-by-uid + " if cfg["uid"] is not None else "") + "subreaper sweep"
    return Protections(cfg["backend"], uid, pid_ns, network, fs, dict(cfg["rlimits"]), cleanup)


_SIGNAL_REASONS = {signal.SIGXCPU: "CPU time limit exceeded", signal.SIGXFSZ: "file size limit "
                   "exceeded", signal.SIGKILL: "killed (SIGKILL: CPU hard limit or memory)",
                   signal.SIGSEGV: "segmentation fault", signal.SIGABRT: "aborted"}


def _result(cfg, report, out: bytes, err: bytes, truncated: bool, limits: Limits):
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    protections = _protections(cfg, report)
    make = functools.partial(SandboxResult, stdout=stdout, stderr=stderr,
                             output_truncated=truncated, protections=protections)
    if report is None:
        return make(status="error", reason="sandbox supervisor died without a report",
                    returncode=None, wall_s=0.0)
    rc, wall = report["returncode"], report["wall_s"]
    if report["setup_error"]:
        return make(status="error", reason=f"sandbox setup failed: {report['setup_error']}",
                    returncode=rc, wall_s=wall)
    if truncated or report["terminated"]:
        return make(status="failed", reason=f"output limit of {limits.output_bytes} bytes "
                    "exceeded", returncode=rc, wall_s=wall)
    if report["timed_out"]:
        return make(status="timeout", reason=f"wall-clock limit of {limits.timeout_s:g} s "
                    "exceeded", returncode=None, wall_s=wall)
    if rc == 0:
        return make(status="passed", reason="exit status 0", returncode=0, wall_s=wall)
    sig = -rc if rc < 0 else (rc - 128 if cfg["backend"] == "bwrap" and rc > 128 else None)
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        reason = _SIGNAL_REASONS.get(sig, f"killed by {name}")
    else:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        reason = lines[-1].strip()[:500] if lines else f"exit status {rc}"
    return make(status="failed", reason=reason, returncode=rc, wall_s=wall)
