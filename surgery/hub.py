"""Hugging Face Hub sources and pushes: a repo id opened as a checkpoint, shards fetched on demand, output uploaded.

Everything goes through huggingface_hub, so its cache and environment apply (HF_HOME, HF_HUB_CACHE, HF_TOKEN,
HF_ENDPOINT, HF_HUB_OFFLINE). It is imported inside functions to keep the CLI's start fast.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from .checkpoint import (
    INDEX_NAME,
    PICKLE_SUFFIXES,
    SINGLE_NAME,
    Checkpoint,
    _pickle_hint,
    is_side_file,
    parse_index,
    read_header,
    read_json,
    tensors_from_headers,
)
from .errors import SurgeryError, first_line
from .header import FileHeader, header_length, parse_header

_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>\S+))?")
_LOGIN = "log in with `hf auth login` or set HF_TOKEN"
_COMMIT = re.compile(r"[0-9a-f]{40}")
#: the first huggingface_hub that resumes a download whose connection was cut mid-file
_MIN_CLIENT = (1, 20)


def parse_repo_id(text: str) -> tuple[str, str | None] | None:
    """`org/name` -> ("org/name", None); `org/name@rev` -> ("org/name", "rev"); anything else -> None."""
    match = _REPO_ID.fullmatch(text)
    return (match["repo"], match["revision"]) if match else None


class RepoUnavailable(SurgeryError):
    """The Hub did not give the repo at all (not found, unreachable, offline and not cached, invalid id, client too
    old), so the text may not have been meant as a repo id."""


@dataclass(eq=False)
class HubFiles:
    """The files of a Hub repository at one commit, downloaded into the huggingface_hub cache on first use.

    `sizes` maps each weight shard to its size when its header was read: a download must match it, since the
    plan's offsets come from that header. With `evict`, releasing a shard removes from the cache what its download
    added: the snapshot entry, and the blob if it was new and no other snapshot (of any revision) links to it.
    """

    repo_id: str
    commit: str
    sizes: dict[str, int] = field(default_factory=dict)
    evict: bool = False
    progress: bool = True
    _added: dict[str, tuple[Path, Path | None]] = field(default_factory=dict, repr=False)

    def fetch(self, name: str) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import silent_tqdm

        storage = _repo_cache(self.repo_id)
        track = self.evict and name in self.sizes and not os.path.lexists(storage / "snapshots" / self.commit / name)
        blobs_before = _blob_names(storage) if track else set()
        with _hub_errors(self.repo_id, self.commit, f"downloading {name}"):
            path = Path(hf_hub_download(
                self.repo_id, name, revision=self.commit, tqdm_class=None if self.progress else silent_tqdm
            ))
        expected, actual = self.sizes.get(name), path.stat().st_size
        if expected is not None and actual != expected:
            raise SurgeryError(
                f"{self.repo_id}@{self.commit}: {name} in the cache ({path}) has {actual} bytes, but its header "
                f"was read from a {expected}-byte file; delete it and run again"
            )
        if track:
            blob = _linked_blob(path, storage)
            self._added[name] = (path, blob if blob is not None and blob.name not in blobs_before else None)
        return path

    def roots(self) -> list[Path]:
        return [_repo_cache(self.repo_id).resolve()]

    def local_path(self, name: str) -> Path | None:
        return None  # fetched on first use, pinned to the commit

    @property
    def key(self) -> str:
        return f"{self.repo_id}@{self.commit}"

    def release(self, name: str) -> None:
        if name not in self._added:
            return
        entry, blob = self._added.pop(name)
        entry.unlink(missing_ok=True)
        if blob is not None and not _is_linked(_repo_cache(self.repo_id), blob):
            blob.unlink(missing_ok=True)


def require_hub_client() -> None:
    """Hub sources and pushes need huggingface_hub >= 1.20 (local sources work with any version).

    Every name used here exists from 1.0 on, but before 1.20 a download cut off mid-file is not resumed.
    """
    from huggingface_hub import __version__

    if _version(__version__) < _MIN_CLIENT:
        raise SurgeryError(
            f"Hub repos need huggingface_hub >= {'.'.join(map(str, _MIN_CLIENT))}, found {__version__} "
            "(transformers 4 pins it below 1.0): upgrade with `pip install -U huggingface_hub transformers`, "
            "or download the repo and pass its folder"
        )


def open_hub_checkpoint(
    repo_id: str, revision: str | None = None, *, evict: bool = False, progress: bool = True
) -> Checkpoint:
    """Open Hub repository `repo_id` at `revision` (a branch, tag or commit; default branch if None).

    The revision is resolved to a commit once and every request is pinned to it. Only config.json, the index
    and the headers of the shards it names are read (two HTTP range requests per shard not already cached);
    shards and side files are downloaded later, when the executor first needs them.
    """
    try:
        require_hub_client()
        with _hub_errors(repo_id, revision, "resolving the revision"):
            commit, files = _resolve(repo_id, revision)
    except SurgeryError as exc:
        raise RepoUnavailable(str(exc)) from exc
    store = HubFiles(repo_id, commit, evict=evict, progress=progress)
    label = f"{repo_id}@{commit}"
    weight_map: dict[str, str] | None = None
    if INDEX_NAME in files:
        weight_map = parse_index(read_json(store.fetch(INDEX_NAME)), f"{label}/{INDEX_NAME}")
        shards = sorted(set(weight_map.values()))
    elif SINGLE_NAME in files:
        shards = [SINGLE_NAME]
    else:
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise SurgeryError(f"{label}: holds only pickle weights ({pickles[0]})" + _pickle_hint(pickles[0]))
        raise SurgeryError(f"{label}: no {SINGLE_NAME} or {INDEX_NAME} in the repository")
    config = read_json(store.fetch("config.json")) if "config.json" in files else {}
    headers: dict[str, FileHeader] = {}
    for name in shards:
        headers[name], store.sizes[name] = _shard_header(store, name)
    tensors = tensors_from_headers(headers, weight_map, label)
    side = sorted(f for f in files if "/" not in f and is_side_file(f))
    return Checkpoint(repo_id, tensors, config, side, store, revision=commit)


def check_push(repo_id: str) -> None:
    """Fail before any work when the output could not be pushed: a malformed repo id, offline mode, or no token."""
    require_hub_client()
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, get_token, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise SurgeryError(f"cannot push to {repo_id!r}: not a valid repo id ({first_line(exc)})") from None
    if constants.is_offline_mode():
        raise SurgeryError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set")
    if get_token() is None:
        raise SurgeryError(f"pushing to {repo_id} needs a Hugging Face token: {_LOGIN}")


def push(folder: Path, repo_id: str, private: bool | None = None) -> str:
    """Create `repo_id` if needed (`private` applies to a new repo) and upload the finished `folder`; return its URL.

    Any failure leaves `folder` as it is and the error says how to retry the upload.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload checkpoint made with surgery")
    except Exception as exc:  # whatever went wrong, the output is complete and the retry is the same
        retry = shlex.join(["hf", "upload", repo_id, str(folder)]) + (" --private" if private else "")
        raise SurgeryError(
            f"{_describe(exc, repo_id, None, f'uploading {folder}')}. The output in {folder} is complete: "
            f"retry with `{retry}`"
        ) from exc
    return str(url)


