"""The sandbox contains hostile programs: each is run on both backends, in parallel, and checked.

Every hostile program tries one escape; its check asserts the escape failed (judged from the host
side where possible: the listener saw no connection, the host file is untouched, no process
survives), that the run reports a reason, and that the caller is unharmed afterwards.

No assertion depends on the machine's speed (CI runs this beside other heavy tests on 2 cores):
a program that ends by itself gets a wall clock far beyond what it needs, so it always reaches
its own verdict; only the programs that must be stopped by the clock get a short one.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from typing import Callable

import pytest

from phi_jax.sandbox import execute as sandbox

ROOT = os.geteuid() == 0
HAS_BWRAP = shutil.which("bwrap") is not None
BWRAP_WORKS = HAS_BWRAP and sandbox.default_backend() == "bwrap"
BACKENDS = [pytest.param("bwrap", marks=pytest.mark.skipif(
    not BWRAP_WORKS, reason="bubblewrap not installed, or installed but unusable here (no user "
                            "namespaces); apt-get install -y bubblewrap")), "fallback"]
# Programs that end by themselves take well under a second on an idle machine: 120 s only catches
# a hang. Programs that never end are stopped after 3 s; reaching that is their expected outcome.
LIMITS = sandbox.Limits(timeout_s=120.0, memory_bytes=512 << 20, processes=16, open_files=64,
                        output_bytes=64 << 10, file_bytes=4 << 20)
SHORT = 3.0
GENEROUS = sandbox.Limits(timeout_s=120.0)


@dataclasses.dataclass
class Hostile:
    name: str
    code: str  # formatted with the context dict
    check: Callable  # (result, ctx) -> None, asserts
    timeout_s: float = LIMITS.timeout_s


def _procs_with(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def _uid_procs(uid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process, zombies included, with `uid` as real, effective, saved or
    filesystem uid; read from /proc/PID/status (not the sandbox's own owner-of-/proc test)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            if str(uid) in fields["Uid"].split():
                out.append((int(entry), fields["State"].strip()))
    return out


_lease_seen = threading.local()


def _watching_clear_uid(clear_uid):
    """Wrap the caller's last-resort `_clear_uid` (run when a uid is leased, when it is handed
    back, and when the supervisor is stuck) to list the uid's processes first. The uid is leased
    to this run at each of those moments, so no other run can own it: whatever is listed belongs
    to this run and outlived the supervisor's own cleanup, which must have left nothing."""
    def watched(uid, limit_s=None):
        _lease_seen.uid = uid
        _lease_seen.survivors += _uid_procs(uid)
        return clear_uid(uid, limit_s)
    return watched


def _run_watched(source, limits, backend):
    _lease_seen.uid, _lease_seen.survivors = None, []
    r = sandbox.run_python(source, limits=limits, backend=backend)
    return r, dict(uid=_lease_seen.uid, survivors=_lease_seen.survivors)


def _not_passed(r, ctx):
    assert r.status in ("failed", "timeout"), (r.status, r.reason, r.stdout, r.stderr)


def _printed_nothing_bad(r, ctx):
    assert "ESCAPED" not in r.stdout, r.stdout


