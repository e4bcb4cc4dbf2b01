"""Trace files: the npz archive (the primary format) and Megatron-core's router-trace JSONL.

Readers check a file's layout and return the fields of a `RoutingTrace`, whose constructor then
checks the content; writers take a trace. Keeping the type out of this module lets `RoutingTrace`
save and load itself here without an import cycle. The layouts are described in the package doc.
"""
from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .validation import TraceError

FORMAT_NAME = "moe-routing-trace"
FORMAT_VERSION = 1
_SUPPORTED_VERSIONS = (1,)
_NPZ_ARRAYS = ("step_T", "layer_T", "rank_T", "topk_ids_TK", "topk_weights_TK", "header")
_SUFFIXES = (".npz", ".jsonl")


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise TraceError(f"{path}: suffix {path.suffix!r} is not allowed; allowed: " + ", ".join(_SUFFIXES))
    return suffix


def _write_npz(trace, path: Path) -> None:
    """`trace` (a RoutingTrace) as an npz archive at `path`."""
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "num_experts": trace.num_experts,
              "top_k": trace.top_k, "source": trace.source}
    arrays = {"step_T": trace.step_T.numpy().astype(np.int32),
              "layer_T": trace.layer_T.numpy().astype(np.int32),
              "rank_T": trace.rank_T.numpy().astype(np.int32),
              "topk_ids_TK": trace.topk_ids_TK.numpy().astype(np.int32),
              "header": np.array(json.dumps(header, sort_keys=True))}
    if trace.topk_weights_TK is not None:
        arrays["topk_weights_TK"] = trace.topk_weights_TK.numpy()
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to other names
        np.savez_compressed(f, **arrays)


def _write_jsonl(trace, path: Path) -> None:
    """`trace` (a RoutingTrace) as Megatron router-trace records, one per run of equal
    (step, layer, rank)."""
    with open(path, "w") as f:
        for start, end in _runs(trace.step_T, trace.layer_T, trace.rank_T):
            ids = trace.topk_ids_TK[start:end]
            record = {"step": int(trace.step_T[start]), "stage": "pre_dispatch", "block": "decoder",
                      "layer": int(trace.layer_T[start]), "rank": int(trace.rank_T[start]),
                      "num_tokens": end - start, "topk": trace.top_k, "top_indices": ids.tolist(),
                      "num_experts": trace.num_experts}
            if trace.topk_weights_TK is not None:
                record["top_weights"] = trace.topk_weights_TK[start:end].tolist()
            f.write(json.dumps(record) + "\n")


