"""The `cowblock` command, run as a user would: the installed binary.

Every subcommand gets the same contract tests: --help works and shows an
example, a bad option exits 2 with usage, an unknown name or a missing pool
gives a clear message and its own exit code, --json output parses, and
corrupted metadata is reported.
"""
import json
import os
import shutil
import subprocess

import pytest

COWBLOCK = shutil.which("cowblock")
pytestmark = pytest.mark.skipif(COWBLOCK is None, reason="the cowblock command is not installed")



def _walk(group, ctx, prefix=()):
    """Every command of the CLI, found by walking click's command tree, as
    (words, click command): a new command cannot be left out."""
    import click
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        words = (*prefix, name)
        yield words, cmd
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, click.Context(cmd, parent=ctx), words)


def _commands():
    import click
    from cowblock.cli.main import cli
    return {" ".join(w): c for w, c in _walk(cli, click.Context(cli))}


COMMANDS = _commands()
# command -> arguments naming an unknown device; every command with a NAME,
# ORIGIN or SNAPSHOT argument must be here
UNKNOWN_DEVICE = {
    "snapshot": ["nope", "x"], "rm": ["nope"], "rename": ["nope", "x"],
    "resize": ["nope", "8M"], "set": ["nope", "--read-only"], "rollback": ["nope", "x"],
    "info": ["nope"], "diff": ["nope", "x"], "read": ["nope"], "write": ["nope"],
    "export": ["nope", "/dev/null"], "container create": ["nope", "c"],
    "container commit": ["nope", "i"], "container rm": ["nope"],
    "image layer": ["nope", "l", "/dev/null"], "mount": ["nope", "/tmp/cowblock-test-mnt"],
    "serve": ["nope", "--socket", "/tmp/cowblock-test.sock"],
}
# commands that take no device name but a name of something new or a file
NO_DEVICE_ARGUMENT = {"create", "import", "image import", "pool restore", "pool damage",
                      "umount", "bench", "daemon", "daemon stop", "daemon status", "ls",
                      "image ls", "container ls", "image", "container", "pool", "pool create",
                      "pool info", "pool resize", "pool check", "pool trim", "pool set",
                      "pool dump", "pool copy", "snapshotter", "image load", "image prune",
                      "image inspect", "image rm"}   # (these name OCI images, not devices)
SUBCOMMANDS = sorted(COMMANDS)


def test_every_command_is_covered_by_the_contract_tests():
    """Each command says whether it names an existing device (and is then
    run with an unknown one): a new command fails here until it does."""
    assert set(UNKNOWN_DEVICE) | NO_DEVICE_ARGUMENT == set(COMMANDS), \
        set(COMMANDS) ^ (set(UNKNOWN_DEVICE) | NO_DEVICE_ARGUMENT)
    assert not set(UNKNOWN_DEVICE) & NO_DEVICE_ARGUMENT


def run(pool, *args, stdin=None, check=True):
    env = dict(os.environ, COWBLOCK_POOL=str(pool))
    r = subprocess.run([COWBLOCK, *args], input=stdin, capture_output=True, env=env)
    if check and r.returncode:
        raise AssertionError(f"cowblock {' '.join(args)} exited {r.returncode}: "
                             f"{r.stderr.decode()}")
    return r


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "pool"
    run(path, "pool", "create", "--size", "256M", "--block-size", "64K")
    run(path, "create", "base", "--size", "16M")
    return path


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_shows_an_example(tmp_path, sub):
    r = run(tmp_path / "none", *sub.split(), "--help")
    out = r.stdout.decode()
    assert "Usage: cowblock" in out and "Example:" in out


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_bad_option_exits_2_with_usage(pool, sub):
    r = run(pool, *sub.split(), "--no-such-option", check=False)
    assert r.returncode == 2
    assert b"Usage:" in r.stderr and b"no-such-option" in r.stderr


