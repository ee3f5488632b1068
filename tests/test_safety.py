"""Never lose a user's data: hostile destinations, signals, concurrent runs, full disks, resume and split runs.

After every failure: the source's files are unchanged, no staging folder is left, and DST is absent, the old output
byte-identical, or the complete new one. Signals are real signals sent to a real `surgery` process.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import surgery
import surgery.destination
import surgery.execute
from surgery.destination import LOCK_SUFFIX, Lock, sibling

from .test_cli import RECIPE, assert_one_line_error, run

ROOT = Path(__file__).resolve().parent.parent
#: many small shards (about 17 for the tiny Mistral), so a run can be caught between two of them
SMALL = [*RECIPE, "--max-shard-size", "20KB"]
UNQUIET = [arg for arg in SMALL if arg != "--quiet"]
IS_ROOT = os.geteuid() == 0


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder` (links followed), by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def weights(folder: Path) -> dict[str, str]:
    """`digest` less the model card, which names the source and the command."""
    return {name: value for name, value in digest(folder).items() if name != "README.md"}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".surgery-" in p.name)


def staged_shards(dst: Path) -> list[Path]:
    """Complete shards in DST's staging folder."""
    staging = sibling(dst, ".surgery-partial")
    return sorted(staging.glob("model-*.safetensors")) if staging.is_dir() else []


def start(*args: object, delay: float = 0.05, **popen) -> subprocess.Popen:
    """The real CLI in a subprocess, pausing `delay` seconds after each tensor written."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.slow_cli", str(delay), *map(str, args)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the subprocess")
        time.sleep(0.01)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


@pytest.fixture
def src(mistral, tmp_path):
    return shutil.copytree(mistral, tmp_path / "src")


@pytest.fixture(scope="module")
def reference(mistral, tmp_path_factory) -> dict[str, str]:
    """Digest (less the model card) of the uninterrupted output of the SMALL recipe."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run("upcycle", mistral, out, *SMALL)
    assert result.exit_code == 0, result.output
    return weights(out)


@pytest.fixture
def old_output(src, tmp_path) -> tuple[Path, dict[str, str]]:
    """A previous output (2 experts) in tmp/out, and its digest."""
    dst = tmp_path / "out"
    assert run("upcycle", src, dst, *SMALL[:3], "2", *SMALL[4:]).exit_code == 0
    return dst, digest(dst)


# ----------------------------------------------------------------------------------------------- destinations


def hf_cache(tmp_path: Path, src: Path) -> Path:
    """A Hugging Face cache layout holding `src`: blobs named by hash, snapshot entries as relative symlinks."""
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in src.iterdir():
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blobs / blob)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob))
    return repo


def test_the_blobs_of_a_cached_source_are_never_the_destination(src, tmp_path):
    repo = hf_cache(tmp_path, src)
    before = digest(repo)
    snapshot = next((repo / "snapshots").iterdir())
    for dst in (repo / "blobs", repo):
        assert_one_line_error(run("upcycle", snapshot, dst, *SMALL, "--overwrite"), "source", str(repo / "blobs"))
    assert digest(repo) == before
    assert all(p.resolve().is_file() for p in snapshot.iterdir())


def test_a_source_file_linked_into_the_destination_is_protected(src, tmp_path, old_output):
    dst, before = old_output
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shutil.move(shard, dst / "moved.safetensors")
    shard.symlink_to(dst / "moved.safetensors")
    before = digest(dst)
    assert_one_line_error(run("upcycle", src, dst, *SMALL, "--overwrite"), "source", "moved.safetensors")
    assert digest(dst) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("dst", [".", "..", "{cwd}"])
def test_the_current_folder_is_never_the_destination(src, tmp_path, monkeypatch, dst):
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.json").write_text("{}")
    (work / "notes.txt").write_text("precious")
    monkeypatch.chdir(work)
    before = digest(tmp_path / "work")
    assert_one_line_error(run("upcycle", src, dst.format(cwd=work), *SMALL, "--overwrite"), "current folder")
    assert digest(work) == before and leftovers(work) == [] and leftovers(tmp_path) == []


def test_a_symlink_to_an_empty_folder_receives_the_output(src, tmp_path, reference):
    real, link = tmp_path / "scratch" / "real", tmp_path / "link"
    real.mkdir(parents=True)
    link.symlink_to(real)
    result = run("upcycle", src, link, *SMALL)
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == real
    assert weights(real) == reference
    assert leftovers(tmp_path) == [] and leftovers(real.parent) == []