def _runs(*columns: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of the maximal runs of equal (step, layer, rank): one JSONL record each."""
    T = columns[0].shape[0]
    if T == 0:
        return []
    change = torch.zeros(T, dtype=torch.bool)
    change[0] = True
    for c in columns:
        change[1:] |= c[1:] != c[:-1]
    starts = change.nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [T]))


def _read_npz(path: Path) -> dict:
    """The RoutingTrace fields stored in an npz trace, after checking the archive's layout."""
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # zip / pickle errors: not an npz written by us
        raise TraceError(f"{path}: not a readable .npz archive ({e})") from None
    with archive:
        names = set(archive.files)
        unknown = sorted(names - set(_NPZ_ARRAYS))
        if unknown:
            raise TraceError(f"{path}: unknown array {unknown[0]!r}; allowed: {', '.join(_NPZ_ARRAYS)}")
        missing = [n for n in _NPZ_ARRAYS if n not in names and n != "topk_weights_TK"]
        if missing:
            raise TraceError(f"{path}: missing array {missing[0]!r}; a trace needs "
                             + ", ".join(n for n in _NPZ_ARRAYS if n != "topk_weights_TK"))
        try:
            header = json.loads(str(_member(archive, "header", path)))
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise TraceError(f"{path}: header must be a JSON object, got {type(header).__name__}")
        if header.get("format") != FORMAT_NAME:
            raise TraceError(f"{path}: header format {header.get('format')!r} is not allowed; "
                             f"expected {FORMAT_NAME!r}")
        version = header.get("version")
        if version not in _SUPPORTED_VERSIONS:
            raise TraceError(f"{path}: trace format version {version!r} is not supported; supported: "
                             + ", ".join(map(str, _SUPPORTED_VERSIONS)))
        for key in ("num_experts", "top_k"):
            if key not in header:
                raise TraceError(f"{path}: header lacks {key!r}")
        arrays = {n: _member(archive, n, path) for n in names if n != "header"}
    for name, arr in arrays.items():
        if name == "topk_weights_TK":
            if arr.dtype != np.float32:
                raise TraceError(f"{path}: {name} has dtype {arr.dtype}; expected float32")
        elif arr.dtype != np.int32:
            raise TraceError(f"{path}: {name} has dtype {arr.dtype}; expected int32")
    ids = arrays["topk_ids_TK"]
    if ids.ndim != 2 or ids.shape[1] != header["top_k"]:
        raise TraceError(f"{path}: topk_ids_TK has shape {ids.shape}; expected [T, top_k={header['top_k']}]")
    return dict(step_T=torch.from_numpy(arrays["step_T"]), layer_T=torch.from_numpy(arrays["layer_T"]),
                rank_T=torch.from_numpy(arrays["rank_T"]), topk_ids_TK=torch.from_numpy(ids),
                topk_weights_TK=_maybe_tensor(arrays.get("topk_weights_TK")),
                num_experts=header["num_experts"], source=header.get("source", {}))


def _member(archive, name: str, path: Path) -> np.ndarray:
    """One array of an open npz archive; a damaged member (bad CRC, truncated, an object array)
    raises TraceError naming the file and the array."""
    try:
        return archive[name]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise TraceError(f"{path}: array {name!r} cannot be read ({e})") from None


def _read_jsonl(path: Path, num_experts: int | None, block: str) -> dict:
    """The RoutingTrace fields of the `block` records in a Megatron router-trace file, after
    checking each record."""
    steps, layers, ranks, ids, weights = [], [], [], [], []
    record_E, mtp_heads, any_weights, all_weights = set(), set(), False, True
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TraceError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise TraceError(f"{where}: a record must be a JSON object")
            if rec.get("block", "decoder") != block:
                continue
            for key in ("mtp_idx", "num_tokens", "topk", "num_experts"):
                if key in rec and (isinstance(rec[key], bool) or not isinstance(rec[key], int)):
                    raise TraceError(f"{where}: {key}={rec[key]!r} is not allowed; expected an integer")
            if "mtp_idx" in rec:
                mtp_heads.add(rec["mtp_idx"])
            for key in ("step", "layer", "rank", "top_indices"):
                if key not in rec:
                    raise TraceError(f"{where}: record lacks {key!r}; a router-trace record needs "
                                     "step, layer, rank, top_indices")
            for key in ("step", "layer", "rank"):
                if isinstance(rec[key], bool) or not isinstance(rec[key], int) or rec[key] < 0:
                    raise TraceError(f"{where}: {key}={rec[key]!r} is not allowed; expected an integer >= 0")
            top = _jsonl_matrix(rec["top_indices"], np.int64, where, "top_indices")
            n = top.shape[0]
            if "num_tokens" in rec and rec["num_tokens"] != n:
                raise TraceError(f"{where}: num_tokens={rec['num_tokens']} but top_indices has {n} rows")
            if "topk" in rec and n and rec["topk"] != top.shape[1]:
                raise TraceError(f"{where}: topk={rec['topk']} but top_indices rows have {top.shape[1]} ids")
            if "num_experts" in rec:
                record_E.add(rec["num_experts"])
            if "top_weights" in rec:
                w = _jsonl_matrix(rec["top_weights"], np.float32, where, "top_weights")
                if w.shape != top.shape:
                    raise TraceError(f"{where}: top_weights has shape {w.shape}, top_indices {top.shape}")
                any_weights = True
            else:
                w, all_weights = None, False
            steps.append(np.full(n, rec["step"]))
            layers.append(np.full(n, rec["layer"]))
            ranks.append(np.full(n, rec["rank"]))
            ids.append(top)
            weights.append(w)
    if len(mtp_heads) > 1:
        raise TraceError(f"{path}: block {block!r} mixes MTP heads {sorted(mtp_heads)}, whose layer "
                         "numbers collide; split the file by mtp_idx first")
    if any_weights and not all_weights:
        raise TraceError(f"{path}: some records carry top_weights and some do not; expected all or none")
    if len(record_E) > 1:
        raise TraceError(f"{path}: records disagree on num_experts: {sorted(record_E)}")
    K = max((a.shape[1] for a in ids if a.shape[0]), default=1)
    ids_TK = np.concatenate([_pad_np(a, K, -1) for a in ids]) if ids else np.zeros((0, K), np.int64)
    weights_TK = np.concatenate([_pad_np(w, K, 0.0) for w in weights]) if all_weights and weights else None
    source = {"kind": "megatron_jsonl", "path": str(path), "block": block}
    if num_experts is None:
        if record_E:
            num_experts = record_E.pop()
        else:
            num_experts = max(int(ids_TK.max()) + 1 if ids_TK.size else 1, 1)
            source["num_experts_inferred"] = True
    elif record_E and record_E != {num_experts}:
        raise TraceError(f"{path}: num_experts={num_experts} given, but the records say {record_E.pop()}")
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
    return dict(step_T=torch.from_numpy(cat(steps)), layer_T=torch.from_numpy(cat(layers)),
                rank_T=torch.from_numpy(cat(ranks)), topk_ids_TK=torch.from_numpy(ids_TK),
                topk_weights_TK=None if weights_TK is None else torch.from_numpy(weights_TK),
                num_experts=num_experts, source=source)


def _maybe_tensor(arr):
    return None if arr is None else torch.from_numpy(arr)


def _jsonl_matrix(rows, dtype, where: str, key: str) -> np.ndarray:
    if not isinstance(rows, list) or any(not isinstance(r, list) for r in rows):
        raise TraceError(f"{where}: {key} must be a list of lists")
    if not rows:
        return np.zeros((0, 0), dtype)
    if len({len(r) for r in rows}) != 1:
        raise TraceError(f"{where}: {key} rows have different lengths")
    arr = np.asarray(rows)
    if dtype == np.int64 and arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TraceError(f"{where}: {key} must hold integers, got {arr.dtype}")
    if dtype == np.float32 and arr.size and not np.issubdtype(arr.dtype, np.number):
        raise TraceError(f"{where}: {key} must hold numbers, got {arr.dtype}")
    return arr.astype(dtype)


def _pad_np(a: np.ndarray, K: int, fill) -> np.ndarray:
    if a.shape[1] == K:
        return a
    out = np.full((a.shape[0], K), fill, dtype=a.dtype)
    out[:, :a.shape[1]] = a
    return out