@pytest.mark.parametrize("sub", [s for s in SUBCOMMANDS if any(
    p.required and p.param_type_name == "argument" for p in COMMANDS[s].params)])
def test_missing_input_exits_2_naming_it(pool, sub):
    r = run(pool, *sub.split(), check=False, stdin=b"")
    assert r.returncode == 2, r.stderr
    assert b"Missing argument" in r.stderr and b"Usage:" in r.stderr


@pytest.mark.parametrize("sub", sorted(UNKNOWN_DEVICE))
def test_unknown_device_exits_3(pool, sub):
    r = run(pool, *sub.split(), *UNKNOWN_DEVICE[sub], check=False, stdin=b"")
    assert r.returncode == 3, r.stderr
    assert b"no device named 'nope'" in r.stderr
    assert b"Traceback" not in r.stderr


def test_missing_pool_exits_3(tmp_path):
    r = run(tmp_path / "missing", "ls", check=False)
    assert r.returncode == 3 and b"no pool at" in r.stderr


def test_bad_size_shows_the_accepted_forms(pool):
    r = run(pool, "create", "x", "--size", "ten gigs", check=False)
    assert r.returncode == 2 and b"4096, 4K, 64KiB, 10G, 1.5T" in r.stderr
    r = run(pool, "create", "x", "--size", "0", check=False)
    assert r.returncode == 5 and b"positive multiple of 4096" in r.stderr
    r = run(pool, "create", "x", "--size", "99999999999999999999999", check=False)
    assert r.returncode == 2 and b"more than 16E" in r.stderr


def test_walkthrough_with_json(pool):
    run(pool, "write", "base", "--offset", "4097", stdin=b"hello world")
    run(pool, "snapshot", "base", "layer1", "--read-only")
    run(pool, "snapshot", "layer1", "box1")
    run(pool, "write", "box1", "--offset", "4097", stdin=b"HELLO")
    assert run(pool, "read", "layer1", "--offset", "4097", "--length", "11").stdout == b"hello world"
    assert run(pool, "read", "box1", "--offset", "4097", "--length", "11").stdout == b"HELLO world"
    ls = json.loads(run(pool, "--json", "ls", "--usage").stdout)
    by_name = {d["name"]: d for d in ls}
    assert by_name["box1"]["origin"] == "layer1" and by_name["layer1"]["read_only"]
    assert by_name["box1"]["exclusive"] == 65536
    diff = json.loads(run(pool, "--json", "diff", "layer1", "box1", "--content").stdout)
    assert diff["ranges"] == [{"kind": "different", "begin": 0, "length": 1, "offset": 0,
                               "bytes": 65536, "content": "changed"}]
    r = run(pool, "write", "layer1", stdin=b"x", check=False)
    assert r.returncode == 7 and b"read-only" in r.stderr
    run(pool, "rollback", "box1", "layer1")
    assert run(pool, "read", "box1", "--offset", "4097", "--length", "5").stdout == b"hello"
    run(pool, "rename", "box1", "web")
    run(pool, "set", "web", "--label", "tier=front")
    info = json.loads(run(pool, "--json", "info", "web").stdout)
    assert info["labels"] == {"tier": "front"} and info["origin"] == "layer1"
    run(pool, "resize", "web", "32M")
    assert json.loads(run(pool, "--json", "info", "web").stdout)["size"] == 32 << 20
    r = run(pool, "snapshot", "base", "web", check=False)
    assert r.returncode == 4 and b"exists already" in r.stderr
    run(pool, "rm", "web")
    run(pool, "rm", "--deferred", "layer1")
    tree = run(pool, "ls", "--tree").stdout.decode()
    assert "base" in tree and "layer1" not in tree
    info = json.loads(run(pool, "--json", "pool", "info").stdout)
    assert info["devices"] >= 1 and info["needs_check"] is False
    assert json.loads(run(pool, "--json", "pool", "check").stdout)["ok"] is True
    json.loads(run(pool, "--json", "pool", "trim").stdout)
    run(pool, "pool", "resize", "512M", "--metadata", "128M")
    info = json.loads(run(pool, "--json", "pool", "info").stdout)
    assert info["data_size"] == 512 << 20 and info["metadata_capacity"] == 128 << 20


