"""Local batch server (OpenAI files + batches, Anthropic message batches, live calls) for tests and demos.

with LocalBatchServer(config=EmulatorConfig(polls_to_complete=3)) as server:
    client = openai.OpenAI(api_key="test", base_url=server.openai_base_url)
    claude = anthropic.Anthropic(api_key="test", base_url=server.anthropic_base_url)
"""

from hipbatch.emulator.config import EmulatorConfig
from hipbatch.emulator.server import LocalBatchServer
from hipbatch.emulator.stats import EmulatorStats

__all__ = ["EmulatorConfig", "EmulatorStats", "LocalBatchServer"]
