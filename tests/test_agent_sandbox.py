"""The agent's sandbox: each way out is tried, stopped, reported in SandboxResult, and the next run works.

Runs under bubblewrap where `sandbox_status()` finds it (CI installs it); without it only the refusal and
the explicit unsafe fallback are tested.
"""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from glm5.agent import sandbox
from glm5.agent.sandbox import SandboxStatus, SandboxUnavailable, run, sandbox_status

needs_sandbox = pytest.mark.skipif(not sandbox_status().available, reason=sandbox_status().summary)
PY = sys.executable


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


@pytest.fixture
def work(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    return d


def assert_next_run_works(work):
    r = run(py("print('still here')"), work, timeout_s=20, memory_mb=512)
    assert r.exit_code == 0 and r.stdout == "still here\n", r


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
    return found


@needs_sandbox
def test_runs_code_in_the_workdir_and_reports_files_made(work):
    (work / "inputs").mkdir()
    (work / "inputs" / "data.txt").write_text("1 2 3")
    r = run(py("""
        import os
        nums = open('inputs/data.txt').read().split()
        os.makedirs('outputs', exist_ok=True)
        open('outputs/sum.txt', 'w').write(str(sum(map(int, nums))))
        print(os.getcwd(), input())
    """), work, timeout_s=20, memory_mb=512, stdin="from stdin\n")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split() == [str(work.resolve()), "from", "stdin"]
    assert r.files == ["outputs/sum.txt"] and (work / "outputs/sum.txt").read_text() == "6"
    assert not r.timed_out and not r.out_of_memory and r.sandboxed
    # an unchanged file is not reported again; ownership is back with the workdir's owner
    r = run(["true"], work, timeout_s=20, memory_mb=256)
    assert r.files == []
    assert (work / "outputs/sum.txt").stat().st_uid == work.stat().st_uid == os.getuid()


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0, reason="the fresh uid is a root-only path")
def test_a_workdir_left_owned_by_a_killed_runs_uid_goes_back_to_its_owner(work):
    (work / "old.txt").write_text("x")
    stale = sandbox._FRESH_UID_RANGE[0] + 7
    for p in (work, work / "old.txt"):
        os.chown(p, stale, stale)
    r = run(["touch", "new.txt"], work, timeout_s=20, memory_mb=256)
    assert r.exit_code == 0 and r.files == ["new.txt"], r
    assert {p.stat().st_uid for p in (work, work / "old.txt", work / "new.txt")} == {os.getuid()}


@needs_sandbox
def test_concurrent_runs_in_one_workdir_both_write(work):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: run(["bash", "-c", f"sleep 0.3; echo {i} > f{i}.txt"], work,
                                              timeout_s=20, memory_mb=256), range(2)))
    assert [r.exit_code for r in results] == [0, 0], [r.stderr for r in results]
    assert sorted(p.name for p in work.iterdir()) == ["f0.txt", "f1.txt"]
    assert {p.stat().st_uid for p in work.iterdir()} == {os.getuid()}


@needs_sandbox
def test_writes_outside_the_workdir_are_stopped(work, tmp_path):
    outside = tmp_path / "outside.txt"
    r = run(py(f"""
        import os
        for path in [{str(outside)!r}, '/etc/glm5-escape', '/usr/glm5-escape', {str(Path.home() / 'glm5-escape')!r}]:
            try:
                open(path, 'w').write('x')
                print('WROTE', path)
            except OSError as e:
                print('refused', path, e.strerror)
    """), work, timeout_s=20, memory_mb=512)
    assert r.exit_code == 0, r.stderr
    assert "WROTE" not in r.stdout and r.stdout.count("refused") == 4, r.stdout
    assert not outside.exists() and not Path("/etc/glm5-escape").exists() and not Path("/usr/glm5-escape").exists()
    assert not (Path.home() / "glm5-escape").exists()
    assert_next_run_works(work)


