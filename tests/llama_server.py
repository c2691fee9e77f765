"""`python -m llama_cpp.server`, loading its model as the embedded engine does (with ggml's
extra buffer types off where the CPU reports AMX: `llamacpp.extra_buffers_default`).

    python -m tests.llama_server --model M ...   # the server's own arguments
"""

from __future__ import annotations

import runpy

from llm_service.backends.llamacpp import extra_buffers_default, model_loading

if __name__ == "__main__":
    with model_loading(extra_buffers_default()):
        runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