def _resolve(repo_id: str, revision: str | None) -> tuple[str, list[str]]:
    """The commit `revision` points at and the repository's file names at that commit (offline: the cached ones).

    Online, one model_info request gives both, and the revision -> commit mapping is recorded in the cache's
    `refs/` as huggingface_hub does, so that a later offline run finds it.
    """
    from huggingface_hub import HfApi, constants

    storage, revision_name = _repo_cache(repo_id), revision or constants.DEFAULT_REVISION
    if not constants.is_offline_mode():
        info = HfApi().model_info(repo_id, revision=revision)
        _record_ref(storage, revision_name, info.sha)
        return info.sha, [s.rfilename for s in info.siblings or []]
    commit = _cached_commit(storage, revision_name)
    if commit is None or not (storage / "snapshots" / commit).is_dir():
        raise SurgeryError(
            f"{repo_id}@{revision_name}: HF_HUB_OFFLINE is set and this revision is not in the cache "
            f"({constants.HF_HUB_CACHE}); unset HF_HUB_OFFLINE to download it"
        )
    return commit, sorted(p.name for p in (storage / "snapshots" / commit).iterdir() if p.is_file())


def _cached_commit(storage: Path, revision: str) -> str | None:
    """The commit `revision` names: itself if it is a commit hash, else what the cache's `refs/` records."""
    if _COMMIT.fullmatch(revision):
        return revision
    ref = storage / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def _record_ref(storage: Path, revision: str, commit: str) -> None:
    """Write `refs/<revision>` = `commit` in a repo's cache folder, atomically, unless it already says so."""
    if _cached_commit(storage, revision) == commit:
        return
    ref = storage / "refs" / revision
    temp = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
    with suppress(OSError):  # a read-only cache: only a later offline run would need the ref
        ref.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(commit)
        os.replace(temp, ref)