@needs_sandbox
def test_no_network_not_even_the_hosts_loopback(work):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        r = run(py(f"""
            import socket
            try:
                socket.create_connection(('127.0.0.1', {port}), timeout=3)
                print('CONNECTED')
            except OSError as e:
                print('refused', type(e).__name__)
        """), work, timeout_s=20, memory_mb=512)
        assert "refused" in r.stdout and "CONNECTED" not in r.stdout, (r.stdout, r.stderr)
        with pytest.raises(BlockingIOError):
            listener.accept()                      # nothing reached the host's socket
    finally:
        listener.close()
    assert_next_run_works(work)


@needs_sandbox
def test_host_unix_sockets_are_out_of_reach(work, tmp_path):
    # an abstract socket (as D-Bus uses) belongs to the network namespace; a socket file outside the
    # workdir is not in the sandbox's file system
    abstract = f"\0glm5-test-{os.getpid()}"
    listeners = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)]
    path = str(tmp_path / "host.sock")
    try:
        listeners[0].bind(abstract)
        listeners[1].bind(path)
        for s in listeners:
            s.listen(1)
            s.setblocking(False)
        r = run(py(f"""
            import socket
            for address in ({abstract!r}, {path!r}):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(address)
                    print('CONNECTED')
                except OSError as e:
                    print('refused', type(e).__name__)
        """), work, timeout_s=20, memory_mb=256)
        assert r.stdout.count("refused") == 2 and "CONNECTED" not in r.stdout, (r.stdout, r.stderr)
        for s in listeners:
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s in listeners:
            s.close()


@needs_sandbox
def test_new_user_namespaces_are_refused_and_ordinary_processes_still_work(work):
    if sandbox.seccomp_filter() is None:
        pytest.skip("no seccomp filter for this architecture")
    r = run(py("""
        import ctypes, multiprocessing, os, subprocess
        libc = ctypes.CDLL(None, use_errno=True)
        for name, flag in (("user", 0x10000000), ("user+net", 0x50000000)):
            rc = libc.unshare(flag)
            print("unshare", name, rc, os.strerror(ctypes.get_errno()) if rc else "")
        print(subprocess.run(["echo", "spawned"], capture_output=True, text=True).stdout.strip())
        with multiprocessing.Pool(2) as pool:           # POSIX semaphores in /dev/shm, fork
            print("pool", sum(pool.map(abs, [-1, -2, -3])))
    """), work, timeout_s=30, memory_mb=1024)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["unshare user -1 Operation not permitted", "unshare user+net -1 Operation not permitted"]
    assert lines[2:] == ["spawned", "pool 6"]
    r = run(["unshare", "--user", "--map-root-user", "true"], work, timeout_s=20, memory_mb=256)
    assert r.exit_code != 0 and "Operation not permitted" in r.stderr


@needs_sandbox
def test_fork_bomb_is_capped_by_the_process_limit(work):
    r = run(py("""
        import os, time
        made = 0
        try:
            for _ in range(10_000):
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                made += 1
        except OSError as e:
            print('stopped after', made, type(e).__name__)
    """), work, timeout_s=10, memory_mb=512)
    words = r.stdout.split()
    assert words[:2] == ["stopped", "after"], (r.stdout, r.stderr)
    assert int(words[2]) < sandbox.MAX_PROCESSES, r.stdout
    assert_next_run_works(work)


@needs_sandbox
def test_shell_fork_bomb_ends_at_the_timeout_and_leaves_nothing(work):
    t0 = time.monotonic()
    bomb = ":(){ :|:& };:; sleep 3131"
    r = run(["bash", "-c", bomb], work, timeout_s=2, memory_mb=256)
    assert time.monotonic() - t0 < 20
    assert r.timed_out and r.exit_code == 128 + 9, r
    time.sleep(0.2)
    assert _processes_with(bomb) == [] and _processes_with("sleep\x003131") == []
    assert_next_run_works(work)


