"""Device bundles: `manifest.json` (schema version 2, or 3 with a shared expert; 1 is still read) plus model files,
verified before any use.

`load_bundle` checks the schema version, every field, and the size and sha256 of every listed file
before it returns; any problem raises one `BundleError` naming the file and the problem, and no
`Bundle` exists. The field-by-field contract is docs/bundle.md. numpy only (runs on devices).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

SCHEMA_VERSION = 2  # what writers write for a bundle without a shared expert
SHARED_EXPERT_SCHEMA_VERSION = 3  # ... and with one (the `shared_expert` field, the shared_expert role)
READABLE_SCHEMA_VERSIONS = (1, 2, 3)  # 1: no model_version field, it is provenance.config_hash
MAX_MODEL_VERSION_BYTES = 255  # the wire protocol's short text
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
ROLES = ("extractor", "gate", "expert", "shared_expert")
PRECISIONS = ("fp32", "int8")
ROUTINGS = ("gate", "random")
SHARED_EXPERT_MODES = ("routed", "fallback")  # a gate output of its own / weight s(z) from the OOD score
OOD_KEYS = ("means", "precision", "tau", "spread", "temperature")  # ood.npz
DTYPES = ("float32", "int8", "uint8")
LAYOUTS = ("NCHW",)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_T = TypeVar("_T")


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and the problem."""


class _Malformed(ValueError):
    """A manifest field is missing or wrong (message starts with the dotted key)."""


@dataclass(frozen=True)
class Quantization:
    """Affine int8 parameters of a tensor: real = (q - zero_point) * scale."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output; a string dimension is dynamic (e.g. "batch")."""

    name: str
    shape: list[int | str]
    dtype: str
    quantization: Quantization | None = None


@dataclass(frozen=True)
class ModelEntry:
    """One model file of the bundle."""

    role: str
    format: str
    precision: str
    file: str
    sha256: str
    bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass(frozen=True)
class InputSpec:
    """What the extractor is fed: raw images and how to normalize them."""

    shape: list[int]  # [C, H, W], no batch
    dtype: str
    scale: float
    mean: list[float]
    std: list[float]
    layout: str


@dataclass(frozen=True)
class SamplesRef:
    """A tensors file of the bundle (samples.npz, ood.npz)."""

    file: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class SharedExpert:
    """Schema 3: an expert every device holds and runs itself (never asked over MQTT), with expert index
    `index` (= num_experts). Mode "routed": it is the gate's last output (num_experts + 1 outputs);
    "fallback": the gate has num_experts outputs and the shared expert gets weight s(z), the OOD score
    of `ood`, the gate's top-k the rest."""

    index: int
    local: bool  # always true: the device runs it in-process
    mode: str = "routed"
    ood: SamplesRef | None = None  # mode "fallback": ood.npz


