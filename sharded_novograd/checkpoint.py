"""Checkpoints of :class:`~sharded_novograd.ShardedNovoGrad` that load at any world size.

A checkpoint is a directory::

    manifest.json             written last, by rank 0: its presence marks a complete checkpoint
    <token>-rank00000.pt      one file per rank: its exp_avg shard (and fp32 master weight
    <token>-rank00001.pt      shard for bf16/fp16 models) and the replicated per-layer vectors
    ...
    <token>-model.pt          the model's state_dict, written by rank 0 (when a model is given)

``<token>`` is fresh for every save, so saving again into the same directory never
overwrites a file the current manifest names: a save that dies half-way leaves the
previous checkpoint loadable, and the new manifest replaces the old one atomically.
Before any other file, rank 0 writes ``<token>-pending.json``, a record of the save's
token and of the files the manifest it replaces names; once the new manifest is
published, exactly those files (and those of recorded saves that died) are removed,
then the records. A file that no record names is never removed, whatever its name.
Every name a manifest lists must be a plain file name that resolves inside the
directory; :func:`load` refuses anything else (a path, ``..``, a symbolic link out).
Every file is written to a temporary name, fsynced and renamed; the manifest records
each file's size and SHA-256, which :func:`load` verifies before reading it.

:func:`load` reads the layout the checkpoint was saved with from the manifest and
reads, for this rank's range of the flat index space, only the old rank files that
overlap it. Layers are concatenated in the same order at every world size, so the
flat index space is the same and only the cut points (and the padding at the end)
move; the copy is exact, bit for bit.

Nothing is unpickled: tensors are read with ``torch.load(weights_only=True)`` and the
manifest is JSON. Every check that can fail runs before anything changes, and its
outcome is agreed on all ranks: a rank that finds a problem makes every rank raise
:class:`CheckpointError`, naming the rank and the problem, instead of leaving the
others waiting in a collective.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import collectives as C
from .functional import validate_hyperparameters
from .layout import ShardLayout

__all__ = ["CheckpointError", "save", "load", "is_complete", "latest", "read_manifest",
           "export_consolidated", "model_state_dict", "MANIFEST", "FORMAT", "FORMAT_VERSION"]

MANIFEST = "manifest.json"
FORMAT = "sharded-novograd-checkpoint"
FORMAT_VERSION = 1
# A save's record of its token, written by rank 0 before any file of that save: the files
# it names (those of the token, the manifest it replaces) are removed once a newer
# manifest is published, even if that save died.
_PENDING = re.compile(r"^([0-9a-f]{16})-pending\.json$")
_VECTORS = ("exp_avg_sq", "step", "max_exp_avg_sq")


logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; raised on every rank with the same message."""


class _Problem(Exception):
    """A local validation failure, reported to every rank before raising."""


# ---------------------------------------------------------------------------- files
def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_tensors(path: str, obj: Dict) -> Tuple[str, int]:
    """Write ``obj`` with torch.save to a temporary name, fsync, rename; return (sha256, bytes)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    digest, size = _sha256(tmp), os.path.getsize(tmp)
    os.replace(tmp, path)
    return digest, size


def _write_text(path: str, text: str) -> None:
    """Write ``text`` to a temporary name, fsync, rename, fsync the directory."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _json_text(obj: Dict) -> str:
    return json.dumps(obj, indent=1, allow_nan=False) + "\n"


def _write_json(path: str, obj: Dict) -> str:
    """Write ``obj`` as JSON (atomically, as :func:`_write_text`); return the text written."""
    text = _json_text(obj)
    _write_text(path, text)
    return text