def test_a_destination_below_a_file(src, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    assert_one_line_error(run("upcycle", src, tmp_path / "file.txt" / "out", *SMALL), "file.txt", "is a file")
    assert (tmp_path / "file.txt").read_text() == "x"


def test_a_failed_run_removes_the_folders_it_made(src, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(surgery.execute, "write_index", full)
    assert_one_line_error(run("upcycle", src, tmp_path / "a" / "b" / "out", *SMALL), "disk is full")
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------------------------- the swap


def test_overwrite_swaps_atomically(src, tmp_path, old_output, reference, monkeypatch):
    dst, _ = old_output
    swaps = []
    exchange = surgery.destination.exchange
    monkeypatch.setattr(surgery.destination, "exchange", lambda a, b: swaps.append((a, b)) or exchange(a, b))
    assert run("upcycle", src, dst, *SMALL, "--overwrite").exit_code == 0
    assert swaps == [(sibling(dst.resolve(), ".surgery-partial"), dst.resolve())]
    assert weights(dst) == reference and leftovers(tmp_path) == []


def test_a_kill_inside_the_fallback_swap_is_repaired_by_the_next_run(src, tmp_path, old_output, reference):
    """Without renameat2, the swap is two renames: kill the process between them, for real."""
    dst, before = old_output
    script = (
        "import os, signal, sys, surgery.destination as d\n"
        "d.exchange = lambda a, b: False\n"
        "rename = os.rename\n"
        "def kill_after_first(a, b):\n"
        "    rename(a, b)\n"
        "    if str(b).endswith('.surgery-old'): os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.rename = kill_after_first\n"
        "from surgery.cli import main\n"
        "main(sys.argv[1:], prog_name='surgery')\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, "upcycle", src, dst, *SMALL, "--overwrite"], cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    assert not dst.exists() and digest(sibling(dst, ".surgery-old")) == before  # the old output is intact aside
    assert run("upcycle", src, dst, *SMALL, "--overwrite").exit_code == 0
    assert weights(dst) == reference and leftovers(tmp_path) == []


def test_a_failed_overwrite_after_an_interrupted_swap_restores_the_old_output(src, tmp_path, old_output, monkeypatch):
    dst, before = old_output
    os.rename(dst, sibling(dst, ".surgery-old"))  # as a run killed between its two renames leaves it

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(surgery.execute, "write_index", full)
    assert_one_line_error(run("upcycle", src, dst, *SMALL, "--overwrite"), "disk is full")
    assert digest(dst) == before and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------- concurrency


def test_a_second_run_on_the_same_destination_is_refused(src, tmp_path, reference):
    dst = tmp_path / "out"
    first = start("upcycle", src, dst, *SMALL)
    wait_for(lambda: staged_shards(dst))
    second = subprocess.run([sys.executable, "-m", "surgery", "upcycle", src, dst, *SMALL, "--overwrite"],
                            cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 1 and "another surgery run" in one_error_line(second.stderr)
    code, out, err = finish(first)
    assert code == 0, err
    assert weights(dst) == reference and leftovers(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_files_written_into_the_destination_during_a_run_are_kept(src, tmp_path, old_output, existing):
    dst, before = old_output
    if not existing:
        shutil.rmtree(dst)
    process = start("upcycle", src, dst, *SMALL, "--overwrite")
    wait_for(lambda: staged_shards(dst))
    dst.mkdir(exist_ok=True)
    (dst / "intruder.txt").write_text("written by someone else")
    code, _, err = finish(process)
    assert code == 1 and "changed while" in one_error_line(err)
    expected = {**(before if existing else {}), "intruder.txt": hashlib.sha256(b"written by someone else").hexdigest()}
    assert digest(dst) == expected and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_a_signal_ends_the_run_cleanly(src, tmp_path, old_output, signum, existing):
    dst, before = old_output
    if not existing:
        shutil.rmtree(dst)
    source = digest(src)
    process = start("upcycle", src, dst, *SMALL, "--overwrite")
    wait_for(lambda: len(staged_shards(dst)) >= 2)
    process.send_signal(signum)
    code, _, err = finish(process)
    assert code == 128 + signum
    line = one_error_line(err)
    assert signum.name in line and "was not changed" in line
    assert leftovers(tmp_path) == [] and digest(src) == source
    assert digest(dst) == before if existing else not dst.exists()


def test_the_leftovers_of_a_killed_run_are_removed_by_the_next_one(src, tmp_path, reference):
    dst = tmp_path / "out"
    process = start("upcycle", src, dst, *SMALL)
    wait_for(lambda: len(staged_shards(dst)) >= 2)
    process.kill()
    finish(process)
    assert sibling(dst, ".surgery-partial").name in leftovers(tmp_path)
    assert not dst.exists()
    assert run("upcycle", src, dst, *SMALL).exit_code == 0
    assert weights(dst) == reference and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------- resume


def kill_after(dst: Path, shards: int, *args: object) -> list[tuple[str, int]]:
    """Start an upcycle into `dst`, SIGKILL it once `shards` shards are complete; return those (name, inode)."""
    process = start("upcycle", *args)
    wait_for(lambda: len(staged_shards(dst)) >= shards)
    process.kill()
    finish(process)
    return [(p.name, p.stat().st_ino) for p in staged_shards(dst)]


def test_resume_after_a_kill_is_byte_identical_and_keeps_the_finished_shards(src, tmp_path, reference):
    dst = tmp_path / "out"
    kept = kill_after(dst, 3, src, dst, *SMALL)
    assert 3 <= len(kept) < len([name for name in reference if name.startswith("model-")])
    result = run("upcycle", src, dst, *SMALL, "--resume")
    assert result.exit_code == 0, result.output
    assert weights(dst) == reference and leftovers(tmp_path) == []
    assert all((dst / name).stat().st_ino == inode for name, inode in kept), "finished shards were rewritten"


def kill_and_damage(src: Path, dst: Path) -> None:
    """A run killed after two shards, then the last byte of the first finished shard flipped."""
    name, _ = kill_after(dst, 2, src, dst, *SMALL)[0]
    damaged = sibling(dst, ".surgery-partial") / name
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))


def test_resume_verify_rewrites_a_damaged_shard(src, tmp_path, reference):
    dst = tmp_path / "out"
    kill_and_damage(src, dst)
    assert run("upcycle", src, dst, *SMALL, "--resume=verify").exit_code == 0
    assert weights(dst) == reference


def test_plain_resume_trusts_headers_and_sizes(src, tmp_path):
    """The cheap check does not read data: a damaged byte survives it, and verify is what finds it."""
    dst = tmp_path / "out"
    kill_and_damage(src, dst)
    assert run("upcycle", src, dst, *SMALL, "--resume").exit_code == 0
    assert_one_line_error(run("verify", src, dst, *SMALL), "does not hold the planned bytes")


def test_resume_with_another_recipe_is_refused(src, tmp_path, reference):
    dst = tmp_path / "out"
    kill_after(dst, 2, src, dst, *SMALL)
    assert_one_line_error(run("upcycle", src, dst, *SMALL, "--seed", "1", "--resume"), "another recipe")
    assert run("upcycle", src, dst, *SMALL, "--resume").exit_code == 0
    assert weights(dst) == reference


def test_a_signal_to_a_resumable_run_keeps_its_shards(src, tmp_path, reference):
    dst = tmp_path / "out"
    process = start("upcycle", src, dst, *SMALL, "--resume")
    wait_for(lambda: len(staged_shards(dst)) >= 2)
    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process)
    assert code == 128 + signal.SIGTERM and "run again with --resume" in one_error_line(err)
    assert len(staged_shards(dst)) >= 2
    assert run("upcycle", src, dst, *SMALL, "--resume").exit_code == 0
    assert weights(dst) == reference and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------- split runs


def test_workers_of_a_job_array_assemble_the_same_output(src, tmp_path, reference):
    dst = tmp_path / "out"
    workers = [start("upcycle", src, dst, *SMALL, "--shards", f"{i}/3", delay=0.02) for i in (1, 2, 3)]
    results = [finish(w) for w in workers]
    assert all(code == 0 for code, _, _ in results), results
    assert [out for _, out, _ in results].count(f"wrote {dst}\n") == 1, results  # one worker assembled
    assert weights(dst) == reference and leftovers(tmp_path) == []


def test_assemble_after_a_straggler(src, tmp_path, reference):
    dst = tmp_path / "out"
    assert "wrote worker 1/2's shards" in run("upcycle", src, dst, *SMALL, "--shards", "1/2").output
    assert_one_line_error(run("assemble", src, dst, *UNQUIET), "not written yet")
    dst.parent.mkdir(exist_ok=True)
    lock = Lock(sibling(dst, LOCK_SUFFIX), shared=True)  # as if another worker were still writing
    lock.acquire("test")
    try:
        assert "wrote worker 2/2's shards" in run("upcycle", src, dst, *SMALL, "--shards", "2/2").output
    finally:
        lock.release()
    assert not dst.exists()
    assert run("assemble", src, dst, *UNQUIET).exit_code == 0
    assert weights(dst) == reference and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------- OS failures


def mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    if not IS_ROOT or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)]).returncode:
        pytest.skip("mounting a tmpfs needs root")


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield made
    for path in made:
        subprocess.run(["umount", str(path)])


