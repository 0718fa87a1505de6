"""The recommenders the training flows can train, by name: the only place that lists them.

A training config's `model:` section names one with `kind:` (`tiger`, `sasrec`, `asymrec`); its other keys
are that model's own config class. Adding a model = a class implementing
`models.recommender.Recommender` plus one line here.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from sidpipe.models.asymrec import AsymRecConfig, AsymRecRecommender
from sidpipe.models.genrec import GenRecConfig
from sidpipe.models.genrec_recommender import GenRecRecommender
from sidpipe.models.recommender import Recommender
from sidpipe.models.sasrec import SASRecConfig, SASRecRecommender

RECOMMENDERS: dict[str, type[Recommender]] = {
    cls.name: cls for cls in (GenRecRecommender, SASRecRecommender, AsymRecRecommender)
}

# The `model:` section of a training config: one of the registered models' configs, by `kind`.
ModelConfig = Annotated[GenRecConfig | SASRecConfig | AsymRecConfig, Field(discriminator="kind")]


def recommender_class(kind: str) -> type[Recommender]:
    return RECOMMENDERS[kind]