@needs_sandbox
def test_allocating_past_the_memory_limit_is_reported(work):
    r = run(py("b = bytearray(800 * 1024 * 1024); print('ALLOCATED', len(b))"), work, timeout_s=20, memory_mb=256)
    assert r.out_of_memory and r.exit_code != 0 and "ALLOCATED" not in r.stdout, r
    assert not r.timed_out
    ok = run(py("b = bytearray(50 * 1024 * 1024); print('ALLOCATED', len(b))"), work, timeout_s=20, memory_mb=256)
    assert ok.exit_code == 0 and not ok.out_of_memory, ok


@needs_sandbox
def test_an_endless_loop_and_its_escaped_children_are_killed_at_the_timeout(work):
    # a detached grandchild (new session, ignores SIGTERM) must die with the run too
    t0 = time.monotonic()
    r = run(["bash", "-c", "setsid bash -c 'trap \"\" TERM; exec sleep 4242' & while :; do :; done"], work,
            timeout_s=2, memory_mb=256)
    elapsed = time.monotonic() - t0
    assert r.timed_out and r.exit_code != 0, r
    assert elapsed < 15, f"took {elapsed:.1f} s"
    time.sleep(0.2)
    assert _processes_with("sleep\x004242") == []
    assert_next_run_works(work)


@needs_sandbox
def test_exit_status_of_signals_and_missing_commands(work):
    assert run(["bash", "-c", "exit 3"], work, timeout_s=20, memory_mb=256).exit_code == 3
    r = run(["bash", "-c", "kill -KILL $$"], work, timeout_s=20, memory_mb=256)
    assert r.exit_code == 128 + 9 and not r.timed_out
    r = run(["bash", "-c", "kill -XCPU $$"], work, timeout_s=20, memory_mb=256)   # what RLIMIT_CPU sends
    assert r.exit_code == 128 + 24 and r.timed_out
    r = run(["no-such-program"], work, timeout_s=20, memory_mb=256)
    assert r.exit_code == 127 and "cannot run 'no-such-program'" in r.stderr


@needs_sandbox
def test_the_parents_environment_is_not_visible(work, monkeypatch):
    monkeypatch.setenv("GLM5_TEST_SECRET", "hunter2-do-not-leak")
    r = run(["bash", "-c", "env; cat /proc/1/environ /proc/$PPID/environ 2>/dev/null; "
             f"cat /proc/{os.getpid()}/environ 2>/dev/null; true"], work, timeout_s=20, memory_mb=256)
    assert r.exit_code == 0, r.stderr
    assert "hunter2" not in r.stdout and "GLM5_TEST_SECRET" not in r.stdout
    assert "PATH=" in r.stdout                       # it did print its (clean) environment


@needs_sandbox
def test_signalling_the_parent_or_the_test_process_does_nothing_outside(work):
    me = os.getpid()
    r = run(py(f"""
        import os, signal
        for pid in (os.getppid(), {me}, 1):
            try:
                os.kill(pid, signal.SIGKILL)
                print('sent', pid)
            except OSError as e:
                print('refused', pid, type(e).__name__)
    """), work, timeout_s=20, memory_mb=256)
    r2 = run(["bash", "-c", f"kill -9 {me} $PPID 1; echo done"], work, timeout_s=20, memory_mb=256)
    assert os.getpid() == me                           # this test is alive to assert anything at all
    assert f"sent {me}" not in r.stdout and r2.exit_code is not None
    assert_next_run_works(work)


@needs_sandbox
def test_output_flood_is_capped(work):
    r = run(["yes", "spam"], work, timeout_s=1, memory_mb=256)
    assert r.truncated and r.timed_out
    assert len(r.stdout) < sandbox.OUTPUT_LIMIT_BYTES + 200
    assert r.stdout.startswith("spam\nspam\n") and "more bytes of output dropped" in r.stdout


