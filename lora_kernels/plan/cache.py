"""The plan cache on disk: one JSON file per context (GPU model, driver, CUDA, torch, Triton, lora-kernels versions,
the CUDA C++ extension built or not), entries merged under a file lock and renamed into place."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import tempfile
import threading

import torch

from .. import backends
from ..settings import settings
from .calls import Call, bucket, parse_spec
from .rules import device_index

__all__ = ["context", "cache_path", "entry_key", "read_entries", "DiskCache", "cache_for", "clear"]

_lock = threading.Lock()


def module_version(module: str) -> str:
    mod = sys.modules.get(module)
    if mod is None:
        try:
            mod = __import__(module)
        except Exception:
            return "none"
    return str(getattr(mod, "__version__", "none"))


@functools.lru_cache(maxsize=None)
def driver_version() -> str:
    try:
        import ctypes

        v = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
        return str(v.value)
    except Exception:
        return "unknown"


def context(device: torch.device) -> dict:
    """What a cached plan was measured on: a plan measured elsewhere (another GPU model, driver, CUDA, torch, Triton
    or lora-kernels version, the CUDA C++ extension present or not) is never used. The extension's state is read
    now, not once: a just-in-time build (backend='cuda') changes it within the process."""
    ext = "absent"
    if device.type == "cuda":
        from .. import cuda_ext

        ext = "built" if cuda_ext.built() else "absent"
    return dict(fixed_context(device), cuda_ext=ext)


@functools.lru_cache(maxsize=None)
def fixed_context(device: torch.device) -> dict:
    from .. import __version__

    name = torch.cuda.get_device_name(device_index(device)) if device.type == "cuda" else device.type
    return {"device": name, "cuda": torch.version.cuda or "none", "driver": driver_version() if device.type == "cuda"
            else "none", "torch": torch.__version__, "triton": module_version("triton"), "lora_kernels": __version__}


def cache_path(device: torch.device) -> str:
    """The plan cache file for `device`: one per context (GPU model and software versions)."""
    ctx = context(device)
    digest = hashlib.sha256(json.dumps(ctx, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() else "-" for c in ctx["device"]).strip("-").lower()[:40]
    return os.path.join(settings().cache_dir, f"plans-{slug}-{digest}.json")


def entry_key(family: str, call: Call) -> str:
    """The cache key of a call: the family asked for and the call, rows rounded up to a power of two."""
    return (f"{family}|{str(call.dtype).replace('torch.', '')}|M{bucket(call.M)}|K{call.K}|N{call.N}|r{call.r}|"
            f"p{int(call.dropout)}|g{call.grads}|d{int(call.deterministic)}|a{call.adapters}"
            + (f"|q{call.quant}" if call.quant else "") + ("|dora" if call.dora else "")
            + (f"|e{call.experts}" if call.experts else ""))


def read_entries(path: str, device: torch.device) -> dict:
    """The entries of a cache file; {} when it is missing. A corrupt file, or one written for another context,
    warns once and is ignored."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        backends.warn_once(f"read-{path}", f"lora_kernels: the plan cache {path} cannot be read "
                                           f"({type(e).__name__}: {e}); ignored (plans are measured again and kept in "
                                           "memory)")
        return {}
    if not isinstance(data, dict) or data.get("context") != context(device) or \
            not isinstance(data.get("entries"), dict):
        backends.warn_once(f"foreign-{path}", f"lora_kernels: the plan cache {path} was written for another GPU or "
                                              "other versions (or is damaged); ignored")
        return {}
    out = {}
    for key, e in data["entries"].items():
        try:
            out[key] = dict(e, plan=parse_spec(e["plan"]).spec)
        except (KeyError, TypeError, ValueError):
            continue  # an entry this version cannot read is skipped, the others serve
    return out


class DiskCache:
    def __init__(self, device: torch.device, path: str):
        self.device = device
        self.path = path
        self.entries = read_entries(self.path, device)

    def put(self, key: str, entry: dict) -> None:
        self.entries[key] = entry
        try:
            self._write(key, entry)
        except OSError as e:
            backends.warn_once(f"write-{self.path}", f"lora_kernels: the plan cache {self.path} cannot be written "
                                                     f"({type(e).__name__}: {e}); plans are kept in memory only")

    def _write(self, key: str, entry: dict) -> None:
        """Merge the entry into the file under an exclusive lock (two processes tuning at once keep both's
        entries), written to a temporary file and renamed over the old one (a reader never sees half a file)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with file_lock(self.path + ".lock"):
            current = read_entries(self.path, self.device)
            current[key] = entry
            self.entries.update(current)
            fd, tmp = tempfile.mkstemp(prefix=".plans-", dir=os.path.dirname(self.path))
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": 1, "context": context(self.device), "entries": current}, f, indent=1,
                              sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


@contextlib.contextmanager
def file_lock(path: str):
    try:
        import fcntl
    except ImportError:  # not POSIX: the rename alone keeps the file whole (a concurrent entry may be lost)
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_CACHES: dict = {}


def cache_for(device: torch.device) -> DiskCache:
    """The cache of `device` in the present context (a cold lookup's path: the context is read again each time)."""
    path = cache_path(device)
    c = _CACHES.get(path)
    if c is None:
        with _lock:
            c = _CACHES.get(path)
            if c is None:
                c = _CACHES[path] = DiskCache(device, path)
    return c


def clear() -> None:
    """Forget the caches read into memory (the files stay)."""
    _CACHES.clear()
