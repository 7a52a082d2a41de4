"""Run untrusted code (the agent's `python` and `shell` tools) in an OS sandbox: bubblewrap + rlimits.

    from glm5.agent.sandbox import run, sandbox_status
    print(sandbox_status().summary)      # what isolation this machine gives, said once at start
    r = run(["python3", "-c", "print(1 + 1)"], workdir, timeout_s=30, memory_mb=1024)
    r.exit_code, r.stdout, r.stderr, r.timed_out, r.out_of_memory, r.files

What a run gets (when `sandbox_status().available`):
- a separate process tree under bubblewrap (`bwrap`, Debian's `bubblewrap` package) in new network, PID,
  mount, IPC and UTS namespaces: the network namespace has only its own loopback, so nothing on the host
  (127.0.0.1 included) or beyond is reachable; PIDs outside are invisible, so the parent cannot be signalled;
- a file system built for it: /usr, /etc, /opt and the Python installation read-only, a fresh /proc and /dev,
  private size-limited tmpfs /tmp and /dev/shm, and the workdir the only writable host path. Home
  directories, /run, /var and the rest of the host are not there at all (so no host unix sockets either);
- a seccomp filter (x86-64 and aarch64) that refuses new user namespaces, which would open much of the
  kernel to the code; other system calls are not filtered;
- an unprivileged user: as root, each run gets a fresh uid (no passwd entry, no capabilities) that owns the
  workdir for the run's duration (ownership is restored afterwards); as a normal user, a new user namespace;
- resource limits set inside the namespaces just before the command starts: RLIMIT_AS (`memory_mb`),
  RLIMIT_CPU (the timeout, rounded up), RLIMIT_NPROC (64 processes; counted per uid, and the uid is fresh or
  in a fresh user namespace, so the count starts at zero), RLIMIT_FSIZE (64 MiB per file), RLIMIT_NOFILE,
  no core files;
- a wall-clock timeout: the whole process group is killed, and with it bwrap's PID 1, which takes every
  process in the PID namespace (double-forked or `setsid` ones included) down with it;
- a clean environment: an explicit small one (PATH, HOME=/tmp, LANG, single-threaded BLAS, Agg matplotlib);
  nothing of the parent's environment is passed;
- stdout and stderr captured up to 1 MiB each (the rest is read and dropped, so a flood cannot block or fill
  memory), and `files`: the workdir's files created or changed by the run.

What it does NOT cover: it is not a VM. The kernel is shared, so a kernel exploit escapes it; seccomp
blocks only new user namespaces (and, on other architectures, nothing); CPU time is bounded per process
(RLIMIT_CPU) and by the wall clock, not by a cgroup share, so a run can use every core until the timeout;
memory is bounded per process by address space (RLIMIT_AS), not by a cgroup, so 64 processes could each use
`memory_mb`; disk use in the workdir is bounded per file (RLIMIT_FSIZE), not in total; `out_of_memory` is
read from the run's stderr (MemoryError, ENOMEM, bad_alloc), a heuristic. Runs in one workdir from one
process take turns (each lends the tree to its own uid); two processes running in one workdir at once are
not supported. Files under /usr, /etc and the Python installation can be read (they are not secret on a
normal install; /etc/shadow is not readable by the sandbox's uid).

Where bubblewrap is missing or the kernel refuses namespaces, `sandbox_status()` says so; `run` then raises
`SandboxUnavailable` unless called with `unsafe_no_sandbox=True`, which keeps only the rlimits, the process
group, the clean environment and the workdir as the current directory — no network, file-system or process
isolation at all (like smolagents' local executor, it is not a security sandbox).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

OUTPUT_LIMIT_BYTES = 1024 * 1024       # per stream, what the caller gets back
FILE_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
MAX_PROCESSES = 64
MAX_OPEN_FILES = 1024
TMP_SIZE_MB = 256
MAX_TRACKED_FILES = 20_000             # the `files` scan stops here (a run that makes more is reported as such)
_FRESH_UID_RANGE = (1_700_000_000, 1_800_000_000)   # far above any real account; unmapped in passwd

_OOM_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory", "ENOMEM")


class SandboxUnavailable(RuntimeError):
    """No OS isolation on this machine, and the caller did not pass unsafe_no_sandbox=True."""


@dataclass
class SandboxResult:
    exit_code: int                 # the command's exit status; 128+N when killed by signal N, 127: not found
    stdout: str
    stderr: str
    timed_out: bool                # the wall-clock or CPU-time limit stopped it
    out_of_memory: bool            # it failed allocating past memory_mb (read from its stderr)
    files: list[str] = field(default_factory=list)   # workdir files created or changed, relative, sorted
    truncated: bool = False        # stdout or stderr went over OUTPUT_LIMIT_BYTES and was cut
    sandboxed: bool = True         # False when it ran with unsafe_no_sandbox (no isolation)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True)
class SandboxStatus:
    available: bool
    method: str                    # "bwrap" or "none"
    as_root: bool
    detail: str                    # what isolation, or why there is none

    @property
    def summary(self) -> str:
        if self.available:
            return f"sandbox: {self.detail}"
        return (f"sandbox: NONE ({self.detail}); the python and shell tools refuse to run unless "
                "--unsafe-no-sandbox is given")


def _is_root() -> bool:
    return os.geteuid() == 0


def _python_roots() -> list[str]:
    """Folders the sandboxed Python needs: the venv and the installation it was made from."""
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    roots.add(os.path.dirname(os.path.realpath(sys.executable)))
    roots.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    # a folder inside another is bound with it
    out = []
    for r in sorted(roots, key=len):
        if r in ("/", "") or any(r == o or r.startswith(o + "/") for o in out):
            continue
        if r.startswith(("/usr/", "/etc/", "/opt/")) or r in ("/usr", "/etc", "/opt"):
            continue
        out.append(r)
    return out


# A seccomp filter (classic BPF, as the kernel's seccomp_data lays it out: nr at 0, arch at 4, args at 16)
# that refuses new user namespaces: unshare(CLONE_NEWUSER) and clone(CLONE_NEWUSER) get EPERM, clone3
# (whose flags sit in memory a filter cannot read) gets ENOSYS so libc falls back to clone, and so do
# other ABIs (x32, 32-bit compat) whose numbers differ. User namespaces open much of the kernel to an
# unprivileged process; the sandbox never needs one inside.
_SECCOMP_ARCH = {   # machine: (AUDIT_ARCH_*, unshare, clone, clone3, x32 bit)
    "x86_64": (0xC000003E, 272, 56, 435, 0x40000000),
    "aarch64": (0xC00000B7, 97, 220, 435, None),
}
_CLONE_NEWUSER = 0x10000000


def seccomp_filter() -> bytes | None:
    """The filter's bytes for this machine's architecture, or None where its syscall numbers are not known."""
    import platform
    import struct
    arch = _SECCOMP_ARCH.get(platform.machine())
    if arch is None:
        return None
    audit_arch, nr_unshare, nr_clone, nr_clone3, x32_bit = arch
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    # (opcode, jump-if-true label, jump-if-false label, k); labels name instructions below
    program = [("", ld, None, None, 4),
               ("", jeq, None, "enosys", audit_arch),
               ("", ld, None, None, 0)]
    if x32_bit is not None:
        program.append(("", jge, "enosys", None, x32_bit))
    program += [("", jeq, "enosys", None, nr_clone3),
                ("", jeq, "flags", None, nr_unshare),
                ("", jeq, "flags", None, nr_clone),
                ("", ret, None, None, allow),
                ("flags", ld, None, None, 16),
                ("", jset, None, "allow", _CLONE_NEWUSER),
                ("", ret, None, None, eperm),
                ("allow", ret, None, None, allow),
                ("enosys", ret, None, None, enosys)]
    where = {label: i for i, (label, *_rest) in enumerate(program) if label}
    out = b""
    for i, (_, code, jt, jf, k) in enumerate(program):
        jump_true = where[jt] - i - 1 if jt else 0
        jump_false = where[jf] - i - 1 if jf else 0
        out += struct.pack("<HBBI", code, jump_true, jump_false, k)
    return out


def _bwrap_args(workdir: str, root: bool, tmp_size_mb: int) -> list[str]:
    args = ["bwrap", "--die-with-parent", "--new-session", "--hostname", "sandbox"]
    if root:
        # privileged bwrap: namespaces without a user namespace (the launcher then drops to a fresh uid,
        # which needs CAP_SETUID/CAP_SETGID; setuid() to a non-zero uid clears every capability)
        args += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                 "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-all", "--unshare-user"]
    for top in ("/usr", "/etc", "/opt"):
        if os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for link in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            args += ["--ro-bind", link, link]
    # /dev/shm writable by the sandbox's uid: POSIX semaphores and shared memory (multiprocessing) live there
    args += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(tmp_size_mb * 1024 * 1024), "--tmpfs", "/tmp",
             "--perms", "1777", "--size", str(tmp_size_mb * 1024 * 1024), "--tmpfs", "/dev/shm"]
    roots = _python_roots()
    # the folders above the bound ones are made here, world-traversable: bwrap would copy their host modes,
    # and a 0700 /root or pytest's 0700 temp folder would lock the sandbox's uid out of what lies below
    ancestors = {str(a) for path in [*roots, workdir] for a in Path(path).parents}
    system = ("/", "/tmp", "/usr", "/etc", "/opt")
    ancestors = {a for a in ancestors if a not in system and not a.startswith(("/usr/", "/etc/", "/opt/"))}
    for a in sorted(ancestors, key=lambda a: (a.count("/"), a)):
        args += ["--perms", "0755", "--dir", a]
    for r in roots:
        args += ["--ro-bind", r, r]
    args += ["--bind", workdir, workdir, "--chdir", workdir]
    return args


# Runs inside the namespaces: set the limits, drop to the fresh uid (as root), exec the command.
# Lowering a limit never needs a privilege; RLIMIT_NPROC is set here, inside the fresh uid/user namespace,
# because it counts every process of the (real) uid.
_LAUNCHER = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
for name, value in cfg["limits"]:
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
os.umask(0o022)
argv = cfg["argv"]
try:
    os.execvpe(argv[0], argv, cfg["env"])
except OSError as e:
    sys.stderr.write(f"sandbox: cannot run {argv[0]!r}: {e.strerror}\n")
    sys.exit(127)
"""


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    venv_bin = os.path.dirname(sys.executable)
    env = {
        "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "USER": "sandbox",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "utf-8",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        # BLAS thread pools reserve address space per core; under RLIMIT_AS one thread is what fits
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.update(extra or {})
    return env


@lru_cache(maxsize=1)
def sandbox_status() -> SandboxStatus:
    """What isolation this machine gives (probed once by running `true` in the sandbox)."""
    root = _is_root()
    if shutil.which("bwrap") is None:
        return SandboxStatus(False, "none", root, "bubblewrap (bwrap) is not installed; apt-get install bubblewrap")
    import tempfile
    with tempfile.TemporaryDirectory(prefix="glm5-sandbox-probe-") as d:
        try:
            r = _run_bwrap(["true"], Path(d), timeout_s=20, memory_mb=256, stdin=None, env=None)
        except OSError as e:
            return SandboxStatus(False, "none", root, f"bwrap failed to start: {e}")
        if r.exit_code != 0:
            why = (r.stderr.strip().splitlines() or ["no message"])[-1]
            return SandboxStatus(False, "none", root, f"bwrap cannot create namespaces here: {why}")
    version = subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip()
    who = "as root, a fresh unprivileged uid per run" if root else "an unprivileged user namespace"
    seccomp = "seccomp: no user namespaces" if seccomp_filter() is not None else "no seccomp filter (unknown CPU)"
    return SandboxStatus(True, "bwrap", root,
                         f"{version or 'bubblewrap'}, {who}; no network, private PID/mount/IPC namespaces, "
                         f"read-only system, writable workdir only, rlimits on memory/CPU/processes/file size; {seccomp}")


def run(command: list[str], workdir: str | Path, *, timeout_s: float, memory_mb: int, stdin: str | None = None,
        env: dict[str, str] | None = None, unsafe_no_sandbox: bool = False) -> SandboxResult:
    """Run argv `command` with `workdir` as its current and only writable folder; see the module docstring.

    `env` adds variables to the clean environment (never the parent's). Raises SandboxUnavailable where
    there is no isolation and `unsafe_no_sandbox` is False; ValueError for a bad command or workdir.
    """
    if not isinstance(command, (list, tuple)) or not command or not all(isinstance(a, str) for a in command):
        raise ValueError("command must be a non-empty list of strings (an argv)")
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ValueError(f"workdir {str(workdir)!r} is not a directory")
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError("timeout_s and memory_mb must be positive")
    status = sandbox_status()
    if status.available:
        # runs in one workdir take turns: each gives the tree to its own uid and back
        with _workdir_lock(workdir):
            return _run_bwrap(list(command), workdir, timeout_s=timeout_s, memory_mb=memory_mb, stdin=stdin,
                              env=env)
    if not unsafe_no_sandbox:
        raise SandboxUnavailable(status.summary)
    return _run_unsandboxed(list(command), workdir, timeout_s=timeout_s, memory_mb=memory_mb, stdin=stdin, env=env)


_WORKDIR_LOCKS: dict[str, threading.Lock] = {}
_WORKDIR_LOCKS_GUARD = threading.Lock()


def _workdir_lock(workdir: Path) -> threading.Lock:
    with _WORKDIR_LOCKS_GUARD:
        return _WORKDIR_LOCKS.setdefault(os.path.realpath(workdir), threading.Lock())


def _limits(timeout_s: float, memory_mb: int, nproc: bool) -> list[tuple[str, int]]:
    cpu = max(1, math.ceil(timeout_s)) + 1
    limits = [("RLIMIT_AS", memory_mb * 1024 * 1024), ("RLIMIT_CPU", cpu), ("RLIMIT_FSIZE", FILE_SIZE_LIMIT_BYTES),
              ("RLIMIT_NOFILE", MAX_OPEN_FILES), ("RLIMIT_CORE", 0)]
    if nproc:
        limits.append(("RLIMIT_NPROC", MAX_PROCESSES))
    return limits


def _run_bwrap(command, workdir: Path, *, timeout_s, memory_mb, stdin, env) -> SandboxResult:
    workdir_real = os.path.realpath(workdir)
    root = _is_root()
    uid = random.randrange(*_FRESH_UID_RANGE) if root else None
    cfg = {"limits": _limits(timeout_s, memory_mb, nproc=True), "uid": uid, "argv": command,
           "env": _clean_env(env)}
    argv = _bwrap_args(workdir_real, root, min(TMP_SIZE_MB, memory_mb)) + [
        os.path.realpath(sys.executable), "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)]
    program = seccomp_filter()
    fds: tuple[int, ...] = ()
    if program is not None:
        fd = os.memfd_create("glm5-seccomp", 0)     # bwrap reads the filter from it (inherited, not a file)
        os.write(fd, program)
        os.lseek(fd, 0, os.SEEK_SET)
        fds = (fd,)
        argv[1:1] = ["--seccomp", str(fd)]
    before = _scan(workdir_real)
    owners = _give_to(workdir_real, uid) if uid is not None else None
    try:
        result = _execute(argv, workdir_real, timeout_s=timeout_s, stdin=stdin, env={"PATH": "/usr/bin:/bin"},
                          pass_fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
        if owners is not None:
            _restore_owners(workdir_real, owners)
    result.files = _changed(before, _scan(workdir_real))
    return result


def _run_unsandboxed(command, workdir: Path, *, timeout_s, memory_mb, stdin, env) -> SandboxResult:
    import resource
    limits = _limits(timeout_s, memory_mb, nproc=not _is_root())   # as root RLIMIT_NPROC does not apply

    def set_limits():
        for name, value in limits:
            resource.setrlimit(getattr(resource, name), (value, value))

    workdir_real = os.path.realpath(workdir)
    full_env = _clean_env(env)
    full_env["HOME"] = full_env["TMPDIR"] = workdir_real     # no private /tmp here
    full_env["MPLCONFIGDIR"] = os.path.join(workdir_real, ".matplotlib")
    before = _scan(workdir_real)
    exe = shutil.which(command[0], path=full_env["PATH"]) or command[0]
    result = _execute([exe, *command[1:]], workdir_real, timeout_s=timeout_s, stdin=stdin, env=full_env,
                      preexec_fn=set_limits)
    result.files = _changed(before, _scan(workdir_real))
    result.sandboxed = False
    return result


class _CappedReader(threading.Thread):
    """Drain a pipe to its end, keeping the first `limit` bytes (a flood never blocks the child or our memory)."""

    def __init__(self, pipe, limit: int):
        super().__init__(daemon=True)
        self.pipe, self.limit, self.chunks, self.kept, self.dropped = pipe, limit, [], 0, 0

    def run(self):
        try:
            while chunk := self.pipe.read1(65536) if hasattr(self.pipe, "read1") else self.pipe.read(65536):
                room = self.limit - self.kept
                if room > 0:
                    self.chunks.append(chunk[:room])
                    self.kept += min(room, len(chunk))
                self.dropped += max(0, len(chunk) - max(room, 0))
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        out = b"".join(self.chunks).decode("utf-8", errors="replace")
        if self.dropped:
            out += f"\n[... {self.dropped} more bytes of output dropped]"
        return out


def _execute(argv, cwd, *, timeout_s, stdin, env, preexec_fn=None, pass_fds=()) -> SandboxResult:
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=preexec_fn, close_fds=True, pass_fds=pass_fds)
    readers = [_CappedReader(proc.stdout, OUTPUT_LIMIT_BYTES), _CappedReader(proc.stderr, OUTPUT_LIMIT_BYTES)]
    for r in readers:
        r.start()
    if stdin is not None:
        def feed():
            try:
                proc.stdin.write(stdin.encode("utf-8"))
            except OSError:            # the child exited without reading it all
                pass
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        threading.Thread(target=feed, daemon=True).start()
    wall_timeout = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        wall_timeout = True
    # the group goes either way: with bwrap its PID 1 dies with it (--die-with-parent) and takes the PID
    # namespace along; without bwrap this reaches whatever stayed in the group
    _kill_group(proc.pid)
    proc.wait()
    for r in readers:
        r.join(timeout=5)
    stdout, stderr = readers[0].text(), readers[1].text()
    code = proc.returncode
    if code < 0:                    # killed by a signal outside bwrap: report it as bwrap and shells do
        code = 128 - code
    cpu_killed = code == 128 + signal.SIGXCPU
    oom = code != 0 and any(m in stderr for m in _OOM_MARKERS)
    return SandboxResult(exit_code=code, stdout=stdout, stderr=stderr, timed_out=wall_timeout or cpu_killed,
                         out_of_memory=oom and not wall_timeout, truncated=any(r.dropped for r in readers))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _scan(root: str) -> dict[str, tuple[int, int, int]]:
    """relative path -> (size, mtime_ns, inode) of every regular file under root (symlinks not followed)."""
    seen: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if not os.path.isfile(full) or os.path.islink(full):
                continue
            seen[os.path.relpath(full, root)] = (st.st_size, st.st_mtime_ns, st.st_ino)
            if len(seen) >= MAX_TRACKED_FILES:
                return seen
    return seen


def _changed(before: dict, after: dict) -> list[str]:
    return sorted(p for p, sig in after.items() if before.get(p) != sig)


def _give_to(root: str, uid: int) -> dict[str, tuple[int, int]]:
    """chown the workdir tree to the run's fresh uid; return the owners to restore."""
    owners = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [None, *filenames, *dirnames]:
            full = dirpath if name is None else os.path.join(dirpath, name)
            if name is not None and name in dirnames and not os.path.islink(full):
                continue          # a directory: handled as its own dirpath
            try:
                st = os.lstat(full)
                owners[full] = (st.st_uid, st.st_gid)
                os.lchown(full, uid, uid)
            except OSError:
                pass
    return owners


def _restore_owners(root: str, owners: dict[str, tuple[int, int]]) -> None:
    """Give every path back its owner; what the run made goes to the workdir's owner."""
    default = owners.get(root, (os.getuid(), os.getgid()))
    if _FRESH_UID_RANGE[0] <= default[0] < _FRESH_UID_RANGE[1]:
        default = (os.getuid(), os.getgid())        # a run killed before its restore left its uid behind
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [None, *filenames, *dirnames]:
            full = dirpath if name is None else os.path.join(dirpath, name)
            if name is not None and name in dirnames and not os.path.islink(full):
                continue
            uid, gid = owners.get(full, default)
            if _FRESH_UID_RANGE[0] <= uid < _FRESH_UID_RANGE[1]:
                uid, gid = default
            try:
                os.lchown(full, uid, gid)
            except OSError:
                pass