HOSTILE = [
    Hostile("connect_loopback_listener", """
        import socket
        s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
        s.sendall(b"hello from the sandbox")
        print("ESCAPED connected")
        """, lambda r, ctx: (_not_passed(r, ctx), _printed_nothing_bad(r, ctx))),
    Hostile("connect_external_dns", """
        import socket
        socket.getaddrinfo("pypi.org", 443)
        print("ESCAPED resolved")
        """, lambda r, ctx: (_not_passed(r, ctx), _printed_nothing_bad(r, ctx))),
    Hostile("udp_send_to_listener", """
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"x", ("127.0.0.1", {udp_port}))
        s.settimeout(1)
        s.recv(10)
        print("ESCAPED udp")
        """, lambda r, ctx: (_not_passed(r, ctx), _printed_nothing_bad(r, ctx))),
    Hostile("write_outside_workdir", """
        open({victim_dir!r} + "/planted.txt", "w").write("pwned")
        print("ESCAPED wrote")
        """, lambda r, ctx: (_not_passed(r, ctx), _printed_nothing_bad(r, ctx))),
    Hostile("delete_outside_workdir", """
        import os
        os.remove({victim_file!r})
        print("ESCAPED deleted")
        """, lambda r, ctx: (_not_passed(r, ctx), _printed_nothing_bad(r, ctx))),
    Hostile("write_system_dirs", """
        for path in ("/usr/lib/phi_jax_planted_{token}", "/etc/phi_jax_planted_{token}",
                     "/phi_jax_planted_{token}"):
            try:
                open(path, "w").write("pwned")
                print("ESCAPED", path)
            except OSError:
                pass
        raise SystemExit("no system directory writable")
        """, lambda r, ctx: (_not_passed(r, ctx), _printed_nothing_bad(r, ctx),
                             assert_(not any(os.path.exists(p + ctx["token"]) for p in (
                                 "/usr/lib/phi_jax_planted_", "/etc/phi_jax_planted_",
                                 "/phi_jax_planted_"))))),
    Hostile("write_into_caller_dir", """
        open({caller_dir!r} + "/planted.txt", "w").write("pwned")
        print("ESCAPED wrote")
        """, lambda r, ctx: (_not_passed(r, ctx), _printed_nothing_bad(r, ctx))),
    Hostile("read_env_secrets", """
        import os, glob
        seen = repr(dict(os.environ))
        for path in glob.glob("/proc/*/environ") + ["/proc/{caller_pid}/environ"]:
            try:
                seen += open(path, "rb").read().decode(errors="replace")
            except OSError:
                pass
        print(seen)
        """, lambda r, ctx: (assert_(ctx["secret"] not in r.stdout + r.stderr),
                             assert_("PATH" in r.stdout))),
    Hostile("read_root_only_files", """
        out = []
        for path in ["/etc/shadow", "/proc/{caller_pid}/environ", "/proc/{caller_pid}/mem",
                     {root_only!r}]:
            try:
                out.append(open(path, "rb").read(100))
            except OSError as e:
                out.append(type(e).__name__)
        if any(isinstance(x, bytes) for x in out):
            print("ESCAPED", out)
        raise SystemExit("denied: " + repr(out))
        """, lambda r, ctx: (_not_passed(r, ctx), _printed_nothing_bad(r, ctx),
                             assert_(ctx["root_secret"] not in r.stdout + r.stderr))),
    Hostile("fork_bomb", """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, lambda r, ctx: _not_passed(r, ctx), timeout_s=SHORT),
    Hostile("thread_bomb", """
        import threading, time
        n = 0
        while True:
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
            n += 1
            if n > 10000:
                print("ESCAPED threads", n)
                break
        """, lambda r, ctx: (_not_passed(r, ctx), _printed_nothing_bad(r, ctx))),
    Hostile("memory_bomb", """
        blocks = []
        while True:
            blocks.append(bytearray(64 << 20))
        """, lambda r, ctx: (_not_passed(r, ctx), assert_("MemoryError" in r.reason, r.reason))),
    Hostile("infinite_loop", "while True:\n    pass\n",
            lambda r, ctx: assert_(r.status == "timeout", r), timeout_s=SHORT),
    Hostile("one_gigabyte_print", """
        import sys
        line = "x" * (1 << 20)
        for _ in range(1024):
            sys.stdout.write(line)
        """, lambda r, ctx: (_not_passed(r, ctx), assert_(r.output_truncated),
                             assert_(len(r.stdout) <= LIMITS.output_bytes),
                             assert_("output limit" in r.reason))),
    Hostile("double_fork_daemon", """
        import os
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/usr/bin/sleep", ["sleep", "{token}"])
            os._exit(0)
        os.wait()
        print("parent exits")
        """, lambda r, ctx: (assert_(r.status == "passed", r),
                             assert_(not _procs_with(ctx["token"]), "daemon survived"))),
    Hostile("setsid_spinner_outlives_timeout", """
        import os, time
        if os.fork() == 0:
            os.setsid()
            os.execv("/usr/bin/sleep", ["sleep", "{token2}"])
        while True:
            time.sleep(1)
        """, lambda r, ctx: (assert_(r.status == "timeout", r),
                             assert_(not _procs_with(ctx["token2"]), "daemon survived")),
        timeout_s=SHORT),
    Hostile("raise_rlimits", """
        import resource
        for lim in (resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_CPU,
                    resource.RLIMIT_NOFILE, resource.RLIMIT_FSIZE):
            try:
                resource.setrlimit(lim, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                print("ESCAPED raised", lim)
            except (ValueError, OSError):
                pass
        raise SystemExit("could not raise any limit")
        """, lambda r, ctx: (_not_passed(r, ctx), _printed_nothing_bad(r, ctx))),
    Hostile("become_root", """
        import os
        for f in (os.setuid, os.setgid):
            try:
                f(0)
                print("ESCAPED root")
            except OSError:  # EPERM, or EINVAL where uid 0 is not mapped
                pass
        import subprocess
        p = subprocess.run(["/usr/bin/su", "-c", "id -u"], capture_output=True, text=True)
        if p.stdout.strip() == "0":
            print("ESCAPED su")
        raise SystemExit("still unprivileged")
        """, lambda r, ctx: (_not_passed(r, ctx), _printed_nothing_bad(r, ctx))),
    Hostile("signal_parent_and_caller", """
        import os, signal
        for pid in (os.getppid(), {caller_pid}, {sentinel_pid}):
            try:
                os.kill(pid, signal.SIGKILL)
                print("signalled", pid)
            except OSError as e:
                print("denied", pid, type(e).__name__)
        os.kill(-1, signal.SIGKILL)  # everything this uid may signal (never the caller)
        raise SystemExit("all signals denied")
        """, lambda r, ctx: (assert_(f"denied {ctx['caller_pid']}" in r.stdout, r.stdout),
                             assert_(f"denied {ctx['sentinel_pid']}" in r.stdout, r.stdout),
                             assert_(ctx["sentinel"].poll() is None, "sentinel was killed"))),
    Hostile("file_size_bomb", """
        with open("big.bin", "wb") as f:
            for _ in range(64):
                f.write(b"x" * (1 << 20))
        print("ESCAPED wrote 64 MiB")
        """, lambda r, ctx: (_not_passed(r, ctx), _printed_nothing_bad(r, ctx),
                             assert_("File too large" in r.reason or "SIGXFSZ" in r.reason or
                                     "file size" in r.reason, r.reason))),
    Hostile("open_file_bomb", """
        fs = [open("f%d" % i, "w") for i in range(100000)]
        print("ESCAPED opened", len(fs))
        """, lambda r, ctx: (_not_passed(r, ctx), _printed_nothing_bad(r, ctx),
                             assert_("Too many open files" in r.reason, r.reason))),
    Hostile("device_write", """
        import glob, os, stat
        for dev in glob.glob("/dev/[sv]d?") + ["/dev/mem", "/dev/kmsg"]:
            try:
                fd = os.open(dev, os.O_WRONLY)  # no O_CREAT: only a real device node counts
                mode = os.fstat(fd).st_mode
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                    print("ESCAPED", dev)
            except OSError:
                pass
        raise SystemExit("no device writable")
        """, lambda r, ctx: (_not_passed(r, ctx), _printed_nothing_bad(r, ctx))),
    Hostile("sysv_shm_outlives_run", """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmget.argtypes = (ctypes.c_int, ctypes.c_size_t, ctypes.c_int)
        shmid = libc.shmget({shm_key}, 1 << 20, 0o1000 | 0o666)  # IPC_CREAT, world read-write
        if shmid < 0:
            raise SystemExit(f"shmget failed: errno {{ctypes.get_errno()}}")
        print("created", shmid)
        """, lambda r, ctx: (assert_(r.status == "passed", r),
                             assert_(ctx["shm_key"] not in _host_shm_keys(),
                                     "a SysV shared memory segment outlived the run"))),
    Hostile("exit_zero_early_then_daemon", """
        import os
        if os.fork() == 0:
            os.execv("/usr/bin/sleep", ["sleep", "{token3}"])
        os._exit(0)
        """, lambda r, ctx: (assert_(r.status == "passed", r),
                             assert_(not _procs_with(ctx["token3"]), "child survived"))),
]


def assert_(cond, msg=""):
    assert cond, msg


def _host_shm_keys() -> set[int]:
    """Keys of the SysV shared memory segments in the host's (the caller's) IPC namespace."""
    with open("/proc/sysvipc/shm") as f:
        next(f)
        return {int(line.split()[0]) for line in f}


def _remove_host_shm(key: int) -> None:
    """Delete the segment `key` from the host, should a failing run have left it there."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmget.argtypes = (ctypes.c_int, ctypes.c_size_t, ctypes.c_int)
    shmid = libc.shmget(key, 0, 0)
    if shmid >= 0:
        libc.shmctl(shmid, 0, None)  # IPC_RMID


@pytest.fixture(scope="module", params=BACKENDS)
def hostile_results(request, tmp_path_factory):
    """Run every hostile program on one backend, all at once, and hand back the results."""
    if not ROOT:
        pytest.skip("the hostile suite needs root: without it the sandbox cannot use a "
                    "dedicated uid (CI runs as root)")
    backend = request.param
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.0)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.0)
    victim_dir = tempfile.mkdtemp(prefix="phi_jax_victim_", dir="/var/tmp")
    os.chmod(victim_dir, 0o777)  # anyone may create or delete here: only the sandbox protects it
    victim_file = os.path.join(victim_dir, "keep.txt")
    with open(victim_file, "w") as f:
        f.write("keep")
    caller_dir = str(tmp_path_factory.mktemp("caller"))
    root_only = os.path.join(caller_dir, "root_only.txt")
    root_secret = secrets.token_hex(8)
    with open(root_only, "w") as f:
        f.write(root_secret)
    os.chmod(root_only, 0o600)
    secret = "phi-jax-secret-" + secrets.token_hex(8)
    os.environ["PHI_JAX_TEST_SECRET"] = secret
    sentinel = subprocess.Popen(["sleep", "300"])
    work_tmp = tempfile.mkdtemp(prefix="phi_jax_sbx_tests_", dir="/tmp")
    os.chmod(work_tmp, 0o711)
    old_tempdir, tempfile.tempdir = tempfile.tempdir, work_tmp
    ctx = dict(port=listener.getsockname()[1], udp_port=udp.getsockname()[1],
               victim_dir=victim_dir, victim_file=victim_file, caller_dir=caller_dir,
               caller_pid=os.getpid(), sentinel_pid=sentinel.pid, secret=secret,
               root_only=root_only, root_secret=root_secret, sentinel=sentinel,
               token=f"{secrets.randbelow(10**6) + 10**6}.123",
               token2=f"{secrets.randbelow(10**6) + 10**6}.456",
               token3=f"{secrets.randbelow(10**6) + 10**6}.789",
               shm_key=secrets.randbelow(2**30) + 2**30)
    retired_before = len(sandbox._UidLease._retired)
    try:
        with pytest.MonkeyPatch.context() as mp, concurrent.futures.ThreadPoolExecutor(8) as pool:
            mp.setattr(sandbox, "_clear_uid", _watching_clear_uid(sandbox._clear_uid))
            futs = {h.name: pool.submit(
                        _run_watched, textwrap.dedent(h.code).format(**ctx),
                        dataclasses.replace(LIMITS, timeout_s=h.timeout_s), backend)
                    for h in HOSTILE}
            results, leases = {}, {}
            for name, f in futs.items():
                results[name], leases[name] = f.result()
        after = dict(
            connections=_accept_all(listener), datagrams=_recv_all(udp),
            leftover_workdirs=os.listdir(work_tmp),
            victim_dir=sorted(os.listdir(victim_dir)), victim_text=open(victim_file).read(),
            caller_dir=sorted(os.listdir(caller_dir)), leases=leases,
            uids_retired=len(sandbox._UidLease._retired) - retired_before)
        yield backend, results, ctx, after
    finally:
        tempfile.tempdir = old_tempdir
        os.environ.pop("PHI_JAX_TEST_SECRET", None)
        sentinel.kill()
        sentinel.wait()
        listener.close()
        udp.close()
        shutil.rmtree(victim_dir, ignore_errors=True)
        shutil.rmtree(work_tmp, ignore_errors=True)
        _remove_host_shm(ctx["shm_key"])


