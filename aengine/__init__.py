"""aengine: a compact, fast LLM inference engine whose front door is a WebSocket."""

from aengine.config import EngineConfig, ServerConfig
from aengine.llm import LLM
from aengine.scheduler.request import (
                                       ContextLengthExceeded,
                                       EngineError,
                                       InvalidRequest,
                                       RequestOutput,
                                       SamplingParams,
)

__all__ = ["LLM", "EngineConfig", "ServerConfig", "SamplingParams", "RequestOutput", "EngineError",
           "InvalidRequest", "ContextLengthExceeded"]
__version__ = "0.1.0"