@dataclass(frozen=True)
class Manifest:
    """manifest.json (schema version 2, or 1 read as 2)."""

    schema_version: int
    model_version: str | None  # peers serve each other only at the same version; None: a v1 bundle without one
    device_id: str
    expert_id: int
    num_experts: int
    top_k: int
    latent_dim: int
    num_classes: int
    class_names: list[str]
    routing: str
    input: InputSpec
    models: list[ModelEntry]
    provenance: dict[str, Any]
    samples: SamplesRef | None
    shared_expert: SharedExpert | None = None  # schema 3 only

    @property
    def gate_outputs(self) -> int:
        """Routing targets: the fleet's experts, plus the shared expert when there is one."""
        return self.num_experts + (self.shared_expert is not None and self.shared_expert.mode == "routed")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to manifest.json."""
        fields = dataclasses.asdict(self)
        if self.shared_expert is None:
            del fields["shared_expert"]  # schema 1/2 have no such field
        return fields


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder."""

    path: Path
    manifest: Manifest

    def model(self, role: str, precision: str, format: str = "onnx") -> ModelEntry:
        """The entry for one role/precision/format; BundleError when the bundle lacks it."""
        for entry in self.manifest.models:
            if (entry.role, entry.precision, entry.format) == (role, precision, format):
                return entry
        have = ", ".join(f"{e.role} {e.precision} {e.format}" for e in self.manifest.models)
        raise BundleError(f"{self.path / MANIFEST}: no {role} {precision} {format} model (has: {have})")

    def model_bytes(self, entry: ModelEntry) -> bytes:
        """The model file's content, verified again against the manifest."""
        return _read_verified(self.path / entry.file, entry.sha256, entry.bytes)

    def samples(self) -> dict[str, np.ndarray]:
        """The self-check samples: uint8 `images`, `labels` and expected fp32 outputs."""
        ref = self.manifest.samples
        if ref is None:
            raise BundleError(f"{self.path / MANIFEST}: this bundle has no samples")
        return self._tensors(ref)

    def ood_tensors(self) -> dict[str, np.ndarray]:
        """The OOD score's tensors (ood.npz) of a shared expert in mode "fallback"."""
        shared = self.manifest.shared_expert
        if shared is None or shared.ood is None:
            raise BundleError(f"{self.path / MANIFEST}: this bundle has no OOD score")
        return self._tensors(shared.ood)

    def _tensors(self, ref: SamplesRef) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(_read_verified(self.path / ref.file, ref.sha256, ref.bytes)),
                     allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle folder (manifest fields, then every file's size and sha256)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        with manifest_path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise BundleError(f"{manifest_path}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        obj = json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{manifest_path}: not valid JSON ({e})") from None
    try:
        manifest = _parse_manifest(obj)
    except _Malformed as e:
        raise BundleError(f"{manifest_path}: {e}") from None
    refs = [(e.file, e.sha256, e.bytes) for e in manifest.models]
    shared = manifest.shared_expert
    for ref in (manifest.samples, None if shared is None else shared.ood):
        if ref is not None:
            refs.append((ref.file, ref.sha256, ref.bytes))
    for file, sha256, size in refs:
        _verify_file(path / file, sha256, size)
    return Bundle(path, manifest)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's content."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _verify_file(path: Path, sha256: str, size: int) -> None:
    if not path.is_file():
        raise BundleError(f"{path}: listed in {MANIFEST} but missing")
    actual = path.stat().st_size
    if actual != size:
        raise BundleError(f"{path}: {actual} bytes, {MANIFEST} says {size} (truncated or replaced)")
    digest = file_sha256(path)
    if digest != sha256:
        raise BundleError(f"{path}: sha256 {digest} does not match {MANIFEST} ({sha256}): corrupted or tampered")


def _read_verified(path: Path, sha256: str, size: int) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
        raise BundleError(f"{path}: changed since the bundle was loaded (size or sha256 mismatch)")
    return data


# ---- manifest parsing ------------------------------------------------------------------------

def _parse_manifest(obj: object) -> Manifest:
    """Validate a decoded manifest.json; raises _Malformed naming the dotted key."""
    m = _obj(obj, "manifest")
    version = _get(m, "schema_version", "", _int)
    if version not in READABLE_SCHEMA_VERSIONS:
        *older, last = map(str, READABLE_SCHEMA_VERSIONS)
        readable = f"{', '.join(older)} and {last}"
        raise _Malformed(f"schema_version {version} is not supported (this agent reads schema_version "
                         f"{readable}); export the bundle again with a matching nmoe-edge")
    provenance = _get(m, "provenance", "", _obj)
    num_experts = _get(m, "num_experts", "", _positive)
    num_classes = _get(m, "num_classes", "", _positive)
    class_names = _get(m, "class_names", "", _list_of(_str))
    if len(class_names) != num_classes:
        raise _Malformed(f"class_names: {len(class_names)} names for num_classes={num_classes}")
    expert_id = _get(m, "expert_id", "", _int)
    if not 0 <= expert_id < num_experts:
        raise _Malformed(f"expert_id: {expert_id} is not in [0, num_experts={num_experts})")
    top_k = _get(m, "top_k", "", _positive)
    if top_k > num_experts:
        raise _Malformed(f"top_k: {top_k} is more than num_experts={num_experts}")
    models = _get(m, "models", "", _list_of(_model_entry))
    routing = _get(m, "routing", "", _choice(ROUTINGS))
    shared = _get(m, "shared_expert", "", _shared_expert) if version >= SHARED_EXPERT_SCHEMA_VERSION else None
    if shared is not None:
        if shared.index != num_experts:
            raise _Malformed(f"shared_expert.index: {shared.index}, must be num_experts={num_experts} "
                             "(the gate's last output)")
        if routing != "gate":
            raise _Malformed(f"shared_expert: needs routing \"gate\", got {routing!r}")
    _check_models(models, routing, shared is not None)
    samples = m.get("samples")
    return Manifest(
        schema_version=version, model_version=_model_version(m, provenance, version),
        device_id=_get(m, "device_id", "", _str), expert_id=expert_id,
        num_experts=num_experts, top_k=top_k, latent_dim=_get(m, "latent_dim", "", _positive),
        num_classes=num_classes, class_names=class_names, routing=routing,
        input=_get(m, "input", "", _input_spec), models=models, provenance=provenance,
        samples=None if samples is None else _samples_ref(samples, "samples"), shared_expert=shared)


def _model_version(m: dict[str, Any], provenance: dict[str, Any], schema_version: int) -> str | None:
    """v2: the `model_version` field; v1: provenance.config_hash when usable as one, else None."""
    if schema_version >= 2:
        return _get(m, "model_version", "", _version_text)
    try:
        return _version_text(provenance.get("config_hash"), "provenance.config_hash")
    except _Malformed:
        return None


def _check_models(models: list[ModelEntry], routing: str, shared: bool) -> None:
    """Unique files and (role, format, precision); every exported variant is a complete set."""
    files = [e.file for e in models]
    if len(set(files)) != len(files):
        raise _Malformed(f"models: a file is listed twice ({files})")
    keys = [(e.role, e.format, e.precision) for e in models]
    if len(set(keys)) != len(keys):
        raise _Malformed("models: a role/format/precision is listed twice")
    needed = {"extractor", "expert"} | ({"gate"} if routing == "gate" else set()) | ({"shared_expert"} if shared else set())
    for fmt, precision in {(f, p) for _, f, p in keys}:
        roles = {r for r, f, p in keys if (f, p) == (fmt, precision)}
        if roles != needed:
            raise _Malformed(f"models: {fmt} {precision} has roles {sorted(roles)}, routing {routing!r} "
                             f"needs {sorted(needed)}")


def _model_entry(obj: object, where: str) -> ModelEntry:
    m = _obj(obj, where)
    return ModelEntry(
        role=_get(m, "role", where, _choice(ROLES)), format=_get(m, "format", where, _str),
        precision=_get(m, "precision", where, _choice(PRECISIONS)), file=_get(m, "file", where, _file),
        sha256=_get(m, "sha256", where, _sha256), bytes=_get(m, "bytes", where, _nonnegative),
        inputs=_get(m, "inputs", where, _list_of(_tensor_spec)),
        outputs=_get(m, "outputs", where, _list_of(_tensor_spec)))


def _shared_expert(obj: object, where: str) -> SharedExpert:
    m = _obj(obj, where)
    if m.get("local") is not True:
        raise _Malformed(f"{where}.local: must be true (a device runs its shared expert itself), got {m.get('local')!r}")
    mode = _get(m, "mode", where, _choice(SHARED_EXPERT_MODES))
    ood = m.get("ood")
    if (mode == "fallback") != (ood is not None):
        raise _Malformed(f"{where}.ood: mode {mode!r} needs {'an' if mode == 'fallback' else 'no'} OOD score file")
    return SharedExpert(_get(m, "index", where, _nonnegative), True, mode,
                        None if ood is None else _samples_ref(ood, f"{where}.ood"))


def _tensor_spec(obj: object, where: str) -> TensorSpec:
    m = _obj(obj, where)
    q = m.get("quantization")
    return TensorSpec(name=_get(m, "name", where, _str), shape=_get(m, "shape", where, _list_of(_dim)),
                      dtype=_get(m, "dtype", where, _choice(DTYPES)),
                      quantization=None if q is None else _quantization(q, f"{where}.quantization"))


def _quantization(obj: object, where: str) -> Quantization:
    m = _obj(obj, where)
    scale = _get(m, "scale", where, _float)
    if not scale > 0:
        raise _Malformed(f"{where}.scale: must be > 0, got {scale}")
    return Quantization(scale, _get(m, "zero_point", where, _int))


def _input_spec(obj: object, where: str) -> InputSpec:
    m = _obj(obj, where)
    shape = _get(m, "shape", where, _list_of(_positive))
    if len(shape) != 3:
        raise _Malformed(f"{where}.shape: expected [C, H, W], got {shape}")
    mean = _get(m, "mean", where, _list_of(_float))
    std = _get(m, "std", where, _list_of(_float))
    if len(mean) != shape[0] or len(std) != shape[0] or not all(s > 0 for s in std):
        raise _Malformed(f"{where}: mean and std need {shape[0]} values each (std > 0)")
    return InputSpec(shape=shape, dtype=_get(m, "dtype", where, _choice(("uint8",))),
                     scale=_get(m, "scale", where, _float), mean=mean, std=std,
                     layout=_get(m, "layout", where, _choice(LAYOUTS)))


def _samples_ref(obj: object, where: str) -> SamplesRef:
    m = _obj(obj, where)
    return SamplesRef(_get(m, "file", where, _file), _get(m, "sha256", where, _sha256),
                      _get(m, "bytes", where, _nonnegative))


# ---- typed field access ----------------------------------------------------------------------

Check = Callable[[object, str], _T]


def _get(obj: dict[str, object], key: str, where: str, check: Check[_T]) -> _T:
    full = f"{where}.{key}" if where else key
    if key not in obj:
        raise _Malformed(f"{full}: missing")
    return check(obj[key], full)


def _obj(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Malformed(f"{where}: expected an integer, got {value!r}")
    return value


def _positive(value: object, where: str) -> int:
    n = _int(value, where)
    if n < 1:
        raise _Malformed(f"{where}: must be >= 1, got {n}")
    return n


def _nonnegative(value: object, where: str) -> int:
    n = _int(value, where)
    if n < 0:
        raise _Malformed(f"{where}: must be >= 0, got {n}")
    return n


def _float(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Malformed(f"{where}: expected a number, got {value!r}")
    return float(value)


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _Malformed(f"{where}: expected a string, got {value!r}")
    return value


def _version_text(value: object, where: str) -> str:
    """A model version: what the wire protocol carries (1..255 bytes of UTF-8)."""
    text = _str(value, where)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        size = 0
    if not 1 <= size <= MAX_MODEL_VERSION_BYTES:
        raise _Malformed(f"{where}: must be 1..{MAX_MODEL_VERSION_BYTES} bytes of UTF-8 (a model version), "
                         f"got {len(text)} characters")
    return text


def _dim(value: object, where: str) -> int | str:
    return _str(value, where) if isinstance(value, str) else _positive(value, where)


def _choice(options: tuple[str, ...]) -> Check[str]:
    def check(value: object, where: str) -> str:
        if value not in options:
            raise _Malformed(f"{where}: must be one of {', '.join(options)}, got {value!r}")
        return _str(value, where)
    return check


def _file(value: object, where: str) -> str:
    name = _str(value, where)
    if not _FILE.fullmatch(name):
        raise _Malformed(f"{where}: {name!r} is not a plain file name inside the bundle")
    return name


def _sha256(value: object, where: str) -> str:
    digest = _str(value, where)
    if not _SHA256.fullmatch(digest):
        raise _Malformed(f"{where}: expected 64 lowercase hex digits, got {digest!r}")
    return digest


def _list_of(item: Check[_T]) -> Check[list[_T]]:
    def check(value: object, where: str) -> list[_T]:
        if not isinstance(value, list):
            raise _Malformed(f"{where}: expected a list, got {type(value).__name__}")
        return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return check


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key in {keys}")
    return dict(pairs)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")
