"""``POST /v1/completions`` (OpenAI legacy completions), request and response."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ggufship.serve.protocol.openai_chat import (
    MaxNewTokens,
    MinP,
    RepetitionPenalty,
    StopSequences,
    StreamOptions,
    TopK,
    Usage,
)


class CompletionRequest(BaseModel):
    """OpenAI ``CreateCompletionRequest``: required fields, then the rest in the reference's order."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="model id (see /v1/models)")
    prompt: str | list[str] | list[int] = Field(description="text (or token ids) to continue")
    best_of: int | None = Field(default=None, ge=1, le=1, description="only 1 is supported")
    echo: bool | None = Field(default=False, description="prepend the prompt to the completion")
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5, description="alternatives per token (0-5)")
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=1, ge=1, le=64, description="choices; at most the server's parallel")
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 2)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = Field(default=None, max_length=0, description="not supported")
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None

    # --- ggufship extensions: TGI / vLLM parameter names (not in the OpenAI spec) ---
    max_new_tokens: MaxNewTokens = None
    stop_sequences: StopSequences = None
    repetition_penalty: RepetitionPenalty = None
    top_k: TopK = None
    min_p: MinP = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None
