"""Sandbox supervisor: a small stdlib-only process that starts one untrusted program and cleans up.

Run by `phi_jax.sandbox.execute` as `python -I -S _supervisor.py CONFIG_JSON` in its own session, with
the program's stdin/stdout/stderr as its fds 0/1/2 and a status pipe on `config["status_fd"]`.
It is a separate process (not a `preexec_fn`) because the caller is multi-threaded (JAX, a thread
pool of sandbox runs) and forking a multi-threaded process to run Python code is unsafe; this
process is single-threaded, so it may fork, drop privileges and call `unshare`/`mount` freely.

What it does, in order:
  1. becomes a child subreaper, so any descendant that double-forks or `setsid`s to escape is
     re-parented to it (not to init) and can still be found and killed;
  2. forks the program, which (in the child) optionally enters new network / IPC / mount namespaces
     (fallback backend), hides world-writable directories behind private tmpfs mounts, sets
     PDEATHSIG, rlimits (soft == hard, so they cannot be raised), drops all groups and switches to
     the dedicated uid, sets no_new_privs, closes every other fd and execs;
  3. waits for the program with a wall-clock deadline (pidfd + select), or until the caller sends
     SIGTERM (output limit exceeded);
  4. kills everything left: the program (with bwrap, killing bwrap tears down the whole PID
     namespace), every process of the dedicated uid (`kill(-1, SIGKILL)` from a helper running as
     that uid, repeated until /proc shows none, zombies included), and every remaining descendant;
  5. writes one JSON status document to the status fd and exits.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38
_RLIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "as": resource.RLIMIT_AS,
    "fsize": resource.RLIMIT_FSIZE,
    "nproc": resource.RLIMIT_NPROC,
    "nofile": resource.RLIMIT_NOFILE,
    "core": resource.RLIMIT_CORE,
}
_libc = ctypes.CDLL(None, use_errno=True)


class _Terminate(Exception):
    """Raised by the SIGTERM handler: the caller wants the run stopped now."""


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option, arg):
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def _enter_namespaces(cfg):
    """Fallback backend only: new network and mount namespaces where possible; says which."""
    want_net = cfg["network"] != "audit"
    net = _CLONE_NEWNET if want_net else 0
    user = 0 if os.geteuid() == 0 else _CLONE_NEWUSER  # unprivileged: via a user namespace
    got = {"network": "audit-hook", "mount": False, "ipc": False}
    uid, gid = os.getuid(), os.getgid()
    # IPC first: SysV shared memory, semaphores and message queues (and POSIX queues) made in the
    # host's IPC namespace would outlive the run, outside every rlimit, readable by later runs.
    combos = [user | _CLONE_NEWIPC | rest for rest in (net | _CLONE_NEWNS, net, _CLONE_NEWNS)]
    for flags in combos + [flags & ~_CLONE_NEWIPC for flags in combos]:
        if flags & ~user and _libc.unshare(ctypes.c_int(flags)) == 0:
            if user:  # map our own ids into the new user namespace (else files show as overflow)
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                                   ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
            if flags & _CLONE_NEWNET:
                got["network"] = "namespace"
            got["mount"] = bool(flags & _CLONE_NEWNS)
            got["ipc"] = bool(flags & _CLONE_NEWIPC)
            break
    if got["mount"]:
        # Private copies of the world-writable directories: writes there vanish with the namespace,
        # and host files in them can be neither read nor deleted. The work dir is bound back in.
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
        workfd = os.open(cfg["workdir"], os.O_RDONLY | os.O_DIRECTORY)
        for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
            if os.path.isdir(d) and not os.path.islink(d):
                _mount("tmpfs", d, "tmpfs", _MS_NOSUID | _MS_NODEV,
                       f"size={cfg['tmpfs_bytes']},mode=1777")
        os.mkdir(cfg["sandbox_dir"], 0o700)
        _mount(f"/proc/self/fd/{workfd}", cfg["sandbox_dir"], None, _MS_BIND)
        os.close(workfd)
    return got


def _exec_program(cfg, err_w, supervisor_pid):
    """In the forked child: confine this process, then exec the program. Never returns."""
    try:
        os.setsid()
        env, argv = dict(cfg["env"]), cfg["argv"]
        if cfg["backend"] == "fallback":
            got = _enter_namespaces(cfg)
            if cfg["network"] == "namespace" and got["network"] != "namespace":
                raise OSError("no network namespace could be created; pass network='audit' to "
                              "accept the weaker Python-level socket block")
            if got["network"] != "namespace":
                argv = cfg["argv_audit"]
            cwd = cfg["sandbox_dir"] if got["mount"] else cfg["workdir"]
            os.chdir(cwd)
            env["HOME"] = cwd
            os.write(err_w, b"I" + json.dumps(got).encode() + b"\n")
        for name, value in cfg["rlimits"].items():
            resource.setrlimit(_RLIMITS[name], (value, value))
        uid = cfg["uid"]
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        # After the uid change: changing credentials clears the parent-death signal. Compared
        # with the supervisor's pid, not 1: an orphan goes to the nearest subreaper (systemd
        # --user, docker --init, ...), and the program must never run unsupervised.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != supervisor_pid:
            raise OSError("supervisor died during setup")
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        os.closerange(3, err_w)
        os.closerange(err_w + 1, 65536)
        os.set_inheritable(err_w, False)
        os.execve(argv[0], argv, env)
    except BaseException as e:  # report to the supervisor, which reports it to the caller
        try:
            os.write(err_w, b"E" + f"{type(e).__name__}: {e}".encode()[:4000])
        finally:
            os._exit(127)


def _uid_pids(uid):
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry))
                        break
        except OSError:
            pass
    return pids


def _kill_uid(uid, limit_s=60.0):
    """SIGKILL every process of `uid` until /proc shows none (zombies reaped): (most seen, cleared).

    `kill(-1)` as that uid hits all of them in one kernel walk; it is repeated because a process
    forked during the walk can be missed. The deadline is generous: under heavy load the kernel
    may take seconds to tear down a large address space, and the caller's uid lease must not be
    given back while anything of the run exists.
    """
    killed, deadline = 0, time.monotonic() + limit_s
    while True:
        pids = _uid_pids(uid)
        if not pids:
            return killed, True
        if time.monotonic() > deadline:
            return killed, False
        killed = max(killed, len(pids))
        helper = os.fork()
        if helper == 0:
            try:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(helper, 0)
        _reap_nohang()
        time.sleep(0.005)


def _children():
    """(pid, state) of our direct children, zombies included."""
    me, kids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[1]) == me:
            kids.append((int(entry), fields[0]))
    return kids


def _reap_nohang():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill_descendants(limit_s=10.0):
    """As a subreaper, every orphaned descendant becomes our child: kill, reap until none left."""
    killed, deadline = 0, time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for pid, state in _children():
            if state != b"Z":
                killed += 1
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _reap_nohang()
        try:
            os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return killed
        time.sleep(0.002)
    return killed


def main():
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    report = {"returncode": None, "timed_out": False, "terminated": False, "setup_error": None,
              "leftover_processes": 0, "uid_cleared": None, "wall_s": None, "namespaces": None}

    def on_term(signum, frame):
        raise _Terminate()

    signal.signal(signal.SIGTERM, on_term)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    err_r, err_w = os.pipe()
    start, supervisor_pid = time.monotonic(), os.getpid()
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.close(err_r)
        _exec_program(cfg, err_w, supervisor_pid)
    os.close(err_w)
    # The program owns the pipes now; holding them here would delay the caller's EOF.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    exited = False
    try:
        with os.fdopen(err_r, "rb") as f:
            msg = f.read()  # EOF at exec (close-on-exec); "I<json>\n" info, "E<text>" failure
        if msg.startswith(b"I"):
            info, _, msg = msg[1:].partition(b"\n")
            report["namespaces"] = json.loads(info)
        if msg.startswith(b"E"):
            report["setup_error"] = msg[1:].decode(errors="replace")
        pidfd = os.pidfd_open(pid)
        deadline = start + cfg["timeout_s"]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                report["timed_out"] = True
                break
            if select.select([pidfd], [], [], left)[0]:
                break
        if not report["timed_out"]:
            _, status = os.waitpid(pid, 0)
            exited = True
            report["returncode"] = os.waitstatus_to_exitcode(status)
    except _Terminate:
        report["terminated"] = True
    report["wall_s"] = time.monotonic() - start
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the cleanup whatever the caller does
    if not exited:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    leftovers = 0
    if cfg["uid"] is not None:
        killed, report["uid_cleared"] = _kill_uid(cfg["uid"])
        leftovers += killed
    leftovers += _kill_descendants()
    if not exited:
        leftovers = max(leftovers - 1, 0)  # the program itself is not a leftover
    report["leftover_processes"] = leftovers
    os.write(status_fd, json.dumps(report).encode())
    os.close(status_fd)


if __name__ == "__main__":
    main()
