"""Sandbox profiles (parse, validate, install) and the bwrap command line: no root needed."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from popek import proc
from popek.engines import sandbox
from popek.engines.sandbox import argv as argvmod
from popek.engines.sandbox import runner, store
from popek.engines.sandbox.profile import Limits, Profile, RunOptions
from popek.errors import EngineError, InvalidInput, NotFound

FDS = sandbox.Fds(seccomp=3, passwd=4, group=5)


def parse(text: str) -> Profile:
    return sandbox.parse_profile("x", Path("/p/x.toml"), text)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("POPEK_HOME", str(tmp_path))
    return tmp_path


# -- parsing ----------------------------------------------------------------
@pytest.mark.parametrize("name", store.SHIPPED)
def test_shipped_profiles_parse(name: str) -> None:
    p = sandbox.parse_profile(name, None, store.shipped_text(name))
    assert p.network is (name == "net")
    assert p.limits == Limits(memory=4 << 30, nproc=512, nofile=1024, cpu_seconds=None)
    assert (p.ro, p.rw, p.env, p.seccomp_extra) == ((), (), {}, ())


def test_full_profile(tmp_path: Path) -> None:
    p = parse(f"""
        network = true
        ro = ["{tmp_path}"]
        rw = ["/var/tmp"]
        seccomp_extra = ["chroot", "chroot"]
        [env]
        EDITOR = "vi"
        [limits]
        memory = "512MiB"
        nproc = 64
        nofile = 256
        cpu_seconds = 30
    """)
    assert p.network and p.ro == (tmp_path.resolve(),) and p.rw == (Path("/var/tmp"),)
    assert p.env == {"EDITOR": "vi"} and p.seccomp_extra == ("chroot",)
    assert p.limits == Limits(memory=512 << 20, nproc=64, nofile=256, cpu_seconds=30)


def test_empty_profile_means_defaults() -> None:
    assert parse("") == Profile(name="x", path=Path("/p/x.toml"))


@pytest.mark.parametrize(("text", "message"), [
    ("netwrok = true", r"unknown key 'netwrok'; allowed: network \(a boolean\), ro"),
    ('network = "yes"', "network is 'yes'; allowed: true or false"),
    ('ro = "/usr"', "ro is '/usr'; allowed: a list of absolute paths"),
    ("rw = [1]", r"rw is \[1\]; allowed: a list of absolute paths"),
    ('ro = ["usr"]', "not an absolute path"),
    ('ro = ["/nonexistent/popek"]', "'/nonexistent/popek': does not exist"),
    ('rw = ["/"]', "the whole host file system cannot be bound"),
    ('ro = ["/proc/self"]', "is under /proc, which the sandbox never shares"),
    ('rw = ["/sys/kernel"]', "is under /sys"),
    ("env = 3", "env is 3; allowed: a table"),
    ("[env]\nX = 1", "env.X is 1; allowed: a string"),
    ('[env]\n"1X" = "a"', "env name '1X' is invalid"),
    ("limits = 1", "limits is 1; allowed: a table"),
    ("[limits]\nswap = 1", r"unknown key limits.swap; allowed: limits.memory"),
    ('[limits]\nmemory = "5XB"', "invalid limits.memory '5XB': unknown unit 'XB'; allowed"),
    ("[limits]\nmemory = 512", "limits.memory is 512; allowed: a size string"),
    ('[limits]\nmemory = "1MiB"', "too small; allowed: at least 16MiB"),
    ("[limits]\nnproc = 0", "limits.nproc is 0; allowed: a whole number >= 1"),
    ("[limits]\nnofile = true", "limits.nofile is True"),
    ("[limits]\ncpu_seconds = 1.5", "limits.cpu_seconds is 1.5"),
    ('seccomp_extra = ["keyctll"]', r"unknown syscall 'keyctll' \(did you mean keyctl"),
    ('seccomp_extra = "ptrace"', "seccomp_extra is 'ptrace'; allowed: a list"),
])
def test_bad_profiles_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=r"^profile 'x' \(/p/x.toml\): ") as err:
        parse(text)
    assert "allowed: " in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)


def test_toml_syntax_error_names_the_line() -> None:
    with pytest.raises(InvalidInput, match=r"not valid TOML: .*line 3"):
        parse("network = false\n\nro = [1,,]\nrw = []\n")


def test_symlink_into_proc_is_refused(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/proc/self")
    with pytest.raises(InvalidInput, match=r"-> /proc/\d+\): is under /proc"):
        sandbox.check_bind_path(str(tmp_path / "link"), "--ro")


# -- the profiles directory ---------------------------------------------------
def test_shipped_profiles_installed_once_never_overwritten(home: Path) -> None:
    assert store.names() == ["default", "net"]
    path = home / "profiles" / "default.toml"
    path.write_text("network = true\n")  # the admin's edit
    (home / "profiles" / "net.toml").unlink()
    assert store.load("default").network is True
    assert store.names() == ["default", "net"]  # net re-installed, default kept
    assert path.read_text() == "network = true\n"


def test_unknown_profile_lists_available(home: Path) -> None:
    (home / "profiles").mkdir()
    (home / "profiles" / "build.toml").write_text("")
    with pytest.raises(NotFound, match=r"unknown sandbox profile 'nope'; available: build, "
                                       r"default, net \(files NAME.toml in "):
        store.load("nope")


@pytest.mark.parametrize("name", ["../etc/passwd", "A", "", "-x", "a" * 64])
def test_bad_profile_name(home: Path, name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid profile name .*; allowed: a-z"):
        store.load(name)


def test_broken_profile_file_names_its_path(home: Path) -> None:
    (home / "profiles").mkdir()
    (home / "profiles" / "bad.toml").write_text("network = maybe\n")
    with pytest.raises(InvalidInput, match=rf"profile 'bad' \({home}/profiles/bad.toml\): "
                                           "not valid TOML: .*line 1"):
        store.load("bad")


# -- merging flags ----------------------------------------------------------------
def test_flags_extend_and_override_profile() -> None:
    base = Profile(name="p", ro=(Path("/a"), Path("/b")), rw=(Path("/c"),),
                   env={"LANG": "de_DE.UTF-8"}, limits=Limits(memory=1 << 30, nproc=10))
    merged = sandbox.merge(base, RunOptions(network=True, ro=(Path("/c"),), rw=(Path("/b"),),
                                            memory=64 << 20, env={"LANG": "C", "TERM": "xterm"}))
    assert merged.network
    assert merged.ro == (Path("/a"), Path("/c")) and merged.rw == (Path("/b"),)
    assert merged.limits == Limits(memory=64 << 20, nproc=10)
    assert merged.env == {"LANG": "de_DE.UTF-8", "TERM": "xterm"}  # the profile wins
    with pytest.raises(InvalidInput, match="too small; allowed: at least 16MiB"):
        sandbox.merge(base, RunOptions(memory=1024))


# -- the command line ---------------------------------------------------------------
def test_bwrap_argv_default_confinement() -> None:
    argv = sandbox.build_bwrap_argv(Profile(name="p"), ["echo", "hi"], FDS)
    joined = " ".join(argv)
    for flag in ("--unshare-all --unshare-user --disable-userns", "--uid 1000 --gid 1000",
                 "--hostname sandbox", "--new-session", "--die-with-parent", "--cap-drop ALL",
                 "--clearenv", "--ro-bind /usr /usr", "--proc /proc", "--dev /dev",
                 "--tmpfs /tmp", "--tmpfs /home/sandbox", "--ro-bind-data 4 /etc/passwd",
                 "--ro-bind-data 5 /etc/group", "--seccomp 3", "--remount-ro /"):
        assert flag in joined, flag
    assert "--share-net" not in argv and "/etc/resolv.conf" not in argv
    assert "/etc/shadow" not in joined and "--bind" not in argv
    assert argv[-3:] == ["--", "echo", "hi"]
    env = {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "--setenv"}
    assert env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/sandbox",
                   "USER": "sandbox"}


def test_bwrap_argv_network_binds_and_sizes() -> None:
    profile = Profile(name="p", network=True, ro=(Path("/srv/in"),), rw=(Path("/srv/out"),),
                      env={"A": "1"}, limits=Limits(memory=64 << 20))
    fds = sandbox.Fds(seccomp=3, passwd=4, group=5, resolv=6, info=7, block=8)
    argv = sandbox.build_bwrap_argv(profile, ["x"], fds)
    # a network namespace of its own even with network: never the host's (its abstract sockets)
    assert "--share-net" not in argv and "--unshare-all" in argv
    assert argv[argv.index("--info-fd"):argv.index("--info-fd") + 4] == [
        "--info-fd", "7", "--block-fd", "8"]
    i = argv.index("/etc/resolv.conf")
    assert argv[i - 2:i + 1] == ["--ro-bind-data", "6", "/etc/resolv.conf"]
    assert argvmod.RESOLV_CONF == "nameserver 10.0.2.3\n"
    ro, rw = argv.index("/srv/in"), argv.index("/srv/out")
    assert argv[ro - 1] == "--ro-bind" and argv[rw - 1] == "--bind"
    assert ro > argv.index("/tmp") and rw > argv.index("/home/sandbox")  # binds after tmpfs
    sizes = {argv[i + 3]: int(argv[i + 1]) for i, a in enumerate(argv) if a == "--size"}
    assert sizes == {"/tmp": 32 << 20, "/home/sandbox": 8 << 20, "/dev/shm": 8 << 20}
    assert argv[argv.index("A") - 1:argv.index("A") + 2] == ["--setenv", "A", "1"]


@pytest.mark.parametrize("memory", [16 << 20, 64 << 20, (4 << 30) + 12345, (1 << 30) - 1])
def test_tmpfs_sizes_share_the_memory_limit(memory: int) -> None:
    sizes = argvmod.tmpfs_sizes(memory)
    assert set(sizes) == {"/tmp", "/home/sandbox", "/dev/shm"}
    assert sum(sizes.values()) <= memory * 3 // 4 and all(v % 4096 == 0 for v in sizes.values())
    assert sizes["/tmp"] > memory // 2 - 4096 and sizes["/dev/shm"] > memory // 8 - 4096


def test_launcher_joins_the_cgroup_then_drops_to_nobody() -> None:
    files = [Path("/sys/fs/cgroup/memory/popek/sandbox-1-0a0b0c0d/tasks"),
             Path("/sys/fs/cgroup/pids/popek/sandbox-1-0a0b0c0d/tasks")]
    assert argvmod.launcher_argv(files, 65534, 65534, "/usr/bin/setpriv", "/bin/sh") == [
        "/bin/sh", "-c", f"echo 0 > {files[0]} && echo 0 > {files[1]} && exec \"$@\"", "sh",
        "/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
        "--inh-caps=-all", "--"]


def test_sandbox_cgroup_names_and_limits() -> None:
    from popek.engines.sandbox import cgroup

    path = cgroup.new_path()
    assert path.startswith(f"popek/sandbox-{os.getpid()}-")
    assert cgroup.NAME.match(path.split("/")[1]) and path != cgroup.new_path()
    lim = cgroup.limits(Limits(memory=64 << 20, nproc=10))
    assert (lim.memory, lim.pids) == (64 << 20, 10 + cgroup.PIDS_EXTRA)
    assert cgroup.limits(Limits(memory=64 << 20)).pids == cgroup.PIDS_DEFAULT


def test_slirp_argv() -> None:
    from popek.engines.sandbox import usernet

    assert usernet.slirp_argv("/usr/bin/slirp4netns", 9, 10, 11) == [
        "/usr/bin/slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback",
        "--enable-sandbox", "--enable-seccomp", "--exit-fd=10", "--ready-fd=11",
        "--netns-type=path", "/proc/self/fd/9", "eth0"]
    assert "--userns-path=/proc/7/ns/user" in usernet.slirp_argv("s", 9, 10, 11,
                                                                  "/proc/7/ns/user")


def test_root_symlinks_follow_host() -> None:
    args = argvmod.root_entries()
    if os.path.islink("/bin"):
        assert ["--symlink", os.readlink("/bin"), "/bin"] == args[args.index("/bin") - 2:
                                                                   args.index("/bin") + 1]


def test_prlimit_argv() -> None:
    assert sandbox.prlimit_argv(Limits()) == ["prlimit", "--core=0", "--"]
    assert sandbox.prlimit_argv(Limits(memory=1 << 30, nproc=5, nofile=64, cpu_seconds=9),
                                "/usr/bin/prlimit") == [
        "/usr/bin/prlimit", "--core=0", f"--as={1 << 30}", "--nproc=5", "--nofile=64",
        "--cpu=9", "--"]


def test_missing_bwrap_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proc, "TOOL_PATH", "/nonexistent")
    with pytest.raises(EngineError, match="install the Debian package 'bubblewrap'"):
        sandbox.find_tools()


def test_unreachable_bind_is_refused() -> None:
    top = Path(tempfile.mkdtemp(dir="/var/tmp"))  # /var/tmp: every user may search it
    try:
        closed = top / "closed"
        (closed / "data").mkdir(parents=True)
        closed.chmod(0o700)
        top.chmod(0o755)
        profile = Profile(name="p", ro=(closed / "data",))
        uid = 65534 if os.geteuid() != 65534 else 65533
        with pytest.raises(InvalidInput, match=rf"cannot reach it, {closed} is mode 0700"):
            runner.check_reachable(profile, uid, uid)
        runner.check_reachable(Profile(name="p", ro=(top,)), uid, uid)
        # as root the runner reaches it for the sandbox (issue 13.7: --rw ~/work as root)
        assert runner.check_reachable(profile, uid, uid, root=True) == [closed / "data"]
        assert runner.check_reachable(Profile(name="p", ro=(top,)), uid, uid, root=True) == []
    finally:
        shutil.rmtree(top)


def test_unreachable_binds_are_staged_in_a_private_mount_namespace(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    staged = {work: f"{argvmod.STAGE_DIR}/0"}
    prefix = argvmod.stage_argv(staged, "/usr/bin/unshare", "/bin/sh")
    assert prefix[:6] == ["/usr/bin/unshare", "--mount", "--propagation", "private", "--",
                          "/bin/sh"]
    assert prefix[7] == (f"mount -t tmpfs -o mode=0755,size=64k popek-stage "
                         f"{argvmod.STAGE_DIR} && mkdir {argvmod.STAGE_DIR}/0 && "
                         f"mount --bind {work} {argvmod.STAGE_DIR}/0 && exec \"$@\"")
    argv = sandbox.build_bwrap_argv(Profile(name="p", rw=(work,)), ["x"], FDS, staged=staged)
    i = argv.index("--bind")
    assert argv[i:i + 3] == ["--bind", f"{argvmod.STAGE_DIR}/0", str(work)]


def test_run_refuses_empty_command_and_bad_timeout() -> None:
    with pytest.raises(InvalidInput, match="no command given"):
        sandbox.run("default", RunOptions(), [])
    with pytest.raises(InvalidInput, match="--timeout -1: allowed: a number of seconds > 0"):
        sandbox.run("default", RunOptions(timeout=-1), ["true"])
