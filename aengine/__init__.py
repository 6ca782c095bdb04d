"""aengine: a compact, fast LLM inference engine whose front door is a WebSocket."""

import os

# Models are local: without this, transformers may ask the Hub about a local path and wait out network timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from aengine.config import EngineConfig, ServerConfig
from aengine.engine import AsyncEngine
from aengine.llm import LLM
from aengine.types import (
    ContextLengthExceeded,
    EngineError,
    EngineStats,
    InvalidRequest,
    RequestDelta,
    RequestOutput,
    SamplingParams,
)

__all__ = ["LLM", "AsyncEngine", "EngineConfig", "ServerConfig", "SamplingParams", "RequestOutput", "RequestDelta",
           "EngineStats", "EngineError", "InvalidRequest", "ContextLengthExceeded"]
__version__ = "0.1.0"