@needs_sandbox
def test_file_size_limit_stops_a_huge_file(work, monkeypatch):
    monkeypatch.setattr(sandbox, "FILE_SIZE_LIMIT_BYTES", 1024 * 1024)
    r = run(["bash", "-c", "head -c 5000000 /dev/zero > big.bin; echo exit=$?"], work, timeout_s=20, memory_mb=256)
    assert (work / "big.bin").stat().st_size <= 1024 * 1024
    assert "exit=0" not in r.stdout, r
    assert r.files == ["big.bin"]


def test_without_isolation_it_refuses_unless_unsafe(work, monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox_status", lambda: SandboxStatus(False, "none", False, "no bwrap here"))
    with pytest.raises(SandboxUnavailable, match="no bwrap here"):
        run(py("print(1)"), work, timeout_s=10, memory_mb=256)
    r = run(py("import os; open('made.txt', 'w').write('x'); print(sorted(os.environ)[:3])"), work,
            timeout_s=10, memory_mb=512, unsafe_no_sandbox=True)
    assert r.exit_code == 0 and not r.sandboxed and r.files == ["made.txt"], r
    r = run(py("while True: pass"), work, timeout_s=1, memory_mb=256, unsafe_no_sandbox=True)
    assert r.timed_out and r.exit_code == 128 + 9


def test_bad_calls_are_refused_with_a_clear_error(work):
    with pytest.raises(ValueError, match="argv"):
        run("echo hi", work, timeout_s=5, memory_mb=256)
    with pytest.raises(ValueError, match="not a directory"):
        run(["true"], work / "missing", timeout_s=5, memory_mb=256)


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists() or not Path("/usr/bin/python3").exists(),
                    reason="needs root, setpriv and the system python3")
def test_as_an_ordinary_user_the_sandbox_uses_a_user_namespace():
    """The non-root path: bwrap makes a user namespace; network and process limits still hold.

    Run as uid 65534 with the system python3 (the sandbox module needs only the standard library), since
    a virtual environment under root's home is out of that uid's reach.
    """
    import shutil
    import tempfile
    work = Path(tempfile.mkdtemp(prefix="glm5-uid65534-", dir="/tmp"))   # pytest's tmp_path is root-only
    os.chown(work, 65534, 65534)
    try:
        _check_as_uid_65534(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_as_uid_65534(work: Path) -> None:
    inner = textwrap.dedent("""
        import os, socket, time
        made = 0
        try:
            for _ in range(1000):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                made += 1
        except OSError:
            pass
        try:
            socket.create_connection(("127.0.0.1", 1), timeout=2)
            print("CONNECTED")
        except OSError:
            print("no-network")
        print("forks", made)
    """)
    script = "\n".join([
        "import sys",
        "from glm5.agent.sandbox import run, sandbox_status",
        "st = sandbox_status()",
        "print('available', st.available, st.as_root, st.detail)",
        f"r = run([sys.executable, '-c', {inner!r}], {str(work)!r}, timeout_s=15, memory_mb=512)",
        "print(r.stdout, r.stderr)",
    ])
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(sandbox.__file__).parents[2])}
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script],
                         capture_output=True, text=True, timeout=60, env=env, cwd="/")
    if "available False" in out.stdout:
        pytest.skip(f"no sandbox for uid 65534 here: {out.stdout.strip()}")
    assert "available True False" in out.stdout, (out.stdout, out.stderr)
    assert "no-network" in out.stdout and "CONNECTED" not in out.stdout, out.stdout
    forks = int(out.stdout.split("forks")[1].split()[0])
    assert forks < sandbox.MAX_PROCESSES, out.stdout


def test_status_says_what_it_found():
    st = sandbox_status()
    assert st.summary.startswith("sandbox: ")
    assert ("NONE" in st.summary) == (not st.available)
    if os.environ.get("GLM5_REQUIRE_SANDBOX") == "1":
        assert st.available, st.summary