def _accept_all(listener):
    n = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def _recv_all(udp):
    n = 0
    while True:
        try:
            udp.recv(100)
        except BlockingIOError:
            return n
        n += 1


@pytest.mark.parametrize("hostile", HOSTILE, ids=[h.name for h in HOSTILE])
@pytest.mark.slow
def test_hostile_program_is_contained(hostile_results, hostile):
    backend, results, ctx, after = hostile_results
    r = results[hostile.name]
    print(f"{backend:8s} {hostile.name:32s} {r.status:8s} {r.reason}")
    assert r.reason
    assert r.status != "error", r  # the sandbox itself must have worked
    hostile.check(r, ctx)
    assert r.protections.backend == backend
    assert r.protections.network == "namespace"
    assert r.protections.pid_namespace == (backend == "bwrap")
    lease = after["leases"][hostile.name]
    assert r.protections.uid == f"dedicated uid {lease['uid']}"
    assert lease["survivors"] == [], "a process of the run survived it"


@pytest.mark.slow
def test_host_side_state_after_hostile_suite(hostile_results):
    backend, results, ctx, after = hostile_results
    assert after["connections"] == 0 and after["datagrams"] == 0  # the listeners saw nothing
    assert after["victim_dir"] == ["keep.txt"] and after["victim_text"] == "keep"
    assert after["caller_dir"] == ["root_only.txt"]
    assert after["leftover_workdirs"] == []  # every work dir removed
    assert after["uids_retired"] == 0  # every uid was cleared and handed back
    assert ctx["sentinel"].poll() is None  # an unrelated root process survived kill attempts
    assert os.environ["PHI_JAX_TEST_SECRET"] == ctx["secret"]


