"""FastTalk LLM service: WebSocket conversations streamed token by token from an LLM engine."""

__version__ = "0.1.0"
