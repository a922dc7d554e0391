"""Local batch server (OpenAI files + batches, Anthropic message batches, Gemini batch mode, live calls) for
tests and demos.

with LocalBatchServer(config=EmulatorConfig(polls_to_complete=3)) as server:
    client = openai.OpenAI(api_key="test", base_url=server.openai_base_url)
    claude = anthropic.Anthropic(api_key="test", base_url=server.anthropic_base_url)
    gemini = genai.Client(api_key="test", http_options={"base_url": server.gemini_base_url, "api_version": "v1beta"})
"""

from hipbatch.emulator.config import EmulatorConfig
from hipbatch.emulator.server import LocalBatchServer
from hipbatch.emulator.stats import EmulatorStats

__all__ = ["EmulatorConfig", "EmulatorStats", "LocalBatchServer"]