# ------------------------------------------------------------------------------ ordinary behaviour
@pytest.mark.parametrize("backend", BACKENDS)
def test_statuses_output_and_environment(backend, monkeypatch):
    monkeypatch.setenv("PHI_JAX_TEST_SECRET", "should-not-leak")
    ok = sandbox.run_python(
        "import os, sys\nprint(sys.stdin.read().upper(), sorted(os.environ))\n"
        "print(open('data.txt').read(), os.getcwd())\nprint('err', file=sys.stderr)\n",
        stdin=b"hello", files={"data.txt": "payload"}, backend=backend,
        limits=GENEROUS)
    assert ok.status == "passed" and ok.returncode == 0, ok
    assert "HELLO" in ok.stdout and "payload" in ok.stdout and sandbox.SANDBOX_DIR in ok.stdout
    assert "should-not-leak" not in ok.stdout and "PHI_JAX_TEST_SECRET" not in ok.stdout
    assert ok.stderr.strip() == "err"
    bad = sandbox.run_python("def f():\n    raise KeyError('nope')\nf()\n", backend=backend,
                             limits=GENEROUS)
    assert bad.status == "failed" and bad.reason == "KeyError: 'nope'"
    code = sandbox.run_python("import sys; sys.exit(7)", backend=backend, limits=GENEROUS)
    assert code.status == "failed" and code.returncode == 7 and code.reason == "exit status 7"
    killed = sandbox.run_python("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
                                backend=backend, limits=GENEROUS)
    assert killed.status == "failed" and "segmentation" in killed.reason