def _repo_cache(repo_id: str) -> Path:
    """The repo's folder in the huggingface_hub cache: `blobs/<etag>`, `snapshots/<commit>/<file>` links, `refs/`."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model"))


def _blob_names(storage: Path) -> set[str]:
    try:
        return set(os.listdir(storage / "blobs"))
    except FileNotFoundError:
        return set()


def _linked_blob(entry: Path, storage: Path) -> Path | None:
    """The repo blob a snapshot entry links to, or None (a copied file, or a link elsewhere).

    Only the link's first hop counts: a blob may itself link into a cache-wide store shared by other repos.
    """
    if not entry.is_symlink():
        return None
    target = entry.parent / os.readlink(entry)
    blobs = storage / "blobs"
    return blobs / target.name if target.parent.resolve() == blobs.resolve() else None


def _is_linked(storage: Path, blob: Path) -> bool:
    """Whether any snapshot entry (of any revision, under any name) links to `blob`."""
    return any(_linked_blob(entry, storage) == blob for entry in (storage / "snapshots").rglob("*"))


def _cached(repo_id: str, commit: str, name: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, name, revision=commit)
    return Path(path) if isinstance(path, str) else None


def _shard_header(store: HubFiles, name: str) -> tuple[FileHeader, int]:
    """A shard's validated header and file size: from the cache if the shard is there, else by range requests."""
    cached = _cached(store.repo_id, store.commit, name)
    if cached is not None:
        return read_header(cached), cached.stat().st_size
    from huggingface_hub import hf_hub_url

    url = hf_hub_url(store.repo_id, name, revision=store.commit)
    where = f"{store.repo_id}@{store.commit}/{name}"
    with _hub_errors(store.repo_id, store.commit, f"reading the header of {name}"):
        first8, size = _read_range(url, 0, 8, where)
        n = header_length(first8, size, where)
        raw = _read_range(url, 8, n, where)[0] if n else b""
    return parse_header(raw, size, where), size


def _read_range(url: str, start: int, length: int, where: str) -> tuple[bytes, int]:
    """Bytes `start`..`start + length` of a remote file (fewer at its end) and the file's size, in one request."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

    headers = {**build_hf_headers(), "Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
    with http_stream_backoff("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
        hf_raise_for_status(response)
        size = response.headers.get("Content-Range", "").rpartition("/")[2]
        if response.status_code != 206 or not size.isdigit():
            raise SurgeryError(
                f"{where}: the server did not answer a byte-range request with 206 and a Content-Range, "
                "so the header cannot be read without downloading the whole file"
            )
        data = response.read()
    if len(data) != min(length, max(int(size) - start, 0)):
        raise SurgeryError(f"{where}: asked the server for {length} bytes at {start}, got {len(data)}")
    return data, int(size)


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, what: str) -> Iterator[None]:
    """Turn huggingface_hub and network exceptions raised while doing `what` into one-line SurgeryErrors."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    try:
        yield
    except (
        HfHubHTTPError, EntryNotFoundError, HFValidationError, OfflineModeIsEnabled, http_client().HTTPError, OSError,
    ) as exc:
        raise SurgeryError(_describe(exc, repo_id, revision, what)) from exc


def _describe(exc: BaseException, repo_id: str, revision: str | None, what: str) -> str:
    """What went wrong talking to the Hub and what to do, from the most telling exception in `exc`'s chain."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain: list[BaseException] = []
    error: BaseException | None = exc
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__

    def found(kind: type | tuple[type, ...]) -> BaseException | None:
        return next((e for e in chain if isinstance(e, kind)), None)

    at = f"{repo_id}@{revision}" if revision else repo_id
    if found(GatedRepoError):
        return f"{repo_id} is gated: accept its conditions on {constants.ENDPOINT}/{repo_id}, then {_LOGIN}"
    if found(RepositoryNotFoundError):
        return f"{repo_id}: repository not found on the Hub (if it is private, {_LOGIN})"
    if found(RevisionNotFoundError):
        return f"{repo_id}: revision {revision!r} not found; use a branch, tag or commit hash of the repository"
    if found(RemoteEntryNotFoundError):
        return f"{at}: {what} failed: the file is not in the repository"
    if invalid := found(HFValidationError):
        return f"{repo_id}: not a valid repo id ({first_line(invalid)})"
    http = found(HfHubHTTPError)
    if isinstance(http, HfHubHTTPError) and http.response is not None and http.response.status_code in (401, 403):
        return f"{at}: {what} was refused (HTTP {http.response.status_code}): {_LOGIN} with a token that has access"
    if network := found(http_client().TransportError):
        return (
            f"{at}: {what} failed with a network error ({first_line(network)}); "
            f"check the connection to {constants.ENDPOINT}"
        )
    if found(OfflineModeIsEnabled):  # not a network error: HF_HUB_OFFLINE is set
        return f"{at}: {what} needs the Hub, but HF_HUB_OFFLINE is set and the cache does not have it"
    return f"{at}: {what} failed ({first_line(exc)})"


def http_client() -> ModuleType:
    """The HTTP library huggingface_hub raises errors of: httpx2 from huggingface_hub 2.0, httpx in 1.x."""
    from huggingface_hub import __version__

    return importlib.import_module("httpx2" if _version(__version__) >= (2, 0) else "httpx")


def _version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "1.20.0" or "2.0.0rc1"."""
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else (0, 0)

