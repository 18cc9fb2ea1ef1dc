"""Registering handlers: every payload model is found or registration fails, and bad options
fail at registration, never later on a worker."""

from __future__ import annotations

import math
from typing import Any, Optional

import pydantic
import pytest

from jobq.registry import JobContext, PayloadInvalid, Registry


class Point(pydantic.BaseModel):
    x: int


def test_an_optional_model_annotation_validates_payloads() -> None:
    registry = Registry()

    @registry.handler("old_style")
    async def old_style(ctx: JobContext, payload: Optional[Point]) -> None: ...  # noqa: UP045

    @registry.handler("new_style")
    async def new_style(ctx: JobContext, payload: Point | None) -> None: ...

    for kind in ("old_style", "new_style"):
        assert registry[kind].payload_model is Point
        with pytest.raises(PayloadInvalid):
            registry[kind].parse_payload({"x": "not a number"})


def test_a_model_defined_in_a_function_under_postponed_annotations_validates_payloads() -> None:
    # This module uses `from __future__ import annotations`: the hint is the string "Local".
    class Local(pydantic.BaseModel):
        name: str

    registry = Registry()

    @registry.handler("local")
    async def local(ctx: JobContext, payload: Local) -> None: ...

    assert registry["local"].payload_model is Local
    assert registry["local"].parse_payload({"name": "a"}) == Local(name="a")


def test_an_annotation_that_cannot_be_resolved_fails_registration() -> None:
    registry = Registry()

    def make() -> Any:
        async def handler(ctx: JobContext, payload: NoSuchModel) -> None: ...  # type: ignore[name-defined]  # noqa: F821

        return handler

    with pytest.raises(TypeError, match="NoSuchModel"):
        registry.handler("ghost")(make())
    assert "ghost" not in registry


@pytest.mark.parametrize(
    "annotation",
    [int, list[Point], Point | int, "Point | dict[str, Any]"],
    ids=["int", "list-of-model", "model-or-int", "model-or-dict"],
)
def test_a_payload_annotation_that_is_not_one_model_or_a_dict_fails_registration(
    annotation: object,
) -> None:
    async def handler(ctx: JobContext, payload: Any) -> None: ...

    handler.__annotations__["payload"] = annotation
    with pytest.raises(TypeError, match="payload"):
        Registry().handler("odd")(handler)


@pytest.mark.parametrize(
    "annotation", [dict, dict[str, Any], Any, "dict[str, Any] | None", None], ids=str
)
def test_a_dict_or_any_annotation_takes_the_payload_as_it_is(annotation: object) -> None:
    async def handler(ctx: JobContext, payload: Any) -> None: ...

    if annotation is None:
        del handler.__annotations__["payload"]
    else:
        handler.__annotations__["payload"] = annotation
    registry = Registry()
    registry.handler("plain")(handler)
    assert registry["plain"].payload_model is None
    assert registry["plain"].parse_payload({"any": [1]}) == {"any": [1]}


@pytest.mark.parametrize("timeout", [0, -5, math.nan, math.inf], ids=str)
def test_a_timeout_that_is_not_a_positive_number_fails_registration(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        Registry().handler("t", timeout=timeout)


def test_a_handler_that_cannot_take_ctx_and_payload_fails_registration() -> None:
    registry = Registry()

    async def one(ctx: JobContext) -> None: ...

    async def three(ctx: JobContext, payload: dict[str, Any], extra: int) -> None: ...

    async def keyword_only(*, ctx: JobContext, payload: dict[str, Any]) -> None: ...

    for fn in (one, three, keyword_only):
        with pytest.raises(TypeError, match="two positional parameters"):
            registry.handler(fn.__name__)(fn)
    assert len(registry) == 0


def test_a_handler_with_defaults_or_star_args_can_register() -> None:
    registry = Registry()

    async def defaults(ctx: JobContext, payload: dict[str, Any], extra: int = 1) -> None: ...

    async def star(*args: Any) -> None: ...

    registry.handler("defaults")(defaults)
    registry.handler("star")(star)
    assert registry.kinds == ["defaults", "star"]


@pytest.mark.parametrize("kind", ["", "x" * 256, "tab\tin"], ids=["empty", "too-long", "control"])
def test_a_kind_the_queue_would_refuse_fails_registration(kind: str) -> None:
    with pytest.raises(ValueError, match="kind"):
        Registry().handler(kind)


def test_retry_bounds_that_are_negative_fail_registration() -> None:
    with pytest.raises(ValueError, match="retry_base_seconds"):
        Registry().handler("r", retry_base_seconds=-1)
    with pytest.raises(ValueError, match="retry_cap_seconds"):
        Registry().handler("r", retry_cap_seconds=math.nan)