@pytest.mark.skipif(not ROOT, reason="the audit hook path is forced here through the root fallback")
def test_audit_hook_network_block_when_no_namespace():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.0)
    try:
        r = sandbox.run_python(
            f"import socket\nsocket.create_connection(('127.0.0.1', "
            f"{listener.getsockname()[1]}), timeout=1)\nprint('ESCAPED')\n",
            backend="fallback", network="audit", limits=GENEROUS)
        assert r.protections.network == "audit-hook"
        assert r.status == "failed" and "blocked" in r.reason and "ESCAPED" not in r.stdout
        assert _accept_all(listener) == 0
        spawn = sandbox.run_python("import subprocess\nsubprocess.run(['true'])\n",
                                   backend="fallback", network="audit", limits=GENEROUS)
        assert spawn.status == "failed" and "subprocess.Popen is blocked" in spawn.reason
    finally:
        listener.close()


_LOAD_SANDBOX_ALONE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("sandbox_copy", sys.argv[1])
sb = sys.modules["sandbox_copy"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sb)
lease = sb._UidLease()
print(lease.uid)
lease.release()
"""


@pytest.mark.skipif(not ROOT, reason="uid leases exist only for root callers")
def test_uid_lease_is_exclusive_across_processes(tmp_path):
    """A uid held here is never handed to another process, whatever that process's TMPDIR."""
    held = sandbox._UidLease()
    try:
        other = subprocess.run([sys.executable, "-I", "-c", _LOAD_SANDBOX_ALONE, sandbox.__file__],
                               capture_output=True, text=True, env={"TMPDIR": str(tmp_path)})
        assert other.returncode == 0, other.stderr
        assert int(other.stdout) != held.uid
    finally:
        held.release()


