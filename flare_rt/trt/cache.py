"""The engine cache: self-describing engine files, and the lookup that reuses, builds or refuses.

An engine runs only on the GPU model, TensorRT version and platform it was built on, for the bundle
and batch profile it was built from. Each engine file says so itself: ``FLRTTRT\\0``, a little-endian
uint32 length, a JSON header (the :class:`EngineKey`, the build config, when and how long it took),
then TensorRT's plan. The lookup reads headers only: an engine is used when its key equals the one
wanted, or differs only by a batch profile that covers the one wanted; otherwise (policy ``auto``)
one is built, locked against other workers building the same cache, written atomically, and the
log says what was found and why it did not fit. Policy ``never`` refuses instead (the backend is
then unavailable, and ``--backend auto`` falls back); ``force`` always rebuilds.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from .. import __version__
from ..atomic import atomic_path
from ..errors import ConfigError, EngineError
from .build import EngineConfig, build_engine, prepare_graph
from .runner import EngineRunner
from .runtime import GpuInfo, host_platform, make_logger

log = logging.getLogger(__name__)

MAGIC = b"FLRTTRT\x00"
HEADER_FORMAT = 1
_LEN = struct.Struct("<I")
#: ``auto`` (build when no cached engine fits), ``never`` (cached or baked engines only), ``force``.
POLICIES = ("auto", "never", "force")
POLICY_ENV = "FLARE_RT_ENGINE_BUILD"


def policy_from_env() -> str:
    policy = os.environ.get(POLICY_ENV, "auto").strip().lower() or "auto"
    if policy not in POLICIES:
        raise ConfigError(f"${POLICY_ENV}={policy!r}: must be one of {POLICIES}")
    return policy


@dataclass(frozen=True)
class EngineKey:
    gpu: str
    compute_capability: str
    tensorrt: str
    platform: str
    bundle_sha256: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int

    @classmethod
    def from_dict(cls, d: dict) -> EngineKey:
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def sm(self) -> str:
        return GpuInfo(self.gpu, self.compute_capability).sm

    def describe(self) -> str:
        return (f"{self.precision}, batch {self.min_batch}/{self.opt_batch}/{self.max_batch}, {self.gpu} ({self.sm}), "
                f"TensorRT {self.tensorrt}, {self.platform}, bundle {self.bundle_sha256[:12]}")

    def differences(self, wanted: EngineKey) -> list[str]:
        """What makes this engine's key differ from ``wanted`` (the machine's), in words."""
        out = []
        if (self.gpu, self.compute_capability) != (wanted.gpu, wanted.compute_capability):
            out.append(f"GPU {self.gpu} ({self.sm}), here {wanted.gpu} ({wanted.sm})")
        if self.tensorrt != wanted.tensorrt:
            out.append(f"TensorRT {self.tensorrt}, here {wanted.tensorrt}")
        if self.platform != wanted.platform:
            out.append(f"platform {self.platform}, here {wanted.platform}")
        if self.bundle_sha256 != wanted.bundle_sha256:
            out.append("another bundle")
        if self.precision != wanted.precision:
            out.append(f"{self.precision}, wanted {wanted.precision}")
        if (self.min_batch, self.opt_batch, self.max_batch) != (wanted.min_batch, wanted.opt_batch, wanted.max_batch):
            out.append(f"batch {self.min_batch}/{self.opt_batch}/{self.max_batch}, wanted "
                       f"{wanted.min_batch}/{wanted.opt_batch}/{wanted.max_batch}")
        return out

    def serves(self, wanted: EngineKey) -> bool:
        """Same GPU, TensorRT, platform, bundle and precision, and a profile covering the wanted batches."""
        same = asdict(self) | {"min_batch": 0, "opt_batch": 0, "max_batch": 0} == \
            asdict(wanted) | {"min_batch": 0, "opt_batch": 0, "max_batch": 0}
        return same and self.min_batch <= wanted.min_batch and self.max_batch >= wanted.max_batch


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_key(bundle_sha256: str, config: EngineConfig, gpu: GpuInfo, tensorrt_version: str) -> EngineKey:
    return EngineKey(gpu.name, gpu.compute_capability, tensorrt_version, host_platform(), bundle_sha256,
                     config.precision, config.min_batch, config.opt_batch, config.max_batch)


# -- the file format ---------------------------------------------------------------------------------
def write_engine(path: Path, header: dict, plan: bytes) -> Path:
    text = json.dumps(header, indent=1, sort_keys=True).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + _LEN.pack(len(text)) + text)
        f.write(plan)
    return path


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of an engine file and the offset of the plan after it."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + _LEN.size)
        if len(head) < len(MAGIC) + _LEN.size or head[:len(MAGIC)] != MAGIC:
            raise EngineError(f"{path}: not a flare-rt engine file (no header); rebuild it with 'flare-rt build-engine'")
        (n,) = _LEN.unpack(head[len(MAGIC):])
        try:
            header = json.loads(f.read(n))
            EngineKey.from_dict(header["key"])
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"{path}: damaged engine header ({exc}); rebuild it with 'flare-rt build-engine'") from exc
    return header, len(head) + n


def read_plan(path: Path) -> bytes:
    _, offset = read_header(path)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-").lower() or "x"


class EngineStore:
    """A folder of engine files (default: ``cache_dir("engines")``) and their timing caches."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def default(cls) -> EngineStore:
        from ..resources import cache_dir

        return cls(cache_dir("engines", create=False))

    def path_for(self, key: EngineKey, label: str) -> Path:
        return self.root / (f"{_slug(label)}-{key.precision}-b{key.min_batch}-{key.opt_batch}-{key.max_batch}-"
                            f"{_slug(key.gpu)}-{key.sm.replace('_', '')}-trt{key.tensorrt}-{key.digest()}.engine")

    def timing_cache_path(self, key: EngineKey) -> Path:
        return self.root / f"timing-{_slug(key.gpu)}-{key.sm.replace('_', '')}-trt{key.tensorrt}.cache"

    def entries(self) -> Iterator[tuple[Path, EngineKey]]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("*.engine")):
            try:
                header, _ = read_header(path)
            except (EngineError, OSError) as exc:
                log.debug("skipping %s: %s", path, exc)
                continue
            yield path, EngineKey.from_dict(header["key"])

    def find(self, key: EngineKey) -> tuple[Path, EngineKey] | None:
        """The engine built for ``key``, else the one whose profile covers it with the smallest maximum."""
        best = None
        for path, found in self.entries():
            if found == key:
                return path, found
            if found.serves(key) and (best is None or found.max_batch < best[1].max_batch):
                best = (path, found)
        return best

    def unfit(self, key: EngineKey) -> list[str]:
        """Why each engine here does not serve ``key`` (the start-up report of a baked image)."""
        return [f"{path.name}: {'; '.join(found.differences(key))}" for path, found in self.entries()
                if not found.serves(key)]

    @contextmanager
    def build_lock(self) -> Iterator[None]:
        """One build at a time per cache folder (several workers may start together)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            f = open(self.root / ".build.lock", "a")
        except OSError as exc:
            raise EngineError(f"cannot write engines into {self.root} ({exc.strerror}); set $FLARE_RT_CACHE to a "
                              "writable folder") from exc
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


# -- the lookup ----------------------------------------------------------------------------------------
@dataclass
class LoadedEngine:
    runner: EngineRunner
    path: Path
    key: EngineKey
    source: str  # "cache" (found: baked or built earlier) or "built" (now)
    build_seconds: float | None = None

    def describe(self) -> str:
        how = "cached" if self.source == "cache" else f"built now in {self.build_seconds:.1f}s"
        return f"engine {self.path.name} ({how})"


def build_and_save(bundle, config: EngineConfig, key: EngineKey, store: EngineStore, trt, logger) -> tuple[Path, float]:
    """Build ``bundle``'s engine for ``key`` into ``store`` (engine file + timing cache); returns its path
    and the build time."""
    model = prepare_graph(bundle.load_onnx(), bundle.meta.precision, config.precision, str(bundle.path))
    tc_path = config.timing_cache or store.timing_cache_path(key)
    timing = tc_path.read_bytes() if tc_path.is_file() else b""
    log.info("building the TensorRT engine for %s (%s)%s; this takes a while once", key.describe(), config.describe(),
             ", with a timing cache" if timing else "")
    t0 = time.perf_counter()
    plan, timing = build_engine(model.SerializeToString(), bundle.meta.input_name, config, trt, logger, timing)
    seconds = time.perf_counter() - t0
    header = {"format": HEADER_FORMAT, "key": asdict(key), "workspace_mb": config.workspace_mb,
              "bundle": bundle.path.name, "producer": f"flare-rt {__version__}", "build_seconds": round(seconds, 2),
              "built_at": datetime.now(UTC).isoformat(timespec="seconds")}
    path = write_engine(store.path_for(key, bundle.path.stem), header, plan)
    with atomic_path(tc_path) as tmp:
        tmp.write_bytes(timing)
    log.info("built %s in %.1fs (%.1f MB); timing cache %s", path, seconds, len(plan) / 1e6, tc_path.name)
    return path, seconds


def _runner(path: Path, bundle, trt, cp, logger) -> EngineRunner:
    runner = EngineRunner(read_plan(path), trt, cp, logger, where=str(path))
    meta = bundle.meta
    item = (int(meta.architecture.get("in_channels", 1)), *meta.patch_size)
    if runner.input_name != meta.input_name or runner.item_shape != item:
        raise EngineError(f"{path}: engine input {runner.input_name!r} {runner.item_shape} does not match the bundle's "
                          f"{meta.input_name!r} {item}; rebuild it with 'flare-rt build-engine {bundle.path} --force'")
    return runner


def load_engine(bundle, config: EngineConfig, *, trt, cp, gpu: GpuInfo, store: EngineStore, policy: str = "auto",
                exact: bool = False) -> LoadedEngine:
    """The runner of ``bundle``'s engine for this GPU and TensorRT: a cached (or baked) engine whose key
    fits (``exact``: equals the wanted one), else one built now (``auto``/``force``), else
    :class:`EngineError` (``never``)."""
    if policy not in POLICIES:
        raise ConfigError(f"engine build policy must be one of {POLICIES}, got {policy!r}")
    logger = make_logger(trt)
    key = make_key(file_sha256(bundle.path), config, gpu, str(trt.__version__))

    def lookup():
        hit = store.find(key)
        return None if hit is None or (exact and hit[1] != key) else hit

    broken = None
    if policy != "force":
        hit = lookup()
        if hit is not None:
            path, found = hit
            try:
                runner = _runner(path, bundle, trt, cp, logger)
                fit = "" if found == key else f" (its batch profile {found.min_batch}/{found.opt_batch}/" \
                                              f"{found.max_batch} covers {key.max_batch})"
                log.info("tensorrt: using cached engine %s%s", path, fit)
                return LoadedEngine(runner, path, found, "cache")
            except EngineError as exc:
                if policy == "never":
                    raise
                broken = path
                log.warning("%s; building a new one", exc)
        else:
            unfit = store.unfit(key)
            found = f"; engines in {store.root} that do not fit: " + " | ".join(unfit) if unfit else \
                f"; {store.root} holds no engine"
            if policy == "never":
                raise EngineError(f"no TensorRT engine for {key.describe()}{found}. Build one with 'flare-rt build-engine "
                                  f"{bundle.path} --batch-size {key.max_batch}' on this GPU, or set {POLICY_ENV}=auto")
            log.warning("tensorrt: no engine baked or cached for %s%s; building one now (one-off cost per cache "
                        "folder; bake it into the image to skip this)", key.describe(), found)
    with store.build_lock():
        hit = lookup() if policy != "force" else None  # another worker may have built it meanwhile
        if hit is not None and hit[1] == key and hit[0] != broken:
            log.info("tensorrt: engine %s was built by another worker meanwhile", hit[0])
            return LoadedEngine(_runner(hit[0], bundle, trt, cp, logger), hit[0], key, "cache")
        path, seconds = build_and_save(bundle, config, key, store, trt, logger)
        if broken is not None and broken != path:  # it claims a key it cannot serve: do not find it again
            log.info("tensorrt: removing %s (replaced by %s)", broken, path.name)
            broken.unlink(missing_ok=True)
    return LoadedEngine(_runner(path, bundle, trt, cp, logger), path, key, "built", seconds)
