import os

from pipeline.compat import ensure_torch_compat

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ensure_torch_compat()
