"""``POST /v1/chat/completions`` and ``GET /v1/models`` (OpenAI), request and response models.

Fields follow the OpenAI API reference: required fields first, then the others in the
reference's (alphabetical) order. Parameters of the spec that a local llama.cpp model
cannot honour are accepted only with their neutral value (e.g. ``n=1``) so a client
gets a 400 naming them instead of silently different behaviour. Unknown fields are
accepted and logged (``extra="allow"``). ggufship's own extensions — the TGI/vLLM
parameter names — are fenced off at the end of each request model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    model_serializer,
)

# The TGI / vLLM parameter names both request models accept (declared once, so their bounds agree).
MaxNewTokens = Annotated[int | None, Field(ge=1, description="TGI name of max_tokens")]
StopSequences = Annotated[list[str] | None, Field(description="TGI name of stop")]
RepetitionPenalty = Annotated[float | None, Field(gt=0.0, le=10.0, description="1.0: off")]
TopK = Annotated[int | None, Field(ge=0, le=100_000, description="0: off")]
MinP = Annotated[float | None, Field(ge=0.0, le=1.0, description="0: off")]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = False


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    """A function call: ``arguments`` is a JSON object serialized as a string (as OpenAI sends it)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=64)
    arguments: str


class ToolCall(BaseModel):
    """One entry of an assistant message's ``tool_calls`` (request and response)."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of the conversation (system, developer, user, assistant or tool)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128, description="assistant")
    tool_call_id: str | None = Field(default=None, max_length=128, description="role tool: the answered call")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the answer must match (a llama.cpp grammar)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: call this function."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(BaseModel):
    """OpenAI ``CreateChatCompletionRequest``."""

    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    model: str = Field(description="model id (see /v1/models)")
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = Field(default=False, description="each answer token's log-probability")
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1, description="older max_completion_tokens")
    n: int | None = Field(default=1, ge=1, le=64, description="choices; at most the server's parallel")
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: int | None = Field(default=None, ge=0, le=2**32 - 2)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    parallel_tool_calls: bool | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="alternatives per token")
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None

    # --- ggufship extensions: TGI / vLLM parameter names (not in the OpenAI spec) ---
    max_new_tokens: MaxNewTokens = None
    stop_sequences: StopSequences = None
    repetition_penalty: RepetitionPenalty = None
    top_k: TopK = None
    min_p: MinP = None


class Truncation(BaseModel):
    """ggufship extension in ``usage``: what the ``truncate`` context policy dropped."""

    messages_dropped: int = 0
    prompt_tokens_dropped: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    # --- ggufship extension ---
    truncated: Truncation | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobs(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobs] | None
    refusal: list[TokenLogprobs] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class _Sparse(BaseModel):
    """Serialized without its unset (None) fields: a streamed tool call's later deltas carry only
    ``index`` and ``function.arguments`` (clients that copy ``id`` / ``name`` from every delta, as
    Dify's provider does, must not see a null there)."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionCallDelta(_Sparse):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Sparse):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ToolCallsDelta(ChoiceDelta):
    """The delta of a chunk carrying tool calls (other chunks keep the two fields of ChoiceDelta)."""

    tool_calls: list[ToolCallDelta]


class ChunkChoice(BaseModel):
    index: int
    delta: SerializeAsAny[ChoiceDelta]
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ggufship"

    # --- ggufship extension ---
    version: str | None = None
    digest: str | None = None
    quantization: str | None = None
    n_ctx: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