def test_low_water_mark_warns_runs_hook_and_refuses(pool, tmp_path):
    marker = tmp_path / "hook-ran"
    run(pool, "pool", "set", "--low-water-data", "99.99", "--min-free-space", "99.99",
        "--hook", f"touch {marker}")
    run(pool, "write", "base", stdin=os.urandom(1 << 20))
    r = run(pool, "ls")
    assert b"warning: pool data space is low" in r.stderr
    assert marker.exists()
    r = run(pool, "create", "more", "--size", "4M", check=False)
    assert r.returncode == 6 and b"min_free_space" in r.stderr
    info = json.loads(run(pool, "--json", "pool", "info").stdout)
    assert info["below_low_water"] and info["warnings"]


def test_corrupt_metadata_is_reported(pool):
    meta = pool / "metadata"
    with open(meta, "r+b") as f:  # both superblock slots
        for slot in (0, 1):
            f.seek(slot * 4096 + 100)
            f.write(b"\xff" * 16)
    for args in (["ls"], ["pool", "info"], ["pool", "check"]):
        r = run(pool, *args, check=False)
        assert r.returncode == 9, (args, r.stderr)
        assert b"corrupt" in r.stderr or b"no valid superblock" in r.stderr


def test_second_command_waits_then_names_the_holder(pool):
    holder = subprocess.Popen(
        ["python3", "-c", "import sys, time; from cowblock import Pool; "
         f"p = Pool.open({str(pool)!r}); print('ready', flush=True); time.sleep(3)"],
        stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"ready"
    r = run(pool, "--timeout", "0.3", "create", "x", "--size", "4M", check=False)
    assert r.returncode == 8 and str(holder.pid).encode() in r.stderr
    r = run(pool, "--timeout", "10", "create", "y", "--size", "4M")  # waits for it
    holder.wait()


def test_python_dash_m_works(pool):
    r = subprocess.run(["python3", "-m", "cowblock", "--pool", str(pool), "--json", "ls"],
                       capture_output=True, check=True)
    assert json.loads(r.stdout)[0]["name"] == "base"


def test_default_pool_is_made_on_first_use(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COWBLOCK_POOL"}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    r = subprocess.run([COWBLOCK, "create", "first", "--size", "1G"], env=env,
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    pool = tmp_path / "xdg" / "cowblock" / "pool"
    assert (pool / "metadata").exists()
    assert os.stat(pool / "data").st_blocks * 512 < (1 << 20)  # sparse


# ---- the CLI contract of issue 12 ----
GLOBAL_OPTIONS = {"--json", "--pool", "--timeout"}


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_global_options_are_options_of_every_command(sub):
    """--json, --pool and --timeout work after the command too
    (`cowblock ls --json`, as the examples say)."""
    opts = {o for p in COMMANDS[sub].params for o in getattr(p, "opts", [])}
    assert GLOBAL_OPTIONS <= opts, GLOBAL_OPTIONS - opts


def test_json_and_pool_after_the_command(pool, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COWBLOCK_POOL"}
    env["XDG_DATA_HOME"] = str(tmp_path / "elsewhere")   # not the pool: --pool must say it
    for args in (["ls", "--json"], ["ls", "--pool", str(pool), "--json"],
                 ["info", "base", "--json"], ["--json", "info", "base"],
                 ["pool", "info", "--json"], ["pool", "--json", "info"]):
        r = subprocess.run([COWBLOCK, *args, *([] if "--pool" in args else ["--pool", str(pool)])],
                           capture_output=True, env=env)
        assert r.returncode == 0, (args, r.stderr)
        out = json.loads(r.stdout)
        assert (out[0]["name"] if isinstance(out, list) else out.get("name", "base")) == "base"
    assert not (tmp_path / "elsewhere").exists()


def _json_lines(stderr):
    return [json.loads(line) for line in stderr.decode().splitlines()]


def test_errors_and_notes_are_json_under_json(pool):
    for args, code in ((["info", "nope", "--json"], 3), (["--json", "info", "nope"], 3),
                       (["ls", "--no-such-option", "--json"], 2),
                       (["--json", "create", "x"], 2), (["rm", "base", "--json", "--bogus"], 2)):
        r = run(pool, *args, check=False)
        assert r.returncode == code, (args, r.stderr)
        [line] = _json_lines(r.stderr)
        assert line["error"]["exit_code"] == code and line["error"]["message"], line
    r = run(pool, "info", "nope", "--json", check=False)
    assert _json_lines(r.stderr)[0]["error"]["hint"] == "list the devices with `cowblock ls`"
    r = run(pool, "create", "odd", "--size", "1000", "--json")
    assert json.loads(r.stdout)["size"] == 4096
    assert "rounding the size 1000 up to 4096" in _json_lines(r.stderr)[0]["note"]
    r = run(pool, "info", "nope", check=False)     # without --json: text
    assert r.stderr.startswith(b"cowblock: error: no device named 'nope'")


# what a CLI user must never be told: Python calls, keywords and values
PYTHON_TERMS = [rb"\w\(\)", rb"\w=(True|False|None)\b", rb"\b(timeout|overwrite|hook)=",
                rb"\b(import_image|add_layer|create_container|commit_container)\b",
                rb"\bPool\.", rb"\bpool\.\w", rb"2\*\*", rb"\bdevice \d+\b"]


def assert_plain(text):
    import re
    for pattern in PYTHON_TERMS:
        assert not re.search(pattern, text), (pattern, text)


def test_every_hint_is_plain():
    from cowblock import errors
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.CowblockError):
            assert_plain(cls.hint.encode())


def test_messages_name_devices_and_use_no_python_terms(pool, tmp_path):
    data = tmp_path / "a.raw"
    data.write_bytes(b"a" * 5000)
    run(pool, "image", "import", "img", str(data))
    run(pool, "export", "img", str(tmp_path / "out"))
    for args, code in ((["write", "img"], 7), (["info", "nope"], 3),
                       (["export", "img", str(tmp_path / "out")], 5),
                       (["container", "create", "base", "c"], 5),
                       (["rollback", "base", "base"], 5), (["rm", "img", "img"], 5),
                       (["create", "x", "--size", "1G", "--label", "cowblock.kind=image"], 5),
                       (["read", "base", "--offset", "99999999999999999999"], 2)):
        r = run(pool, *args, check=False, stdin=b"x")
        assert r.returncode == code, (args, r.stderr)
        assert_plain(r.stderr)
    assert b"device 'img' is read-only" in run(pool, "write", "img", stdin=b"x",
                                               check=False).stderr
    r = run(tmp_path / "missing", "ls", check=False)
    assert r.returncode == 3
    assert_plain(r.stderr)
    holder = subprocess.Popen(
        ["python3", "-c", "import time; from cowblock import Pool; "
         f"p = Pool.open({str(pool)!r}); print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"ready"
        r = run(pool, "create", "y", "--size", "4M", "--timeout", "0.2", check=False)
        assert r.returncode == 8 and b"--timeout SECONDS" in r.stderr
        assert_plain(r.stderr.splitlines()[-1])   # the hint (the error names the holder's
                                                   # command line: this test's Python)
    finally:
        holder.kill()
        holder.wait()


def test_pool_create_into_a_file_says_so(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    r = run(tmp_path / "file", "pool", "create", "--size", "64M", check=False)
    assert r.returncode == 5, r.stderr
    assert b"it is a file, and a pool is a directory" in r.stderr
    assert b"read-only until" not in r.stderr


def test_info_says_yes_no_and_dash(pool):
    out = run(pool, "info", "base").stdout.decode()
    assert "False" not in out and "None" not in out and "True" not in out
    rows = dict(line.split(None, 1) for line in out.splitlines()[1:])
    assert rows["origin"].strip() == "-" and rows["read-only"].strip() == "no"
    run(pool, "snapshot", "base", "s", "--read-only")
    rows = dict(line.split(None, 1) for line in run(pool, "info", "s").stdout.decode()
                .splitlines()[1:])
    assert rows["origin"].strip() == "base" and rows["read-only"].strip() == "yes"


def test_read_and_write_past_the_end_are_refused_before_a_byte_moves(pool, tmp_path):
    run(pool, "create", "d", "--size", "100M")
    run(pool, "write", "d", "--offset", "99M", stdin=b"\x11" * (1 << 20))
    for args in (["--offset", "99M", "--length", "2M"], ["--offset", "200M"],
                 ["--offset", "100M", "--length", "1"]):
        r = run(pool, "read", "d", *args, check=False)
        assert r.returncode == 5 and r.stdout == b"", (args, r.stderr)
        assert b"device 'd' is 104857600 bytes (100M); nothing was read" in r.stderr
    assert run(pool, "read", "d", "--offset", "100M").stdout == b""      # up to the end: empty
    assert run(pool, "read", "d", "--offset", "99M").stdout == b"\x11" * (1 << 20)
    big = tmp_path / "big"
    big.write_bytes(b"\x22" * (2 << 20))
    for stdin in (None, b"\x22" * (2 << 20)):   # a regular file, then a pipe
        r = subprocess.run([COWBLOCK, "write", "d", "--offset", "99M"], capture_output=True,
                           env=dict(os.environ, COWBLOCK_POOL=str(pool)), input=stdin,
                           stdin=None if stdin else open(big, "rb"))
        assert r.returncode == 5 and b"nothing was written" in r.stderr, r.stderr
    r = run(pool, "write", "d", "--offset", "101M", stdin=b"", check=False)
    assert r.returncode == 5 and b"at offset 105906176" in r.stderr
    assert run(pool, "read", "d", "--offset", "99M").stdout == b"\x11" * (1 << 20)   # untouched
    run(pool, "write", "d", "--offset", "99M", stdin=b"\x33" * (1 << 20))           # fits
    assert run(pool, "read", "d", "--offset", "99M", "--length", "4").stdout == b"\x33" * 4


def test_export_follows_the_umask(pool, tmp_path):
    r = subprocess.run(["sh", "-c", f'umask 022 && "{COWBLOCK}" export base "{tmp_path}/o"'],
                       env=dict(os.environ, COWBLOCK_POOL=str(pool)), capture_output=True)
    assert r.returncode == 0, r.stderr
    assert os.stat(tmp_path / "o").st_mode & 0o777 == 0o644


def test_pool_info_says_a_writable_pool_is_writable(pool):
    assert json.loads(run(pool, "--json", "pool", "info").stdout)["read_only"] is False


def test_typed_sizes_round_up_with_a_note_and_resize_takes_changes(pool, tmp_path):
    r = run(pool, "create", "d", "--size", "10000")
    assert b"note: rounding the size 10000 up to 12288 bytes (12K)" in r.stderr
    size = lambda: json.loads(run(pool, "info", "d", "--json").stdout)["size"]  # noqa: E731
    assert size() == 12288
    run(pool, "resize", "d", "+10M")
    assert size() == 12288 + (10 << 20)
    run(pool, "resize", "d", "-10M")
    assert size() == 12288
    r = run(pool, "resize", "d", "-5000")          # the new size rounds up: shrinks by 4K
    assert b"rounding the change -5000 up to -4096" in r.stderr and size() == 8192
    run(pool, "resize", "d", "--", "-4K")
    assert size() == 4096
    r = run(pool, "resize", "d", "-4K", check=False)
    assert r.returncode == 5 and b"cannot shrink device 'd' by 4096 bytes" in r.stderr
    r = run(pool, "resize", "d", "20001")
    assert b"up to 20480" in r.stderr and size() == 20480
    # a length taken from a file stays exact
    (tmp_path / "f").write_bytes(b"z" * 10001)
    out = json.loads(run(pool, "--json", "import", "f", str(tmp_path / "f")).stdout)
    assert out["length"] == 10001 and out["size"] == 12288
    run(pool, "export", "f", str(tmp_path / "f.out"))
    assert (tmp_path / "f.out").read_bytes() == b"z" * 10001


def test_rm_rename_rollback_set_rails(pool, tmp_path):
    (tmp_path / "a.raw").write_bytes(b"a" * 8192)
    run(pool, "image", "import", "img", str(tmp_path / "a.raw"))
    run(pool, "container", "create", "img", "c1")
    r = run(pool, "rm", "img", check=False)
    assert r.returncode == 15 and b"container 'c1' depends on it" in r.stderr
    assert b"--force" in r.stderr
    r = run(pool, "set", "img", "--writable", check=False)
    assert r.returncode == 15 and b"cannot make image 'img' writable" in r.stderr
    r = run(pool, "set", "c1", "--label", "cowblock.image=base", check=False)
    assert r.returncode == 5 and b"'cowblock.image' is a reserved label" in r.stderr
    r = run(pool, "rollback", "c1", "base", check=False)
    assert r.returncode == 15 and b"'base' is not a snapshot of 'c1'" in r.stderr
    run(pool, "snapshot", "c1", "c1-before")
    run(pool, "write", "c1", stdin=b"changed")
    run(pool, "rollback", "c1", "c1-before")
    assert run(pool, "read", "c1", "--length", "7").stdout == b"a" * 7
    run(pool, "rename", "img", "base-image")
    assert json.loads(run(pool, "container", "ls", "--json").stdout)[0]["image"] == "base-image"
    run(pool, "rm", "base-image", "--force")
    assert json.loads(run(pool, "container", "ls", "--json").stdout)[0]["image"] is None
    assert b" - " in run(pool, "container", "ls").stdout   # no image, never a dangling name
    run(pool, "set", "c1", "--read-only")
    run(pool, "set", "c1", "--writable")                   # not an image: no --force needed


def test_repair_that_drops_devices_asks_first(tmp_path):
    path = tmp_path / "p"
    run(path, "pool", "create", "--size", "64M", "--block-size", "64K")
    run(path, "create", "a", "--size", "8M")
    run(path, "create", "b", "--size", "8M")
    run(path, "write", "a", stdin=os.urandom(3 << 20))
    run(path, "write", "b", stdin=b"b" * (1 << 20))
    run(path, "pool", "damage", "flip:map-leaf")     # the first leaf: a's
    r = run(path, "pool", "check", "--dry-run", check=False)
    assert r.returncode == 9, r.stderr
    assert b"dropped device 'a': its mapping tree is damaged, its data is lost" in r.stdout
    out = json.loads(run(path, "--json", "pool", "check", "--dry-run", check=False).stdout)
    assert out["would_drop"] == ["a"] and out["dry_run"] and not out["repaired"]
    r = run(path, "pool", "check", "--repair", check=False)   # stdin is not a terminal
    assert r.returncode == 15 and b"give --yes to repair anyway" in r.stderr
    assert b"nothing was changed" in r.stderr
    assert run(path, "pool", "check", check=False).returncode == 9   # as it was
    assert [d["name"] for d in json.loads(run(path, "--json", "ls").stdout)] == ["a", "b"]
    run(path, "pool", "check", "--repair", "--yes")
    assert [d["name"] for d in json.loads(run(path, "--json", "ls").stdout)] == ["b"]
    assert run(path, "read", "b", "--length", "4").stdout == b"bbbb"
    run(path, "pool", "check")
    r = run(path, "pool", "check", "--dry-run")
    assert b"a repair would have nothing to do" in r.stdout