def _plain_name(name) -> bool:
    """Whether ``name`` names an entry of a directory itself: no path, no '..', not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
            and not any(sep and sep in name for sep in ("/", os.sep, os.altsep)) and not os.path.isabs(name))


def _check_file_names(directory: str, m: Dict) -> None:
    """Every file the manifest names must resolve inside ``directory`` (symbolic links included)."""
    root = os.path.realpath(directory)
    for e in m["files"]:
        name = e["name"]
        if not _plain_name(name):
            raise _Problem(f"{MANIFEST} in {directory} names the file {name!r}, which is not a plain file name "
                           "(a path, '..' or an absolute path); a checkpoint's files must lie in its directory, "
                           "refusing to read outside it")
        real = os.path.realpath(os.path.join(directory, name))
        if os.path.commonpath([root, real]) != root:
            raise _Problem(f"{MANIFEST} in {directory} names the file {name}, a symbolic link to {real}, outside "
                           "the checkpoint directory; refusing to read outside it")


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns exactly its elements (torch.save writes whole storages)."""
    t = t.detach().to("cpu")
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _read_verified(directory: str, entry: Dict) -> Dict:
    """Check a file against its manifest entry (presence, size, SHA-256), then load its tensors."""
    name = entry["name"]
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise _Problem(f"missing file {name} (listed in the manifest)")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        what = "truncated" if size < entry["bytes"] else "has the wrong size"
        raise _Problem(f"file {name} is {what}: {size} bytes, the manifest records {entry['bytes']}")
    digest = _sha256(path)
    if digest != entry["sha256"]:
        raise _Problem(f"checksum mismatch in {name}: SHA-256 {digest[:16]}..., the manifest records "
                       f"{entry['sha256'][:16]}... (the file is corrupt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse is a corrupt file
        raise _Problem(f"file {name} cannot be read as a tensor file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise _Problem(f"file {name} is not a {FORMAT} file")
    return obj


# ---------------------------------------------------------------------------- JSON
def _to_json(value, where: str):
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _to_json(value.item(), where)
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _to_json(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise _Problem(f"cannot store {where}={value!r} ({type(value).__name__}) in the manifest: values must be "
                   "numbers, strings, bools, None, or lists and dicts of them")


def _from_json(value):
    if isinstance(value, dict) and set(value) == {"float"}:
        return float(value["float"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------- manifest
def read_manifest(directory) -> Dict:
    """The manifest of the checkpoint in ``directory``; raises :class:`CheckpointError` if it
    is absent (the checkpoint is incomplete) or malformed. Reads no tensor file."""
    try:
        return _read_manifest(os.fspath(directory))
    except _Problem as e:
        raise CheckpointError(str(e)) from None


def _read_manifest(directory: str) -> Dict:
    if not os.path.isdir(directory):
        raise _Problem(f"checkpoint directory {directory} does not exist")
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise _Problem(f"incomplete checkpoint: {directory} has no {MANIFEST} (a save did not finish, or "
                       "this is not a checkpoint directory)")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise _Problem(f"{MANIFEST} in {directory} is not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _Problem(f"{MANIFEST} in {directory} is not a {FORMAT} manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise _Problem(f"checkpoint format version {m.get('format_version')!r} is not supported "
                       f"(this library reads version {FORMAT_VERSION})")
    try:
        lay = m["layout"]
        old = ShardLayout(tuple(tuple(s) for s in lay["shapes"]), m["world_size"], lay["align"])
        consistent = (list(old.offsets) == lay["offsets"] and old.shard_size == lay["shard_size"]
                      and old.total == lay["total"])
        ranks = [e for e in m["files"] if e["kind"] == "rank"]
        consistent = consistent and sorted(e["rank"] for e in ranks) == list(range(old.world_size))
        consistent = consistent and len(m["layers"]) == old.num_layers
    except (KeyError, TypeError, ValueError) as e:
        raise _Problem(f"{MANIFEST} in {directory} is malformed ({type(e).__name__}: {e})") from e
    if not consistent:
        raise _Problem(f"{MANIFEST} in {directory} is inconsistent: its layout, layers or file list do not "
                       "match its shapes and world size")
    _check_file_names(directory, m)
    return m


def is_complete(directory) -> bool:
    """Whether ``directory`` holds a checkpoint whose save finished (its manifest is present
    and well formed). File checksums are verified by :func:`load`, not here."""
    try:
        _read_manifest(os.fspath(directory))
        return True
    except _Problem:
        return False


def latest(root) -> Optional[str]:
    """The complete checkpoint under ``root`` whose directory name sorts last, or None.

    Names are compared with their digit runs as numbers (``step_10`` after ``step_9``).
    Incomplete directories (a save that died) are skipped.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        return None

    def key(name):
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]

    for name in sorted(os.listdir(root), key=key, reverse=True):
        path = os.path.join(root, name)
        if os.path.isdir(path) and is_complete(path):
            return path
    return None


# ---------------------------------------------------------------------------- helpers
def _check_optimizer(optimizer) -> None:
    from .sharded import ShardedNovoGrad
    if not isinstance(optimizer, ShardedNovoGrad):
        raise TypeError(f"checkpoint.save/load take a ShardedNovoGrad, got {type(optimizer).__name__}; for a "
                        "single-process NovoGrad use torch.save(optimizer.state_dict())")
    optimizer.wait_params()  # the model's parameters are read or written next


def _layer_map(optimizer) -> List[Dict]:
    """For each layer, its index in torch's state_dict numbering and its param group."""
    where, index = {}, 0
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            where[id(p)] = (index, gi)
            index += 1
    return [{"param_index": where[id(p)][0], "group": where[id(p)][1]} for p in optimizer.layer_params]


def _norm_name(norm_type) -> str:
    return "inf" if norm_type == math.inf else "2"


def _raise_agreed(problems: List[Tuple[int, str]], what: str) -> None:
    by_message: Dict[str, List[int]] = {}
    for r, msg in problems:
        by_message.setdefault(msg, []).append(r)
    parts = [f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {msg}" for msg, rs in by_message.items()]
    raise CheckpointError(f"{what}: " + "; ".join(parts))


def _exchange(problem: Optional[str], payload: Dict, group, device, what: str) -> List[Dict]:
    """Every rank's ``payload``; if any rank has a problem, every rank raises it."""
    texts = C.all_gather_text(json.dumps({"problem": problem, **payload}), group, device)
    replies = [json.loads(t) for t in texts]
    problems = [(r, x["problem"]) for r, x in enumerate(replies) if x["problem"]]
    if problems:
        _raise_agreed(problems, what)
    return replies


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, _Problem) else f"{type(e).__name__}: {e}"


def _named_by_manifest(directory: str) -> List[str]:
    """The plain file names the manifest in ``directory`` lists; [] if there is none or it is unreadable."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            m = json.load(f)
        return [e["name"] for e in m["files"] if _plain_name(e["name"])] if m.get("format") == FORMAT else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _write_pending(directory: str, token: str) -> None:
    """Record, before any file of the save is written, what it will make obsolete."""
    record = {"format": FORMAT, "token": token, "pid": os.getpid(), "replaces": _named_by_manifest(directory)}
    _write_text(os.path.join(directory, f"{token}-pending.json"), _json_text(record))


def _remove_obsolete(directory: str, keep: set) -> None:
    """Remove what the pending records name (this save's included), then the records.

    A record names the files of its save's token and the files of the manifest that
    save was to replace; a file that nothing records (the user's, another
    checkpoint's) is never removed, whatever its name.
    """
    listing = os.listdir(directory)
    doomed, records = set(), []
    for name in listing:
        match = _PENDING.match(name)
        if not match:
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                rec = json.load(f)
            if rec["format"] != FORMAT or rec["token"] != match.group(1):
                continue
            replaces, pid = list(rec["replaces"]), rec["pid"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        own = re.compile(rf"^{match.group(1)}-(rank\d{{5,}}|model)\.pt(\.\d+\.tmp)?$")
        doomed.update(n for n in listing if own.match(n))
        doomed.update(n for n in replaces if _plain_name(n))
        doomed.add(f"{MANIFEST}.{pid}.tmp")
        records.append(name)
    for name in sorted(doomed - keep - {MANIFEST}) + records:
        path = os.path.join(directory, name)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
    _fsync_dir(directory)


# ---------------------------------------------------------------------------- save
def save(directory, optimizer, model: Optional[torch.nn.Module] = None, *,
         metadata: Optional[Dict[str, Any]] = None) -> Dict:
    """Save ``optimizer`` (and ``model``) to ``directory``. This needs to be called on all ranks.

    Every rank writes its own file; rank 0 writes the model's ``state_dict`` (the model
    is replicated, so one copy serves every world size) and, after every rank's file is
    safely on disk, the manifest. Saving into a directory that already holds a
    checkpoint replaces it atomically when the new manifest is written; then the files
    of the replaced checkpoint (and of earlier saves here that died) are removed, and
    no other file.

    Args:
        directory: the checkpoint directory (created if needed).
        optimizer: a :class:`~sharded_novograd.ShardedNovoGrad`.
        model: a module whose ``state_dict`` to save with it (default: None)
        metadata: JSON-serialisable user data stored in the manifest, e.g. the
            training step; rank 0's is stored (default: None)

    Returns:
        the manifest as written on disk by rank 0 (what :func:`read_manifest` returns),
        identical on every rank.

    Raises:
        CheckpointError: on every rank, if any rank failed; the previous checkpoint in
            ``directory``, if any, is left in place.
    """
    _check_optimizer(optimizer)
    directory = os.fspath(directory)
    group, device, rank = optimizer.process_group, optimizer.device, optimizer.rank
    what = f"cannot save checkpoint {directory}"

    # Phase 1: local preparation, and rank 0's token for this save's file names.
    problem, token, sd = None, uuid.uuid4().hex[:16], None
    try:
        sd = optimizer.state_dict()
        groups = [{k: _to_json(v, f"param_groups[{i}][{k!r}]") for k, v in g.items()}
                  for i, g in enumerate(sd["param_groups"])]
        if metadata is not None and not isinstance(metadata, dict):
            raise _Problem(f"metadata must be a dict, got {type(metadata).__name__}")
        user = None if metadata is None else _to_json(metadata, "metadata")
        os.makedirs(directory, exist_ok=True)
        if rank == 0:
            _write_pending(directory, token)
    except Exception as e:  # noqa: BLE001 - every failure must reach every rank
        problem = _describe(e)
    token = _exchange(problem, {"token": token}, group, device, what)[0]["token"]

    # Phase 2: every rank writes its file (rank 0 also the model's).
    records, problem = [], None
    try:
        st = sd["state"]
        payload = {"format": FORMAT, "token": token, "rank": rank, "world_size": optimizer.world_size,
                   "exp_avg": _compact(st["exp_avg"]), "skipped_steps": int(st["skipped_steps"])}
        for key in _VECTORS:
            payload[key] = _compact(st[key])
        if "master_weight" in st:
            payload["master_weight"] = _compact(st["master_weight"])
        name = f"{token}-rank{rank:05d}.pt"
        digest, size = _write_tensors(os.path.join(directory, name), payload)
        records.append({"name": name, "kind": "rank", "rank": rank, "sha256": digest, "bytes": size})
        if rank == 0 and model is not None:
            name = f"{token}-model.pt"
            digest, size = _write_tensors(os.path.join(directory, name),
                                          {"format": FORMAT, "token": token, "model": model.state_dict()})
            records.append({"name": name, "kind": "model", "sha256": digest, "bytes": size})
        _fsync_dir(directory)
    except Exception as e:  # noqa: BLE001
        problem = _describe(e)
    replies = _exchange(problem, {"records": records}, group, device, what)
    files = [rec for x in replies for rec in x["records"] if rec["kind"] == "rank"]
    files += [rec for x in replies for rec in x["records"] if rec["kind"] == "model"]

    lay = optimizer.layout
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "library_version": _library_version(), "torch_version": torch.__version__,
        "created_unix": time.time(), "token": token,
        "world_size": optimizer.world_size,
        "layout": {"shapes": [list(s) for s in lay.shapes], "numels": list(lay.numels),
                   "offsets": list(lay.offsets), "total": lay.total, "padded_total": lay.padded_total,
                   "shard_size": lay.shard_size, "align": lay.align},
        "param_dtype": str(optimizer.param_dtype), "state_dtype": str(sd["state"]["exp_avg"].dtype),
        "has_master_weight": "master_weight" in sd["state"], "has_model": model is not None,
        "norm_type": _norm_name(optimizer.norm_type), "zero_stage": optimizer.zero_stage,
        "skipped_steps": int(sd["state"]["skipped_steps"]),
        "layers": _layer_map(optimizer), "param_groups": groups, "user": user, "files": files,
    }

    # Phase 3: rank 0 publishes its manifest and removes what it made obsolete; every
    # rank then returns the bytes on disk (metadata or clocks may differ per rank).
    problem, text = None, ""
    if rank == 0:
        try:
            text = _write_json(os.path.join(directory, MANIFEST), manifest)
            _remove_obsolete(directory, {rec["name"] for rec in files})
        except Exception as e:  # noqa: BLE001
            problem = _describe(e)
    data = text.encode("utf-8")
    size = _exchange(problem, {"bytes": len(data)}, group, device, what)[0]["bytes"]
    buf = torch.zeros(size, dtype=torch.uint8)
    if rank == 0:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    buf = buf.to(device)
    C.broadcast_flat(buf, group, src=0)
    manifest = json.loads(bytes(buf.cpu().tolist()).decode("utf-8"))
    if rank == 0:
        logger.info("saved checkpoint %s: %d files, %d bytes", directory, len(files),
                    sum(rec["bytes"] for rec in files))
    return manifest


def _library_version() -> str:
    from . import __version__
    return __version__


# ---------------------------------------------------------------------------- load
def _check_compatible(m: Dict, optimizer) -> None:
    """Raise _Problem unless the checkpoint was saved from the same model and groups."""
    mine = [tuple(s) for s in optimizer.layout.shapes]
    theirs = [tuple(s) for s in m["layout"]["shapes"]]
    if mine != theirs:
        if len(mine) != len(theirs):
            raise _Problem(f"checkpoint of a different model: it has {len(theirs)} layers, the optimizer has "
                           f"{len(mine)}")
        i = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        raise _Problem(f"checkpoint of a different model: layer {i} has shape {theirs[i]} in the checkpoint "
                       f"but {mine[i]} in the optimizer")
    groups = [{k: _from_json(v) for k, v in g.items()} for g in m["param_groups"]]
    if len(groups) != len(optimizer.param_groups):
        raise _Problem(f"checkpoint has {len(groups)} param groups, the optimizer has "
                       f"{len(optimizer.param_groups)}")
    for i, (a, b) in enumerate(zip(groups, optimizer.param_groups)):
        if len(a["params"]) != len(b["params"]):
            raise _Problem(f"param group {i} has {len(a['params'])} parameters in the checkpoint, "
                           f"{len(b['params'])} in the optimizer")
        validate_hyperparameters({k: tuple(v) if k == "betas" else v for k, v in a.items()})
    if m["layers"] != _layer_map(optimizer):
        raise _Problem("checkpoint of a different model: its trainable parameters sit at other positions "
                       "in the param groups")
    if m["norm_type"] != _norm_name(optimizer.norm_type):
        raise _Problem(f"checkpoint uses norm_type={m['norm_type']}, the optimizer "
                       f"norm_type={_norm_name(optimizer.norm_type)}")


def _rank_entry(m: Dict, q: int) -> Dict:
    return next(e for e in m["files"] if e["kind"] == "rank" and e["rank"] == q)


def _check_rank_file(obj: Dict, m: Dict, q: int, old: ShardLayout) -> None:
    name = _rank_entry(m, q)["name"]
    if obj.get("token") != m["token"] or obj.get("rank") != q or obj.get("world_size") != old.world_size:
        raise _Problem(f"file {name} belongs to another save (token, rank or world size differ from the "
                       "manifest)")
    expected = {"exp_avg": old.shard_size, **{k: old.num_layers for k in _VECTORS}}
    if m["has_master_weight"]:
        expected["master_weight"] = old.shard_size
    for key, n in expected.items():
        t = obj.get(key)
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != n or not t.dtype.is_floating_point:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise _Problem(f"file {name}: {key} should be a 1-D float tensor of {n} elements, got {got}")


def _read_local(directory: str, m: Dict, optimizer) -> Dict:
    """This rank's optimizer state dict in the current layout, read from the old files and checked."""
    _check_compatible(m, optimizer)
    lay = m["layout"]
    old = ShardLayout(tuple(tuple(s) for s in lay["shapes"]), m["world_size"], lay["align"])
    new, rank = optimizer.layout, optimizer.rank
    current = optimizer.state_dict()
    dtype = current["state"]["exp_avg"].dtype
    need_master = "master_weight" in current["state"]
    lo, hi = new.shard_range(rank)
    real_hi = min(hi, new.total)
    So = old.shard_size
    # Only the old files overlapping [lo, real_hi); a rank holding padding only still
    # needs one file for the replicated per-layer vectors.
    sources = list(range(lo // So, (real_hi - 1) // So + 1)) if lo < real_hi else \
        [min(old.world_size - 1, max(0, new.total - 1) // So)]
    exp_avg = torch.zeros(new.shard_size, dtype=dtype)
    master = torch.zeros(new.shard_size, dtype=dtype) if need_master and m["has_master_weight"] else None
    vectors, skipped = None, None
    for q in sources:
        obj = _read_verified(directory, _rank_entry(m, q))
        _check_rank_file(obj, m, q, old)
        a, b = max(lo, q * So), min(real_hi, (q + 1) * So)
        if a < b:
            exp_avg[a - lo:b - lo] = obj["exp_avg"][a - q * So:b - q * So]
            if master is not None:
                master[a - lo:b - lo] = obj["master_weight"][a - q * So:b - q * So]
        mine = {k: obj[k].to(dtype) for k in _VECTORS}
        if vectors is None:
            vectors, skipped = mine, int(obj["skipped_steps"])
        elif any(not torch.equal(vectors[k], mine[k]) for k in _VECTORS):
            raise _Problem(f"the per-layer vectors differ between rank files {sources[0]} and {q}: the "
                           "checkpoint is inconsistent")
    state = {"exp_avg": exp_avg.to(optimizer.device), "skipped_steps": skipped,
             **{k: v.to(optimizer.device) for k, v in vectors.items()}}
    if master is not None:
        state["master_weight"] = master.to(optimizer.device)
    groups = [{k: _from_json(v) for k, v in g.items()} for g in m["param_groups"]]
    sd = {"state": state, "param_groups": groups, "layout": current["layout"]}
    return sd


def _read_model(directory: str, m: Dict, model: torch.nn.Module) -> Dict:
    entry = next((e for e in m["files"] if e["kind"] == "model"), None)
    if entry is None:
        raise _Problem("the checkpoint holds no model state (it was saved with model=None)")
    obj = _read_verified(directory, entry)
    sd = obj.get("model")
    if obj.get("token") != m["token"] or not isinstance(sd, dict):
        raise _Problem(f"file {entry['name']} belongs to another save or holds no model state")
    mine = model.state_dict()
    missing = [k for k in mine if k not in sd]
    unexpected = [k for k in sd if k not in mine]
    if missing or unexpected:
        raise _Problem(f"checkpoint of a different model: model keys missing from the checkpoint {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    for k, v in mine.items():
        if isinstance(v, torch.Tensor) and tuple(sd[k].shape) != tuple(v.shape):
            raise _Problem(f"checkpoint of a different model: {k} has shape {tuple(sd[k].shape)} in the "
                           f"checkpoint but {tuple(v.shape)} in the model")
    return sd


def load(directory, optimizer, model: Optional[torch.nn.Module] = None) -> Dict:
    """Load a checkpoint saved by :func:`save` at any world size. This needs to be called on all ranks.

    Restores the optimizer state (resharded to this optimizer's layout), the
    checkpoint's param-group hyperparameters (as ``load_state_dict`` does) and, when
    ``model`` is given, the model's ``state_dict``. Nothing changes on any rank unless
    every rank found what it needs, checksums included.

    Args:
        directory: a checkpoint directory written by :func:`save`.
        optimizer: a :class:`~sharded_novograd.ShardedNovoGrad` built on the same
            parameters (shapes and order) as the saved one, at any world size.
        model: the module to restore (default: None)

    Returns:
        the checkpoint's manifest (its ``"user"`` entry holds ``save``'s ``metadata``).

    Raises:
        CheckpointError: on every rank, naming the rank and the problem: no manifest
            (incomplete checkpoint), a missing, truncated or corrupt file, a checksum
            mismatch, or a checkpoint of a different model.
    """
    _check_optimizer(optimizer)
    directory = os.fspath(directory)
    group, device = optimizer.process_group, optimizer.device
    what = f"cannot load checkpoint {directory}"
    problem = manifest = sd = model_sd = None
    try:
        manifest = _read_manifest(directory)
        sd = _read_local(directory, manifest, optimizer)
        if model is not None:
            model_sd = _read_model(directory, manifest, model)
    except Exception as e:  # noqa: BLE001 - every failure must reach every rank
        problem = _describe(e)
    problems = C.agree(problem, group, device)
    if problems:
        _raise_agreed(problems, what)

    problem = None
    try:
        if model_sd is not None:
            model.load_state_dict(model_sd)
        # A checkpoint of an fp32 model carries no master weights: loaded into a bf16/fp16
        # one, load_state_dict takes them from the (just loaded) parameters.
        optimizer.load_state_dict(sd)
    except Exception as e:  # noqa: BLE001
        problem = _describe(e)
    problems = C.agree(problem, group, device)
    if problems:
        _raise_agreed(problems, f"{what} (state may be partly loaded)")
    if optimizer.rank == 0:
        logger.info("loaded checkpoint %s (saved at world size %d) at world size %d", directory,
                    manifest["world_size"], optimizer.world_size)
    return manifest


# ---------------------------------------------------------------------------- conversions
def export_consolidated(directory) -> Dict:
    """The checkpoint's optimizer state in :class:`~sharded_novograd.NovoGrad`'s format.

    Needs no process group: reads every rank file (verifying checksums) in this
    process. The result equals ``ShardedNovoGrad.consolidated_state_dict()`` at the
    time of the save; :class:`~sharded_novograd.NovoGrad` loads it, and so does
    ``ShardedNovoGrad.load_consolidated_state_dict`` at any world size. Master
    weights are not part of it (see :func:`model_state_dict` for the weights).
    """
    directory = os.fspath(directory)
    try:
        m = _read_manifest(directory)
        lay = m["layout"]
        old = ShardLayout(tuple(tuple(s) for s in lay["shapes"]), m["world_size"], lay["align"])
        parts, vectors = [], None
        for q in range(old.world_size):
            obj = _read_verified(directory, _rank_entry(m, q))
            _check_rank_file(obj, m, q, old)
            parts.append(obj["exp_avg"].clone())
            if vectors is None:
                vectors = {k: obj[k].clone() for k in _VECTORS}
    except _Problem as e:
        raise CheckpointError(f"cannot export checkpoint {directory}: {e}") from None
    flat = torch.cat(parts)
    groups = [{k: (tuple(_from_json(v)) if k == "betas" else _from_json(v)) for k, v in g.items()}
              for g in m["param_groups"]]
    steps = vectors["step"].tolist()
    state = {}
    for i, (layer, shape) in enumerate(zip(m["layers"], old.shapes)):
        if steps[i] == 0:
            continue
        off, n = old.offsets[i], old.numels[i]
        st = {"step": torch.tensor(float(steps[i])), "exp_avg": flat[off:off + n].view(shape).clone(),
              "exp_avg_sq": vectors["exp_avg_sq"][i].clone()}
        if groups[layer["group"]]["amsgrad"]:
            st["max_exp_avg_sq"] = vectors["max_exp_avg_sq"][i].clone()
        state[layer["param_index"]] = st
    return {"state": state, "param_groups": groups}


def model_state_dict(directory) -> Dict:
    """The model ``state_dict`` stored in the checkpoint, checksum verified. Needs no process group."""
    directory = os.fspath(directory)
    try:
        m = _read_manifest(directory)
        entry = next((e for e in m["files"] if e["kind"] == "model"), None)
        if entry is None:
            raise _Problem("the checkpoint holds no model state (it was saved with model=None)")
        return {k: v.clone() if isinstance(v, torch.Tensor) else v
                for k, v in _read_verified(directory, entry)["model"].items()}
    except _Problem as e:
        raise CheckpointError(f"cannot read the model state of checkpoint {directory}: {e}") from None
