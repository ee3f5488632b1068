"""Hub sources and pushes, against a loopback fake Hub: pinned revisions, only the needed files, headers by range
requests, shard-by-shard downloads with eviction, one-line errors, and uploads only of complete output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi, constants, hf_hub_download
from transformers import MistralForCausalLM, MixtralForCausalLM

import surgery
from surgery.api import open_source
from surgery.checkpoint import INDEX_NAME, read_header
from surgery.cli import main
from surgery.errors import SurgeryError
from surgery.hub import http_client
from surgery.rules import find_rules
from surgery.verify import verify
from tests.fake_hub import FakeHub, etag, folder_files
from tests.tiny_models import save_tiny

REPO = "tiny-org/mistral"
SHA_MAIN = hashlib.sha1(b"main").hexdigest()
SHA_V1 = hashlib.sha1(b"v1").hexdigest()
REVISIONS = "tiny-org/revisions"  # commit SHA_B = SHA_MAIN's files with shard 3 from SHA_V1
SHA_B = hashlib.sha1(b"b").hexdigest()
CHANGED = "model-00003-of-00005.safetensors"
RECIPE = dict(rules="mistral-to-mixtral", num_experts=4, experts_per_token=2)
RECIPE_ARGS = ["-r", "mistral-to-mixtral", "-e", "4", "-k", "2"]
SIDE = {"tokenizer.json": b'{"version": "1.0"}'}
DECOYS = {
    "consolidated.safetensors", "pytorch_model.bin", "model-00099-of-00099.safetensors", ".gitattributes", "README.md",
}


def logits(model) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def repo_files(folder: Path) -> dict[str, bytes]:
    """A commit of the fake repo: the model folder, a tokenizer file, and decoys that must never be fetched."""
    files = folder_files(folder) | SIDE
    shard = files["model-00001-of-00005.safetensors"]
    return files | {
        "consolidated.safetensors": shard, "pytorch_model.bin": b"\x80\x02pickle", ".gitattributes": b"*.bin lfs\n",
        "model-00099-of-00099.safetensors": shard, "README.md": b"# tiny\n",
    }


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_written(dst: Path) -> None:
    assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}.surgery-*"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """commit -> a tiny dense Mistral in 5 shards; the two commits hold different weights."""
    root = tmp_path_factory.mktemp("hub-models")
    return {
        sha: save_tiny("mistral", root / sha, shards=3, seed=seed, sliding_window=8)
        for sha, seed in ((SHA_MAIN, 0), (SHA_V1, 1))
    }


@pytest.fixture(scope="module")
def dense_logits(models) -> dict[str, torch.Tensor]:
    return {sha: logits(MistralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
            for sha, folder in models.items()}


@pytest.fixture(scope="module")
def hub(models):
    fake = FakeHub()
    commits = {sha: repo_files(folder) for sha, folder in models.items()}
    fake.add_repo(REPO, commits, {"main": SHA_MAIN, "v1": SHA_V1})
    fake.add_repo("tiny-org/gated", {SHA_MAIN: commits[SHA_MAIN]}, {"main": SHA_MAIN}, gated=True)
    fake.add_repo("tiny-org/private", {SHA_MAIN: commits[SHA_MAIN]}, {"main": SHA_MAIN}, private=True)
    missing = {k: v for k, v in commits[SHA_MAIN].items() if k != "model-00003-of-00005.safetensors"}
    fake.add_repo("tiny-org/missing-shard", {SHA_MAIN: missing}, {"main": SHA_MAIN})
    pickles = {"config.json": commits[SHA_MAIN]["config.json"], "pytorch_model.bin": b"\x80\x02pickle"}
    fake.add_repo("tiny-org/pickles", {SHA_MAIN: pickles}, {"main": SHA_MAIN})
    mixed = commits[SHA_MAIN] | {CHANGED: commits[SHA_V1][CHANGED]}
    fake.add_repo(REVISIONS, {SHA_MAIN: commits[SHA_MAIN], SHA_B: mixed}, {"main": SHA_B})
    yield fake
    fake.close()


@pytest.fixture
def hf_cache(hub, tmp_path, monkeypatch) -> Path:
    """huggingface_hub pointed at the fake Hub, with an empty cache and no token; returns the cache folder."""
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    hub.log.clear()
    hub.broken.clear()
    hub.on_download = None
    return tmp_path / "hf-cache"


def shard_files(hub: FakeHub, commit: str = SHA_MAIN, repo: str = REPO) -> dict[str, bytes]:
    """The shards the index of `repo` at `commit` names, by file name."""
    files = hub.repos[repo].commits[commit]
    return {name: files[name] for name in set(json.loads(files[INDEX_NAME])["weight_map"].values())}


def shard_blobs(cache: Path, shards: dict[str, bytes]) -> list[Path]:
    """The cached blobs holding any of these shards."""
    etags = {etag(data) for data in shards.values()}
    return [p for p in cache.rglob("blobs/*") if p.name in etags]


def closed_endpoint() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# --- upcycle from a repo id -------------------------------------------------------------------------------------

def test_upcycle_from_a_branch_reproduces_dense_and_fetches_only_what_is_needed(hub, hf_cache, models, dense_logits,
                                                                                  tmp_path):
    out = surgery.upcycle(REPO, tmp_path / "moe", **RECIPE, progress=False)

    moe = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (logits(moe) - dense_logits[SHA_MAIN]).abs().max().item() <= 1e-5
    card = (out / "README.md").read_text()
    assert f'"source": "{REPO}"' in card and f'"source_revision": "{SHA_MAIN}"' in card
    assert card.split("---")[1].splitlines()[-1] == f"base_model: {REPO}"
    assert (out / "tokenizer.json").read_bytes() == SIDE["tokenizer.json"]

    file_requests = [r for r in hub.log if r.file is not None]
    assert [r.revision for r in hub.log if r.file is None] == [None]  # resolved and listed in one request...
    assert {r.revision for r in file_requests} == {SHA_MAIN}  # ...and every file pinned to the commit
    shards = set(shard_files(hub))
    requested = {r.file for r in file_requests}
    assert requested == shards | {"config.json", INDEX_NAME, "generation_config.json", "tokenizer.json"}
    assert not requested & DECOYS
    assert sorted(r.file for r in hub.downloads() if r.file in shards) == sorted(shards)  # each shard once


@pytest.mark.parametrize("revision", [SHA_V1, "v1"])
def test_upcycle_at_a_commit_or_tag(hub, hf_cache, dense_logits, tmp_path, revision):
    out = surgery.upcycle(f"{REPO}@{revision}", tmp_path / "moe", **RECIPE, progress=False)

    moe = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (logits(moe) - dense_logits[SHA_V1]).abs().max().item() <= 1e-5
    assert f'"source_revision": "{SHA_V1}"' in (out / "README.md").read_text()
    assert {r.revision for r in hub.log if r.file is not None} == {SHA_V1}


def test_the_cache_of_a_hub_source_is_never_the_destination(hub, hf_cache, tmp_path):
    assert run("plan", REPO, *RECIPE_ARGS).exit_code == 0  # caches the config, the index and the headers
    repo = next(hf_cache.glob("models--*"))
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    for dst in (repo / "blobs", repo / "snapshots" / SHA_MAIN / "moe", hf_cache):
        assert_one_line_error(run("upcycle", REPO, dst, *RECIPE_ARGS, "-q", "--overwrite"), "cache", str(repo))
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before


def test_a_local_path_wins_over_a_repo_id(hub, hf_cache, models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(models[SHA_V1], tmp_path / REPO)
    checkpoint = open_source(REPO)
    assert checkpoint.revision is None and checkpoint.num_parameters > 0
    assert hub.log == []


# --- plan and inspect: headers only -----------------------------------------------------------------------------

def test_plan_and_inspect_read_headers_only(hub, hf_cache, models):
    result = run("plan", REPO, *RECIPE_ARGS)
    assert result.exit_code == 0, result.output
    assert f"@ {SHA_MAIN}" in result.output
    local = run("plan", models[SHA_MAIN], *RECIPE_ARGS)
    assert result.output.splitlines()[1:] == local.output.splitlines()[1:]  # same plan as from the local folder

    files = hub.repos[REPO].commits[SHA_MAIN]
    shards = set(shard_files(hub))
    header_bytes = sum(8 + int.from_bytes(files[name][:8], "little") for name in shards)
    shard_requests = [r for r in hub.log if r.file in shards]
    assert all(r.method == "GET" and r.status == 206 and r.range.startswith("bytes=") for r in shard_requests)
    assert not [r for r in hub.downloads() if r.file in shards], "no shard may be downloaded"
    assert sum(r.sent for r in shard_requests) == header_bytes
    assert sum(r.sent for r in hub.log) < header_bytes + 5_000  # plus config.json, the index and the listing
    assert not list(hf_cache.rglob("*.safetensors"))

    inspected = run("inspect", REPO)
    assert inspected.exit_code == 0 and inspected.output == run("inspect", models[SHA_MAIN]).output
    assert not [r for r in hub.downloads() if r.file in shards]


def test_remote_headers_are_validated_like_local_ones(hub, hf_cache, models, tmp_path):
    files = dict(hub.repos[REPO].commits[SHA_MAIN])
    name = "model-00002-of-00005.safetensors"
    n = 8 + int.from_bytes(files[name][:8], "little")
    files[name] = files[name][:n].replace(b'"F32"', b'"F33"', 1) + files[name][n:]  # an unknown dtype
    hub.add_repo("tiny-org/corrupt", {SHA_MAIN: files}, {"main": SHA_MAIN})
    (tmp_path / name).write_bytes(files[name])
    with pytest.raises(SurgeryError) as local:
        read_header(tmp_path / name)

    with pytest.raises(SurgeryError) as remote:
        surgery.plan("tiny-org/corrupt", **RECIPE)
    assert str(remote.value) == f"tiny-org/corrupt@{SHA_MAIN}/{name}: " + str(local.value).split(": ", 1)[1]


# --- shard by shard ---------------------------------------------------------------------------------------------

def shards_on_disk_at_each_download(hub, cache: Path, tmp_path: Path) -> list[tuple[str, int]]:
    """Upcycle with eviction; at the start of each shard download, how many other shards are in the cache."""
    shards = shard_files(hub)
    seen: list[tuple[str, int]] = []
    hub.on_download = lambda repo, file: file in shards and seen.append((file, len(shard_blobs(cache, shards))))
    surgery.upcycle(REPO, tmp_path / "moe", **RECIPE, progress=False, evict_source=True)
    assert shard_blobs(cache, shards) == [] and not list(cache.rglob("model-*.safetensors")), "all evicted"
    return seen


def test_evict_source_keeps_at_most_one_source_shard_on_disk(hub, hf_cache, models, tmp_path):
    """Shards are downloaded in storage order, each once, each evicted before the next one downloads."""
    seen = shards_on_disk_at_each_download(hub, hf_cache, tmp_path)
    assert seen == [(name, 0) for name in sorted(shard_files(hub))]
    the_plan = surgery.plan(models[SHA_MAIN], **RECIPE)
    assert verify(the_plan, tmp_path / "moe") == len(the_plan.tensors)


@pytest.mark.parametrize("cached_names,upcycled", [
    (None, SHA_B),  # all of SHA_MAIN: another revision links to 4 of the 5 shard blobs, by the same and other names
    (["consolidated.safetensors"], SHA_MAIN),  # the same revision links to shard 1's blob by another name
    (["model-00002-of-00005.safetensors"], SHA_MAIN),  # the shard itself was cached
])
def test_evict_source_removes_only_what_it_added_to_the_cache(hub, hf_cache, tmp_path, cached_names, upcycled):
    """Files of SHA_MAIN cached before the run by huggingface_hub itself survive; a blob is deleted only if this run
    downloaded it and no snapshot of any revision links to it."""
    cached_files = hub.repos[REVISIONS].commits[SHA_MAIN]
    cached = {name: Path(hf_hub_download(REVISIONS, name, revision=SHA_MAIN)) for name in cached_names or cached_files}
    files = hub.repos[REVISIONS].commits[upcycled]
    surgery.upcycle(f"{REVISIONS}@{upcycled}", tmp_path / "moe", **RECIPE, progress=False, evict_source=True)

    for name, path in cached.items():
        assert path.read_bytes() == cached_files[name], name
    side = {"config.json", INDEX_NAME, "generation_config.json", "tokenizer.json"}  # downloaded, never evicted
    kept = {etag(cached_files[name]) for name in cached} | {etag(files[name]) for name in side}
    assert {p.name for p in hf_cache.rglob("blobs/*")} == kept  # e.g. SHA_B's own shard 3 is gone
    snapshot = hf_cache / "models--tiny-org--revisions" / "snapshots" / upcycled
    added = set(shard_files(hub, upcycled, REVISIONS)) - (set(cached) if upcycled == SHA_MAIN else set())
    assert not [name for name in added if os.path.lexists(snapshot / name)]


def test_a_cut_off_download_is_retried(hub, hf_cache, models, tmp_path, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    name = "model-00002-of-00005.safetensors"
    hub.broken[name] = 1
    out = surgery.upcycle(REPO, tmp_path / "moe", **RECIPE, progress=False)
    size = len(hub.repos[REPO].commits[SHA_MAIN][name])
    assert [r.sent for r in hub.downloads(name)] == [size // 2, size]  # cut off, then downloaded again
    the_plan = surgery.plan(models[SHA_MAIN], **RECIPE)
    assert verify(the_plan, out) == len(the_plan.tensors)


def test_a_download_that_keeps_failing_is_an_error_and_writes_nothing(hub, hf_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    name = "model-00002-of-00005.safetensors"
    hub.broken[name] = 100
    with pytest.raises(SurgeryError) as error:
        surgery.upcycle(REPO, tmp_path / "moe", **RECIPE, progress=False)
    message = str(error.value)
    assert "\n" not in message and f"downloading {name}" in message and "check the connection" in message
    assert len(hub.downloads(name)) > 2  # retried before giving up
    assert_nothing_written(tmp_path / "moe")
    assert not list(hf_cache.rglob("*.incomplete"))


def test_a_downloaded_shard_must_match_the_header_it_was_planned_from(hub, hf_cache, tmp_path):
    checkpoint = open_source(REPO)
    files = hub.repos[REPO].commits[SHA_MAIN]
    name = "model-00001-of-00005.safetensors"
    original = files[name]
    files[name] = original + b" " * 8
    try:
        with pytest.raises(SurgeryError, match=f"{name} in the cache .* has {len(original) + 8} bytes"):
            surgery.upcycle(checkpoint, tmp_path / "moe", **RECIPE, progress=False)
    finally:
        files[name] = original
    assert_nothing_written(tmp_path / "moe")


def test_offline_mode_uses_the_cache_only(hub, hf_cache, tmp_path, monkeypatch):
    first = surgery.upcycle(REPO, tmp_path / "first", **RECIPE, progress=False)
    hub.log.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    second = surgery.upcycle(REPO, tmp_path / "second", **RECIPE, progress=False)
    assert hub.log == []
    assert folder_files(second) == folder_files(first)
    with pytest.raises(SurgeryError, match="HF_HUB_OFFLINE"):
        surgery.plan(f"{REPO}@v1", **RECIPE)


# --- errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("src,fragments", [
    ("nobody/nothing", ["nobody/nothing", "not found"]),
    ("tiny-org/private", ["tiny-org/private", "hf auth login", "HF_TOKEN"]),
    ("tiny-org/gated", ["tiny-org/gated", "gated", "hf auth login", "HF_TOKEN"]),
    (f"{REPO}@nope", ["revision 'nope' not found"]),
    ("tiny-org/missing-shard", ["model-00003-of-00005.safetensors", "not in the repository"]),
    ("tiny-org/pickles", ["pytorch_model.bin", "never unpickles"]),
    ("tiny-org/not..valid", ["not a valid repo id"]),
])
def test_hub_errors_are_one_line_and_write_nothing(hub, hf_cache, tmp_path, src, fragments):
    assert_one_line_error(run("upcycle", src, tmp_path / "out", *RECIPE_ARGS, "--quiet"), *fragments)
    assert_nothing_written(tmp_path / "out")
    assert_one_line_error(run("plan", src, *RECIPE_ARGS), *fragments)
    assert_one_line_error(run("inspect", src), *fragments)
    assert not list(hf_cache.rglob("*.safetensors"))


def test_an_unreachable_hub_is_one_line_error(hf_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", closed_endpoint())
    assert_one_line_error(run("upcycle", REPO, tmp_path / "out", *RECIPE_ARGS, "--quiet"), "check the connection")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("reachable,reason", [
    (True, "repository not found on the Hub"),
    (False, "resolving the revision failed with a network error"),
])
def test_a_missing_local_path_that_looks_like_a_repo_id_says_both(hub, hf_cache, tmp_path, monkeypatch, reachable,
                                                                   reason):
    monkeypatch.chdir(tmp_path)
    if not reachable:
        monkeypatch.setattr(constants, "ENDPOINT", closed_endpoint())
    expected = f"Error: models/mistral: no such local file or folder; as a Hub repo id: {reason}"
    assert_one_line_error(run("plan", "models/mistral", *RECIPE_ARGS), expected)
    assert_one_line_error(run("upcycle", "models/mistral", tmp_path / "out", *RECIPE_ARGS, "--quiet"), expected)
    assert_nothing_written(tmp_path / "out")


# --- push -------------------------------------------------------------------------------------------------------

@pytest.fixture
def uploads(hf_cache, monkeypatch) -> list[tuple]:
    """HfApi.create_repo and upload_folder replaced by recorders; upload_folder notes if the folder was complete."""
    calls: list[tuple] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"{constants.ENDPOINT}/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        index = folder / INDEX_NAME
        complete = (
            index.is_file() and (folder / "config.json").is_file() and (folder / "README.md").is_file()
            and all((folder / f).is_file() for f in json.loads(index.read_text())["weight_map"].values())
            and not list(folder.parent.glob(".*surgery-partial*"))
        )
        calls.append(("upload_folder", repo_id, folder, complete))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    return calls


def test_push_to_hub_uploads_the_complete_output(hub, uploads, tmp_path):
    out = tmp_path / "moe"
    result = run("upcycle", REPO, out, *RECIPE_ARGS, "--max-shard-size", "40KB", "--quiet", "--push-to-hub", "me/moe",
                 "--private")
    assert result.exit_code == 0, result.output
    assert "pushed to me/moe" in result.output
    assert uploads == [
        ("create_repo", "me/moe", {"private": True, "exist_ok": True}),
        ("upload_folder", "me/moe", out, True),
    ]

    uploads.clear()
    surgery.upcycle(REPO, tmp_path / "api", **RECIPE, progress=False, max_shard_size=40_000, push_to_hub="me/api")
    assert uploads == [
        ("create_repo", "me/api", {"private": None, "exist_ok": True}),
        ("upload_folder", "me/api", tmp_path / "api", True),
    ]


def test_a_failed_push_keeps_the_output_and_says_how_to_retry(hub, uploads, models, tmp_path, monkeypatch):
    def refuse(self, **kwargs):
        raise http_client().ConnectError("connection refused")

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    out = tmp_path / "moe"
    result = run("upcycle", REPO, out, *RECIPE_ARGS, "--quiet", "--push-to-hub", "me/moe")
    assert_one_line_error(result, "connection refused", f"{out} is complete", f"retry with `hf upload me/moe {out}`")
    the_plan = surgery.plan(models[SHA_MAIN], **RECIPE)
    assert verify(the_plan, out) == len(the_plan.tensors)


def test_an_output_transformers_would_not_load_is_not_pushed(hub, uploads, tmp_path):
    rules = tmp_path / "misnamed.yaml"
    text = find_rules("mistral-to-mixtral").read_text()
    rules.write_text(text.replace("experts.{expert}.w1.weight", "experts.{expert}.w9.weight"))
    result = run("upcycle", REPO, tmp_path / "moe", "-r", rules, "-e", "4", "-k", "2", "--quiet", "--push-to-hub", "me/moe")
    assert_one_line_error(result, "experts.0.w9.weight", "The output is kept")
    assert uploads == []


def test_push_without_a_token_fails_before_any_work(hub, uploads, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    assert_one_line_error(run("upcycle", REPO, tmp_path / "moe", *RECIPE_ARGS, "--quiet", "--push-to-hub", "me/moe"),
                          "hf auth login")
    assert_nothing_written(tmp_path / "moe")
    assert hub.log == [] and uploads == []


# --- the real environment variables, in a fresh process ---------------------------------------------------------

def test_cli_honours_the_hf_environment_variables(hub, hf_cache, models, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-c", "from surgery.cli import main; main()"]
    out = tmp_path / "moe"
    done = subprocess.run([*command, "upcycle", REPO, out, *RECIPE_ARGS, "--quiet", "--evict-source"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cache" / "models--tiny-org--mistral" / "snapshots" / SHA_MAIN / "config.json").is_file()
    shards = shard_files(hub)
    assert sorted(r.file for r in hub.downloads() if r.file in shards) == sorted(shards)
    assert shard_blobs(tmp_path / "cache", shards) == []
    the_plan = surgery.plan(models[SHA_MAIN], **RECIPE)
    assert verify(the_plan, out) == len(the_plan.tensors)


@pytest.mark.parametrize("version", ["0.36.2", "1.19.0"])
def test_old_huggingface_hub_gives_a_clear_error(monkeypatch, version):
    """Before 1.20, huggingface_hub does not resume a download cut off mid-file."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "__version__", version)
    with pytest.raises(SurgeryError, match=f"need huggingface_hub >= 1.20, found {version}"):
        open_source(REPO)
    with pytest.raises(SurgeryError, match="need huggingface_hub >= 1.20"):
        surgery.upcycle("unused", "unused-dst", **RECIPE, push_to_hub="me/moe")
