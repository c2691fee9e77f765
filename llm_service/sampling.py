"""How a reply is sampled: `SamplingParams`, the one definition of every sampler setting.

A session's config holds one, the engines read it (each maps the fields onto its own request),
the `DEFAULT_*` settings build the service's default one, and a client's `start_session`
changes it through `updated()`. Each field, its type and its range are written here once, so
adding a sampler setting is one edit here and one line in each engine's mapping. Values are
checked strictly: a client's `"temperature": "hot"` or `"top_k": 2.5` is refused, not
coerced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from llm_service.errors import InvalidConfig


class SamplingParams(BaseModel):
    """Sampling and length settings for one reply, in engine-neutral names."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(2048, ge=1)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(40, ge=0)
    repeat_penalty: float = Field(1.1, gt=0, le=10)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**31), lt=2**31)
    stop: tuple[str, ...] = Field((), max_length=16, strict=False)  # a JSON list is fine

    @classmethod
    def optional_fields(cls) -> dict[str, Any]:
        """Every field as optional (`None`: not set), ranges kept: for a model of changes."""
        return {
            name: (Optional[info.annotation], FieldInfo.merge_field_infos(info, default=None))  # noqa: UP045
            for name, info in cls.model_fields.items()
        }

    @classmethod
    def names(cls) -> frozenset[str]:
        """The settings a client may change."""
        return frozenset(cls.model_fields)

    def updated(self, changes: Mapping[str, Any]) -> SamplingParams:
        """These settings with `changes` applied (a `null` leaves a field as it is); raises
        `InvalidConfig`, naming each bad field, when one is of the wrong type or out of range."""
        values = {name: value for name, value in changes.items() if value is not None}
        try:
            return SamplingParams.model_validate({**self.model_dump(), **values})
        except ValidationError as exc:
            raise InvalidConfig(f"invalid config: {describe(exc)}") from exc


def describe(exc: ValidationError, prefix: str = "") -> str:
    """pydantic's report as one line: `temperature: Input should be ...; top_k: ...`."""
    return "; ".join(
        f"{prefix}{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
    )
