"""`python -m worker.prepare`: convert the base model once (GGUF -> safetensors, ~20 s) before the
API and the worker start, so neither races the other for it."""

from model.settings import get_settings
from worker.runtime import prepare_model

if __name__ == "__main__":
    s = get_settings()
    prepare_model(s)
    print(f"model {s.base_model} ready under {s.data_dir}")