def test_a_full_disk_is_one_line_and_leaves_nothing(src, tmp_path, mounts):
    disk = tmp_path / "small"
    mount_tmpfs(disk, "size=120k")
    mounts.append(disk)
    source = digest(src)
    result = subprocess.run([sys.executable, "-m", "surgery", "upcycle", src, disk / "out", *SMALL],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "disk is full" in one_error_line(result.stderr)
    assert os.listdir(disk) == [] and digest(src) == source


def test_a_read_only_destination_is_one_line(src, tmp_path, mounts):
    disk = tmp_path / "ro"
    mount_tmpfs(disk, "ro,size=1m")
    mounts.append(disk)
    assert_one_line_error(run("upcycle", src, disk / "out", *SMALL), "read-only")


def test_the_file_size_limit_is_one_line_and_leaves_nothing(src, tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    result = subprocess.run(
        [sys.executable, "-m", "surgery", "upcycle", src, tmp_path / "out", *RECIPE, "--max-shard-size", "100KB"],
        cwd=ROOT, capture_output=True, text=True, preexec_fn=limit,
    )
    assert result.returncode == 1 and "--max-shard-size" in one_error_line(result.stderr)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_an_unreadable_side_file_is_found_before_writing(src, tmp_path, monkeypatch):
    (src / "tokenizer.json").write_text("{}")
    if IS_ROOT:  # root reads any file whatever its mode: make open() refuse it as it would for a user
        real_open = os.open

        def refuse(path, flags, *args, **kwargs):
            if str(path).endswith("tokenizer.json"):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
    else:
        (src / "tokenizer.json").chmod(0)
    monkeypatch.setattr(surgery.execute, "write_shards", lambda *a, **k: pytest.fail("wrote before checking"))
    assert_one_line_error(run("upcycle", src, tmp_path / "out", *SMALL), "tokenizer.json", "permission denied")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_many_shards_with_a_low_open_file_limit(tmp_path):
    from benchmarks.synthetic import write_synthetic

    small = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                 vocab_size=64)
    src = write_synthetic(tmp_path / "src", layers=12, overrides=small)

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    args = ["--rules", "mistral-to-mixtral", "-e", "4", "-k", "2", "--max-shard-size", "1", "-q"]
    result = subprocess.run([sys.executable, "-m", "surgery", "upcycle", src, tmp_path / "out", *args],
                            cwd=ROOT, capture_output=True, text=True, preexec_fn=limit)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 200
    assert run("verify", src, tmp_path / "out", *args).exit_code == 0


# ----------------------------------------------------------------------------------------------- inputs that ask too much


def limited_memory():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_a_huge_expert_count_is_refused_before_planning(src, tmp_path):
    """By the parameter's bounds in a built-in rule file, and by the planner's cap in a file without them."""
    unbounded = tmp_path / "unbounded.yaml"
    unbounded.write_text(Path(surgery.rules.find_rules("mistral-to-mixtral")).read_text().replace(", max: 4096", ""))
    for rules, message in (("mistral-to-mixtral", "num_experts must be from 1 to 4096"),
                           (unbounded, "more than 1,000,000 output tensors")):
        result = subprocess.run([sys.executable, "-m", "surgery", "plan", src, "-r", rules, "-e", "1000000000",
                                 "-k", "2"], cwd=ROOT, capture_output=True, text=True, preexec_fn=limited_memory,
                                timeout=30)
        assert result.returncode == 1 and message in one_error_line(result.stderr)


def test_a_yaml_alias_bomb_is_refused(src, tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(7)]
    rules = tmp_path / "bomb.yaml"
    rules.write_text(
        "name: bomb\nsource: {model_type: [mistral]}\ntarget: {model_type: mixtral}\nconfig:\n  set:\n"
        + "".join(f"    {line}\n" for line in levels)
        + "tensors:\n  - from: model.norm.weight\n    to: model.norm.weight\n"
    )
    result = subprocess.run([sys.executable, "-m", "surgery", "plan", src, "-r", rules, "-e", "2", "-k", "1"],
                            cwd=ROOT, capture_output=True, text=True, preexec_fn=limited_memory, timeout=30)
    assert result.returncode == 1 and "aliases" in one_error_line(result.stderr)


def test_duplicate_keys_in_a_rule_file_are_refused(src, tmp_path):
    rules = custom_rules(tmp_path, config="    router_aux_loss_coef: 1.0\n")
    assert_one_line_error(run("plan", src, *SMALL[2:-3], "-r", rules), "duplicate key 'router_aux_loss_coef'")


def test_wrong_values_are_refused_not_written(src, tmp_path):
    for option, value, message in [("--router-std", "inf", "router_std"), ("--router-std", "1e300", "router_std"),
                                   ("--router-std", "nan", "router_std"), ("--seed", "-1", "seed")]:
        assert_one_line_error(run("upcycle", src, tmp_path / "out", *SMALL, option, value), message)
        assert_one_line_error(run("plan", src, *SMALL[:-3], option, value), message)
    assert not (tmp_path / "out").exists()


def custom_rules(tmp_path: Path, extra_tensor: str = "", config: str = "") -> Path:
    text = (Path(surgery.rules.find_rules("mistral-to-mixtral"))).read_text()
    text = text.replace("config:\n  set:\n", "config:\n  set:\n" + config)
    path = tmp_path / "custom.yaml"
    path.write_text(text + extra_tensor)
    return path


@pytest.mark.parametrize("name,message", [("__metadata__", "reserved"), ('"bad\\tname"', "unprintable")])
def test_reserved_and_unprintable_output_names_are_refused(src, tmp_path, name, message):
    rules = custom_rules(tmp_path, f"  - new: {name}\n    for_each: model.norm.weight\n    shape: [2]\n    init: zeros\n")
    assert_one_line_error(run("upcycle", src, tmp_path / "out", *SMALL[2:], "-r", rules), message)
    assert not (tmp_path / "out").exists()


def test_a_config_value_that_json_cannot_hold_is_refused(src, tmp_path):
    rules = custom_rules(tmp_path, config='    my_coef: "{1e308 * 10}"\n')
    assert_one_line_error(run("upcycle", src, tmp_path / "out", *SMALL[2:], "-r", rules), "config.my_coef", "finite")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- verify


@pytest.mark.parametrize("damage,message", [
    (lambda out: (out / "config.json").write_text(
        (out / "config.json").read_text().replace('"num_local_experts": 4', '"num_local_experts": 5')),
     "num_local_experts"),
    (lambda out: (out / "generation_config.json").write_text("{}"), "generation_config.json"),
    (lambda out: (out / "model.safetensors.index.json").write_text(
        (out / "model.safetensors.index.json").read_text().replace('"total_size": ', '"total_size": 1')),
     "total_size"),
    (lambda out: shutil.copyfile(next(out.glob("model-*.safetensors")), out / "extra.safetensors"),
     "extra.safetensors"),
], ids=["config", "side-file", "index", "stray-shard"])
def test_verify_checks_more_than_tensors(src, tmp_path, damage, message):
    out = tmp_path / "out"
    assert run("upcycle", src, out, *SMALL).exit_code == 0
    assert run("verify", src, out, *SMALL).exit_code == 0
    damage(out)
    assert_one_line_error(run("verify", src, out, *SMALL), message)


def test_a_cast_that_overflows_names_the_tensor_and_writes_nothing(src, tmp_path):
    from safetensors.numpy import load_file, save_file

    shard = next(p for p in sorted(src.glob("model-*.safetensors")) if "model.norm.weight" in load_file(p))
    tensors = load_file(shard)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1e5
    save_file(tensors, shard, metadata={"format": "pt"})
    assert_one_line_error(run("upcycle", src, tmp_path / "out", *SMALL, "--dtype", "fp16"),
                          "model.norm.weight", "do not fit in F16", "--dtype")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
