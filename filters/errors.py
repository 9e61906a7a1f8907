"""The one error filters/ raises for a model it cannot load: `ModelLoadError`.

Its message is one line that names the kiln flag, the path or id, what is wrong and what to do:

    --nsfw-head /m/head.pt: a pickle that carries code (...) is refused because loading it could run
    that code; convert it to safetensors on a machine you trust (...), or pass --nsfw off

filters/ imports nothing from pipeline/ (docs/DESIGN.md), so this is not a
`pipeline.errors.UserError` itself: `pipeline.model_stages`' loaders re-raise it as
`pipeline.model_stages.ModelError` (a UserError), which the `kiln` command prints as that one line
(exit 2). It subclasses ValueError, so plain library callers catch it as they always could. Only
the failures of the user's model spec or files become one; a bug in kiln keeps its own exception
and traceback. Standard library only: importing this costs nothing.
"""

from __future__ import annotations

__all__ = ["ModelLoadError"]


class ModelLoadError(ValueError):
    """`flag` (e.g. "--clip-model") `spec` (the path or id given): `problem`; `todo` -- one line.

    The four parts are the exception's args, so it pickles (a Beam worker may send it across
    processes) and a caller can read them: `err.flag`, `err.spec`, `err.problem`, `err.todo`."""

    def __init__(self, flag: str, spec: object, problem: str, todo: str):
        super().__init__(flag, str(spec), problem, todo)

    flag = property(lambda self: self.args[0])
    spec = property(lambda self: self.args[1])
    problem = property(lambda self: self.args[2])
    todo = property(lambda self: self.args[3])

    def __str__(self) -> str:
        return " ".join(f"{self.flag} {self.spec}: {self.problem}; {self.todo}".split())