@pytest.mark.skipif(not ROOT, reason="uid leases exist only for root callers")
def test_uid_lease_is_kept_while_a_process_of_the_uid_exists(monkeypatch):
    """A zombie of the run's uid (SIGKILL cannot remove it) keeps the uid locked: the lease is
    retired with a warning instead of being handed to the next run; once reaped, the uid clears."""
    lease = sandbox._UidLease()
    slot_file = os.path.join(sandbox._LOCK_DIR, str(lease.uid - sandbox._uid_base()))
    zombie = subprocess.Popen(["/usr/bin/true"], user=lease.uid, group=lease.uid, cwd="/")
    try:
        while not any(pid == zombie.pid and state.startswith("Z")
                      for pid, state in _uid_procs(lease.uid)):
            os.sched_yield()  # until `true` has exited and, unreaped, is a zombie
        monkeypatch.setattr(sandbox, "_CLEAR_LIMIT_S", 0.2)
        with pytest.warns(RuntimeWarning, match=f"sandbox uid {lease.uid} still has processes"):
            lease.release()
        probe = os.open(slot_file, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # still locked: no other run can take the uid
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    finally:
        zombie.wait()
        if lease.fd in sandbox._UidLease._retired:
            sandbox._UidLease._retired.remove(lease.fd)
            os.close(lease.fd)
    assert sandbox._clear_uid(lease.uid, limit_s=10.0)  # reaped: nothing of the uid is left


def test_default_backend_prefers_bwrap():
    assert sandbox.default_backend() == ("bwrap" if BWRAP_WORKS else "fallback")
    with pytest.raises(ValueError, match="backend="):
        sandbox.run_python("pass", backend="docker")
    with pytest.raises(ValueError, match="leaves the work dir"):
        sandbox.run_python("pass", files={"../x": "y"}, backend="fallback")


def test_caller_process_group_untouched():
    """The run is its own session: the caller's process group and session stay as they were."""
    before = (os.getpgrp(), os.getsid(0), signal.getsignal(signal.SIGINT))
    sandbox.run_python("import os; os.killpg(0, 9)", limits=GENEROUS)
    assert (os.getpgrp(), os.getsid(0), signal.getsignal(signal.SIGINT)) == before
    assert sys.stdout is not None
