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
                      "pool dump"}
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
    r = run(pool, "create", "x", "--size", "1000", check=False)
    assert r.returncode == 5 and b"multiple of 4096" in r.stderr


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
