"""The models kiln's stages load, as data (`registry/*.json`), and `kiln models` to fetch and verify them.

    kiln models list
    kiln models show ViT-B-32-openai
    kiln models fetch laion400m-defaults --to /models      # hub files + release URLs, sha256-checked
    kiln models verify /models                             # re-hash every file against /models/models.json

`registry.py` reads and validates the registry; `fetch.py` downloads (resumable, atomic, hashed) and
writes `DIR/models.json`; `cli.py` is the command. Standard library only at import time.
"""
